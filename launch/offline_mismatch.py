r"""The offline mismatch measurement (experiments.offline_mismatch), one job per engine and seed.

    python -m launch.offline_mismatch --experiment_dir=runs/offline_mismatch
    python -m launch.offline_mismatch --engines=jax,vllm --precisions=fp32,bf16,fp16 --dry_run

Each job samples with the engine in every precision of --precisions, re-scores with the trainer,
and writes EXP/offline_{engine}_seed{seed} (metrics.json, tokens.csv, plots/);
colabs/results.ipynb draws the trainer-vs-sampler probability scatter from tokens.csv.
"""

from collections.abc import Iterator, Sequence

from absl import app
from absl import flags

from launch import sweep as sweep_lib

ENGINES = ("jax", "vllm")
MODULE = "experiments.offline_mismatch"
CONFIG_FILE = "experiments/configs/offline_mismatch.py"
NAME = "offline_{engine}_seed{seed}"

_ENGINES = flags.DEFINE_list("engines", ["vllm"], f"Sampling engines, from {list(ENGINES)}.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["fp32", "bf16", "fp16"], "Precision pairs measured by every job (bf16, or "
    "TRAINER-SAMPLER such as bf16-fp16).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")


def sweep(engines: Sequence[str], precisions: Sequence[str],
          seeds: Sequence[int]) -> Iterator[dict]:
  """Yields the config variant of each (engine, seed); every job measures all `precisions`."""
  for engine in engines:
    for seed in seeds:
      yield {"engine": engine, "precisions": ",".join(precisions), "seed": seed}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  engines = sweep_lib.check_choices(_ENGINES.value, ENGINES, "engines")
  precisions = [sweep_lib.check_precision(p) for p in _PRECISIONS.value]
  if not precisions:
    raise app.UsageError("--precisions is empty")
  seeds = sweep_lib.int_list(_SEEDS.value, "seeds")
  jobs, experiment_dir = sweep_lib.jobs_from_flags(
      sweep(engines, precisions, seeds), module=MODULE, config_file=CONFIG_FILE,
      sweep_name="offline_mismatch", name=NAME)
  return sweep_lib.main(jobs, sweep_name="offline_mismatch", experiment_dir=experiment_dir)


if __name__ == "__main__":
  app.run(main)
