r"""The sanity test sweep: algorithm x precision x seed, one RL run each (experiments.rl).

    python -m launch.sanity_sweep --experiment_dir=runs/sanity_sweep --max_parallel=2
    python -m launch.sanity_sweep --algorithms=grpo,gspo --precisions=bf16,fp16 --seeds=0,1 \
        --override=steps=10 --override=engine=jax --dry_run

Each job writes EXP/{algorithm}_{precision}_seed{seed}; read them with colabs/results.ipynb.
"""

from collections.abc import Iterator, Sequence

from absl import app
from absl import flags

from launch import sweep as sweep_lib

# The algorithms of the paper's sanity test.
PAPER_ALGORITHMS = ("grpo", "grpo_token_tis", "gspo", "pg_seq_is", "grpo_seq_mis", "pg_seq_mis")

_ALGORITHMS = flags.DEFINE_list("algorithms", list(PAPER_ALGORITHMS),
                                f"Algorithms to run, from {list(sweep_lib.ALGORITHMS)}.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["bf16", "fp16"], "Precisions: bf16, fp16, fp32, or TRAINER-SAMPLER pairs such "
    "as bf16-fp16.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")


def sweep(algorithms: Sequence[str], precisions: Sequence[str],
          seeds: Sequence[int]) -> Iterator[dict]:
  """Yields the config variant of each (algorithm, precision, seed)."""
  for algorithm in algorithms:
    for precision in precisions:
      for seed in seeds:
        yield {"algorithm": algorithm, "precision": precision, "seed": seed}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  algorithms = sweep_lib.check_choices(_ALGORITHMS.value, sweep_lib.ALGORITHMS, "algorithms")
  precisions = [sweep_lib.check_precision(p) for p in _PRECISIONS.value]
  seeds = sweep_lib.int_list(_SEEDS.value, "seeds")
  jobs, experiment_dir = sweep_lib.jobs_from_flags(
      sweep(algorithms, precisions, seeds), module=sweep_lib.RL_MODULE,
      config_file=sweep_lib.RL_CONFIG, sweep_name="sanity_sweep")
  return sweep_lib.main(jobs, sweep_name="sanity_sweep", experiment_dir=experiment_dir)


if __name__ == "__main__":
  app.run(main)
