r"""The precision ablation: trainer dtype x sampler dtype (x algorithm x seed), one RL run each.

    python -m launch.precision_ablation --experiment_dir=runs/precision_ablation --max_parallel=2
    python -m launch.precision_ablation --trainers=bf16,fp16 --samplers=bf16,fp16 --dry_run

Each job runs experiments.rl with --config.precision=TRAINER-SAMPLER (just TRAINER when both are
the same, the name the sanity sweep uses) and writes EXP/{algorithm}_{precision}_seed{seed}.
colabs/results.ipynb draws the grid of final reward and mean mismatch.
"""

from collections.abc import Iterator, Sequence

from absl import app
from absl import flags

from launch import sweep as sweep_lib

PRECISIONS = sweep_lib.PRECISIONS

_TRAINERS = flags.DEFINE_list("trainers", list(PRECISIONS), "Trainer dtypes.")
_SAMPLERS = flags.DEFINE_list("samplers", list(PRECISIONS), "Sampler (inference engine) dtypes.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["grpo"], "Algorithms.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")


def precision_pair(trainer: str, sampler: str) -> str:
  """The precision name: "bf16" when both sides are bf16, else e.g. "bf16-fp16"."""
  return trainer if trainer == sampler else f"{trainer}-{sampler}"


def sweep(trainers: Sequence[str], samplers: Sequence[str], algorithms: Sequence[str],
          seeds: Sequence[int]) -> Iterator[dict]:
  """Yields the config variant of each (algorithm, trainer, sampler, seed)."""
  for algorithm in algorithms:
    for trainer in trainers:
      for sampler in samplers:
        for seed in seeds:
          yield {"algorithm": algorithm, "precision": precision_pair(trainer, sampler),
                 "seed": seed}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  trainers = sweep_lib.check_choices(_TRAINERS.value, PRECISIONS, "trainers")
  samplers = sweep_lib.check_choices(_SAMPLERS.value, PRECISIONS, "samplers")
  algorithms = sweep_lib.check_choices(_ALGORITHMS.value, sweep_lib.ALGORITHMS, "algorithms")
  seeds = sweep_lib.int_list(_SEEDS.value, "seeds")
  jobs, experiment_dir = sweep_lib.jobs_from_flags(
      sweep(trainers, samplers, algorithms, seeds), module=sweep_lib.RL_MODULE,
      config_file=sweep_lib.RL_CONFIG, sweep_name="precision_ablation")
  return sweep_lib.main(jobs, sweep_name="precision_ablation", experiment_dir=experiment_dir)


if __name__ == "__main__":
  app.run(main)
