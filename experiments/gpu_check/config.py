"""The accelerator check: trainer-vs-JAX-sampler mismatch and train-step speed per precision.

    python -m experiments.gpu_check --config=experiments/gpu_check/config.py
    python -m experiments.gpu_check --config=experiments/gpu_check/config.py:cpu   # smoke size

Sized for one GPU and a few minutes (most of it XLA compilation). vLLM is not used: the GPU image
this was written for has no vLLM wheel, so the sampler is the in-process JAX KV-cache sampler.
`mismatch` and `benchmark` are overrides on experiments/configs/offline_mismatch.py and
experiments/benchmark/config.py.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the committed tiny base model (a trained policy, peaked logits)
  config.seed = 0
  config.mismatch = ml_collections.ConfigDict(dict(
      engine="jax", precisions=("fp32", "bf16", "fp16", "bf16-fp16"), num_prompts=64,
      samples_per_prompt=4, max_new_tokens=256, temperature=1.0, layer_view=False))
  # JAX's default float32 matmul precision on NVIDIA GPUs is TF32 (10 significand bits); also
  # run the fp32 pair and the fp32 train step under jax.default_matmul_precision("highest").
  config.fp32_highest = True
  # Pairs re-measured under "highest" (when fp32_highest), e.g. ("fp32", "bf16", "fp16").
  config.highest_pairs = ("fp32",)
  # A subset of: mismatch, trainer, paper; run in this order (on the command line comma-separated:
  # --config.stages=paper,mismatch).
  config.stages = ("mismatch", "trainer")
  # The paper-scale check: the paper's 1.5B model shape with random weights, train steps on
  # 8K-token sequences with per-layer remat, and the JAX sampler's decode at batch 64.
  # `model_overrides` replaces ModelConfig fields (the cpu variant shrinks the model).
  config.paper = ml_collections.ConfigDict(dict(
      model="DeepSeek-R1-Distill-Qwen-1.5B", model_overrides={}, remat=True,
      precisions=("bf16", "fp16"), rows=1, seq_len=8192, prompt_len=256, repetitions=3,
      decode_precision="bf16", decode_rows=64, decode_prompt_len=256, decode_new_tokens=256))
  config.benchmark = ml_collections.ConfigDict(dict(
      sections=("peak", "trainer"), vllm=False, precisions=("fp32", "bf16", "fp16"), warmup=1,
      repetitions=5, peak_matmul_size=8192, trainer_models=("small", "medium"),
      trainer_response_lengths=(1024,), trainer_prompt_len=32, trainer_tokens_per_step=16384,
      # A ~160M-parameter random Qwen2 (head_dim 64): big enough to occupy a GPU.
      medium=dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)))
  config.output_dir = "runs/gpu_check"
  if variant == "cpu":
    config.mismatch.update(dict(precisions=("fp32", "bf16", "fp16"), num_prompts=2,
                                samples_per_prompt=2, max_new_tokens=16))
    config.benchmark.update(dict(
        repetitions=1, peak_matmul_size=256, trainer_models=("medium",),
        trainer_response_lengths=(32,), trainer_prompt_len=16, trainer_tokens_per_step=96,
        medium=dict(vocab_size=256, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)))
    config.paper.update(dict(
        model_overrides=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        seq_len=128, prompt_len=32, repetitions=1, decode_rows=4, decode_prompt_len=16,
        decode_new_tokens=8))
  elif variant:
    raise ValueError(f"Unknown gpu_check variant {variant!r}; allowed: '' or 'cpu'")
  return config
