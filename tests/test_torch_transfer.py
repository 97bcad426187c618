"""Weights move from JAX to torch by DLPack on the same device, else via the host.

On CPU both live in host memory, so the DLPack path is taken and must share JAX's buffer.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deps import require

torch = require("torch")

from rl_fp16.sampling import torch_transfer  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dlpack_on_the_same_device_shares_the_buffer(dtype):
  array = jax.device_put(jnp.arange(24, dtype=jnp.float32).reshape(4, 6).T.astype(dtype) / 7)
  tensor, path = torch_transfer.jax_to_torch(array, "cpu")
  assert path == torch_transfer.DLPACK
  assert tensor.data_ptr() == array.unsafe_buffer_pointer()  # no copy
  assert tuple(tensor.shape) == array.shape and tensor.dtype == getattr(torch, jnp.dtype(
      dtype).name)
  np.testing.assert_array_equal(tensor.float().numpy(), np.asarray(array, np.float32))


def test_host_fallback_when_dlpack_fails_or_devices_differ(monkeypatch):
  array = jnp.linspace(-3, 3, 12, dtype=jnp.bfloat16).reshape(3, 4)

  def refuse(_):
    raise BufferError("no DLPack today")

  monkeypatch.setattr(torch, "from_dlpack", refuse)
  tensor, path = torch_transfer.jax_to_torch(array, "cpu")
  # (On CPU the host "copy" may still view JAX's host buffer: device_get needs no copy there.)
  assert path == torch_transfer.HOST and tensor.dtype == torch.bfloat16
  np.testing.assert_array_equal(tensor.view(torch.uint16).numpy(),
                                np.asarray(array).view(np.uint16))
  monkeypatch.undo()
  # A target device JAX's array is not on (torch's "meta" device here): the host path, no DLPack.
  tensor, path = torch_transfer.jax_to_torch(array, "meta")
  assert path == torch_transfer.HOST and tensor.device.type == "meta"
  assert torch_transfer.torch_device_of(array) == torch.device("cpu")


def test_state_dict_counts_each_path():
  arrays = {"a": jnp.ones((2, 3)), "b": jnp.zeros((4,), jnp.float16)}
  tensors, counts = torch_transfer.jax_to_torch_dict(arrays, "cpu")
  assert counts == {"dlpack": 2, "host": 0} and set(tensors) == {"a", "b"}
  assert ml_dtypes.finfo(np.float16).max == 65504  # the same dtypes on both sides
  assert tensors["b"].dtype == torch.float16
