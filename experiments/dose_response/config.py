r"""The significand-bits dose-response: an fp32 trainer against a sampler rounding to K bits.

One arm (the paper recipe's algorithm, sampler precision, seed):

    python -m experiments.rl --config=experiments/dose_response/config.py:grpo_token_tis \
        --config.precision=fp32-e6 --config.seed=0

`sweep()` lists every arm as a nested dict of overrides of `get_config()` (apply them with
`experiments.common.merge_overrides`; `python -m launch.sweep
--config=experiments/dose_response/config.py --dry_run` lists the jobs): the paper variants of
GRPO, GRPO-Token-TIS and GRPO-Seq-MIS (experiments/configs/paper.py), sampler K in 4, 5, 6, 7, 8,
9, 11, 24 (`fp32-eK`: float32 exponent range, docs/dose_response.md), plus real bf16 and fp16
samplers (`fp32-bf16`, `fp32-fp16`) to place them on the curve. The engine is the in-process JAX
sampler (the emulation exists only there); each arm runs `STEPS` RL steps (the budget per arm of
docs/long_runs_preregistration.md).
"""

from collections.abc import Iterator, Sequence

import ml_collections

from experiments.configs import paper

ALGORITHMS = ("grpo", "grpo_token_tis", "grpo_seq_mis")
SAMPLER_BITS = (4, 5, 6, 7, 8, 9, 11, 24)
REAL_SAMPLERS = ("fp32-bf16", "fp32-fp16")
STEPS = 150
# Follow-ups added after the registered arms' results, each as keyword arguments of `sweep()`
# (docs/long_runs_preregistration.md, "Changes after registration"): seed 1 at K = 4 and the
# K = 24 control, for each algorithm.
FOLLOW_UPS = ({"bits": (4, 24), "seeds": (1,), "real_samplers": ()},)


def get_config(name: str = "grpo") -> ml_collections.ConfigDict:
  """The paper variant `name` on the JAX engine, fp32 trainer, 8-bit sampler (change with
  --config.precision=fp32-eK)."""
  config = paper.get_config(name)
  config.engine = "jax"
  config.precision = "fp32-e8"
  config.steps = STEPS
  config.output_dir = "runs/dose_response/{algorithm}_{precision}_seed{seed}"
  return config


def sweep(algorithms: Sequence[str] = ALGORITHMS, bits: Sequence[int] = SAMPLER_BITS,
          seeds: Sequence[int] = (0,), real_samplers: Sequence[str] = REAL_SAMPLERS
          ) -> Iterator[dict]:
  """Yields each arm's overrides of `get_config()`: the paper recipe of the algorithm (algorithm,
  advantage, loss block), the precision pair and the seed."""
  for name in algorithms:
    recipe = paper.get_config(name)
    for precision in [f"fp32-e{k}" for k in bits] + list(real_samplers):
      for seed in seeds:
        yield {"algorithm": recipe.algorithm, "advantage": recipe.advantage,
               "paper_run": recipe.paper_run, "paper_script": recipe.paper_script,
               "loss": recipe.loss.to_dict(), "precision": precision, "seed": seed}
