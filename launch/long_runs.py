r"""The pre-registered long runs (docs/long_runs_preregistration.md), as three commands.

    python -m launch.long_runs --mode=speedcheck   # the registered engine rule, on an idle machine
    python -m launch.long_runs --mode=run          # the 9 primary runs, round-robin, resumable
    python -m launch.long_runs --mode=report       # the registered outcomes of the kept runs

`speedcheck` runs the registered 10-step `paper:grpo` bf16 check for each configuration in the
registered order ((vLLM, 64 prompts), (JAX, 64), (vLLM, 32), (JAX, 32), (vLLM, 16), (JAX, 16)),
takes the median `time/step_s` over steps 3-10 and stops at the first one at or under 40 s (or
takes the last, recording the overrun). It refuses to measure on a loaded machine (1-minute load
average over `--max_load`), as the registration requires, and writes `decision.json`.

Only committed data is sure to outlast a session (`runs/` sometimes survives, sometimes not), so
finished runs' data is committed, and the speed rule also requires that `--steps` steps fit in
`--session_hours` (registered changes of 2026-11-30 and 2026-12-01,
docs/long_runs_preregistration.md).

`run` reads `decision.json` and runs the 9 primary runs (`paper:grpo` x bf16/fp16/fp32 x seeds
0/1/2) one after another, in the registered order, each to the end. An interrupted run resumes
from its last checkpoint when the command is rerun (in a later session too, if `runs/` survived;
else it starts again). After each finished run it keeps `config.json` and a gzipped
`metrics.jsonl` in `docs/long_runs/data/<run>/` (`results.keep_run`; commit them), and skips
runs whose data is already there.

`report` reads every kept run under `docs/long_runs/data/` and writes `docs/long_runs/results.md`
(per-run outcomes, per-arm verdicts once an arm and its control have all their seeds, the H3/H4
window ratios) and `docs/long_runs/figures/` (each seed and the seed median per precision), with
the registered definitions of `rl_fp16.outcomes`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
import pandas as pd

from rl_fp16 import outcomes
from rl_fp16 import plots
from rl_fp16 import results

SPEEDCHECK_ORDER = (("vllm", 64), ("jax", 64), ("vllm", 32), ("jax", 32), ("vllm", 16),
                    ("jax", 16))
MAX_SECONDS_PER_STEP = 40.0  # the registered budget (30 machine-hours for the primary block)
SPEEDCHECK_STEPS = 10
PRECISIONS = ("bf16", "fp16", "fp32")
SEEDS = (0, 1, 2)
PAPER_CONFIG = "experiments/configs/paper.py:grpo"

_MODE = flags.DEFINE_enum("mode", "run", ["speedcheck", "run", "report"],
                          "What to do (module doc).")
_ROOT = flags.DEFINE_string("root", "runs/long", "Directory of the speed checks and the runs.")
_DATA = flags.DEFINE_string("data", "docs/long_runs/data", "Where finished runs' data is kept.")
_STEPS = flags.DEFINE_integer("steps", 300, "RL steps per primary run (registered: 300).")
_SESSION_HOURS = flags.DEFINE_float("session_hours", 2.0,
                                    "A run's `steps` must fit in this many hours.")
_MAX_LOAD = flags.DEFINE_float("max_load", 0.7, "Refuse to speed-check above this load average.")


def median_step_seconds(metrics_path: str, first: int = 3, last: int = SPEEDCHECK_STEPS) -> float:
  """The registered speed figure: median `time/step_s` over RL steps first..last."""
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  seconds = [r["time/step_s"] for r in rows if first <= r["step"] <= last]
  if len(seconds) != last - first + 1:
    raise ValueError(f"{metrics_path}: want steps {first}..{last}, found "
                     f"{sorted(r['step'] for r in rows)}")
  return float(statistics.median(seconds))


def step_budget(steps: int, session_hours: float) -> float:
  """Seconds per RL step allowed: the registered 40 s, and `steps` steps within a session."""
  return min(MAX_SECONDS_PER_STEP, session_hours * 3600.0 / steps)


def choose(measured: Sequence[tuple[str, int, float]],
           budget: float = MAX_SECONDS_PER_STEP) -> dict:
  """The registered rule over (engine, prompts, seconds) measured in `SPEEDCHECK_ORDER`: the
  first within `budget` seconds per step, else the last (an overrun)."""
  for engine, prompts, seconds in measured:
    if seconds <= budget:
      return {"engine": engine, "prompts_per_step": prompts, "seconds_per_step": seconds,
              "overrun": False}
  engine, prompts, seconds = measured[-1]
  return {"engine": engine, "prompts_per_step": prompts, "seconds_per_step": seconds,
          "overrun": True}


def rl_command(run_dir: str, *, engine: str, prompts: int, precision: str, seed: int,
               steps: int) -> list[str]:
  return [sys.executable, "-m", "experiments.rl", f"--config={PAPER_CONFIG}",
          f"--config.precision={precision}", f"--config.seed={seed}", f"--config.engine={engine}",
          f"--config.prompts_per_step={prompts}", f"--config.steps={steps}",
          f"--config.output_dir={run_dir}"]


ARMS = tuple((f"grpo_{p}_seed{s}", p, s) for s in SEEDS for p in PRECISIONS)


def completed_steps(run_dir: str) -> int:
  """RL steps logged in `run_dir/metrics.jsonl` (0 when the run has not started)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


def pending_arms(data_root: str) -> list[tuple[str, str, int]]:
  """The primary runs, in the registered order, whose data is not kept yet."""
  return [arm for arm in ARMS
          if not os.path.exists(os.path.join(data_root, arm[0], results.KEPT_METRICS_FILE))]


def speedcheck(root: str, data_root: str, steps: int, session_hours: float,
               max_load: float) -> dict:
  load = os.getloadavg()[0]
  if load > max_load:
    raise SystemExit(f"load average {load:.2f} > --max_load={max_load}: the registration measures "
                     "on an idle machine; stop other work first")
  budget = step_budget(steps, session_hours)
  measured = []
  for engine, prompts in SPEEDCHECK_ORDER:
    run_dir = os.path.join(root, "speedcheck", f"{engine}_{prompts}")
    print(f"speedcheck {engine} x {prompts} prompts -> {run_dir}", flush=True)
    subprocess.run(rl_command(run_dir, engine=engine, prompts=prompts, precision="bf16", seed=0,
                              steps=SPEEDCHECK_STEPS), check=True)
    seconds = median_step_seconds(os.path.join(run_dir, "metrics.jsonl"))
    print(f"  median s/step (steps 3-10): {seconds:.1f} (budget {budget:.1f})", flush=True)
    measured.append((engine, prompts, seconds))
    if seconds <= budget:
      break
  decision = dict(choose(measured, budget), measured=measured, budget_s_per_step=budget,
                  load_average_at_start=load, date=time.strftime("%Y-%m-%d %H:%M"))
  os.makedirs(data_root, exist_ok=True)
  with open(os.path.join(data_root, "decision.json"), "w") as f:
    json.dump(decision, f, indent=1)
  print(json.dumps(decision, indent=1))
  return decision


def run(root: str, data_root: str, steps: int) -> None:
  path = os.path.join(data_root, "decision.json")
  if not os.path.exists(path):
    raise SystemExit(f"No {path}: run --mode=speedcheck first (the registered engine rule)")
  with open(path) as f:
    decision = json.load(f)
  for name, precision, seed in pending_arms(data_root):
    run_dir = os.path.join(root, name)
    print(f"{name}: {completed_steps(run_dir)}/{steps} steps so far", flush=True)
    subprocess.run(rl_command(run_dir, engine=decision["engine"],
                              prompts=decision["prompts_per_step"], precision=precision,
                              seed=seed, steps=steps), check=True)
    results.keep_run(run_dir, os.path.join(data_root, name))
    print(f"{name}: finished; data in {os.path.join(data_root, name)} (commit it)", flush=True)
  print("all primary runs finished")


# The report: one figure per metric (name, log scale, trailing mean over this many steps; the
# reward's is the registered R(t)), and the registered comparisons.
FIGURE_METRICS = (("reward/mean", False, 20), ("eval/accuracy", False, 1),
                  ("mismatch/prob_diff_mean", True, 10), ("mismatch/kl_k3", True, 10),
                  ("is/token_weight_max", True, 10), ("is/seq_weight_p99", True, 10),
                  ("response/length_mean", False, 10), ("train/entropy", True, 10))
CONTROL = "fp32"
H3_MIN_RATIO = 8.0
_fmt = outcomes.fmt


def run_rows(frames: dict[str, pd.DataFrame]) -> list[dict]:
  """One row of registered outcomes and summary figures per kept run (`frames` by run name)."""
  rows = []
  for name, precision, seed in ARMS:
    if name not in frames:
      continue
    frame = frames[name]
    first, last = frame.head(outcomes.WINDOW), frame.tail(outcomes.WINDOW)
    rows.append(dict(outcomes.run_outcomes(frame), run=name, precision=precision, seed=seed,
                     mismatch_first=first["mismatch/prob_diff_mean"].mean(),
                     mismatch_last=last["mismatch/prob_diff_mean"].mean(),
                     token_weight_max=frame["is/token_weight_max"].max(),
                     seq_weight_p99_max=frame["is/seq_weight_p99"].max(),
                     length_last=last["response/length_mean"].mean(),
                     skipped_total=frame["train/skipped_steps"].sum()))
  return rows


def run_table(rows: Sequence[dict]) -> list[str]:
  header = ("run", "steps", "P", "F", "time to solve", "collapse", "G (prob diff)", "G (KL k3)",
            "held-out acc. first -> last", "mean abs dp, steps 1-20 -> last 20", "max token IS w",
            "max seq IS w p99", "length, last 20", "skipped updates")
  cells = []
  for r in rows:
    collapse = "yes: " + "; ".join(r["collapse_reasons"]) if r["collapse"] else "no"
    cells.append((
        r["run"], r["steps"], _fmt(r["P"]), _fmt(r["F"]), r["time_to_solve"] or "never", collapse,
        _fmt(r["G[mismatch/prob_diff_mean]"], ".2f"), _fmt(r["G[mismatch/kl_k3]"], ".2f"),
        f"{_fmt(r.get('eval_accuracy_first'))} -> {_fmt(r.get('eval_accuracy_final'))}",
        f"{_fmt(r['mismatch_first'], '.2e')} -> {_fmt(r['mismatch_last'], '.2e')}",
        _fmt(r["token_weight_max"], ".3g"), _fmt(r["seq_weight_p99_max"], ".4g"),
        _fmt(r["length_last"], ".0f"), int(r["skipped_total"])))
  return results.markdown_table(header, cells).splitlines()


def comparisons(rows: Sequence[dict], frames: dict[str, pd.DataFrame]) -> list[str]:
  """The registered per-arm verdicts and hypotheses H2-H4, or what is still missing for each."""
  by_precision = {p: [r for r in rows if r["precision"] == p] for p in PRECISIONS}
  frames_of = {p: [frames[r["run"]] for r in by_precision[p]] for p in PRECISIONS}
  full = {p: len(by_precision[p]) == len(SEEDS) for p in PRECISIONS}
  lines = []
  for precision in ("bf16", "fp16"):
    if full[precision] and full[CONTROL]:
      verdict = outcomes.arm_verdict(by_precision[precision], by_precision[CONTROL])
      lines.append(f"- {precision} vs {CONTROL} (H1): **{verdict}**.")
    else:
      lines.append(f"- {precision} vs {CONTROL} (H1): not decided: {len(by_precision[precision])}"
                   f" of {len(SEEDS)} {precision} seeds and {len(by_precision[CONTROL])} of "
                   f"{len(SEEDS)} {CONTROL} seeds are finished.")
  growths = [r["G[mismatch/prob_diff_mean]"] for r in by_precision["bf16"]]
  shown = ", ".join(_fmt(g, ".2f") for g in growths) or "none yet"
  h2 = outcomes.growth_direction(growths) if full["bf16"] else "not decided"
  lines.append(f"- H2 (bf16 mismatch grows, G > 2 on every seed): {h2} (G per seed: {shown}).")
  if frames_of["bf16"] and frames_of["fp16"]:
    ratio = outcomes.window_ratios(frames_of["bf16"], frames_of["fp16"], "mismatch/prob_diff_mean")
    held = "holds" if (ratio >= H3_MIN_RATIO).all() else "fails"
    partial = "" if full["bf16"] and full["fp16"] else " (on the seeds finished so far)"
    lines.append(f"- H3 (fp16's mismatch >= {H3_MIN_RATIO:g}x below bf16's in every 20-step "
                 f"window): {held}{partial}: bf16/fp16 ratio of seed medians "
                 f"{ratio.min():.1f}-{ratio.max():.1f}x over {len(ratio)} windows.")
    for metric in ("is/seq_weight_p99", "is/token_weight_max"):
      ratio = outcomes.window_ratios(frames_of["bf16"], frames_of["fp16"], metric)
      held = "holds" if (ratio > 1).all() else f"fails in {int((ratio <= 1).sum())} windows"
      lines.append(f"- H4 (bf16's `{metric}` above fp16's in every window): {held}{partial}.")
  else:
    lines.append("- H3, H4: need finished bf16 and fp16 runs.")
  return lines


def report(data_root: str, out_path: str, figure_dir: str) -> str:
  """Writes the registered outcomes of every kept run (markdown at `out_path`, figures under
  `figure_dir`) and returns the markdown."""
  frames = {name: results.read_metrics(os.path.join(data_root, name))
            for name, _, _ in ARMS if os.path.exists(os.path.join(data_root, name))}
  if not frames:
    raise SystemExit(f"no kept runs under {data_root}: run --mode=run first")
  rows = run_rows(frames)
  long_frame = pd.concat([frames[r["run"]].assign(precision=r["precision"], seed=r["seed"])
                          for r in rows], ignore_index=True)
  os.makedirs(figure_dir, exist_ok=True)
  figures = []
  for metric, logy, smooth in FIGURE_METRICS:
    if metric in long_frame:
      path = os.path.join(figure_dir, metric.replace("/", "_") + ".png")
      plots.plot_seed_curves(long_frame, metric, panel="precision", logy=logy, smooth=smooth,
                             path=path)
      figures.append((metric, os.path.relpath(path, os.path.dirname(out_path))))
  text = "\n".join([
      "# Long runs: the registered outcomes (generated)", "",
      "Generated by `python -m launch.long_runs --mode=report` from the kept runs in "
      f"`{data_root}/` with the definitions of docs/long_runs_preregistration.md "
      "(`rl_fp16/outcomes.py`); do not edit by hand. "
      f"{len(rows)} of {len(ARMS)} primary runs are finished.", "",
      "## Per run", "", *run_table(rows), "",
      "## Registered comparisons", "", *comparisons(rows, frames), "",
      "## Curves (each seed thin, the seed median thick)", "",
      *[f"![{metric}]({path})" for metric, path in figures], ""])
  results.write_text_atomic(out_path, text)
  return text


def main(argv):
  del argv
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  if _MODE.value == "speedcheck":
    speedcheck(_ROOT.value, _DATA.value, _STEPS.value, _SESSION_HOURS.value, _MAX_LOAD.value)
  elif _MODE.value == "report":
    print(report(_DATA.value, os.path.join(os.path.dirname(_DATA.value), "results.md"),
                 os.path.join(os.path.dirname(_DATA.value), "figures")))
  else:
    run(_ROOT.value, _DATA.value, _STEPS.value)


if __name__ == "__main__":
  app.run(main)
