r"""The pre-registered long runs (docs/long_runs_preregistration.md): engine rule, then runs.

    python -m launch.long_runs --mode=speedcheck   # the registered engine rule, on an idle machine
    python -m launch.long_runs --mode=run          # the 9 primary runs, one after another

`speedcheck` runs the registered 10-step `paper:grpo` bf16 check for each configuration in the
registered order (`experiments.long_runs.config.SPEEDCHECK_ORDER`), takes the median
`time/step_s` over steps 3-10 and stops at the first one within the budget (or takes the last,
recording the overrun). It refuses to measure on a loaded machine (1-minute load average over
`--max_load`), as the registration requires, and writes `decision.json`. The budget is the
registered 40 s per step, tightened so that `--steps` steps fit in `--session_hours` (the
registration's "Changes after registration").

`run` reads `decision.json` and runs the 9 primary runs (`paper:grpo` x bf16/fp16/fp32 x seeds
0/1/2) one after another, in the registered order, each to the end. An interrupted run resumes
from its last checkpoint when the command is rerun (if `runs/` survived; else it starts again).
After each finished run it keeps `config.json` and a gzipped `metrics.jsonl` in
`docs/long_runs/data/<run>/` (`results.keep_run`; commit them), and skips runs whose data is
already there. `python -m experiments.long_runs.report` reports the kept runs.
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

from experiments.long_runs.config import (ARMS, MAX_SECONDS_PER_STEP, PAPER_CONFIG,
                                          SPEEDCHECK_ORDER, SPEEDCHECK_STEPS)
from rl_fp16 import results

_MODE = flags.DEFINE_enum("mode", "run", ["speedcheck", "run"], "What to do (module doc).")
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


def main(argv):
  del argv
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  if _MODE.value == "speedcheck":
    speedcheck(_ROOT.value, _DATA.value, _STEPS.value, _SESSION_HOURS.value, _MAX_LOAD.value)
  else:
    run(_ROOT.value, _DATA.value, _STEPS.value)


if __name__ == "__main__":
  app.run(main)
