"""The accelerator check: trainer-vs-JAX-sampler mismatch and train-step speed per precision.

    python -m experiments.gpu_check --config=experiments/gpu_check/config.py
    python -m experiments.gpu_check --config=experiments/gpu_check/config.py:cpu   # smoke size
    python -m experiments.gpu_check --config=experiments/gpu_check/config.py:scale  # paper scale

`scale` runs only the paper-scale stages (`paper`, `rl`, `minibatch`) within `budget_s`
(`scale_cpu`: the same at a tiny shape, for CPU).

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
  # A subset of: mismatch, trainer, paper, rl, minibatch; run in this order (on the command line
  # comma-separated: --config.stages=paper,mismatch).
  config.stages = ("mismatch", "trainer")
  # The paper-scale check: the paper's 1.5B model shape with random weights, train steps on
  # 8K-token sequences with per-layer remat, and the JAX sampler's decode at each of
  # `decode_rows` against the floor the measured copy bandwidth (`bandwidth_bytes`) sets.
  # `model_overrides` replaces ModelConfig fields (the cpu variant shrinks the model).
  # `estimates_s`: seconds a train case (compile included) and a decode case are expected to
  # take, for the budget; a measured case replaces the estimate of the next one of its kind.
  config.paper = ml_collections.ConfigDict(dict(
      model="DeepSeek-R1-Distill-Qwen-1.5B", model_overrides={}, remat=True,
      precisions=("bf16", "fp16"), rows=1, seq_len=8192, prompt_len=256, repetitions=3,
      decode_precision="bf16", decode_rows=(64,), decode_prompt_len=256, decode_new_tokens=256,
      bandwidth_bytes=2 * 1024**3, estimates_s=dict(train=70.0, minibatch=120.0, decode=45.0),
      # One minibatch update of `rows` rows with lognormal response lengths (the paper-scale
      # padding model of docs/performance.md), once per entry of `micro_batch_rows` (0: the
      # whole minibatch at once; 32 rows of 8K do not fit one GPU that way).
      minibatch=dict(precision="bf16", rows=32, micro_batch_rows=(4,), bucket=512,
                  length_mean=3000.0, length_sigma=0.6)))
  # One end-to-end RL iteration (`Learner.step`: JAX engine, GRPO) at the paper model's shape
  # with random weights and prompts, every row running to `max_new_tokens` (no EOS).
  # `iterations`: the first compiles; later ones are the steady state. `num_minibatches`: one
  # update per minibatch (16 keeps a minibatch of 8 x 2.3K tokens in one GPU's memory; rows of
  # equal length gain nothing from micro-batches). `estimates_s`: (first iteration, each later
  # one).
  config.rl = ml_collections.ConfigDict(dict(
      precision="bf16", num_prompts=16, samples_per_prompt=8, prompt_len=256,
      max_new_tokens=2048, num_minibatches=16, prompt_bucket=32, learning_rate=1e-6,
      iterations=2, estimates_s=(240.0, 100.0)))
  # The whole script's wall-clock budget in seconds for the paper and rl stages' cases (each is
  # skipped, with the reason printed, when its estimate does not fit); 0 = no budget.
  config.budget_s = 0.0
  config.benchmark = ml_collections.ConfigDict(dict(
      sections=("peak", "trainer"), vllm=False, precisions=("fp32", "bf16", "fp16"), warmup=1,
      repetitions=5, peak_matmul_size=8192, trainer_models=("small", "medium"),
      trainer_response_lengths=(1024,), trainer_prompt_len=32, trainer_tokens_per_step=16384,
      # A ~160M-parameter random Qwen2 (head_dim 64): big enough to occupy a GPU.
      medium=dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)))
  config.output_dir = "runs/gpu_check"
  if variant in ("scale", "scale_cpu"):
    config.stages = ("paper", "rl", "minibatch")
    config.paper.decode_rows = (64, 256)
    config.budget_s = 480.0
  if variant in ("cpu", "scale_cpu"):
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
        seq_len=128, prompt_len=32, repetitions=1, decode_rows=(4, 16), decode_prompt_len=16,
        decode_new_tokens=8, bandwidth_bytes=1024**2,
        estimates_s=dict(train=10.0, minibatch=20.0, decode=5.0),
        minibatch=dict(precision="bf16", rows=8, micro_batch_rows=(0, 2), bucket=64,
                    length_mean=40.0, length_sigma=0.6)))
    config.rl.update(dict(num_prompts=2, samples_per_prompt=4, prompt_len=16, max_new_tokens=16,
                          num_minibatches=2, prompt_bucket=16, estimates_s=(20.0, 5.0)))
    config.budget_s = 300.0 if variant == "scale_cpu" else 0.0
  if variant not in ("", "cpu", "scale", "scale_cpu"):
    raise ValueError(f"Unknown gpu_check variant {variant!r}; allowed: '', 'cpu', 'scale', "
                     "'scale_cpu'")
  return config
