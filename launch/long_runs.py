r"""The pre-registered long runs (docs/long_runs_preregistration.md), as two commands.

    python -m launch.long_runs --mode=speedcheck   # the registered engine rule, on an idle machine
    python -m launch.long_runs --mode=run          # the 9 primary runs, round-robin, resumable

`speedcheck` runs the registered 10-step `paper:grpo` bf16 check for each configuration in the
registered order ((vLLM, 64 prompts), (JAX, 64), (vLLM, 32), (JAX, 32), (vLLM, 16), (JAX, 16)),
takes the median `time/step_s` over steps 3-10 and stops at the first one at or under 40 s (or
takes the last, recording the overrun). It refuses to measure on a loaded machine (1-minute load
average over `--max_load`), as the registration requires, and writes `decision.json`.

`run` reads `decision.json` and advances the 9 primary runs (`paper:grpo` x bf16/fp16/fp32 x seeds
0/1/2) round-robin, `--chunk` RL steps at a time, so that every arm progresses together across
sessions; each chunk is `python -m experiments.rl` resuming from its last checkpoint with a larger
`--config.steps` (an allowed resume change; the computation equals one uninterrupted run). Stop it
at any time (Ctrl-C, end of session) and rerun the same command to continue.
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

SPEEDCHECK_ORDER = (("vllm", 64), ("jax", 64), ("vllm", 32), ("jax", 32), ("vllm", 16),
                    ("jax", 16))
MAX_SECONDS_PER_STEP = 40.0
SPEEDCHECK_STEPS = 10
PRECISIONS = ("bf16", "fp16", "fp32")
SEEDS = (0, 1, 2)
PAPER_CONFIG = "experiments/configs/paper.py:grpo"

_MODE = flags.DEFINE_enum("mode", "run", ["speedcheck", "run"], "What to do (module doc).")
_ROOT = flags.DEFINE_string("root", "runs/long", "Directory of the speed checks and the runs.")
_STEPS = flags.DEFINE_integer("steps", 300, "RL steps per primary run (registered: 300).")
_CHUNK = flags.DEFINE_integer("chunk", 25, "RL steps a run advances before the next run's turn.")
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


def choose(measured: Sequence[tuple[str, int, float]]) -> dict:
  """The registered rule over (engine, prompts, seconds) measured in `SPEEDCHECK_ORDER`."""
  for engine, prompts, seconds in measured:
    if seconds <= MAX_SECONDS_PER_STEP:
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


def next_chunk(done: dict[str, int], steps: int, chunk: int) -> tuple[str, int] | None:
  """The run to advance next and its new step target: the least advanced unfinished run (ties in
  the given order), to the next multiple of `chunk` (at most `steps`); None when all are done."""
  pending = [(n, name) for name, n in done.items() if n < steps]
  if not pending:
    return None
  n, name = min(pending, key=lambda item: item[0])
  return name, min(steps, (n // chunk + 1) * chunk)


def speedcheck(root: str, max_load: float) -> dict:
  load = os.getloadavg()[0]
  if load > max_load:
    raise SystemExit(f"load average {load:.2f} > --max_load={max_load}: the registration measures "
                     "on an idle machine; stop other work first")
  measured = []
  for engine, prompts in SPEEDCHECK_ORDER:
    run_dir = os.path.join(root, "speedcheck", f"{engine}_{prompts}")
    print(f"speedcheck {engine} x {prompts} prompts -> {run_dir}", flush=True)
    subprocess.run(rl_command(run_dir, engine=engine, prompts=prompts, precision="bf16", seed=0,
                              steps=SPEEDCHECK_STEPS), check=True)
    seconds = median_step_seconds(os.path.join(run_dir, "metrics.jsonl"))
    print(f"  median s/step (steps 3-10): {seconds:.1f}", flush=True)
    measured.append((engine, prompts, seconds))
    if seconds <= MAX_SECONDS_PER_STEP:
      break
  decision = dict(choose(measured), measured=measured, load_average_at_start=load,
                  date=time.strftime("%Y-%m-%d %H:%M"))
  with open(os.path.join(root, "decision.json"), "w") as f:
    json.dump(decision, f, indent=1)
  print(json.dumps(decision, indent=1))
  return decision


def run(root: str, steps: int, chunk: int) -> None:
  path = os.path.join(root, "decision.json")
  if not os.path.exists(path):
    raise SystemExit(f"No {path}: run --mode=speedcheck first (the registered engine rule)")
  with open(path) as f:
    decision = json.load(f)
  arms = {f"grpo_{p}_seed{s}": (p, s) for s in SEEDS for p in PRECISIONS}
  while True:
    done = {name: completed_steps(os.path.join(root, name)) for name in arms}
    print("progress: " + ", ".join(f"{k} {v}/{steps}" for k, v in done.items()), flush=True)
    step = next_chunk(done, steps, chunk)
    if step is None:
      print("all primary runs finished")
      return
    name, target = step
    precision, seed = arms[name]
    subprocess.run(rl_command(os.path.join(root, name), engine=decision["engine"],
                              prompts=decision["prompts_per_step"], precision=precision,
                              seed=seed, steps=target), check=True)


def main(argv):
  del argv
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  if _MODE.value == "speedcheck":
    speedcheck(_ROOT.value, _MAX_LOAD.value)
  else:
    run(_ROOT.value, _STEPS.value, _CHUNK.value)


if __name__ == "__main__":
  app.run(main)
