r"""Is it the mismatch or the precision? (docs/mismatch_or_precision.md, registered there.)

One arm (algorithm, precision pair, bitwise mode, seed), e.g. a 4-significand-bit policy whose
trainer and sampler agree bit for bit:

    python -m experiments.rl --config=experiments/mismatch_or_precision/config.py:grpo_token_tis \
        --config.precision=e4 --config.bitwise=True --config.seed=0

All arms, two at a time, skipping those already kept:

    python -m launch.sweep --config=experiments/mismatch_or_precision/config.py --max_parallel=2 \
        --experiment_dir=runs/mismatch_or_precision --skip_kept=docs/mismatch_or_precision/data

The settings are the dose-response's (experiments/dose_response/config.py at 8 prompts per step:
paper recipes, fp32 master weights, JAX engine, 150 steps), so its kept `fp32-e4` and `fp32-e24`
arms of seeds 0 and 1 are this study's too.
"""

from collections.abc import Iterator, Sequence

import ml_collections

from experiments.dose_response import config as dose_response
from experiments.configs import paper

ALGORITHMS = ("grpo_token_tis", "grpo")
SEEDS = (0, 1, 2)
STEPS = dose_response.STEPS
PROMPTS_PER_STEP = 8
CONTROL = "fp32-e24"
# (precision pair, bitwise, seeds) of each new arm, in the registered order: the decisive arms
# (4 bits, bitwise and not; seed 2 of the dose-response's mismatched arm and control), then bf16.
DECISIVE_ARMS = (("e4", True, SEEDS), ("e4", False, SEEDS), ("fp32-e4", False, (2,)),
                 (CONTROL, False, (2,)))
BF16_ARMS = (("bf16", True, SEEDS), ("bf16", False, SEEDS))
NAME = "{algorithm}_{precision}_bitwise{bitwise}_seed{seed}"


def get_config(name: str = "grpo_token_tis") -> ml_collections.ConfigDict:
  """The dose-response's config of the paper variant `name` at 8 prompts per step."""
  config = dose_response.get_config(name)
  config.prompts_per_step = PROMPTS_PER_STEP
  config.output_dir = "runs/mismatch_or_precision/" + NAME
  return config


def sweep(algorithms: Sequence[str] = ALGORITHMS, bf16: bool = True) -> Iterator[dict]:
  """Yields each new arm's overrides of `get_config()`, in the registered order: for each
  algorithm its decisive arms, then (with `bf16`) for each algorithm the bf16 arms."""
  blocks = [(name, DECISIVE_ARMS) for name in algorithms]
  if bf16:
    blocks += [(name, BF16_ARMS) for name in algorithms]
  for name, arms in blocks:
    recipe = paper.get_config(name)
    for precision, bitwise, seeds in arms:
      for seed in seeds:
        yield {"algorithm": recipe.algorithm, "advantage": recipe.advantage,
               "paper_run": recipe.paper_run, "paper_script": recipe.paper_script,
               "loss": recipe.loss.to_dict(), "precision": precision, "bitwise": bitwise,
               "seed": seed}
