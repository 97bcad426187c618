"""The `Engine` protocol, the wrapper base, and the two in-process inference engines.

An engine is built from our params and a sampler `DtypePolicy`, samples `Rollout`s, and takes new
params at every weight sync; `sync_weights` is the one sync verb:

    engine = make_engine("vllm", model_config, params, policy, workdir=run_dir)
    rollout = engine.generate(prompts, n=8, sampling=SamplingConfig(...), seed=step)
    sync_seconds = engine.sync_weights(new_params)
    engine.close()

Wrappers are engines around an engine (`EngineWrapper`) and compose: the directory sync
(`directory_sync.DirectorySyncEngine`, the engine in a worker process), sleep between rollouts
(`wrappers.SleepBetweenRollouts`) and one engine per process (`wrappers.ProcessShareEngine`);
`sync_modes.make_synced_engine` stacks them for a run.

`"jax"` is the in-process JAX sampler (KV-cache forward of our decoder); `"vllm"` is real vLLM,
started from a Hugging Face directory written by `save_hf` and synced in memory with
`to_hf_device_arrays` (DLPack into torch where possible) afterwards. vLLM serves in the policy's
compute dtype with its own kernels, so the policy's per-op dtypes (norm, softmax, logits) do not
apply to it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol, Sequence

import jax

from rl_fp16.checkpoints import save_hf, to_hf_device_arrays
from rl_fp16.models import ModelConfig
from rl_fp16.precision import DtypePolicy, cast_floating, dtype_name
from rl_fp16.sampling import jax_sampler
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.sampling.rollout import Rollout

from rl_fp16.names import ENGINES  # re-exported (rl_fp16.names)


class Engine(Protocol):
  """What the RL loop and the studies call on a sampler."""

  name: str
  policy: DtypePolicy

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int,
               sampling: SamplingConfig, seed: int, first_row: int = 0) -> Rollout:
    """`n` samples per prompt, rows grouped by prompt. `first_row`: this batch's first row in a
    larger one sampled with the same seed; each row gets the tokens it would get there."""
    ...

  def sync_weights(self, params: Any) -> float:
    """Serves `params` (our pytree, sharded or not) from the next `generate` on; returns seconds."""
    ...

  def close(self) -> None:
    ...


class EngineWrapper:
  """An `Engine` around an `Engine`: forwards the three calls, and any attribute it does not
  define (`name`, `policy`, `sampler`, `sleep`, ...), to `self.engine`. Subclasses override what
  they change."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def __getattr__(self, name):
    if name == "engine":  # not set yet (e.g. during unpickling)
      raise AttributeError(name)
    return getattr(self.engine, name)

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int,
               sampling: SamplingConfig, seed: int, first_row: int = 0) -> Rollout:
    return self.engine.generate(prompt_token_ids, n=n, sampling=sampling, seed=seed,
                                first_row=first_row)

  def sync_weights(self, params: Any) -> float:
    return self.engine.sync_weights(params)

  def close(self) -> None:
    self.engine.close()


class JaxEngine:
  """The in-process JAX sampler holding its own copy of the weights in `policy.param_dtype`, on
  one device (a sharded trainer's params are gathered at each sync)."""

  name = "jax"

  def __init__(self, model_config: ModelConfig, params: Any, policy: DtypePolicy, *,
               eos_token_ids: Sequence[int] | None = None, prompt_bucket: int = 16,
               batch_bucket: int = 8, decode_row_group: int = 0):
    self.model_config, self.policy = model_config, policy
    self.eos_token_ids = eos_token_ids
    self.prompt_bucket, self.batch_bucket = prompt_bucket, batch_bucket
    self.decode_row_group = decode_row_group
    self.params = None
    self.last_sync_s = self.sync_weights(params)

  def sync_weights(self, params: Any) -> float:
    """Copies the trainer's params (sharded or not; fully addressable) onto this process's first
    device, in the engine's storage dtype; returns seconds."""
    start = time.perf_counter()
    local = jax.device_put(params, jax.local_devices()[0])
    self.params = jax.block_until_ready(cast_floating(local, self.policy.param_dtype))
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  def generate(self, prompt_token_ids, *, n, sampling, seed, first_row: int = 0) -> Rollout:
    return jax_sampler.generate(self.model_config, self.params, prompt_token_ids,
                                policy=self.policy, n=n, sampling=sampling,
                                rng=jax.random.key(seed), eos_token_ids=self.eos_token_ids,
                                prompt_bucket=self.prompt_bucket, batch_bucket=self.batch_bucket,
                                decode_row_group=self.decode_row_group, row_offset=first_row)

  def close(self) -> None:
    self.params = None


class VllmEngine:
  """Real vLLM in this process, fed by checkpoint conversion."""

  name = "vllm"

  def __init__(self, model_config: ModelConfig, params: Any, policy: DtypePolicy, *,
               workdir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               eos_token_ids: Sequence[int] | None = None, max_model_len: int = 2048,
               seed: int = 0, **vllm_options):
    from rl_fp16.sampling import vllm_requests  # pylint: disable=g-import-not-at-top
    from rl_fp16.sampling.vllm_sampler import VllmConfig, VllmSampler  # heavy import

    self.model_config, self.policy = model_config, policy
    self.dtype = dtype_name(policy.compute_dtype)
    self.eos_token_id = vllm_requests.single_eos_token_id(
        model_config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    self.model_dir = os.path.join(os.fspath(workdir), f"vllm_init_{self.dtype}")
    save_hf(self.model_dir, model_config, params, dtype=self.dtype, tokenizer_dir=tokenizer_dir)
    self.sampler = VllmSampler(self.model_dir, VllmConfig(dtype=self.dtype,
                                                          max_model_len=max_model_len,
                                                          seed=seed, **vllm_options))
    self.last_sync_s = 0.0

  def sync_weights(self, params: Any, *, directory: str | os.PathLike | None = None) -> float:
    """Pushes params in memory (`to_hf_device_arrays` -> torch -> vLLM reload); returns seconds.

    The HF-layout arrays reach torch by DLPack where JAX and vLLM share the device (no host round
    trip), else through the host (`torch_transfer.jax_to_torch`); `last_transfer` counts each.
    With `directory` (the fallback), writes an HF directory there and has vLLM re-read it instead.
    """
    from rl_fp16.sampling import torch_transfer  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    if directory is not None:
      save_hf(directory, self.model_config, params, dtype=self.dtype)
      self.sampler.sync_weights_from_dir(os.fspath(directory))
      self.last_sync_s = time.perf_counter() - start
      return self.last_sync_s
    # to_hf_device_arrays refuses NaN/inf and values beyond the engine dtype's range (naming the
    # tensor), so the sampler need not read the weights a second time.
    tensors, self.last_transfer = torch_transfer.jax_to_torch_dict(
        to_hf_device_arrays(self.model_config, params, self.dtype), self.sampler.torch_device)
    self.sampler.sync_weights(tensors, check_values=False)
    del tensors  # they may share the trainer's buffers (DLPack); vLLM has copied them
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  def generate(self, prompt_token_ids, *, n, sampling, seed, first_row: int = 0) -> Rollout:
    """Row i is sampled with seed + first_row + i. Truncated sampling (top-k / top-p) is refused
    by `VllmSampler.generate`."""
    return self.sampler.generate(prompt_token_ids, n=n, max_new_tokens=sampling.max_new_tokens,
                                 temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, seed=seed + first_row,
                                 eos_token_id=self.eos_token_id)

  def sleep(self, level: int = 1) -> None:
    """vLLM's sleep mode (needs `enable_sleep_mode=True`; see `VllmSampler.sleep`)."""
    self.sampler.sleep(level)

  def wake_up(self, tags: Sequence[str] | None = None) -> None:
    self.sampler.wake_up(tags)

  def close(self) -> None:
    self.sampler.close()


def check_engine_policy(name: str, policy: DtypePolicy) -> None:
  """Raises ValueError if engine `name` cannot sample in `policy`.

  Emulated precisions (`eK`: rounding to K significand bits) and bitwise policies exist only in
  our decoder, i.e. in the JAX engine; vLLM would silently sample at its own dtype and with its
  own kernels instead.
  """
  if name not in ENGINES:
    raise ValueError(f"Unknown engine {name!r}; allowed: {list(ENGINES)}")
  if name == "vllm" and policy.is_emulated:
    raise ValueError(f"The vLLM engine cannot sample in an emulated precision "
                     f"({policy.significand_bits} significand bits): emulation exists only in our "
                     "decoder; use engine 'jax' or a real sampler precision (fp32, bf16, fp16)")
  if name == "vllm" and policy.bitwise:
    raise ValueError("The vLLM engine cannot sample bitwise with the trainer (its kernels are not "
                     "the trainer's); use engine 'jax' for a bitwise policy")


def make_engine(name: str, model_config: ModelConfig, params: Any, policy: DtypePolicy, *,
                vllm_log_level: str = "WARNING", **kwargs) -> Engine:
  """`name` in ("jax", "vllm"); kwargs go to the engine (vLLM needs `workdir`).

  `vllm_log_level` is the level of vLLM's own loggers (`VllmConfig.log_level`): "WARNING" keeps
  its INFO lines out of a run's output, "INFO" brings them back; ignored by the JAX engine.
  """
  check_engine_policy(name, policy)
  if name == "jax":
    kwargs = {k: v for k, v in kwargs.items() if k in jax_sampler.JAX_ENGINE_OPTIONS}
    return JaxEngine(model_config, params, policy, **kwargs)
  kwargs = {k: v for k, v in kwargs.items() if k not in jax_sampler.JAX_ONLY_OPTIONS}
  return VllmEngine(model_config, params, policy, log_level=vllm_log_level, **kwargs)
