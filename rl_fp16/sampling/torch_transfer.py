"""JAX arrays -> torch tensors for the in-memory weight sync: DLPack where both live on the same
device (no copy, no host round trip), a host copy otherwise.

DLPack is taken when the array sits on exactly one device and that device is the target torch
device (CPU <-> "cpu", a JAX GPU with local id k <-> "cuda:k"); the torch tensor then shares the
JAX buffer (`tensor.data_ptr() == array.unsafe_buffer_pointer()`). A sharded array, another device,
or an exporter that refuses (e.g. a dtype DLPack lacks) goes through `jax.device_get` and
`Tensor.to(device)`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import numpy as np
import torch

DLPACK = "dlpack"
HOST = "host"


def torch_device_of(array: jax.Array) -> torch.device | None:
  """The torch device naming the array's one device, or None (sharded, or a platform torch does
  not address this way)."""
  devices = array.devices()
  if len(devices) != 1:
    return None
  device = next(iter(devices))
  if device.platform == "cpu":
    return torch.device("cpu")
  if device.platform in ("gpu", "cuda", "rocm"):  # torch names ROCm devices "cuda" too
    return torch.device("cuda", getattr(device, "local_hardware_id", None) or 0)
  return None


def _same_device(a: torch.device | None, b: torch.device) -> bool:
  if a is None or a.type != b.type:
    return False
  return a.type == "cpu" or (a.index or 0) == (b.index or 0)


def _host_tensor(array: jax.Array) -> torch.Tensor:
  """The array in host memory as a CPU tensor (a read-only view of JAX's host buffer on CPU,
  only read by the sync)."""
  host = np.ascontiguousarray(jax.device_get(array))
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if host.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: torch.from_numpy does not know it
      return torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def jax_to_torch(array: jax.Array, device: torch.device | str) -> tuple[torch.Tensor, str]:
  """`array` as a torch tensor on `device`, and the path taken: "dlpack" (shares the buffer) or
  "host" (copied through host memory)."""
  device = torch.device(device)
  if _same_device(torch_device_of(array), device):
    try:
      return torch.from_dlpack(array), DLPACK
    except (BufferError, RuntimeError, TypeError, ValueError):
      pass  # the host copy below
  return _host_tensor(array).to(device), HOST


def jax_to_torch_dict(arrays: Mapping[str, jax.Array], device: torch.device | str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
  """`jax_to_torch` over a state dict; also returns how many tensors took each path."""
  tensors: dict[str, Any] = {}
  counts = {DLPACK: 0, HOST: 0}
  for name, array in arrays.items():
    tensors[name], path = jax_to_torch(array, device)
    counts[path] += 1
  return tensors, counts
