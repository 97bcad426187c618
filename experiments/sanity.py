r"""The README's main job: the sanity experiment in BF16 and in FP16, then a comparison.

Runs `experiments.rl` once per precision in `--compare` (same algorithm, seed and data), prints
final and best reward and the mismatch of each, and plots reward and mismatch curves side by side.
Every run's config (values, and the config.json of a run directory it would resume) is checked
before the first run starts. Each run is its own `python -m experiments.rl` process (the config
handed over as JSON through experiments/configs/from_json.py), so that no experiment module
imports another; its summary is read back from the run directory.

    python -m experiments.sanity --config=experiments/configs/sanity.py [--compare=bf16,fp16]
    python -m experiments.sanity --config=experiments/configs/moe.py   # the MoE policy
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import common
from rl_fp16 import cli, plots, results, rl_experiment, run_lock
from rl_fp16.run_config import check_run_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_JSON_CONFIG = os.path.join(REPO_ROOT, "experiments", "configs", "from_json.py")


def run_configs(config, precisions) -> list:
  """One RL config per precision, each checked (values, its run directory's config.json, and that
  no other process holds that directory) before any of them runs, so that a bad precision or a
  clashing or busy directory fails at once.

  Raises:
    ConfigError, ConfigMismatchError, RunDirectoryLocked: what the first bad run has.
  """
  if not precisions:
    raise common.ConfigError("--compare must list at least one precision, e.g. bf16,fp16")
  configs = []
  for precision in precisions:
    run_config = copy.deepcopy(config)
    run_config.precision = precision
    run_dir = rl_experiment.run_dir(common.validate_rl_config(run_config))
    check_run_config(run_dir, run_config, allowed=rl_experiment.RESUME_ALLOWED)
    holder = run_lock.holder(run_dir)
    if holder is not None:
      raise run_lock.RunDirectoryLocked(
          f"{run_dir} (the {precision} run) is in use by {holder}; wait for it to end, or pass "
          "another --config.output_dir")
    configs.append(run_config)
  return configs


def run_summary(run_dir: str, minutes: float) -> dict:
  """What `experiments.rl.run` returns, read back from a finished run directory."""
  frame = results.read_metrics(run_dir)
  return {"run_dir": run_dir, "final_reward": float(frame["reward/mean"].iloc[-1]),
          "best_reward": float(frame["reward/mean"].max()),
          "mean_prob_diff": float(frame["mismatch/prob_diff_mean"].mean()), "minutes": minutes}


def run_rl(run_config) -> dict:
  """One RL run as `python -m experiments.rl` (output shown as it goes); returns its summary.

  Raises:
    RuntimeError: when the run exits non-zero.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  started = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    config_path = os.path.join(tmp, "config.json")
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump(run_config.to_dict(), f)
    command = [sys.executable, "-m", "experiments.rl", f"--config={FROM_JSON_CONFIG}:{config_path}"]
    done = subprocess.run(command, env=env, check=False)
  if done.returncode:
    raise RuntimeError(f"The {run_config.precision} run failed (exit status {done.returncode}): "
                       f"{' '.join(command)}")
  run_dir = rl_experiment.run_dir(rl_experiment.from_config_dict(run_config))
  return run_summary(run_dir, (time.time() - started) / 60)


def compare(config, precisions) -> dict:
  summaries = {}
  run_dirs = []
  for run_config in run_configs(config, precisions):
    precision = run_config.precision
    summaries[precision] = run_rl(run_config)
    run_dirs.append(summaries[precision]["run_dir"])
  experiment_dir = os.path.commonpath(run_dirs)
  frame = results.load_runs(experiment_dir, settings=["algorithm", "precision", "seed"])
  frame = frame[frame["run"].isin([os.path.relpath(d, experiment_dir) for d in run_dirs])]
  plots_dir = os.path.join(experiment_dir, "plots")
  os.makedirs(plots_dir, exist_ok=True)
  metrics = [("reward/mean", "reward"), ("mismatch/prob_diff_mean", "mismatch"),
             ("mismatch/kl_k3", "kl_k3")]
  if "mismatch/expert_set_diff" in frame:  # MoE policies (experiments/configs/moe.py)
    metrics.append(("mismatch/expert_set_diff", "expert_set_diff"))
  for metric, name in metrics:
    plots.plot_curves(frame, metric, hue="precision", col="algorithm",
                      logy=name in ("mismatch", "kl_k3"),  # the expert-set fraction can be 0
                      path=os.path.join(plots_dir, f"compare_{name}_{config.algorithm}.png"))
  print(f"\n{config.algorithm}, seed {config.seed}, {config.steps} steps, engine {config.engine}:")
  print(f"{'precision':>10} {'final reward':>13} {'best reward':>12} {'mean |pi-mu|':>13} "
        f"{'minutes':>8}")
  for precision, s in summaries.items():
    print(f"{precision:>10} {s['final_reward']:>13.3f} {s['best_reward']:>12.3f} "
          f"{s['mean_prob_diff']:>13.2e} {s['minutes']:>8.1f}")
  print(f"plots: {plots_dir}")
  return summaries


if __name__ == "__main__":
  flags.DEFINE_list("compare", ["bf16", "fp16"], "Precisions to run and compare.")
  cli.run_main(lambda config: compare(config, flags.FLAGS.compare), lock_config=False,
                  validate=common.validate_rl_config)
