r"""The accelerator check: trainer-vs-JAX-sampler mismatch and RL train-step speed per precision.

One command for a short lease on a GPU machine (it runs on CPU too, at smoke size):

    python -m experiments.gpu_check --config=experiments/configs/gpu_check.py

Stages, each in this process, each kept going past another's failure (device time is scarce; the
command still exits non-zero and names the failed stage):
  1. `experiments.offline_mismatch` with the JAX engine: the sampler's KV-cache decode in the
     sampler dtype against the trainer's full-sequence forward in the trainer dtype.
  2. The fp32 pair (`highest_pairs`) again under `jax.default_matmul_precision("highest")`
     (`fp32_highest`): on NVIDIA GPUs JAX runs float32 matmuls in TF32 by default.
  3. `experiments.benchmark` sections peak and trainer: matmul peak per dtype and `rl_train_step`
     tokens/s and MFU for fp32, bf16 and fp16.
  4. The fp32 train step under "highest" (`fp32_highest`).
Writes `summary.json` and `summary.md` to `output_dir` (the stages' own outputs under it) and
prints the summary last.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import traceback
from typing import Any, Callable

import jax

from experiments import benchmark
from experiments import common
from experiments import offline_mismatch
from experiments.configs import benchmark as benchmark_config
from experiments.configs import offline_mismatch as offline_mismatch_config
from rl_fp16.fileio import write_text_atomic


STAGES = ("mismatch", "trainer")
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


def format_summary(summary: dict[str, Any]) -> str:
  """Markdown: the device, the mismatch table, the matmul peaks and the train-step table."""
  info = summary["device"]
  out = [f"## gpu_check on {info['device_kind']} ({info['backend']}, jax {info['jax']}, "
         f"{len(info['devices'])} device(s))"]
  if summary["mismatch"]:
    out.append("### Trainer vs JAX sampler (per response token)")
    out.append(common.markdown_table(
        ["pair (trainer-sampler)", "matmul precision"] + [c for c, _ in MISMATCH_COLUMNS],
        [[row["pair"], row["matmul_precision"]]
         + [f"{row[key]:.3g}" for _, key in MISMATCH_COLUMNS] for row in summary["mismatch"]]))
  for name, peak in summary["peaks"].items():
    out.append(f"matmul peak ({name}, {peak['matmul_size']}^2): " + ", ".join(
        f"{dtype} {peak[dtype]['flops_per_s']['median'] / 1e12:.1f} TFLOP/s"
        for dtype in ("float32", "bfloat16", "float16")))
  if summary["trainer"]:
    out.append("### rl_train_step (median of the timed steps; MFU against the fp32 peak and "
               "against the compute dtype's peak)")
    out.append(common.markdown_table(
        ["model", "params", "tokens/step", "precision", "matmul precision", "step ms",
         "tokens/s", "MFU fp32", "MFU dtype", "compile s"],
        [[r["model"], f"{r['params'] / 1e6:.1f}M", r["tokens"], r["precision"],
          r["matmul_precision"], f"{r['step_s'] * 1e3:.2f} [{r['step_s_min'] * 1e3:.2f}, "
          f"{r['step_s_max'] * 1e3:.2f}]", f"{r['tokens_per_s']:.0f}",
          f"{r['mfu_fp32_peak']:.1%}", f"{r['mfu_compute_dtype_peak']:.1%}",
          f"{r['warmup_compile_s']:.1f}"] for r in summary["trainer"]]))
  if summary["errors"]:
    out.append("### FAILED stages\n" + "\n".join(
        f"- {name}: {error.strip().splitlines()[-1]}" for name, error in summary["errors"].items()))
  out.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
  return "\n\n".join(out)


def run(config) -> dict[str, Any]:
  """Runs the stages (module doc); returns the summary. Raises after writing it if one failed."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  if not stages or set(stages) - set(STAGES):
    raise ValueError(f"config.stages={config.stages!r}; allowed: a subset of {list(STAGES)}")
  out = os.path.abspath(config.output_dir)
  os.makedirs(out, exist_ok=True)
  common.write_json_atomic(os.path.join(out, "config.json"), config.to_dict())
  summary: dict[str, Any] = {"device": device_info(), "mismatch": [], "trainer": [], "peaks": {},
                             "errors": {}, "seconds": {}}
  print(f"gpu_check: {summary['device']}", flush=True)
  precisions = ["default"] + (["highest"] if config.fp32_highest else [])

  def stage(name: str, fn: Callable[[], None]) -> None:
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    try:
      fn()
    except Exception:  # pylint: disable=broad-except
      summary["errors"][name] = traceback.format_exc()
      print(summary["errors"][name], flush=True)
    summary["seconds"][name] = time.perf_counter() - start
    common.write_json_atomic(os.path.join(out, "summary.json"), summary)

  def mismatch_stage(matmul_precision: str) -> None:
    fields = dict(model=config.model, seed=config.seed,
                  output_dir=os.path.join(out, f"mismatch_{matmul_precision}"))
    if matmul_precision != "default":
      fields["precisions"] = config.highest_pairs
    sub = _sub_config(offline_mismatch_config, config.mismatch.to_dict(), **fields)
    with _matmul_precision(matmul_precision):
      summary["mismatch"] += _mismatch_rows(offline_mismatch.run(sub), matmul_precision)

  def trainer_stage(matmul_precision: str) -> None:
    fields = dict(model=config.model, seed=config.seed,
                  output_dir=os.path.join(out, f"benchmark_{matmul_precision}"))
    if matmul_precision != "default":
      fields["precisions"] = "fp32"
    sub = _sub_config(benchmark_config, config.benchmark.to_dict(), **fields)
    with _matmul_precision(matmul_precision):
      result = benchmark.run(sub)
    summary["peaks"][matmul_precision] = result["peak"]
    summary["trainer"] += _trainer_rows(result, matmul_precision)

  for matmul_precision in precisions if "mismatch" in stages else []:
    stage(f"mismatch ({matmul_precision} matmul precision)",
          lambda p=matmul_precision: mismatch_stage(p))
  for matmul_precision in precisions if "trainer" in stages else []:
    stage(f"trainer speed ({matmul_precision} matmul precision)",
          lambda p=matmul_precision: trainer_stage(p))

  report = format_summary(summary)
  common.write_json_atomic(os.path.join(out, "summary.json"), summary)
  write_text_atomic(os.path.join(out, "summary.md"), report + "\n")
  print("\n" + report, flush=True)
  if summary["errors"]:
    raise RuntimeError(f"gpu_check stages failed: {sorted(summary['errors'])} (tracebacks in "
                       f"{os.path.join(out, 'summary.json')})")
  summary["run_dir"] = out
  return summary


if __name__ == "__main__":
  common.run_main(run)
