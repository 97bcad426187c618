r"""Measuring tools: compile counts, repeated timings, resident memory, XLA op profiles, and the
model-FLOPs formulas that turn a step's seconds into utilisation (MFU).

Used by the benchmark suite (experiments/benchmark.py) and the accelerator check
(experiments/gpu_check.py); each figure is the median of timed repetitions after untimed warm-up
calls, reported with min and max (`summarize`).

Model FLOPs of one training step (the MFU numerator), on B sequences of S tokens:
    6 * (N + d * V) * B * S  +  12 * L * H * d_head * S^2 * B
N: non-embedding parameters (`ModelConfig.num_params(include_embeddings=False)`); d * V: the
output projection, a matmul even when tied (the input embedding is a gather, not counted);
6 = 2 (multiply-add) x 3 (forward, and backward for activations and weights). Attention: per
layer and sequence the forward computes QK^T and PV, 2 * S^2 * H * d_head each, x 3 for the
backward; counted over the full S x S square our attention evaluates (as PaLM's MFU does). The
log-softmax, entropy, norms, optimizer and loss are not counted. MFU = model FLOPs / step
seconds / the measured float32 matmul peak (`matmul_peak`).

Decoding (`decode_flops`): 2 * (N + d * V) per generated token plus attention 4 * L * H * d_head
per token and context position.

Compilations are counted with a `jax.monitoring` listener (`CompileCounter`): every XLA backend
compile (event "/jax/core/compile/backend_compile_duration", which carries the function name) and
every executable loaded from the persistent compilation cache. A call that reuses cached
executables counts 0.

Profiles (`xla_op_profile`): a step run under `jax.profiler.trace` writes a trace (open it in
Perfetto or TensorBoard's profile plugin); `xla_op_profile` groups one jitted module's XLA ops by
kind (the HLO op name without its ".N" suffix: `ynn_fusion` and `dot` are matmuls on CPU,
`copy*`/`transpose*` layout changes) with their share of op time, summed over threads.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16 import objectives
from rl_fp16.batch import TrainBatch, make_batch
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig
from rl_fp16.precision import (default_loss_scale_config, dtype_name, get_policy,
                               init_loss_scale)
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import RLConfig, make_train_step

MIB = 2.0**20


# ------------------------------------------------------------------------ measuring tools ----


class CompileCounter:
  """Counts XLA compilations in this process while active (a context manager).

  Listens to `jax.monitoring` events: each backend compile records its duration under
  "/jax/core/compile/backend_compile_duration" with the jitted function's name; an executable
  loaded from the persistent compilation cache instead records "/jax/compilation_cache/
  cache_hits". Either means a call needed an executable it did not have in memory. `seconds`
  adds up every "/jax/core/compile/" stage (tracing, lowering, XLA compile), also per function
  in `seconds_by_function`.
  """

  COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
  STAGE_PREFIX = "/jax/core/compile/"
  CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

  def __init__(self):
    self.names: list[str] = []
    self.seconds = 0.0
    self.seconds_by_function: dict[str, float] = {}

  @property
  def count(self) -> int:
    return len(self.names)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event.startswith(self.STAGE_PREFIX):  # tracing, lowering to MLIR, XLA compile
      self.seconds += duration
      name = str(kwargs.get("fun_name", "?"))
      name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
      self.seconds_by_function[name] = self.seconds_by_function.get(name, 0.0) + duration
    if event == self.COMPILE_EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  def _on_event(self, event: str, **kwargs) -> None:
    if event == self.CACHE_HIT_EVENT:
      self.names.append(f"cache:{kwargs.get('fun_name', '?')}")

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """{"median", "min", "max", "values"} of the repetitions."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError("No repetitions to summarize")
  return {"median": float(np.median(values)), "min": min(values), "max": max(values),
          "values": values}


def invert_stat(stat: dict[str, Any], numerator: float) -> dict[str, Any]:
  """numerator / value per repetition (seconds -> a rate)."""
  return summarize([numerator / max(v, 1e-12) for v in stat["values"]])


@dataclasses.dataclass
class Timing:
  """What `time_calls` measured.

  Attributes:
    seconds: the timed calls' seconds, summarized (median, min, max, values).
    compiles: compilations during each timed call (0 when nothing recompiled).
    recompiled: names of what compiled during the timed calls.
    warmup_compile_s: seconds spent tracing, lowering and compiling during the warm-up calls.
  """

  seconds: dict[str, Any]
  compiles: list[int]
  recompiled: list[str]
  warmup_compile_s: float


def time_calls(fn: Callable[[int], Any], *, warmup: int, repetitions: int) -> Timing:
  """Calls `fn(i)` for i in range(warmup + repetitions), timing the last `repetitions` calls.

  `fn` must block until its work is done (`jax.block_until_ready`).
  """
  with CompileCounter() as warmup_counter:
    for i in range(warmup):
      fn(i)
  seconds, compiles, names = [], [], []
  for i in range(warmup, warmup + repetitions):
    with CompileCounter() as counter:
      start = time.perf_counter()
      fn(i)
      seconds.append(time.perf_counter() - start)
    compiles.append(counter.count)
    names += counter.names
  return Timing(summarize(seconds), compiles, sorted(set(names)), warmup_counter.seconds)


class SectionClock:
  """Wall and process CPU seconds of a block (CPU / wall shows how much of the machine the
  benchmark got: about the number of busy cores when nothing else runs)."""

  def __init__(self):
    self.wall = self.cpu = 0.0

  @staticmethod
  def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

  def __enter__(self) -> "SectionClock":
    self._wall0, self._cpu0 = time.perf_counter(), self._cpu()
    return self

  def __exit__(self, *exc_info) -> None:
    self.wall = time.perf_counter() - self._wall0
    self.cpu = self._cpu() - self._cpu0

  def to_dict(self) -> dict[str, float]:
    return {"wall_s": self.wall, "cpu_s": self.cpu}


def peak_rss_mib() -> float:
  """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
  """The process's resident set size now (Linux /proc/self/statm), MiB."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
  except OSError:
    return float("nan")


# ---------------------------------------------------------------------------- matmul peak ----


def matmul_peak(size: int, *, seed: int, warmup: int, repetitions: int) -> dict[str, Any]:
  """FLOP/s of a jitted size x size @ size x size matmul per dtype (float32 is the MFU reference).

  Returns {"matmul_size", and per dtype name ("float32", "bfloat16", "float16"): {"seconds",
  "flops_per_s"}} (each a `summarize` dict). `warmup` is at least 1 (the compile).
  """
  n = int(size)
  flops = 2.0 * n**3
  matmul = jax.jit(jnp.matmul)
  out = {"matmul_size": n}
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    keys = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(keys[0], (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(keys[1], (n, n), jnp.float32).astype(dtype)
    seconds = time_calls(lambda i, a=a, b=b: matmul(a, b).block_until_ready(),
                         warmup=max(warmup, 1), repetitions=repetitions).seconds
    out[dtype_name(dtype)] = {"seconds": seconds, "flops_per_s": invert_stat(seconds, flops)}
  return out


def peak_flops_per_s(peak: dict[str, Any], dtype: str) -> float:
  """The median FLOP/s of `matmul_peak`'s result for a dtype name ("float32", ...)."""
  return peak[dtype]["flops_per_s"]["median"]


# ------------------------------------------------------------------------- model FLOPs ----


def train_step_flops(model_config: ModelConfig, batch: int, seq_len: int) -> dict[str, float]:
  """Model FLOPs of one training step on `batch` sequences of `seq_len` tokens (module doc)."""
  dense_params = (model_config.num_params(include_embeddings=False, active_only=True)
                  + model_config.hidden_size * model_config.vocab_size)
  dense = 6.0 * dense_params * batch * seq_len
  attention = (12.0 * model_config.num_hidden_layers * model_config.num_attention_heads
               * model_config.head_dim * seq_len**2 * batch)
  return {"dense": dense, "attention": attention, "total": dense + attention,
          "dense_params": float(dense_params)}


def synthetic_rl_batch(vocab_size: int, rows: int, prompt_len: int, response_len: int,
                       seed: int, response_lengths=None) -> TrainBatch:
  """A `TrainBatch` of `rows` rows of prompt_len + response_len random tokens (host arrays).

  response_lengths: int [rows] (each in [1, response_len]), or None for response_len in every
  row; a row's prompt and response then start at column 0 and padding fills the rest."""
  rng = np.random.default_rng(seed)
  seq = prompt_len + response_len
  lengths = np.full(rows, response_len) if response_lengths is None else np.asarray(
      response_lengths)
  if lengths.shape != (rows,) or lengths.min() < 1 or lengths.max() > response_len:
    raise ValueError(f"response_lengths must be [{rows}] ints in [1, {response_len}], got "
                     f"{response_lengths!r}")
  columns = np.arange(seq)[None, :]
  attention_mask = (columns < prompt_len + lengths[:, None]).astype(np.int32)
  loss_mask = attention_mask * (columns >= prompt_len)
  logp = np.where(loss_mask > 0, -np.log(vocab_size), 0.0).astype(np.float32)
  return make_batch(
      tokens=rng.integers(0, vocab_size, (rows, seq)).astype(np.int32) * attention_mask,
      attention_mask=attention_mask,
      loss_mask=loss_mask,
      logp_old=logp,
      logp_sampler=logp + (0.01 * rng.standard_normal(logp.shape) * loss_mask
                           ).astype(np.float32),
      advantages=rng.standard_normal(rows).astype(np.float32))


def xla_op_profile(trace_dir: str, module: str, top: int = 8) -> list[dict[str, Any]]:
  """Op time of the jitted `module` (e.g. "jit_train_step") in the newest trace under
  `trace_dir`, grouped by op kind (HLO op name without ".N"), largest first.

  Returns [{"op", "ms", "share", "count"}] for the `top` kinds; times are summed over threads, so
  on a multi-threaded backend they can exceed wall time. Reads the Chrome-trace JSON that
  `jax.profiler.trace` writes next to its xplane file.
  """
  traces = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))
  if not traces:
    raise FileNotFoundError(f"No *.trace.json.gz under {trace_dir}/plugins/profile")
  with gzip.open(traces[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  micros, counts = collections.Counter(), collections.Counter()
  for event in events:
    args = event.get("args") or {}
    if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
      kind = re.sub(r"\.\d+$", "", args["hlo_op"])
      micros[kind] += float(event.get("dur", 0.0))
      counts[kind] += 1
  total = sum(micros.values())
  return [{"op": kind, "ms": us / 1e3, "share": us / total if total else 0.0,
           "count": counts[kind]} for kind, us in micros.most_common(top)]


def decode_flops(model_config: ModelConfig, rows: int, prompt_len: int, steps: int) -> float:
  """Model FLOPs of decoding `steps` tokens for `rows` rows (every row runs every step, as the
  batched decode does): 2 (N + d V) per token plus attention 4 L H d_head x context."""
  dense = 2.0 * (model_config.num_params(include_embeddings=False, active_only=True)
                 + model_config.hidden_size * model_config.vocab_size)
  attn = 4.0 * (model_config.num_hidden_layers * model_config.num_attention_heads
                * model_config.head_dim)
  contexts = prompt_len + np.arange(steps)
  return float(rows * (dense * steps + attn * contexts.sum()))


# ------------------------------------------------------------------------ models to time ----


def host_params(params: Any) -> Any:
  """Numpy float32 copies: every train state and engine then builds its own device buffers (a
  donated train state never deletes the model's arrays)."""
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), params)


def with_context(config: ModelConfig, length: int) -> ModelConfig:
  """The config with max_position_embeddings >= length, rounded up to 64 (vLLM refuses a longer
  max_model_len)."""
  need = int(-(-length // 64) * 64)
  if config.max_position_embeddings >= need:
    return config
  return config.replace(max_position_embeddings=need)


def random_qwen2_config(shape: Mapping[str, int], max_len: int) -> ModelConfig:
  """A Qwen2 config (q/k/v bias, untied embeddings) of `shape` (vocab_size, hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads) with a context
  of at least `max_len` (and 2048) tokens: a model to time with random weights."""
  keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads")
  config = ModelConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=False,
                       max_position_embeddings=max(max_len, 2048),
                       **{key: int(shape[key]) for key in keys})
  return with_context(config, max_len)


# -------------------------------------------------------------------------------- speeds ----


def train_step_speed(model_config: ModelConfig, params: Any, *, precision: str, prompt_len: int,
                     response_len: int, tokens_per_step: int, optimizer, peak: dict[str, Any],
                     algorithm: str = "grpo", seed: int = 0, warmup: int = 1,
                     repetitions: int = 3, profile_dir: str | None = None) -> dict[str, Any]:
  """One train-step (`make_train_step`) configuration: seconds per step, tokens/s, MFU, compiles
  per step.

  Steps on a `synthetic_rl_batch` of about `tokens_per_step` tokens (rows of prompt_len +
  response_len). `peak` is `matmul_peak`'s result. "mfu" is against the float32 matmul peak (the
  reference on every machine); "mfu_compute_dtype" against the peak of the step's compute dtype
  (on a GPU the bf16/fp16 matrix units are many times faster than float32). With `profile_dir`,
  one more step runs under `jax.profiler.trace` and "profile" holds its `xla_op_profile`.
  """
  policy = get_policy(precision, "trainer")
  seq = prompt_len + response_len
  rows = max(1, round(tokens_per_step / seq))
  batch = jax.device_put(synthetic_rl_batch(model_config.vocab_size, rows, prompt_len,
                                            response_len, seed))
  loss_config = objectives.LossConfig(max_response_len=response_len)
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(policy)))
  holder = {"state": state}
  train_step = make_train_step(model_config, policy, optimizer, rl_config=RLConfig(
      algorithm=algorithm, loss=loss_config, temperature=1.0))

  def step(_):
    new_state, metrics = train_step(holder["state"], batch)
    holder["state"] = jax.block_until_ready(new_state)
    jax.block_until_ready(metrics)

  timing = time_calls(step, warmup=max(warmup, 1), repetitions=repetitions)
  profile = None
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      step(0)
    profile = xla_op_profile(profile_dir, "jit_train_step")
  seconds = timing.seconds
  flops = train_step_flops(model_config, rows, seq)
  tokens = rows * seq
  del holder
  return {
      "profile": profile, "profile_dir": profile_dir,
      "params": model_config.num_params(), "response_len": response_len,
      "prompt_len": prompt_len, "rows": rows, "tokens": tokens,
      "precision": precision, "seconds": seconds,
      "tokens_per_s": invert_stat(seconds, tokens),
      "model_flops": flops,
      "mfu": invert_stat(seconds, flops["total"] / peak_flops_per_s(peak, "float32")),
      "mfu_compute_dtype": invert_stat(
          seconds, flops["total"] / peak_flops_per_s(peak, dtype_name(policy.compute_dtype))),
      "compiles_per_step": max(timing.compiles), "recompiled": timing.recompiled,
      "warmup_compile_s": timing.warmup_compile_s,
  }


def generate_speed(engine, prompts: list[list[int]], *, n: int, max_new_tokens: int, warmup: int,
                   repetitions: int, seed: int) -> dict[str, Any]:
  """Generated tokens/s of `engine.generate` (same prompts every call, a new seed each)."""
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
  generated = []

  def call(i):
    rollout = engine.generate(prompts, n=n, sampling=sampling, seed=seed + i)
    generated.append(int(rollout.response_mask.sum()))

  timing = time_calls(call, warmup=warmup, repetitions=repetitions)
  seconds = timing.seconds
  tokens = generated[-1]
  if len(set(generated)) != 1:
    raise RuntimeError(f"Calls generated different token counts {generated}; the benchmark "
                       "needs every row to run to the length (no EOS)")
  return {"rows": len(prompts) * n, "new_tokens": max_new_tokens, "generated_tokens": tokens,
          "seconds": seconds, "tokens_per_s": invert_stat(seconds, tokens),
          "compiles_per_call": max(timing.compiles), "recompiled": timing.recompiled,
          "warmup_compile_s": timing.warmup_compile_s}
