r"""The precision ablation: trainer {fp32, bf16, fp16} x sampler {fp32, bf16, fp16}.

One run per cell, e.g. a BF16 trainer with an FP16 sampler:

    python -m experiments.rl --config=experiments/configs/precision_ablation.py \
        --config.precision=bf16-fp16

`sweep()` yields the whole grid (x algorithms x seeds); run it with the generic launcher:

    python -m launch.sweep --config=experiments/configs/precision_ablation.py --max_parallel=2
    python -m launch.sweep --config=experiments/configs/precision_ablation.py \
        --sweep_arg=trainers=bf16,fp16 --sweep_arg=samplers=bf16,fp16 --dry_run

Each job writes EXP/{algorithm}_{precision}_seed{seed}, precision TRAINER-SAMPLER (just TRAINER
when both are the same, the name the sanity sweep uses); colabs/results.ipynb draws the grid.
"""

from collections.abc import Iterator, Sequence

import ml_collections

from experiments.configs import sanity
from rl_fp16 import names

TRAINER_DTYPES = names.PRESETS  # ("fp32", "bf16", "fp16")
SAMPLER_DTYPES = names.PRESETS


def precision_pair(trainer: str, sampler: str) -> str:
  """The precision name: "bf16" when both sides are bf16, else e.g. "bf16-fp16"."""
  return trainer if trainer == sampler else f"{trainer}-{sampler}"


GRID = tuple(precision_pair(t, s) for t in TRAINER_DTYPES for s in SAMPLER_DTYPES)


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  config.precision = "bf16-fp16"  # one cell of GRID
  config.output_dir = "runs/precision_ablation/{algorithm}_{precision}_seed{seed}"
  return config


def sweep(trainers: Sequence[str] = TRAINER_DTYPES, samplers: Sequence[str] = SAMPLER_DTYPES,
          algorithms: Sequence[str] = ("grpo",), seeds: Sequence[int] = (0,)) -> Iterator[dict]:
  """Yields the overrides of each (algorithm, trainer, sampler, seed)."""
  unknown = [d for d in [*trainers, *samplers] if d not in names.PRESETS]
  if unknown or not trainers or not samplers:
    raise ValueError(f"trainer/sampler dtypes {unknown or 'empty'}: choose from "
                     f"{list(names.PRESETS)}")
  sanity.check_sweep_values(algorithms=algorithms, seeds=seeds)
  for algorithm in algorithms:
    for trainer in trainers:
      for sampler in samplers:
        for seed in seeds:
          yield {"algorithm": algorithm, "precision": precision_pair(trainer, sampler),
                 "seed": seed}
