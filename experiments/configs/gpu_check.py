"""The accelerator check: trainer-vs-JAX-sampler mismatch and train-step speed per precision.

    python -m experiments.gpu_check --config=experiments/configs/gpu_check.py
    python -m experiments.gpu_check --config=experiments/configs/gpu_check.py:cpu   # smoke size

Sized for one GPU and a few minutes (most of it XLA compilation). vLLM is not used: the GPU image
this was written for has no vLLM wheel, so the sampler is the in-process JAX KV-cache sampler.
`mismatch` and `benchmark` are overrides on experiments/configs/offline_mismatch.py and
experiments/configs/benchmark.py.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the committed tiny base model (a trained policy, peaked logits)
  config.seed = 0
  config.mismatch = ml_collections.ConfigDict(dict(
      engine="jax", precisions="fp32,bf16,fp16,bf16-fp16", num_prompts=64,
      samples_per_prompt=4, max_new_tokens=256, temperature=1.0, layer_view=False))
  # JAX's default float32 matmul precision on NVIDIA GPUs is TF32 (10 significand bits); also
  # run the fp32 pair and the fp32 train step under jax.default_matmul_precision("highest").
  config.fp32_highest = True
  # Pairs re-measured under "highest" (when fp32_highest), e.g. "fp32,bf16,fp16".
  config.highest_pairs = "fp32"
  # Comma-separated subset of: mismatch, trainer.
  config.stages = "mismatch,trainer"
  config.benchmark = ml_collections.ConfigDict(dict(
      sections="peak,trainer", vllm=False, precisions="fp32,bf16,fp16", warmup=1,
      repetitions=5, peak_matmul_size=8192, trainer_models="small,medium",
      trainer_response_lengths="1024", trainer_prompt_len=32, trainer_tokens_per_step=16384,
      # A ~160M-parameter random Qwen2 (head_dim 64): big enough to occupy a GPU.
      medium=dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)))
  config.output_dir = "runs/gpu_check"
  if variant == "cpu":
    config.mismatch.update(dict(precisions="fp32,bf16,fp16", num_prompts=2, samples_per_prompt=2,
                                max_new_tokens=16))
    config.benchmark.update(dict(
        repetitions=1, peak_matmul_size=256, trainer_models="medium",
        trainer_response_lengths="32", trainer_prompt_len=16, trainer_tokens_per_step=96,
        medium=dict(vocab_size=256, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)))
  elif variant:
    raise ValueError(f"Unknown gpu_check variant {variant!r}; allowed: '' or 'cpu'")
  return config
