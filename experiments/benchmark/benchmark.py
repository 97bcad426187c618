r"""Benchmark suite: the machine's limits and how close the RL stack gets to them.

    python -m experiments.benchmark --config=experiments/benchmark/config.py
    python -m experiments.benchmark --config=experiments/benchmark/config.py --config.quick=True

Sections (`--config.sections`), each figure the median of `repetitions` timed runs after `warmup`
untimed ones, reported with min and max:
  peak      a jitted N x N float32 matmul (bf16 and fp16 for reference): FLOP/s, the reference
            for utilisation.
  trainer   train-step (`make_train_step`) tokens/s and model-FLOPs utilisation (MFU) per model
            size, response length and precision.
  samplers  generated tokens/s of the JAX sampler and of vLLM on the same model, prompts, batch
            and lengths (no EOS: every row runs to the length), per precision.
  sync      seconds per weight sync into vLLM, in memory (`sync_weights`) and through a
            Hugging Face directory (`sync_weights(directory=...)`), against the parameter bytes;
            with `sync_worker`, also the directory mode's sync (versioned write + reload by a
            vLLM worker in another process, `DirectorySyncEngine`).
  e2e       `rl_iteration` time split into sample / score / logp / update / sync, and the
            process's peak resident memory.
  bitwise   the same RL iteration of the JAX engine in the normal and the bitwise on-policy
            mode, on the small and the medium model: time split and ratios (docs/bitwise.md).
  compare   rl_fp16's RL iteration (JAX engine per precision, vLLM engine) next to
            TRL's GRPOTrainer at the same settings (the tiny base model's perfectible problems),
            TRL in its own venv as a subprocess (`--config.trl_python`, made by
            experiments/benchmark/peers/setup_trl.sh); one table of medians, breakdown and
            ratios, the resident memory over `compare.memory_iterations` iterations, the
            physical floor of each part at the measured matmul peak, and the padding the length
            bucketing removes at paper scale (an assumed response-length distribution, stated in
            the report).
Writes the run `--config.output_dir` through `rl_fp16.results.RunWriter` (config.json, one
metrics.jsonl row at step 0 named by section and case, `report.run_metrics`; TensorBoard)
and `benchmark.json` there (every figure with its repetitions, the machine, the targets); prints
markdown tables and the suite's targets with PASS/FAIL. What turns the measured figures into
summaries, targets, that row and the tables is report.py (pure functions); this module runs the
engines and times them.

Model FLOPs, MFU (model FLOPs / step seconds / the measured float32 matmul peak) and the compile
counting (`CompileCounter`: a call that reuses cached executables counts 0): the measuring tools
of rl_fp16/profiling.py, whose module doc gives the formulas.

Profiles (`--config.profile=True`): after each trainer case's timed steps, one more step runs under
`jax.profiler.trace` into `<output_dir>/profile/<case>/` (open it in Perfetto or TensorBoard's
profile plugin); the report lists the step's XLA ops grouped by kind (the HLO op name without its
".N" suffix: `ynn_fusion` and `dot` are matmuls on CPU, `copy*`/`transpose*` layout changes) with
their share of op time, summed over threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from experiments.benchmark.report import (evaluate_targets, format_report, padding_waste,
                                          parse_trl_output, physical_floor, run_metrics,
                                          summarize_rl_case)
from rl_fp16 import fileio, objectives, seeds
from rl_fp16.results import RunWriter
from rl_fp16.data.rl_problems import PERFECTIBLE_FILE, load_task
from rl_fp16.profiling import (MIB, CompileCounter, SectionClock, current_rss_mib,
                               generate_speed, host_params, invert_stat, matmul_peak,
                               peak_rss_mib, random_qwen2_config, summarize, time_calls,
                               train_step_speed, with_context)
from rl_fp16.checkpoints import to_hf_state_dict
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import (default_loss_scale_config, dtype_name, get_policy,
                               get_precision_pair, init_loss_scale)
from rl_fp16.sampling.directory_sync import DirectorySyncEngine
from rl_fp16.sampling.engines import make_engine
from rl_fp16.rl_loop import precompile_rl_update, rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer

SECTIONS = ("peak", "trainer", "samplers", "sync", "e2e", "bitwise", "compare")
MODEL_NAMES = ("small", "medium")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "trl_grpo.py")
TRL_SETUP = "bash experiments/benchmark/peers/setup_trl.sh ~/.venvs/trl-peer"
# Engines of the compare section: "jax_bitwise" is the JAX engine in bitwise mode
# (docs/bitwise.md); "vllm_compiled" is vLLM with enforce_eager=False (torch.compile
# of its model on CPU) instead of the compare block's vllm_enforce_eager.
COMPARE_ENGINES = ("jax", "jax_bitwise", "vllm", "vllm_compiled")
# The config fields that list names or integers: tuples in the config file; on the command line
# `--config.precisions=fp32,bf16` (`resolve_config` reads them with
# rl_fp16.names.config_list).
NAME_LISTS = ("sections", "precisions", "trainer_models", "sampler_models", "sync_models",
              "sync_precisions", "bitwise_models", "compare.cases")
INT_LISTS = ("trainer_response_lengths", "sampler_response_lengths")


# ------------------------------------------------------------------------------- helpers ----


def _tree_bytes(params: Any, dtype: Any) -> int:
  leaves = jax.tree_util.tree_leaves(params)
  return int(sum(np.size(x) for x in leaves) * jnp.dtype(dtype).itemsize)


# ------------------------------------------------------------------------------ the config ----


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with `quick_overrides` applied when `quick` is set; validated, and every
  list field (`NAME_LISTS`, `INT_LISTS`) a clean tuple: the rest of this module reads them as is."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  if resolved.quick:
    common.merge_overrides(resolved, resolved.quick_overrides.to_dict())
  common.clean_lists(resolved, NAME_LISTS, INT_LISTS)
  unknown = [s for s in resolved.sections if s not in SECTIONS]
  if unknown:
    raise ValueError(f"Unknown sections {unknown}; allowed: {list(SECTIONS)}")
  for key in ("trainer_models", "sampler_models", "sync_models", "bitwise_models"):
    bad = [m for m in resolved[key] if m not in MODEL_NAMES]
    if bad:
      raise ValueError(f"config.{key} has {bad}; allowed: {list(MODEL_NAMES)}")
  for key in ("precisions", "sync_precisions"):
    for name in resolved[key]:
      get_policy(name)  # a clear error on a bad name, before any work
  get_precision_pair(resolved.e2e.precision)
  for case in resolved.compare.cases:
    engine, _, precision = case.partition(":")
    if engine not in COMPARE_ENGINES or not precision:
      raise ValueError(f"config.compare.cases has {case!r}; want engine:precision with engine "
                       f"one of {list(COMPARE_ENGINES)}")
    get_precision_pair(precision)
  if resolved.repetitions < 1 or resolved.warmup < 0:
    raise ValueError(f"Need repetitions >= 1 and warmup >= 0, got {resolved.repetitions}, "
                     f"{resolved.warmup}")
  return resolved


# ------------------------------------------------------------------------------- the models ----


@dataclasses.dataclass
class BenchModel:
  """A model to benchmark, with float32 host (numpy) params and a way to make prompts."""

  name: str
  config: ModelConfig
  params: Any
  description: str
  make_prompts: Callable[[int, int], list[list[int]]]
  eos_token_ids: tuple[int, ...] = ()
  tokenizer_dir: str | None = None

  @property
  def num_params(self) -> int:
    return self.config.num_params()


def load_models(config, names: Sequence[str], max_len: int) -> dict[str, BenchModel]:
  """The named models ("small", "medium") with a context of at least `max_len` tokens."""
  models = {}
  if "small" in names:
    policy_model = common.load_policy_model(config.model, seed=config.seed)
    models["small"] = BenchModel(
        "small", with_context(policy_model.config, max_len), host_params(policy_model.params),
        policy_model.description, policy_model.make_prompts,
        tuple(policy_model.eos_token_ids), policy_model.tokenizer_dir)
  if "medium" in names:
    model_config = random_qwen2_config(config.medium, max_len)
    params = host_params(init_params(model_config, jax.random.key(config.seed)))
    models["medium"] = BenchModel(
        "medium", model_config, params,
        f"random Qwen2 ({model_config.num_hidden_layers} layers, d={model_config.hidden_size}, "
        f"head_dim {model_config.head_dim}, vocab {model_config.vocab_size}; "
        f"{model_config.num_params() / 1e6:.1f}M params)",
        common.random_prompts(model_config.vocab_size))
  return models


# ------------------------------------------------------------------------------------ peak ----


def bench_peak(config) -> dict[str, Any]:
  """`profiling.matmul_peak` at the config's size, seed, warm-up and repetitions."""
  return matmul_peak(config.peak_matmul_size, seed=config.seed, warmup=config.warmup,
                     repetitions=config.repetitions)


# --------------------------------------------------------------------------------- trainer ----


def bench_trainer_case(config, model: BenchModel, response_len: int, precision: str,
                       optimizer, peak: dict[str, Any],
                       profile_dir: str | None = None) -> dict[str, Any]:
  """One train-step configuration of the trainer section (`profiling.train_step_speed`)."""
  return {"model": model.name, **train_step_speed(
      model.config, model.params, precision=precision, prompt_len=config.trainer_prompt_len,
      response_len=response_len, tokens_per_step=config.trainer_tokens_per_step,
      optimizer=optimizer, peak=peak, algorithm=config.algorithm, seed=config.seed,
      warmup=config.warmup, repetitions=config.repetitions, profile_dir=profile_dir)}


def bench_trainer(config, models: dict[str, BenchModel], peak: dict[str, Any],
                  profile_root: str | None = None) -> list[dict]:
  """Every trainer case of `config` (a `resolve_config` result: its lists are tuples)."""
  rows = []
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))  # one object: one jit key
  cases = [(m, length, p) for m in config.trainer_models
           for length in config.trainer_response_lengths for p in config.precisions]
  for name, length, precision in common.progress(cases, desc="trainer"):
    profile_dir = (os.path.join(profile_root, f"{name}_{length}_{precision}") if profile_root
                   else None)
    rows.append(bench_trainer_case(config, models[name], length, precision, optimizer, peak,
                                   profile_dir))
  return rows


# -------------------------------------------------------------------------------- samplers ----


def bench_sync(engine, model: BenchModel, directory: str, *, warmup: int,
               repetitions: int) -> dict[str, Any]:
  """Seconds per vLLM weight sync, in memory and through a Hugging Face directory.

  The in-memory sync is also timed in its two parts: our conversion (`to_hf_state_dict`) and
  vLLM's reload of ready host arrays (`VllmSampler.sync_weights`).
  """
  params = jax.device_put(model.params)  # the trainer's float32 device params, as in RL
  memory = time_calls(lambda i: engine.sync_weights(params), warmup=warmup,
                      repetitions=repetitions).seconds
  convert = time_calls(lambda i: to_hf_state_dict(model.config, params, engine.dtype),
                       warmup=warmup, repetitions=repetitions).seconds
  state = to_hf_state_dict(model.config, params, engine.dtype)
  reload = time_calls(lambda i: engine.sampler.sync_weights(state), warmup=warmup,
                      repetitions=repetitions).seconds
  disk = time_calls(lambda i: engine.sync_weights(params, directory=directory), warmup=warmup,
                    repetitions=repetitions).seconds
  shutil.rmtree(directory, ignore_errors=True)
  mbytes = _tree_bytes(model.params, engine.policy.compute_dtype) / MIB
  return {"model": model.name, "precision": dtype_name(engine.policy.compute_dtype),
          "param_mib": mbytes, "memory_s": memory, "directory_s": disk,
          "memory_convert_s": convert, "memory_reload_s": reload,
          "memory_mib_per_s": invert_stat(memory, mbytes),
          "directory_mib_per_s": invert_stat(disk, mbytes),
          "directory_over_memory": disk["median"] / max(memory["median"], 1e-12)}


def bench_worker_sync(model: BenchModel, precision: str, weights_dir: str, *, warmup: int,
                      repetitions: int, **engine_options) -> dict[str, Any]:
  """Seconds per sync of `--config.weight_sync=directory`: the trainer writes a versioned HF
  directory (`versions.write_version`: temp dir + rename, LATEST, pruning) and a vLLM worker in
  another process reloads it (`DirectorySyncEngine.sync_weights`, which waits for the reload)."""
  params = jax.device_put(model.params)
  engine = DirectorySyncEngine("vllm", model.config, params, get_policy(precision, "sampler"),
                               weights_dir=weights_dir, eos_token_ids=[], **engine_options)
  writes, reloads = [], []

  def call(i):
    engine.sync_weights(params)
    writes.append(engine.last_write_s)
    reloads.append(engine.last_reload_s)

  try:
    total = time_calls(call, warmup=warmup, repetitions=repetitions).seconds
  finally:
    engine.close()
    shutil.rmtree(weights_dir, ignore_errors=True)
  return {"worker_s": total, "worker_write_s": summarize(writes[warmup:]),
          "worker_reload_s": summarize(reloads[warmup:]), "worker_start_s": engine.start_s}


def _vllm_available() -> bool:
  try:
    import vllm  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def bench_samplers_and_sync(config, models: dict[str, BenchModel], workdir: str,
                            sections: Sequence[str]) -> tuple[list[dict], list[dict]]:
  """The JAX sampler runs first (before any vLLM engine has started its OpenMP threads in this
  process), then one vLLM engine per model and precision serves both its sampler figures and its
  weight-sync figures."""
  samplers, syncs = [], []
  sampler_models = config.sampler_models if "samplers" in sections else []
  sync_models = config.sync_models if "sync" in sections else []
  lengths = config.sampler_response_lengths
  n = config.sampler_samples_per_prompt
  reps = {"warmup": max(config.warmup, 1), "repetitions": config.repetitions}
  prompts = {name: models[name].make_prompts(config.sampler_prompts, config.seed)
             for name in set(sampler_models) | set(sync_models)}

  for name in sampler_models:
    model = models[name]
    for precision in config.precisions:
      engine = make_engine("jax", model.config, model.params, get_policy(precision, "sampler"),
                           eos_token_ids=[])
      for length in lengths:
        row = generate_speed(engine, prompts[name], n=n, max_new_tokens=length,
                             seed=config.seed, **reps)
        samplers.append({"model": name, "engine": "jax", "precision": precision, **row})
      engine.close()

  if not config.vllm:
    return samplers, syncs
  sync_precisions = config.sync_precisions
  sessions = [(name, p) for name in MODEL_NAMES for p in
              dict.fromkeys([*config.precisions, *sync_precisions])
              if (name in sampler_models and p in config.precisions)
              or (name in sync_models and p in sync_precisions)]
  for name, precision in common.progress(sessions, desc="vllm engines"):
    model = models[name]
    max_len = common.max_model_len(prompts[name], max(lengths))
    start = time.perf_counter()
    engine = make_engine("vllm", model.config, model.params, get_policy(precision, "sampler"),
                         workdir=workdir, eos_token_ids=[], max_model_len=max_len,
                         seed=config.seed, cpu_kv_cache_space_gib=config.vllm_kv_cache_gib)
    start_s = time.perf_counter() - start
    try:
      if name in sampler_models and precision in config.precisions:
        for length in lengths:
          row = generate_speed(engine, prompts[name], n=n, max_new_tokens=length,
                               seed=config.seed, **reps)
          samplers.append({"model": name, "engine": "vllm", "precision": precision,
                           "engine_start_s": start_s, **row})
      if name in sync_models and precision in sync_precisions:
        syncs.append(bench_sync(engine, model, os.path.join(workdir, f"sync_{name}_{precision}"),
                                **reps))
        if config.get("sync_worker", False):
          row = syncs[-1]
          row.update(bench_worker_sync(
              model, precision, os.path.join(workdir, f"weights_{name}_{precision}"),
              max_model_len=max_len, seed=config.seed,
              cpu_kv_cache_space_gib=config.vllm_kv_cache_gib, **reps))
          row["worker_over_memory"] = (row["worker_s"]["median"]
                                       / max(row["memory_s"]["median"], 1e-12))
    finally:
      engine.close()
  return samplers, syncs


# ------------------------------------------------------------------------------ end to end ----


def parity_reward(rollout) -> np.ndarray:
  """float32 [B]: fraction of even token ids in each response (a cheap reward that varies
  within groups, for models without a task)."""
  mask = rollout.response_mask.astype(np.float32)
  even = (rollout.response_tokens % 2 == 0).astype(np.float32) * mask
  return even.sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def bench_e2e(config, model: BenchModel, workdir: str, *, engine: str | None = None,
              precision: str | None = None) -> dict[str, Any]:
  """`rl_iteration` time split, compilations per iteration and peak RSS, at the e2e settings
  (`engine`, `precision`: default the e2e block's; engine "jax_bitwise": the bitwise mode)."""
  e = config.e2e
  engine = engine or e.engine
  precision = precision or e.precision
  pair = get_precision_pair(precision, bitwise=engine == "jax_bitwise")
  rl_config = RLConfig(algorithm=e.algorithm, samples_per_prompt=e.samples_per_prompt,
                       num_minibatches=e.num_minibatches, max_new_tokens=e.max_new_tokens,
                       loss=objectives.LossConfig(max_response_len=e.max_new_tokens))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=e.learning_rate))
  iterations = max(config.warmup, 1) + config.repetitions
  task = None
  if model.tokenizer_dir is not None and os.path.exists(
      os.path.join(model.tokenizer_dir, "task_config.json")):
    task = load_task(model)
  if task is not None:
    problems = [task.problems(e.prompts_per_step, seed=config.seed + i) for i in range(iterations)]
    prompts = [task.prompt_ids(p) for p in problems]
    rewards = [lambda r, p=p: task.rewards(p, r) for p in problems]
    reward_name = "synthetic task (exact answer)"
  else:
    prompts = [model.make_prompts(e.prompts_per_step, config.seed + i) for i in range(iterations)]
    rewards = [parity_reward] * iterations
    reward_name = "parity of response tokens (model has no task)"
  max_len = common.max_model_len([p for step in prompts for p in step], e.max_new_tokens)
  state = TrainState.create(model.params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  sampler = make_engine("jax" if engine.startswith("jax") else engine, model.config,
                        model.params, pair.sampler, workdir=workdir,
                        tokenizer_dir=model.tokenizer_dir, eos_token_ids=model.eos_token_ids,
                        max_model_len=max_len, seed=config.seed,
                        cpu_kv_cache_space_gib=config.vllm_kv_cache_gib)
  per_iteration, compiles, names, warmup_s, warmup_compile_s = [], [], [], [], 0.0
  compile_by_function: dict[str, float] = {}
  try:
    for i in common.progress(range(iterations), desc=f"e2e {engine} {precision} {model.name}"):
      state, metrics, elapsed, counter = timed_rl_iteration(
          state, model.config, pair.trainer, optimizer, sampler, prompts[i], rewards[i],
          rl_config, seed=seeds.rl_step(config.seed, i))
      if i < iterations - config.repetitions:
        warmup_s.append(elapsed)
        warmup_compile_s += counter.seconds
        for name, seconds in counter.seconds_by_function.items():
          compile_by_function[name] = compile_by_function.get(name, 0.0) + seconds
      else:
        per_iteration.append(metrics)
        compiles.append(counter.count)
        names += counter.names
  finally:
    sampler.close()
  parts = ("sample", "score", "logp", "update", "sync")
  out = {"engine": engine, "precision": precision, "reward": reward_name,
         "rows": e.prompts_per_step * e.samples_per_prompt, "max_new_tokens": e.max_new_tokens}
  for part in parts + ("step",):
    out[f"{part}_s"] = summarize([m[f"time/{part}_s"] for m in per_iteration])
  other = [(m["time/score_s"] + m["time/logp_s"] + m["time/sync_s"]) / m["time/step_s"]
           for m in per_iteration]
  out["other_fraction"] = summarize(other)
  out["response_length_mean"] = summarize([m["response/length_mean"] for m in per_iteration])
  out["tokens_per_s"] = summarize([m["perf/tokens_per_s"] for m in per_iteration])
  out["compiles_per_iteration"] = max(compiles)
  out["recompiled"] = sorted(set(names))
  out["warmup_iteration_s"] = warmup_s
  out["warmup_compile_s"] = warmup_compile_s
  out["warmup_compile_s_by_function"] = dict(sorted(compile_by_function.items(),
                                                    key=lambda kv: -kv[1]))
  out["peak_rss_mib"] = peak_rss_mib()
  out["mismatch_max"] = max(m["mismatch/prob_diff_max"] for m in per_iteration)
  return out


def bench_bitwise(config, models: dict[str, BenchModel], workdir: str) -> list[dict[str, Any]]:
  """The e2e RL iteration of the JAX engine in the normal and the bitwise mode, one after the
  other on each of `config.bitwise_models`, at `config.bitwise_precision`."""
  return [{"model": name, "normal": bench_e2e(config, models[name], workdir, engine="jax",
                                              precision=config.bitwise_precision),
           "bitwise": bench_e2e(config, models[name], workdir, engine="jax_bitwise",
                                precision=config.bitwise_precision)}
          for name in config.bitwise_models]


def timed_rl_iteration(state, model_config, trainer_policy, optimizer, engine, prompts,
                       reward_fn, rl_config, *, seed: int):
  """One `rl_iteration` under a compile counter: (state, metrics, seconds, CompileCounter)."""
  with CompileCounter() as counter:
    start = time.perf_counter()
    state, metrics = rl_iteration(
        state, model_config=model_config, trainer_policy=trainer_policy, optimizer=optimizer,
        engine=engine, prompts=prompts, reward_fn=reward_fn, rl_config=rl_config, seed=seed)
    elapsed = time.perf_counter() - start
  return state, metrics, elapsed, counter


# ------------------------------------------------------------------------------ compare ----


def _problems_and_task(model: BenchModel):
  """The model directory's perfectible problems (what TRL's script trains on) and its task."""
  path = os.path.join(model.tokenizer_dir or "", PERFECTIBLE_FILE)
  if model.tokenizer_dir is None or not os.path.exists(path):
    raise FileNotFoundError(f"The compare section needs a model directory with a task and "
                            f"{PERFECTIBLE_FILE} (the committed tiny base model); got "
                            f"{model.description}")
  from rl_fp16.data.tasks import problem_from_record  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    problems = [problem_from_record(json.loads(line)) for line in f if line.strip()]
  return problems, load_task(model)


def bench_rl_case(config, model: BenchModel, engine_name: str, precision: str, workdir: str,
                  iterations: int, optimizer=None) -> dict[str, Any]:
  """`iterations` RL iterations of one engine and precision at the compare settings: per
  iteration its time split, compilations, response lengths and resident memory."""
  c = config.compare
  problems, task = _problems_and_task(model)
  pair = get_precision_pair(precision, bitwise=engine_name == "jax_bitwise")
  rl_config = RLConfig(algorithm=c.algorithm, samples_per_prompt=c.samples_per_prompt,
                       num_minibatches=c.num_minibatches, max_new_tokens=c.max_new_tokens,
                       sequence_bucket=c.sequence_bucket, micro_batch_rows=c.micro_batch_rows,
                       loss=objectives.LossConfig(max_response_len=c.max_new_tokens))
  if optimizer is None:
    optimizer = make_optimizer(OptimizerConfig(learning_rate=c.learning_rate))
  per_step = c.prompts_per_step
  batches = [[problems[(i * per_step + j) % len(problems)] for j in range(per_step)]
             for i in range(iterations)]
  prompts = [task.prompt_ids(b) for b in batches]
  max_len = common.max_model_len([p for step in prompts for p in step], c.max_new_tokens)
  state = TrainState.create(model.params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  # One decode shape for the run: prompts padded to the longest prompt of the problem set.
  longest_prompt = max(len(p) for p in task.prompt_ids(problems))
  prompt_bucket = int(-(-longest_prompt // 16) * 16)
  start = time.perf_counter()
  engine = make_engine("jax" if engine_name.startswith("jax") else "vllm", model.config,
                       model.params,
                       pair.sampler, workdir=workdir, prompt_bucket=prompt_bucket,
                       tokenizer_dir=model.tokenizer_dir, eos_token_ids=model.eos_token_ids,
                       max_model_len=max_len, seed=config.seed,
                       cpu_kv_cache_space_gib=config.vllm_kv_cache_gib,
                       decode_row_group=int(c.jax_decode_row_group),
                       **({"enforce_eager": bool(c.vllm_enforce_eager
                                                 and engine_name != "vllm_compiled"),
                           "max_num_seqs": int(c.vllm_max_num_seqs), "vllm_log_level": "ERROR"}
                          if engine_name == "vllm" else {}))
  engine_start_s = time.perf_counter() - start
  rows = []
  try:
    progress = common.progress(range(iterations), desc=f"compare {engine_name} {precision}")
    for i in progress:
      state, metrics, elapsed, counter = timed_rl_iteration(
          state, model.config, pair.trainer, optimizer, engine, prompts[i],
          lambda r, b=batches[i]: task.rewards(b, r), rl_config, seed=seeds.rl_step(config.seed, i))
      rows.append({"seconds": elapsed, "compiles": counter.count, "recompiled": counter.names,
                   "compile_s": counter.seconds, "rss_mib": current_rss_mib(),
                   "peak_rss_mib": peak_rss_mib(), **{k: float(v) for k, v in metrics.items()}})
      progress.set_postfix(s=f"{elapsed:.2f}", rss_mib=f"{rows[-1]['rss_mib']:.0f}")
      if i + 1 == c.warmup and c.sequence_bucket:
        # The trainer compiles once per packed width (a multiple of sequence_bucket): compile
        # every bucket from the smallest seen in warm-up to the longest possible one now.
        bucket = c.sequence_bucket
        seen = min(int(r["perf/train_seq_len"]) for r in rows)
        top = int(-(-(longest_prompt + c.max_new_tokens) // bucket) * bucket)
        with CompileCounter() as counter:
          start = time.perf_counter()
          precompiled = precompile_rl_update(
              state, model_config=model.config, trainer_policy=pair.trainer,
              optimizer=optimizer, rl_config=rl_config,
              rows=c.prompts_per_step * c.samples_per_prompt,
              widths=range(seen, top + 1, bucket))
          precompile_s = time.perf_counter() - start
        rows[-1]["compile_s"] += counter.seconds
        rows[-1]["precompiled_widths"] = precompiled
        rows[-1]["precompile_s"] = precompile_s
  finally:
    engine.close()
  return {"engine": engine_name, "precision": precision, "engine_start_s": engine_start_s,
          "iterations": rows}


def bench_trl(config, model: BenchModel) -> dict[str, Any]:
  """TRL's GRPOTrainer at the same settings, in its own venv (a subprocess); its median over
  the iterations after the first. {"skipped": reason} when `trl_python` is unset or missing."""
  c = config.compare
  python = os.path.expanduser(str(config.trl_python or ""))
  if not python:
    return {"skipped": f"--config.trl_python is unset; make the TRL venv with `{TRL_SETUP}` "
                       "(it prints its python) and pass --config.trl_python=~/.venvs/trl-peer/"
                       "bin/python"}
  if not os.path.exists(python):
    return {"skipped": f"--config.trl_python={python} does not exist; make it with "
                       f"`{TRL_SETUP}`"}
  if model.tokenizer_dir is None:
    return {"skipped": "TRL needs the model directory (the committed tiny base model)"}
  command = [python, TRL_SCRIPT, model.tokenizer_dir, str(c.trl_iterations),
             str(c.prompts_per_step), str(c.samples_per_prompt)]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True, timeout=c.trl_timeout_s,
                        check=False, cwd=REPO_ROOT)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"TRL exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
  found = parse_trl_output(proc.stdout)
  per_iter = found["ITER_S"]
  timed = per_iter[1:] or per_iter
  out = {"command": " ".join(command), "wall_s": wall, "iteration_s": summarize(timed),
         "iterations": per_iter, "mean_completion_tokens": found.get("MEAN_COMPLETION_TOKENS"),
         "trl_reported_median": found.get("ITER_S_MEDIAN")}
  parts = found.get("PARTS_S")
  if parts and len(parts) == len(per_iter):
    parts = parts[1:] or parts
    for name, key in (("sample", "sample"), ("logp", "score_logp"), ("update", "update")):
      out[f"{name}_s"] = summarize([p[key] for p in parts])
  return out


def bench_compare(config, model: BenchModel, workdir: str, peak: dict[str, Any] | None
                  ) -> dict[str, Any]:
  """TRL and rl_fp16's engines side by side: see the config's `compare` block."""
  c = config.compare
  out: dict[str, Any] = {"settings": {k: c[k] for k in (
      "prompts_per_step", "samples_per_prompt", "max_new_tokens", "num_minibatches",
      "learning_rate", "algorithm", "sequence_bucket", "warmup", "repetitions",
      "micro_batch_rows", "jax_decode_row_group")}}
  print("compare: TRL (subprocess) ...", flush=True)
  out["trl"] = bench_trl(config, model)
  if "skipped" in out["trl"]:
    print(f"  TRL skipped: {out['trl']['skipped']}")
  cases = []
  # One optimizer object for every case: cases with the same trainer precision share the jitted
  # trainer (its static arguments are equal), so they do not compile it again.
  optimizer = make_optimizer(OptimizerConfig(learning_rate=c.learning_rate))
  for k, case in enumerate(c.cases):
    engine_name, _, precision = case.partition(":")
    if engine_name != "jax" and not config.vllm:
      print(f"compare: {case} skipped (--config.vllm=False)")
      continue
    iterations = c.warmup + c.repetitions
    if k == 0:
      iterations = max(iterations, c.warmup + c.memory_iterations)
    print(f"compare: rl_fp16 {engine_name} {precision}, {iterations} iterations ...", flush=True)
    raw = bench_rl_case(config, model, engine_name, precision, workdir, iterations, optimizer)
    row = summarize_rl_case(raw, c.warmup, c.repetitions)
    row["floor"] = physical_floor(model, row, c, peak)
    cases.append(row)
  out["cases"] = cases
  out["padding"] = padding_waste(c, seed=config.seed)
  trl_s = out["trl"].get("iteration_s", {}).get("median")
  for row in cases:
    row["speedup_vs_trl"] = (trl_s / row["iteration_s"]["median"]) if trl_s else None
  return out


# --------------------------------------------------------------------------------- the run ----


def machine_info() -> dict[str, Any]:
  info = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()], "load_average": os.getloadavg()}
  try:
    import vllm  # pylint: disable=g-import-not-at-top
    info["vllm"] = vllm.__version__
  except ImportError:
    info["vllm"] = None
  return info


def run(config) -> dict[str, Any]:
  """Runs the selected sections; returns (and writes) every figure and the targets."""
  config = resolve_config(config)
  sections = list(config.sections)
  run_dir = os.path.abspath(config.output_dir)
  workdir = os.path.join(run_dir, "work")
  os.makedirs(workdir, exist_ok=True)
  # resume_step=0: a rerun with the same config replaces the earlier measurement.
  writer = RunWriter(run_dir, config.to_dict(), resume=True, resume_step=0)
  _check_vllm(config, sections)
  started = time.perf_counter()
  results: dict[str, Any] = {"machine": machine_info(), "quick": bool(config.quick),
                             "sections": sections}
  _print_header(config, results)
  models = load_models(config, sorted(_needed_models(config, sections)), _max_len(config))
  results["models"] = _describe_models(models)
  clocks = results["section_seconds"] = {}
  _run_sections(config, sections, models, results, clocks, run_dir, workdir)
  results["peak_rss_mib"] = peak_rss_mib()
  results["targets"] = evaluate_targets(results)
  results["seconds"] = time.perf_counter() - started
  results["machine"]["load_average_end"] = os.getloadavg()
  shutil.rmtree(workdir, ignore_errors=True)
  return _write_and_print(results, clocks, writer, run_dir)


def _check_vllm(config, sections: Sequence[str]) -> None:
  """ImportError when a selected section needs vLLM and it is missing; ValueError for e2e with
  the vLLM engine under vllm=False."""
  compare_vllm = "compare" in sections and any(
      case.startswith("vllm") for case in config.compare.cases)
  if config.vllm and ({"samplers", "sync"} & set(sections) or compare_vllm or
                      ("e2e" in sections and config.e2e.engine == "vllm")):
    if not _vllm_available():
      raise ImportError("vLLM is not installed; install it or pass --config.vllm=False (and "
                        "--config.e2e.engine=jax)")
  if not config.vllm and config.e2e.engine == "vllm" and "e2e" in sections:
    raise ValueError("--config.vllm=False needs --config.e2e.engine=jax")


def _print_header(config, results: dict[str, Any]) -> None:
  """One line: the sections, repetitions and the machine's load."""
  print(f"benchmark{' (quick)' if config.quick else ''}: sections "
        f"{', '.join(results['sections'])}; "
        f"{config.warmup} warm-up + {config.repetitions} timed repetitions each; "
        f"load average {results['machine']['load_average'][0]:.2f} on "
        f"{results['machine']['cpus']} CPUs")


def _max_len(config) -> int:
  """The longest sequence any section runs (prompts of the samplers and RL runs: 64 tokens)."""
  return max([config.trainer_prompt_len + max(config.trainer_response_lengths)]
             + [64 + max(config.sampler_response_lengths)]
             + [64 + config.e2e.max_new_tokens, 64 + config.compare.max_new_tokens])


def _needed_models(config, sections: Sequence[str]) -> set[str]:
  """The model names ("small", "medium") the selected sections use."""
  needed = set()
  if "trainer" in sections:
    needed |= set(config.trainer_models)
  if "samplers" in sections:
    needed |= set(config.sampler_models)
  if "sync" in sections and config.vllm:
    needed |= set(config.sync_models)
  if "e2e" in sections or "compare" in sections:
    needed.add("small")
  if "bitwise" in sections:
    needed |= set(config.bitwise_models)
  return needed


def _describe_models(models: dict[str, Any]) -> dict[str, Any]:
  """Prints each model's description; returns name -> {description, params, config}."""
  described = {name: {"description": m.description, "params": m.num_params,
                      "config": dataclasses.asdict(m.config)}
               for name, m in models.items()}
  for name, m in models.items():
    print(f"  {name}: {m.description}")
  return described


def _timed(clocks: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
  """fn(), with its wall and process CPU seconds kept in clocks[name]."""
  with SectionClock() as clock:
    value = fn()
  clocks[name] = clock.to_dict()
  return value


def _run_sections(config, sections: Sequence[str], models: dict[str, Any],
                  results: dict[str, Any], clocks: dict[str, Any], run_dir: str,
                  workdir: str) -> None:
  """Runs each selected section in order (peak first: the trainer and compare use it) and puts
  its figures in `results` under the section's name."""
  if "peak" in sections or "trainer" in sections or "compare" in sections:
    results["peak"] = _timed(clocks, "peak", lambda: bench_peak(config))
  if "trainer" in sections:
    profile_root = os.path.join(run_dir, "profile") if config.profile else None
    results["trainer"] = _timed(clocks, "trainer", lambda: bench_trainer(
        config, models, results["peak"], profile_root))
  if "samplers" in sections or ("sync" in sections and config.vllm):
    samplers, syncs = _timed(clocks, "samplers+sync", lambda: bench_samplers_and_sync(
        config, models, workdir, sections))
    if "samplers" in sections:
      results["samplers"] = samplers
    if "sync" in sections and config.vllm:
      results["sync"] = syncs
  if "e2e" in sections:
    results["e2e"] = _timed(clocks, "e2e", lambda: bench_e2e(config, models["small"], workdir))
  if "bitwise" in sections:
    results["bitwise"] = _timed(clocks, "bitwise",
                                lambda: bench_bitwise(config, models, workdir))
  if "compare" in sections:
    results["compare"] = _timed(clocks, "compare", lambda: bench_compare(
        config, models["small"], workdir, results.get("peak")))


def _write_and_print(results: dict[str, Any], clocks: dict[str, Any], writer: RunWriter,
                     run_dir: str) -> dict[str, Any]:
  """Writes metrics.jsonl and benchmark.json, prints the report and the timings; returns the
  results with "run_dir" and "report"."""
  with writer:
    writer.write(0, run_metrics(results))
  fileio.write_json_atomic(os.path.join(run_dir, "benchmark.json"), results)
  report = format_report(results)
  print("\n" + report)
  print("\nsection seconds (wall / process CPU): " + ", ".join(
      f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}" for k, v in clocks.items()))
  print(f"peak RSS {results['peak_rss_mib']:.0f} MiB; {results['seconds']:.0f} s; load "
        f"average {results['machine']['load_average_end'][0]:.2f} at the end; wrote "
        f"{run_dir}: config.json, metrics.jsonl, benchmark.json")
  results["run_dir"] = run_dir
  results["report"] = report
  return results
