r"""The accelerator check: trainer-vs-JAX-sampler mismatch and RL train-step speed per precision.

One command for a short lease on a GPU machine (it runs on CPU too, at smoke size):

    python -m experiments.gpu_check --config=experiments/gpu_check/config.py
    python -m experiments.gpu_check --config=experiments/gpu_check/config.py:scale  # paper scale

Stages, each in this process, each kept going past another's failure (device time is scarce; the
command still exits non-zero and names the failed stage):
  1. The offline mismatch measurement (`rl_fp16.offline`, as experiments.offline_mismatch runs
     it; its metrics.jsonl row, no plots) with the JAX engine: the sampler's KV-cache decode in the
     sampler dtype against the trainer's full-sequence forward in the trainer dtype.
  2. The fp32 pair (`highest_pairs`) again under `jax.default_matmul_precision("highest")`
     (`fp32_highest`): on NVIDIA GPUs JAX runs float32 matmuls in TF32 by default.
  3. The benchmark's peak and trainer measurements (`rl_fp16.profiling`): matmul peak per dtype
     and train-step (`make_train_step`) tokens/s and MFU for fp32, bf16 and fp16.
  4. The fp32 train step under "highest" (`fp32_highest`).
  paper: the paper's model shape (`paper.model`, random weights, `remat` per layer):
     the RL train step on `paper.rows` sequences of `paper.seq_len` tokens per precision (fp16 with
     dynamic loss scaling), compiled ahead of time: seconds, tokens/s, MFU against the measured
     matmul peak of the compute dtype, XLA's memory plan and the device's peak memory; then the
     JAX sampler's decode at each of `paper.decode_rows` rows: tokens/s, seconds per decode step,
     the weight bytes it streams per second, and its bandwidth floor (weights and KV cache read
     once per step at the device's copy bandwidth, measured first: `scale.copy_bandwidth`).
  rl: one end-to-end RL iteration (`Learner.step`, JAX engine) per `rl.iterations` at the paper
     model's shape, random weights and prompts, a reward on token ids: wall seconds and the loop's
     split (sample, score, logp_old, update, sync; `scale.rl_iteration_row`).
  minibatch: one minibatch update of `paper.minibatch.rows` rows at the paper model's shape with
     lognormal response lengths, per entry of `paper.minibatch.micro_batch_rows` (length-sorted
     micro-batches, `RLConfig.micro_batch_rows`; 0 = the whole minibatch at its longest row):
     padded slots, real tokens/s and MFU on the real tokens' model FLOPs.
With `budget_s`, each paper and rl case is first checked against the time left
(`scale.Budget`): a case whose estimate does not fit is skipped, its reason printed and kept in
the summary's "skipped".
Stages run in the order `stages` names them. Each stage is a run directory under `output_dir`
(mismatch_default, benchmark_default, ..._highest, paper), written through
`rl_fp16.results.RunWriter`: config.json and one metrics.jsonl row at step 0
(`results.load_runs(output_dir)` reads them all). `output_dir` also gets the report:
`summary.json` (every row, the device, the stage seconds and failed stages' tracebacks) and
`summary.md`, printed last.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from experiments.benchmark import config as benchmark_config
from experiments.configs import offline_mismatch
from experiments.gpu_check import scale
from experiments.gpu_check.scale import device_peak_bytes
from rl_fp16 import fileio, objectives, offline, profiling, results
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models.paper_configs import get_paper_config
from rl_fp16.names import config_list
from rl_fp16.precision import (default_loss_scale_config, dtype_name, get_policy,
                               get_precision_pair, init_loss_scale)
from rl_fp16.sampling.engines import make_engine
from rl_fp16.train import (OptimizerConfig, RLConfig, make_optimizer, make_train_step,
                           make_update)


STAGES = ("mismatch", "trainer", "paper", "rl", "minibatch")
# The config fields that list names or integers: tuples in the config file; on the command line
# `--config.stages=paper,mismatch` (`run` reads them with rl_fp16.names.config_list).
NAME_LISTS = ("stages", "highest_pairs", "mismatch.precisions", "paper.precisions",
              "benchmark.sections", "benchmark.precisions", "benchmark.trainer_models")
INT_LISTS = ("benchmark.trainer_response_lengths", "paper.decode_rows",
             "paper.minibatch.micro_batch_rows")
GIB = 1024**3
MFU_GOAL = 0.40  # the paper-scale train step's MFU goal, against the dtype's measured peak
MISMATCH_COLUMNS = (
    ("mean abs dlogp", "mismatch/logp_diff_mean"),
    ("max abs dlogp", "mismatch/logp_diff_max"),
    ("mean abs dprob", "mismatch/prob_diff_mean"),
    ("KL k3", "mismatch/kl_k3"),
    ("mean abs seq log ratio", "mismatch/seq_log_ratio_abs_mean"),
)


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {"backend": jax.default_backend(), "devices": [str(d) for d in devices],
          "device_kind": devices[0].device_kind, "jax": jax.__version__,
          "python": platform.python_version(), "host_cpus": os.cpu_count()}


def _sub_config(base, overrides: dict[str, Any], **fields):
  config = base.get_config()
  common.merge_overrides(config, overrides)
  common.merge_overrides(config, fields)
  return config


def _matmul_precision(name: str):
  """"default" (XLA's choice; TF32 for float32 on NVIDIA GPUs) or a jax matmul precision name."""
  if name == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(name)


def _mismatch_rows(result: dict[str, Any], matmul_precision: str) -> list[dict[str, Any]]:
  return [{"pair": pair, "matmul_precision": matmul_precision,
           **{key: metrics[key] for _, key in MISMATCH_COLUMNS},
           "tokens": metrics.get("mismatch/num_tokens"),
           "response_length_mean": metrics["response/length_mean"]}
          for pair, metrics in result["metrics"].items()]


def _trainer_rows(result: dict[str, Any], matmul_precision: str) -> list[dict[str, Any]]:
  return [{"model": r["model"], "params": r["params"], "tokens": r["tokens"],
           "precision": r["precision"], "matmul_precision": matmul_precision,
           "step_s": r["seconds"]["median"], "step_s_min": r["seconds"]["min"],
           "step_s_max": r["seconds"]["max"], "tokens_per_s": r["tokens_per_s"]["median"],
           "mfu_fp32_peak": r["mfu"]["median"],
           "mfu_compute_dtype_peak": r["mfu_compute_dtype"]["median"],
           "compiles_per_step": r["compiles_per_step"],
           "warmup_compile_s": r["warmup_compile_s"]}
          for r in result["trainer"]]


# --------------------------------------------------------------- mismatch and trainer stages ----


def measure_mismatch(mismatch_config, run_dir: str) -> dict[str, Any]:
  """The offline measurement (`rl_fp16.offline`) of every pair in `mismatch_config` (an
  experiments/configs/offline_mismatch.py config): writes the run `run_dir` (`offline.run_metrics`
  at step 0) and returns the summary ({"metrics": {pair: dict}, "layer_view": ...})."""
  config = mismatch_config
  pairs = config_list(config.precisions, "mismatch.precisions")
  for pair in pairs:
    get_precision_pair(pair)  # fail before any work on a bad name
  model = common.load_policy_model(config.model, seed=config.seed)
  prompts = model.make_prompts(config.num_prompts, seed=config.seed)
  # resume_step=0: a rerun with the same config replaces the earlier measurement.
  writer = results.RunWriter(run_dir, config.to_dict(), resume=True, resume_step=0)
  measured = {}
  for pair in pairs:
    measured[pair] = offline.measure_pair(
        model, pair, prompts, engine=config.engine,
        samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, seed=config.seed, workdir=run_dir,
        max_model_len=common.max_model_len(prompts, config.max_new_tokens))
    print(f"  {pair}: mean|dlogp|={measured[pair]['metrics']['mismatch/logp_diff_mean']:.3g}",
          flush=True)
  view = (offline.layer_view(model, measured, config.layer_view_sequences) if config.layer_view
          else None)
  summary = {"model": model.description, "engine": config.engine,
             **offline.summarize_pairs(measured, view)}
  with writer:
    writer.write(0, offline.run_metrics(summary))
  return summary


def trainer_models(bench) -> dict[str, tuple[ModelConfig, Any]]:
  """{name: (model config, float32 host params)} of `bench.trainer_models` (a benchmark config):
  "small" is `bench.model`, "medium" a random Qwen2 of `bench.medium`'s shape."""
  names = config_list(bench.trainer_models, "benchmark.trainer_models")
  unknown = sorted(set(names) - {"small", "medium"})
  if unknown:
    raise ValueError(f"config.benchmark.trainer_models has {unknown}; allowed: small, medium")
  max_len = bench.trainer_prompt_len + max(
      config_list(bench.trainer_response_lengths, "benchmark.trainer_response_lengths", item=int))
  models = {}
  if "small" in names:
    small = common.load_policy_model(bench.model, seed=bench.seed)
    models["small"] = (profiling.with_context(small.config, max_len),
                       profiling.host_params(small.params))
  if "medium" in names:
    medium = profiling.random_qwen2_config(bench.medium, max_len)
    models["medium"] = (medium, profiling.host_params(init_params(medium,
                                                                  jax.random.key(bench.seed))))
  return models


def measure_trainer(bench, run_dir: str) -> dict[str, Any]:
  """The matmul peak and train-step speed per model, response length and precision of
  `bench` (a benchmark config); writes the run `run_dir` (`trainer_metrics` at step 0) and
  returns {"peak", "trainer"}."""
  precisions = config_list(bench.precisions, "benchmark.precisions")
  lengths = config_list(bench.trainer_response_lengths, "benchmark.trainer_response_lengths",
                        item=int)
  for precision in precisions:
    get_policy(precision)  # a clear error on a bad name, before any work
  models = trainer_models(bench)
  writer = results.RunWriter(run_dir, bench.to_dict(), resume=True, resume_step=0)
  peak = profiling.matmul_peak(bench.peak_matmul_size, seed=bench.seed, warmup=bench.warmup,
                               repetitions=bench.repetitions)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))  # one object: one jit key
  rows = []
  for name in config_list(bench.trainer_models, "benchmark.trainer_models"):
    model_config, params = models[name]
    for length in lengths:
      for precision in precisions:
        rows.append({"model": name, **profiling.train_step_speed(
            model_config, params, precision=precision, prompt_len=bench.trainer_prompt_len,
            response_len=length, tokens_per_step=bench.trainer_tokens_per_step,
            optimizer=optimizer, peak=peak, algorithm=bench.algorithm, seed=bench.seed,
            warmup=bench.warmup, repetitions=bench.repetitions)})
  result = {"peak": peak, "trainer": rows}
  with writer:
    writer.write(0, trainer_metrics(result))
  return result


def trainer_metrics(result: dict[str, Any]) -> dict[str, float]:
  """{"peak", "trainer"} as one metrics row: "peak/float32/flops_per_s/median", ...,
  "trainer/{model}/{precision}/resp{length}/tokens_per_s/median", ..."""
  cases = {f"{r['model']}/{r['precision']}/resp{r['response_len']}": r for r in result["trainer"]}
  return results.flatten_metrics({"peak": result["peak"], "trainer": cases})


# ---------------------------------------------------------------------- paper-scale stage ----


def paper_model_config(paper) -> ModelConfig:
  """`paper.model` from `paper_configs` (a dense one), with `paper.model_overrides` (smoke sizes)
  and `remat`."""
  model_config = get_paper_config(paper.model)
  if not isinstance(model_config, ModelConfig):
    raise ValueError(f"config.paper.model={paper.model!r} is not a dense decoder this stage runs")
  overrides = dict(paper.model_overrides)
  return model_config.replace(remat=bool(paper.remat), **overrides)


def paper_train_case(model_config: ModelConfig, params, precision: str, paper, peak,
                     seed: int) -> dict[str, Any]:
  """One precision's train step at the paper's shape: compiled once ahead of time (so its
  memory plan is known), warmed up once, then `paper.repetitions` timed steps."""
  policy = get_policy(precision, "trainer")
  rows, seq, prompt_len = int(paper.rows), int(paper.seq_len), int(paper.prompt_len)
  response_len = seq - prompt_len
  batch = jax.device_put(profiling.synthetic_rl_batch(model_config.vocab_size, rows, prompt_len,
                                                      response_len, seed))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6))
  params = jax.tree_util.tree_map(jnp.copy, params)  # the step donates its state
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(policy)))
  start = time.perf_counter()
  train_step = make_train_step(model_config, policy, optimizer, rl_config=RLConfig(
      algorithm="grpo", loss=objectives.LossConfig(max_response_len=response_len),
      temperature=1.0))
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  plan = compiled.memory_analysis()
  holder, skipped = {"state": state}, []

  def step(_):
    new_state, metrics = compiled(holder["state"], batch, train_step.base_params)
    holder["state"] = jax.block_until_ready(new_state)
    skipped.append(float(jax.device_get(metrics["train/skipped_steps"])))

  timing = profiling.time_calls(step, warmup=1, repetitions=int(paper.repetitions))
  del holder, state
  seconds = timing.seconds
  flops = profiling.train_step_flops(model_config, rows, seq)
  dtype_peak = peak[dtype_name(policy.compute_dtype)]["flops_per_s"]["median"]
  return {
      "model": paper.model, "params": model_config.num_params(), "remat": model_config.remat,
      "precision": precision, "rows": rows, "seq_len": seq, "tokens": rows * seq,
      "step_s": seconds["median"], "step_s_min": seconds["min"], "step_s_max": seconds["max"],
      "tokens_per_s": rows * seq / seconds["median"], "model_flops": flops["total"],
      "mfu_compute_dtype_peak": flops["total"] / seconds["median"] / dtype_peak,
      "meets_mfu_goal": bool(flops["total"] / seconds["median"] / dtype_peak >= MFU_GOAL),
      "compute_dtype_peak_flops_per_s": dtype_peak, "compile_s": compile_s,
      "compiles_per_step": max(timing.compiles),
      "xla_plan_gib": {"arguments": plan.argument_size_in_bytes / GIB,
                       "outputs": plan.output_size_in_bytes / GIB,
                       "aliased": plan.alias_size_in_bytes / GIB,
                       "temporaries": plan.temp_size_in_bytes / GIB},
      "device_peak_gib_so_far": device_peak_bytes() / GIB,
      "skipped_steps": skipped,
  }


def paper_update_case(model_config: ModelConfig, params, paper, peak, seed: int,
                      micro_batch_rows: int) -> dict[str, Any]:
  """One minibatch update (`make_update`, one minibatch) of `paper.minibatch.rows` rows whose
  response lengths are lognormal (mean `length_mean`, log-space sigma `length_sigma`, clipped to
  seq_len - prompt_len), in length-sorted micro-batches of `micro_batch_rows` rows at widths that
  are multiples of `bucket` (0: the whole minibatch at once, padded to its longest row).
  MFU counts the model FLOPs of the real tokens only, against the compute dtype's peak."""
  update_config = paper.minibatch
  policy = get_policy(update_config.precision, "trainer")
  rows, seq, prompt_len = int(update_config.rows), int(paper.seq_len), int(paper.prompt_len)
  response_len = seq - prompt_len
  rng = np.random.default_rng(seed)
  sigma = float(update_config.length_sigma)
  lengths = np.clip(np.round(rng.lognormal(np.log(float(update_config.length_mean))
                                           - sigma**2 / 2, sigma, rows)), 1, response_len)
  batch = profiling.synthetic_rl_batch(model_config.vocab_size, rows, prompt_len, response_len,
                                       seed, response_lengths=lengths.astype(np.int64))
  bucket = int(update_config.bucket)
  width = min(seq, -(-int(batch.attention_mask.sum(axis=1).max()) // bucket) * bucket)
  batch = jax.device_put(jax.tree_util.tree_map(
      lambda x: x[:, :width] if x.ndim == 2 else x, batch))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6))
  state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(policy)))
  update = make_update(model_config, policy, optimizer, rl_config=RLConfig(
      algorithm="grpo", loss=objectives.LossConfig(max_response_len=response_len),
      num_minibatches=1, sequence_bucket=bucket, micro_batch_rows=micro_batch_rows))
  order = jnp.arange(rows, dtype=jnp.int32)[None]
  holder, padding = {"state": state}, []

  def step(_):
    new_state, metrics = update(holder["state"], batch, order)
    holder["state"] = jax.block_until_ready(new_state)
    padding.append(float(jax.device_get(metrics["train/padding_frac"])[0]))

  start = time.perf_counter()
  step(None)
  first_s = time.perf_counter() - start
  timing = profiling.time_calls(step, warmup=0, repetitions=int(paper.repetitions))
  del holder, state
  seconds = timing.seconds["median"]
  real = batch.attention_mask.sum(axis=1)
  flops = sum(profiling.train_step_flops(model_config, 1, int(n))["total"] for n in real)
  dtype_peak = peak[dtype_name(policy.compute_dtype)]["flops_per_s"]["median"]
  return {
      "model": paper.model, "params": model_config.num_params(), "remat": model_config.remat,
      "precision": update_config.precision, "rows": rows, "width": width,
      "micro_batch_rows": micro_batch_rows, "bucket": bucket,
      "real_tokens": int(real.sum()), "padding_frac": padding[-1],
      "step_s": seconds, "step_s_min": timing.seconds["min"],
      "step_s_max": timing.seconds["max"], "first_call_s": first_s,
      "real_tokens_per_s": float(real.sum()) / seconds,
      "mfu_real_tokens": flops / seconds / dtype_peak,
      "compiles_per_step": max(timing.compiles),
      "device_peak_gib_so_far": device_peak_bytes() / GIB,
  }


def paper_decode_case(model_config: ModelConfig, params, paper, seed: int, rows: int,
                      bytes_per_s: float) -> dict[str, Any]:
  """The JAX sampler's batched decode of `rows` rows at the paper's model shape (no EOS: every
  row runs to `decode_new_tokens`); weight GB/s = the sampler's weight bytes streamed once per
  decode step; "x_floor" = the measured seconds (prefill included) over `scale.decode_floor_s`
  at `bytes_per_s`."""
  policy = get_policy(paper.decode_precision, "sampler")
  engine = make_engine("jax", model_config.replace(remat=False), params, policy,
                       eos_token_ids=[])
  prompts = scale.random_prompts(model_config.vocab_size, rows, paper.decode_prompt_len, seed)
  try:
    row = profiling.generate_speed(engine, prompts, n=1,
                                   max_new_tokens=int(paper.decode_new_tokens), warmup=1,
                                   repetitions=int(paper.repetitions), seed=seed)
  finally:
    engine.close()
  steps = int(paper.decode_new_tokens)
  seconds = row["seconds"]["median"]
  itemsize = np.dtype(policy.param_dtype).itemsize
  weight_bytes = model_config.num_params() * itemsize
  floor_s = scale.decode_floor_s(model_config, rows=row["rows"],
                                 prompt_len=int(paper.decode_prompt_len), steps=steps,
                                 itemsize=itemsize, bytes_per_s=bytes_per_s)
  return {"model": paper.model, "precision": paper.decode_precision, "rows": row["rows"],
          "prompt_len": int(paper.decode_prompt_len), "new_tokens": steps,
          "seconds": seconds, "tokens_per_s": row["tokens_per_s"]["median"],
          "ms_per_decode_step": 1e3 * seconds / steps,
          "weight_gb_per_s": weight_bytes * steps / seconds / 1e9,
          "floor_ms_per_decode_step": 1e3 * floor_s / steps, "x_floor": seconds / floor_s,
          "bandwidth_gb_per_s": bytes_per_s / 1e9,
          "decode_model_flops": profiling.decode_flops(model_config, row["rows"],
                                                       int(paper.decode_prompt_len), steps),
          "compiles_per_call": row["compiles_per_call"],
          "warmup_compile_s": row["warmup_compile_s"],
          "device_peak_gib_so_far": device_peak_bytes() / GIB}


def format_summary(summary: dict[str, Any]) -> str:
  """Markdown: the device, the mismatch table, the matmul peaks and the train-step table."""
  info = summary["device"]
  out = [f"## gpu_check on {info['device_kind']} ({info['backend']}, jax {info['jax']}, "
         f"{len(info['devices'])} device(s))"]
  if summary["mismatch"]:
    out.append("### Trainer vs JAX sampler (per response token)")
    out.append(results.markdown_table(
        ["pair (trainer-sampler)", "matmul precision"] + [c for c, _ in MISMATCH_COLUMNS],
        [[row["pair"], row["matmul_precision"]]
         + [f"{row[key]:.3g}" for _, key in MISMATCH_COLUMNS] for row in summary["mismatch"]]))
  for matmul_precision, view in summary.get("layer_view", {}).items():
    width = len(next(iter(view.values())))
    out.append(f"### Layer view ({matmul_precision} matmul precision): relative error of the "
               "residual stream against fp32, per layer boundary (embedding, layers, logits)")
    out.append(results.markdown_table(
        ["path"] + ["emb"] + [f"L{i}" for i in range(1, width - 1)] + ["logits"],
        [[key] + [f"{v:.2g}" for v in values] for key, values in view.items()]))
  for name, peak in summary["peaks"].items():
    out.append(f"matmul peak ({name}, {peak['matmul_size']}^2): " + ", ".join(
        f"{dtype} {peak[dtype]['flops_per_s']['median'] / 1e12:.1f} TFLOP/s"
        for dtype in ("float32", "bfloat16", "float16")))
  if summary["trainer"]:
    out.append("### RL train step (median of the timed steps; MFU against the fp32 peak and "
               "against the compute dtype's peak)")
    out.append(results.markdown_table(
        ["model", "params", "tokens/step", "precision", "matmul precision", "step ms",
         "tokens/s", "MFU fp32", "MFU dtype", "compile s"],
        [[r["model"], f"{r['params'] / 1e6:.1f}M", r["tokens"], r["precision"],
          r["matmul_precision"], f"{r['step_s'] * 1e3:.2f} [{r['step_s_min'] * 1e3:.2f}, "
          f"{r['step_s_max'] * 1e3:.2f}]", f"{r['tokens_per_s']:.0f}",
          f"{r['mfu_fp32_peak']:.1%}", f"{r['mfu_compute_dtype_peak']:.1%}",
          f"{r['warmup_compile_s']:.1f}"] for r in summary["trainer"]]))
  out += _paper_tables(summary)
  if summary["errors"]:
    out.append("### FAILED stages\n" + "\n".join(
        f"- {name}: {error.strip().splitlines()[-1]}" for name, error in summary["errors"].items()))
  if summary["skipped"]:
    out.append("### Skipped (budget)\n" + "\n".join(
        f"- {row['case']}: {row['reason']}" for row in summary["skipped"]))
  out.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
  return "\n\n".join(out)


def _paper_tables(summary: dict[str, Any]) -> list[str]:
  """The paper-scale train-step, decode and RL-iteration tables (those with rows)."""
  out = []
  if summary["paper_train"]:
    out.append("### Paper-scale train step (random weights; MFU = model FLOPs / step s / the "
               "matmul peak of the compute dtype measured in this run; remat recomputes each "
               f"layer's forward on top; goal {MFU_GOAL:.0%})")
    out.append(_paper_train_table(summary["paper_train"]))
  if summary.get("paper_update"):
    out.append("### Paper-scale minibatch update, lognormal response lengths (length-sorted "
               "micro-batches, each at its own bucketed width, vs the whole minibatch at its "
               "longest row; MFU on the real tokens' model FLOPs)")
    out.append(_paper_update_table(summary["paper_update"]))
  if summary["paper_decode"]:
    bandwidth = summary["bandwidth"]["bytes_per_s"]["median"] / 1e9
    out.append("### Paper-scale JAX sampler decode (no EOS; prefill included; floor = weights + "
               f"KV cache read once per step at the measured copy bandwidth, {bandwidth:.0f} GB/s)")
    out.append(_paper_decode_table(summary["paper_decode"]))
  if summary["rl_iterations"]:
    out.append("### End-to-end RL iteration (Learner.step, JAX engine, random weights; the first "
               "compiles; seconds; other = wall - the phases)")
    out.append(_rl_table(summary["rl_iterations"]))
  return out


def _paper_train_table(rows: list[dict[str, Any]]) -> str:
  return results.markdown_table(
      ["model", "params", "remat", "precision", "rows x seq", "step s", "tokens/s",
       "MFU dtype", "goal met", "XLA temp GiB", "device peak GiB (so far)", "compile s",
       "skipped"],
      [[r["model"], _params_text(r["params"]), r["remat"], r["precision"],
        f"{r['rows']} x {r['seq_len']}",
        f"{r['step_s']:.3f} [{r['step_s_min']:.3f}, {r['step_s_max']:.3f}]",
        f"{r['tokens_per_s']:.0f}", f"{r['mfu_compute_dtype_peak']:.1%}",
        "yes" if r["meets_mfu_goal"] else "no",
        f"{r['xla_plan_gib']['temporaries']:.1f}", f"{r['device_peak_gib_so_far']:.1f}",
        f"{r['compile_s']:.0f}", ",".join(f"{v:.0f}" for v in r["skipped_steps"])]
       for r in rows])


def _paper_update_table(rows: list[dict[str, Any]]) -> str:
  return results.markdown_table(
      ["model", "precision", "rows x width", "micro-batch rows", "bucket", "real tokens",
       "padded slots", "step s", "real tokens/s", "MFU (real tokens)",
       "device peak GiB (so far)", "first call s"],
      [[r["model"], r["precision"], f"{r['rows']} x {r['width']}",
        r["micro_batch_rows"] or "all", r["bucket"], r["real_tokens"],
        f"{r['padding_frac']:.1%}",
        f"{r['step_s']:.3f} [{r['step_s_min']:.3f}, {r['step_s_max']:.3f}]",
        f"{r['real_tokens_per_s']:.0f}", f"{r['mfu_real_tokens']:.1%}",
        f"{r['device_peak_gib_so_far']:.1f}", f"{r['first_call_s']:.0f}"] for r in rows])


def _params_text(params: float) -> str:
  """"1.78B", or "0.2M" below a billion (the smoke sizes)."""
  return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def _paper_decode_table(rows: list[dict[str, Any]]) -> str:
  return results.markdown_table(
      ["model", "precision", "rows", "prompt", "new tokens", "tokens/s", "ms / decode step",
       "floor ms / step", "x floor", "weight GB/s", "device peak GiB (so far)", "compile s"],
      [[r["model"], r["precision"], r["rows"], r["prompt_len"], r["new_tokens"],
        f"{r['tokens_per_s']:.0f}", f"{r['ms_per_decode_step']:.3g}",
        f"{r['floor_ms_per_decode_step']:.3g}", f"{r['x_floor']:.1f}",
        f"{r['weight_gb_per_s']:.0f}", f"{r['device_peak_gib_so_far']:.1f}",
        f"{r['warmup_compile_s']:.0f}"] for r in rows])


def _rl_table(rows: list[dict[str, Any]]) -> str:
  return results.markdown_table(
      ["iteration", "precision", "rows", "wall", "sample", "score", "logp_old", "update", "sync",
       "other", "response tokens", "tokens/s", "device peak GiB (so far)", "host peak GiB"],
      [[r["iteration"], r["precision"], r["rows"], f"{r['wall_s']:.2f}", f"{r['sample_s']:.2f}",
        f"{r['score_s']:.3f}", f"{r['logp_s']:.2f}", f"{r['update_s']:.2f}",
        f"{r['sync_s']:.2f}", f"{r['other_s']:.2f}", f"{r['response_tokens']:.0f}",
        f"{r['tokens_per_s']:.0f}", f"{r['device_peak_gib_so_far']:.1f}",
        f"{r['host_peak_rss_gib']:.1f}"] for r in rows])


def run(config) -> dict[str, Any]:
  """Runs the stages (module doc); returns the summary. Raises after writing it if one failed."""
  config = _checked_config(config)
  out = os.path.abspath(config.output_dir)
  os.makedirs(out, exist_ok=True)
  fileio.write_json_atomic(os.path.join(out, "config.json"), config.to_dict())
  summary = _empty_summary()
  budget = scale.Budget(config.budget_s)
  summary["budget_s"], summary["skipped"] = config.budget_s, budget.skipped
  print(f"gpu_check: {summary['device']}", flush=True)
  for title, fn in _stage_plan(config, out, summary, budget):
    _run_stage(title, fn, summary, out)
  summary["elapsed_s"] = budget.elapsed()
  return _finish(summary, out)


def _checked_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` with its lists cleaned (the input untouched); ValueError for an unknown
  stage."""
  config = ml_collections.ConfigDict(config.to_dict())
  common.clean_lists(config, NAME_LISTS, INT_LISTS)
  if set(config.stages) - set(STAGES):
    raise ValueError(f"config.stages={config.stages!r}; allowed: a subset of {list(STAGES)}")
  return config


def _empty_summary() -> dict[str, Any]:
  """The summary before any stage ran: this device, and an empty slot per result."""
  return {"device": device_info(), "mismatch": [], "trainer": [], "peaks": {},
          "paper_train": [], "paper_update": [], "paper_decode": [], "bandwidth": {},
          "rl_iterations": [],
          "layer_view": {}, "skipped": [],
          "errors": {},
          "seconds": {}}


def _stage_plan(config, out: str, summary: dict[str, Any], budget: scale.Budget
                ) -> list[tuple[str, Callable[[], None]]]:
  """(title, thunk) per stage run, in order: the paper and rl stages once (their cases checked
  against `budget`), the others once per matmul precision ("default", and "highest" with
  `fp32_highest`)."""
  precisions = ["default"] + (["highest"] if config.fp32_highest else [])
  plan = []
  for name in config.stages:
    if name == "paper":
      plan.append(("paper-scale train step and decode",
                   functools.partial(_paper_stage, config, out, summary, budget)))
      continue
    if name == "rl":
      plan.append(("paper-scale RL iteration",
                   functools.partial(_rl_stage, config, out, summary, budget)))
      continue
    if name == "minibatch":
      plan.append(("paper-scale minibatch update in micro-batches",
                   functools.partial(_minibatch_stage, config, out, summary, budget)))
      continue
    for matmul_precision in precisions:
      if name == "mismatch":
        plan.append((f"mismatch ({matmul_precision} matmul precision)",
                     functools.partial(_mismatch_stage, config, out, summary, matmul_precision)))
      else:
        plan.append((f"trainer speed ({matmul_precision} matmul precision)",
                     functools.partial(_trainer_stage, config, out, summary, matmul_precision)))
  return plan


def _run_stage(name: str, fn: Callable[[], None], summary: dict[str, Any], out: str) -> None:
  """Runs one stage: a failure is kept as its traceback in summary["errors"]; the seconds are
  kept and summary.json rewritten either way."""
  print(f"\n=== {name}", flush=True)
  start = time.perf_counter()
  try:
    fn()
  except Exception:  # pylint: disable=broad-except
    summary["errors"][name] = traceback.format_exc()
    print(summary["errors"][name], flush=True)
  summary["seconds"][name] = time.perf_counter() - start
  fileio.write_json_atomic(os.path.join(out, "summary.json"), summary)


def _mismatch_stage(config, out: str, summary: dict[str, Any], matmul_precision: str) -> None:
  """The offline mismatch at one matmul precision; adds its rows (and layer view) to `summary`."""
  fields = dict(model=config.model, seed=config.seed,
                output_dir=os.path.join(out, f"mismatch_{matmul_precision}"))
  if matmul_precision != "default":
    fields["precisions"] = config.highest_pairs
  sub = _sub_config(offline_mismatch, config.mismatch.to_dict(), **fields)
  with _matmul_precision(matmul_precision):
    result = measure_mismatch(sub, fields["output_dir"])
  summary["mismatch"] += _mismatch_rows(result, matmul_precision)
  if result.get("layer_view"):
    summary["layer_view"][matmul_precision] = result["layer_view"]


def _trainer_stage(config, out: str, summary: dict[str, Any], matmul_precision: str) -> None:
  """The trainer speed at one matmul precision; adds its peak and rows to `summary`."""
  fields = dict(model=config.model, seed=config.seed,
                output_dir=os.path.join(out, f"benchmark_{matmul_precision}"))
  if matmul_precision != "default":
    fields["precisions"] = ("fp32",)
  sub = _sub_config(benchmark_config, config.benchmark.to_dict(), **fields)
  with _matmul_precision(matmul_precision):
    result = measure_trainer(sub, fields["output_dir"])
  summary["peaks"][matmul_precision] = result["peak"]
  summary["trainer"] += _trainer_rows(result, matmul_precision)


def _default_peak(config, summary: dict[str, Any]) -> float:
  """The default-precision matmul peak: the trainer stage's, else measured now (and kept)."""
  if "default" not in summary["peaks"]:
    bench = _sub_config(benchmark_config, config.benchmark.to_dict(), seed=config.seed)
    summary["peaks"]["default"] = profiling.matmul_peak(
        bench.peak_matmul_size, seed=bench.seed, warmup=bench.warmup,
        repetitions=bench.repetitions)
  return summary["peaks"]["default"]


def _paper_stage(config, out: str, summary: dict[str, Any], budget: scale.Budget) -> None:
  """The paper-scale train step per precision, then the copy bandwidth and the decode per row
  count, each case within `budget`; rows go to `summary` and to the run directory <out>/paper."""
  paper = config.paper
  model_config = paper_model_config(paper)
  peak = _default_peak(config, summary)
  params = init_params(model_config, jax.random.key(config.seed))
  estimates = dict(paper.estimates_s)
  with results.RunWriter(os.path.join(out, "paper"), paper.to_dict(), resume=True,
                         resume_step=0) as writer:  # rows "train/{precision}/...", "decode/..."
    for precision in paper.precisions:
      case = f"paper train step {precision}"
      if not budget.allows(case, estimates["train"]):
        continue
      row, estimates["train"] = _timed(summary, case, paper_train_case, model_config, params,
                                       precision, paper, peak, config.seed)
      if row is not None:
        _keep(summary, "paper_train", row, writer, "train", precision, out)
    for rows in paper.decode_rows:
      case = f"paper decode {rows} rows"
      if not budget.allows(case, estimates["decode"]):
        continue
      bandwidth = _bandwidth(paper, summary)
      row, seconds = _timed(summary, case, paper_decode_case, model_config, params, paper,
                            config.seed, rows, bandwidth)
      estimates["decode"] = max(estimates["decode"], seconds)  # more rows take no less
      if row is not None:
        _keep(summary, "paper_decode", row, writer, "decode", f"rows{rows}", out)


def _minibatch_stage(config, out: str, summary: dict[str, Any], budget: scale.Budget) -> None:
  """The paper-scale minibatch update with lognormal response lengths, once per entry of
  `paper.minibatch.micro_batch_rows`, each within `budget`; rows go to `summary` and to the run
  directory <out>/minibatch."""
  paper = config.paper
  estimate = float(paper.estimates_s["minibatch"])
  if not budget.allows("paper minibatch setup", estimate):
    return
  model_config = paper_model_config(paper)
  peak = _default_peak(config, summary)
  params = init_params(model_config, jax.random.key(config.seed))
  with results.RunWriter(os.path.join(out, "minibatch"), paper.to_dict(), resume=True,
                         resume_step=0) as writer:  # rows "update/micro{rows}/..."
    for micro_batch_rows in paper.minibatch.micro_batch_rows:
      case = f"paper minibatch update, micro-batches of {micro_batch_rows or 'all'} rows"
      if not budget.allows(case, estimate):
        continue
      row, estimate = _timed(summary, case, paper_update_case, model_config, params, paper,
                             peak, config.seed, micro_batch_rows)
      if row is not None:
        _keep(summary, "paper_update", row, writer, "update", f"micro{micro_batch_rows}", out)


def _timed(summary: dict[str, Any], case: str, fn: Callable[..., Any], *args
           ) -> tuple[Any, float]:
  """(fn(*args), its wall seconds); a failure gives (None, seconds), its traceback kept in
  summary["errors"][case] (the stage goes on to its next case)."""
  start = time.perf_counter()
  try:
    result = fn(*args)
  except Exception:  # pylint: disable=broad-except
    summary["errors"][case] = traceback.format_exc()
    print(summary["errors"][case], flush=True)
    result = None
  return result, time.perf_counter() - start


def _keep(summary: dict[str, Any], key: str, row: dict[str, Any], writer, prefix: str,
          name: str, out: str) -> None:
  """Adds `row` to summary[key], writes it as the run's metrics "{prefix}/{name}/..." and
  rewrites summary.json (a later crash keeps what was measured)."""
  summary[key].append(row)
  writer.write(0, results.flatten_metrics({name: row}, prefix=prefix))
  fileio.write_json_atomic(os.path.join(out, "summary.json"), summary)


def _bandwidth(paper, summary: dict[str, Any]) -> float:
  """The device's copy bandwidth in bytes/s: measured once per run (kept in summary)."""
  if not summary["bandwidth"]:
    summary["bandwidth"] = scale.copy_bandwidth(paper.bandwidth_bytes,
                                                repetitions=paper.repetitions)
  return summary["bandwidth"]["bytes_per_s"]["median"]


def _rl_stage(config, out: str, summary: dict[str, Any], budget: scale.Budget) -> None:
  """`rl.iterations` end-to-end RL iterations at the paper model's shape, each within `budget`;
  rows go to `summary` and to the run directory <out>/rl."""
  rl = config.rl
  first_s, later_s = (float(v) for v in rl.estimates_s)
  if not budget.allows("RL setup and iteration 0", first_s):
    return
  model_config = paper_model_config(config.paper)
  learner = scale.rl_setup(model_config, init_params(model_config, jax.random.key(config.seed)),
                           rl, config.seed)
  prompts = scale.random_prompts(model_config.vocab_size, rl.num_prompts, rl.prompt_len,
                                 config.seed)
  try:
    with results.RunWriter(os.path.join(out, "rl"), rl.to_dict(), resume=True,
                           resume_step=0) as writer:
      for iteration in range(int(rl.iterations)):
        if iteration and not budget.allows(f"RL iteration {iteration}", later_s):
          break
        row, _ = _timed(summary, f"RL iteration {iteration}", scale.rl_iteration_row, learner,
                        prompts, config.seed, iteration)
        if row is None:
          break
        print(f"  iteration {iteration}: {row['wall_s']:.1f} s", flush=True)
        _keep(summary, "rl_iterations", row, writer, "rl", f"iteration{iteration}", out)
  finally:
    learner.engine.close()


def _finish(summary: dict[str, Any], out: str) -> dict[str, Any]:
  """Writes summary.json and summary.md and prints the report; RuntimeError if a stage failed,
  else the summary with its "run_dir"."""
  report = format_summary(summary)
  fileio.write_json_atomic(os.path.join(out, "summary.json"), summary)
  fileio.write_text_atomic(os.path.join(out, "summary.md"), report + "\n")
  print("\n" + report, flush=True)
  if summary["errors"]:
    raise RuntimeError(f"gpu_check stages failed: {sorted(summary['errors'])} (tracebacks in "
                       f"{os.path.join(out, 'summary.json')})")
  summary["run_dir"] = out
  return summary
