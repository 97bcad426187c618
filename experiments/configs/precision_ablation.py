"""The precision ablation: trainer {bf16, fp16, fp32} x sampler {bf16, fp16, fp32}.

One run per cell, e.g. a BF16 trainer with an FP16 sampler:

    python -m experiments.rl --config=experiments/configs/precision_ablation.py \
        --config.precision=bf16-fp16

`launch/precision_ablation.py` sweeps the whole grid (and algorithms and seeds) with XManager.
"""

import ml_collections

from experiments.configs import sanity

TRAINER_DTYPES = ("bf16", "fp16", "fp32")
SAMPLER_DTYPES = ("bf16", "fp16", "fp32")
GRID = tuple(t if t == s else f"{t}-{s}" for t in TRAINER_DTYPES for s in SAMPLER_DTYPES)


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  config.precision = "bf16-fp16"  # one cell of GRID
  config.output_dir = "runs/precision_ablation/{algorithm}_{precision}_seed{seed}"
  return config
