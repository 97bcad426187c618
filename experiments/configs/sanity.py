r"""The sanity experiment at CPU scale: RL on the tiny base model's perfectible subset.

    python -m experiments.rl --config=experiments/configs/sanity.py \
        --config.algorithm=grpo --config.precision=fp16

A sound algorithm should drive training reward on a perfectible set towards 1; the paper's BF16
runs of uncorrected GRPO collapse while FP16 runs of every algorithm reach ~0.97-0.99.

Every key, with its default and meaning, is a field of `rl_fp16.rl_experiment.RLExperimentConfig`
or of the dataclasses it holds (`RLConfig`, `LossConfig`, `OptimizerConfig`, `ProblemsConfig`,
`EvalConfig`, ...); `rl_experiment.LAYOUT` maps each to its key here.

`sweep()` is the sanity test's sweep, algorithm x precision x seed (launch/README.md):

    python -m launch.sweep --config=experiments/configs/sanity.py --max_parallel=2
    python -m launch.sweep --config=experiments/configs/sanity.py \
        --sweep_arg=algorithms=grpo,gspo --sweep_arg=precisions=bf16,fp16 --sweep_arg=seeds=0,1 \
        --override=steps=10 --override=engine=jax --dry_run
"""

from collections.abc import Iterator, Sequence

import ml_collections

from rl_fp16 import names
from rl_fp16.rl_experiment import RLExperimentConfig, config_dict
from rl_fp16.train import OptimizerConfig

# The algorithms of the paper's sanity test.
PAPER_ALGORITHMS = ("grpo", "grpo_token_tis", "gspo", "pg_seq_is", "grpo_seq_mis", "pg_seq_mis")


def experiment() -> RLExperimentConfig:
  """The sanity run: the library's defaults (`RLExperimentConfig` documents every key) but for a
  learning rate the tiny base moves at and its own run directory."""
  return RLExperimentConfig(optimizer=OptimizerConfig(learning_rate=1e-4),
                            output_dir="runs/sanity/{algorithm}_{precision}_seed{seed}")


def get_config() -> ml_collections.ConfigDict:
  return config_dict(experiment())


def check_sweep_values(algorithms: Sequence[str] = (), precisions: Sequence[str] = (),
                       seeds: Sequence[int] = ()) -> None:
  """ValueError for an unknown algorithm, a bad precision pair or a seed that is not an int."""
  unknown = [a for a in algorithms if a not in names.ALGORITHMS]
  if unknown:
    raise ValueError(f"algorithms {unknown}: choose from {list(names.ALGORITHMS)}")
  names.check_precisions_and_seeds(precisions, seeds)


def sweep(algorithms: Sequence[str] = PAPER_ALGORITHMS,
          precisions: Sequence[str] = ("bf16", "fp16"),
          seeds: Sequence[int] = (0,)) -> Iterator[dict]:
  """Yields the overrides of each (algorithm, precision, seed); run directory
  {algorithm}_{precision}_seed{seed}."""
  check_sweep_values(algorithms, precisions, seeds)
  for algorithm in algorithms:
    for precision in precisions:
      for seed in seeds:
        yield {"algorithm": algorithm, "precision": precision, "seed": seed}
