"""LoRA RL at CPU scale: the sanity experiment training rank-1 adapters on a frozen base.

    python -m experiments.rl --config=experiments/configs/lora.py --config.precision=fp16

Mirrors the paper's LoRA setting: rank 1, alpha 2 (update scale alpha / rank = 2), adapters on
every attention and MLP projection, lr 4e-5 against 1e-6 for full fine-tuning (40x). Everything
else is the sanity config, whose full fine-tuning lr (1e-4) is already scaled up for the tiny CPU
model; the LoRA lr keeps the paper's 40x ratio to it (4e-3). `--config.learning_rate=4e-5` gives
the paper's literal value.
"""

import ml_collections

from experiments.configs import sanity

PAPER_FULL_FT_LR = 1e-6
PAPER_LORA_LR = 4e-5


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  config.lora.enabled = True
  config.lora.rank = 1
  config.lora.alpha = 2.0
  config.learning_rate = config.learning_rate * PAPER_LORA_LR / PAPER_FULL_FT_LR
  config.output_dir = "runs/lora/{algorithm}_{precision}_seed{seed}"
  return config
