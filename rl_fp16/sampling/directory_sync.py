"""The directory weight sync: a sampler in another process that only sees versioned HF directories.

    engine = DirectorySyncEngine("vllm", model_config, params, policy,
                                 weights_dir=f"{run_dir}/weights", max_model_len=512)
    rollout = engine.generate(prompts, n=8, sampling=SamplingConfig(...), seed=step)
    sync_seconds = engine.sync_weights(new_params)  # writes step_000001/, LATEST; worker reloads
    engine.close()

The trainer writes each version with `rl_fp16.checkpoints.versions.write_version` (temp dir +
rename, then an atomic `LATEST`, old versions pruned) and sends the worker only the step number;
the worker (`serve`, a `multiprocessing` "spawn" child running its own vLLM or JAX engine) reloads
that version from disk (`VllmSampler.sync_weights_from_dir`, or `load_hf` for JAX) and answers
`generate` requests with `Rollout`s. Nothing but the step number, the prompts and the rollouts
crosses the pipe: a worker on another host that reads the same storage needs only those. Here the
worker is a local child process; on a cluster the same loop would sit behind an RPC.

`sync_weights` waits for the worker's reload, so `time/sync_s` is write + reload; the parts are
kept in `last_write_s` and `last_reload_s`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
import traceback
from typing import Any, Sequence

from rl_fp16.checkpoints import versions
from rl_fp16.models import ModelConfig
from rl_fp16.precision import DtypePolicy, dtype_name
from rl_fp16.sampling.jax_sampler import JAX_ENGINE_OPTIONS, JAX_ONLY_OPTIONS, SamplingConfig
from rl_fp16.sampling.rollout import Rollout

WEIGHT_SYNC_MODES = ("memory", "directory")
_SERVED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
  """What the worker process needs to build its engine (picklable).

  Attributes:
    engine: "jax" or "vllm".
    policy: the sampler's dtype policy.
    weights_dir: the versions' root directory.
    options: engine keywords: for vLLM, `VllmConfig` fields plus `eos_token_ids`; for JAX,
      `JaxEngine` keywords.
  """

  engine: str
  policy: DtypePolicy
  weights_dir: str
  options: dict


def directory_dtype(engine: str, policy: DtypePolicy) -> str:
  """The dtype versions are stored in: vLLM's serving dtype (policy.compute_dtype); for the JAX
  engine its storage dtype when that is a real dtype, else float32 (emulated precisions round in
  the decoder)."""
  name = dtype_name(policy.compute_dtype if engine == "vllm" else policy.param_dtype)
  return name if name in _SERVED_DTYPES else "float32"


class _WorkerEngine:
  """The worker's engine over one versions directory (runs in the child)."""

  def __init__(self, spec: WorkerSpec, path: str):
    self.spec = spec
    options = dict(spec.options)
    eos = list(options.pop("eos_token_ids", None) or [])
    if spec.engine == "vllm":
      from rl_fp16.sampling import vllm_requests, vllm_sampler  # pylint: disable=g-import-not-at-top
      self.eos_token_id = vllm_requests.single_eos_token_id(eos)
      self.sampler = vllm_sampler.VllmSampler(path, vllm_sampler.VllmConfig(
          dtype=directory_dtype("vllm", spec.policy), **options))
    else:
      from rl_fp16.checkpoints import load_hf  # pylint: disable=g-import-not-at-top
      from rl_fp16.sampling.engines import JaxEngine  # pylint: disable=g-import-not-at-top
      config, params = load_hf(path)
      self.engine = JaxEngine(config, params, spec.policy, eos_token_ids=eos or None,
                              **{k: v for k, v in options.items() if k in JAX_ENGINE_OPTIONS})

  def reload(self, path: str) -> None:
    if self.spec.engine == "vllm":
      self.sampler.sync_weights_from_dir(path)
    else:
      from rl_fp16.checkpoints import load_hf  # pylint: disable=g-import-not-at-top
      self.engine.sync_weights(load_hf(path)[1])

  def generate(self, prompts, n: int, sampling: SamplingConfig, seed: int,
               first_row: int) -> Rollout:
    if self.spec.engine == "jax":
      return self.engine.generate(prompts, n=n, sampling=sampling, seed=seed, first_row=first_row)
    # Truncated sampling (top-k / top-p) is refused by `VllmSampler.generate`.
    return self.sampler.generate(prompts, n=n, max_new_tokens=sampling.max_new_tokens,
                                 temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, seed=seed + first_row,
                                 eos_token_id=self.eos_token_id)

  def close(self) -> None:
    if self.spec.engine == "vllm":
      self.sampler.close()
    else:
      self.engine.close()


def serve(spec: WorkerSpec, conn) -> None:
  """The worker loop (child process). Messages in: ("load", step), ("generate", prompts, n,
  sampling, seed, first_row), ("close",). Answers: ("ok", value) or ("error", traceback text);
  "load" answers the reload's seconds, "generate" a `Rollout`."""
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  engine, loaded = None, None
  try:
    while True:
      message = conn.recv()
      kind = message[0]
      if kind == "close":
        conn.send(("ok", None))
        return
      try:
        if kind == "load":
          step = message[1]
          path = versions.version_dir(spec.weights_dir, step)
          start = time.perf_counter()
          if engine is None:
            engine = _WorkerEngine(spec, path)
          else:
            engine.reload(path)
          loaded = step
          conn.send(("ok", time.perf_counter() - start))
        elif kind == "generate":
          if engine is None:
            raise RuntimeError("generate before any weights version was loaded")
          _, prompts, n, sampling, seed, first_row = message
          conn.send(("ok", engine.generate(prompts, n, sampling, seed, first_row)))
        elif kind == "loaded":
          conn.send(("ok", loaded))
        else:
          raise ValueError(f"unknown message {kind!r}; allowed: load, generate, loaded, close")
      except Exception:  # pylint: disable=broad-except
        conn.send(("error", traceback.format_exc()))
  finally:
    if engine is not None:
      engine.close()


class DirectorySyncEngine:
  """An engine (`rl_fp16.sampling.engines.Engine`) whose sampler runs in a separate process and
  takes weights only through versioned HF directories under `weights_dir`.

  Args:
    name: the worker's engine, "jax" or "vllm".
    params: the initial params, written as version `first_step` before the worker starts.
    weights_dir: the versions' root (shared storage).
    first_step: the RL step the initial params belong to (0, or the step a run resumes from);
      each `sync_weights` writes the next step. Versions newer than it are deleted at start.
    keep: versions kept on disk (>= 2).
    tokenizer_dir: tokenizer files copied into every version.
    timeout_s: longest wait for the worker's answer (its first start included).
    options: the worker engine's keywords (`VllmConfig` fields and `eos_token_ids` for vLLM;
      `JaxEngine` keywords for JAX); `workdir` and `vllm_log_level` are accepted as
      `make_engine` takes them.
  """

  def __init__(self, name: str, model_config: ModelConfig, params: Any, policy: DtypePolicy, *,
               weights_dir: str | os.PathLike, first_step: int = 0, keep: int = 2,
               tokenizer_dir: str | os.PathLike | None = None, timeout_s: float = 900.0,
               **options):
    from rl_fp16.sampling.engines import check_engine_policy  # pylint: disable=g-import-not-at-top
    check_engine_policy(name, policy)
    if keep < 2:
      raise ValueError(f"keep must be >= 2 (the worker may still read the previous version), got "
                       f"{keep}")
    self.name, self.model_config, self.policy = name, model_config, policy
    self.weights_dir = os.path.abspath(os.fspath(weights_dir))
    self.dtype = directory_dtype(name, policy)
    self.keep, self.tokenizer_dir, self.timeout_s = keep, tokenizer_dir, timeout_s
    options.pop("workdir", None)
    if "vllm_log_level" in options:
      level = options.pop("vllm_log_level")
      if name == "vllm":
        options["log_level"] = level
    if name == "jax":
      options = {k: v for k, v in options.items() if k in JAX_ENGINE_OPTIONS}
    else:
      options = {k: v for k, v in options.items() if k not in JAX_ONLY_OPTIONS}
    self.step = first_step
    self.last_write_s = self.last_reload_s = 0.0
    start = time.perf_counter()
    self._write(params)
    context = multiprocessing.get_context("spawn")
    self._conn, child_conn = context.Pipe()
    self._process = context.Process(
        target=serve, args=(WorkerSpec(name, policy, self.weights_dir, options), child_conn),
        name=f"sampler-worker-{name}", daemon=True)
    self._process.start()
    child_conn.close()
    self._call("load", self.step)
    self.start_s = time.perf_counter() - start
    self.last_sync_s = 0.0

  @property
  def pid(self) -> int | None:
    return self._process.pid

  def _write(self, params: Any) -> None:
    start = time.perf_counter()
    versions.write_version(self.weights_dir, self.step, self.model_config, params,
                           dtype=self.dtype, tokenizer_dir=self.tokenizer_dir, keep=self.keep)
    self.last_write_s = time.perf_counter() - start

  def _call(self, *message) -> Any:
    if self._conn is None:
      raise RuntimeError("the sampler worker is closed")
    self._conn.send(message)
    deadline = time.monotonic() + self.timeout_s
    while not self._conn.poll(1.0):
      if not self._process.is_alive():
        raise RuntimeError(f"the sampler worker (pid {self._process.pid}) died with exit code "
                           f"{self._process.exitcode} while handling {message[0]!r}")
      if time.monotonic() > deadline:
        raise TimeoutError(f"the sampler worker did not answer {message[0]!r} within "
                           f"{self.timeout_s} s")
    status, value = self._conn.recv()
    if status != "ok":
      raise RuntimeError(f"the sampler worker failed on {message[0]!r}:\n{value}")
    return value

  def sync_weights(self, params: Any) -> float:
    """Writes version `step + 1` and has the worker reload it; returns seconds (write + reload)."""
    start = time.perf_counter()
    self.step += 1
    self._write(params)
    self.last_reload_s = self._call("load", self.step)
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int,
               sampling: SamplingConfig, seed: int, first_row: int = 0) -> Rollout:
    prompts = [[int(t) for t in p] for p in prompt_token_ids]
    return self._call("generate", prompts, n, sampling, seed, first_row)

  def loaded_step(self) -> int | None:
    """The version the worker serves (asked of the worker)."""
    return self._call("loaded")

  def close(self) -> None:
    """Stops the worker (it closes its engine); safe to call twice."""
    if self._conn is None:
      return
    try:
      if self._process.is_alive():
        self._call("close")
      self._process.join(timeout=60)
    finally:
      if self._process.is_alive():
        self._process.kill()
        self._process.join()
      self._conn.close()
      self._conn = None


def check_weight_sync(mode: str) -> None:
  if mode not in WEIGHT_SYNC_MODES:
    raise ValueError(f"Unknown weight_sync {mode!r}; allowed: {', '.join(WEIGHT_SYNC_MODES)}")

