"""The benchmark suite: machine peak, trainer, samplers, weight sync and one RL iteration.

    python -m experiments.benchmark --config=experiments/benchmark/config.py
    python -m experiments.benchmark --config=experiments/benchmark/config.py --config.quick=True

`quick=True` applies `quick_overrides` on top of everything else (tiny shapes, 2 repetitions; for
tests and a smoke check in about two minutes on an idle 2-core machine): fp32 and fp16 only, and
the trainer runs only "medium", shrunk to a 2-layer model that keeps head_dim 64.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The full suite's settings; every section's fields are flat on the config, in this order."""
  return ml_collections.ConfigDict({
      **_run_fields(), **_model_fields(), **_trainer_fields(), **_sampler_fields(),
      **_sync_fields(), **_e2e_and_bitwise_fields(), **_compare_fields(),
      "quick_overrides": _quick_overrides(), "output_dir": "runs/benchmark"})


def _run_fields() -> dict:
  """What to run, how often, in which precisions, and whether vLLM is real."""
  return dict(
      quick=False,
      # A subset of: peak, trainer, samplers, sync, e2e, bitwise, compare (on the command line
      # comma-separated: --config.sections=peak,trainer).
      sections=("peak", "trainer", "samplers", "sync", "e2e", "bitwise", "compare"),
      seed=0,
      # Every figure is the median (with min and max) of `repetitions` timed runs after `warmup`
      # untimed ones (the first call compiles).
      warmup=1,
      repetitions=3,
      precisions=("fp32", "bf16", "fp16"),
      # Use real vLLM for the vLLM sampler, the weight sync and (engine="vllm") the RL iteration.
      vllm=True,
      vllm_kv_cache_gib=1.0)


def _model_fields() -> dict:
  """The "small" and "medium" models, and the peak matmul's size."""
  return dict(
      # "small": `model` as experiments.common.load_policy_model reads it ("default" = the
      # committed tiny base model, else a ~1M-parameter random Qwen2). "medium": a random Qwen2
      # of this shape (head_dim = hidden_size / num_attention_heads = 64; about 26M parameters).
      model="default",
      medium=ml_collections.ConfigDict(dict(
          vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
          num_attention_heads=8, num_key_value_heads=8)),
      # Peak: a jitted N x N @ N x N matmul.
      peak_matmul_size=2048)


def _trainer_fields() -> dict:
  """Trainer: one `rl_train_step` on sequences of prompt_len + response_len tokens, with
  round(tokens_per_step / sequence length) rows (at least one)."""
  return dict(
      trainer_models=("small", "medium"),
      trainer_response_lengths=(256, 1024),
      trainer_prompt_len=32,
      trainer_tokens_per_step=1024,
      algorithm="grpo",
      # Trace one extra step per trainer case with jax.profiler into <output_dir>/profile/ and
      # report the op time by kind.
      profile=False)


def _sampler_fields() -> dict:
  """Samplers: the same prompts, batch and lengths for the JAX sampler and vLLM; no EOS, so every
  row runs to the length."""
  return dict(
      sampler_models=("small",),
      sampler_response_lengths=(256,),
      sampler_prompts=4,
      sampler_samples_per_prompt=4)


def _sync_fields() -> dict:
  """Weight sync into vLLM: in memory vs through a Hugging Face directory."""
  return dict(
      sync_models=("small", "medium"),
      sync_precisions=("fp32", "bf16", "fp16"),
      # Also time --config.weight_sync=directory: versioned write + reload by a vLLM worker
      # process.
      sync_worker=True)


def _e2e_and_bitwise_fields() -> dict:
  """End to end: RL iterations (`rl_fp16.rl_loop.rl_iteration`) as experiments/configs/sanity.py
  runs them, on the small model (its synthetic task and reward when it has one). Bitwise: the e2e
  iteration with the JAX engine, normal then bitwise mode (docs/bitwise.md), on each of
  `bitwise_models`, in `bitwise_precision`."""
  return dict(
      e2e=ml_collections.ConfigDict(dict(
          engine="vllm", precision="fp16", algorithm="grpo", prompts_per_step=8,
          samples_per_prompt=8, max_new_tokens=256, num_minibatches=2, learning_rate=1e-4)),
      bitwise_models=("small", "medium"),
      bitwise_precision="bf16")


def _compare_fields() -> dict:
  """Compare: rl_fp16's RL iteration next to TRL's GRPOTrainer at the same settings (the committed
  tiny base model and its perfectible problems), every case in this one run.

  Cases are engine:precision pairs; each runs `warmup` untimed + `repetitions` timed iterations
  (the first case continues to `memory_iterations` to show the resident memory does not grow);
  engines: jax, vllm, vllm_compiled (vLLM with enforce_eager=False: torch.compile). On the command
  line quote several cases (ml_collections refuses a bare `a:b,c:d` for a tuple field):
  --config.compare.cases="'jax:fp32,vllm:fp32'" (one case needs no quotes). TRL runs in its own
  venv as a subprocess (experiments/benchmark/peers/trl_grpo.py) with `trl_python`; unset or
  missing: the TRL row is skipped with how to make the venv.
  """
  return dict(
      trl_python="",
      compare=ml_collections.ConfigDict(dict(
          cases=("jax:fp32", "jax:bf16", "jax:fp16", "vllm:fp32", "vllm_compiled:fp32"),
          warmup=2, repetitions=5,
          memory_iterations=50, prompts_per_step=8, samples_per_prompt=8, max_new_tokens=256,
          num_minibatches=2, learning_rate=1e-4, algorithm="grpo", sequence_bucket=64,
          micro_batch_rows=0,  # rl_fp16's length-sorted micro-batches (RLConfig; 0: off)
          trl_iterations=6, trl_timeout_s=900,
          # JAX engine: rows per decode group (`decode_row_group`; 0: all rows at once).
          jax_decode_row_group=0,
          # vLLM engine settings (rl_fp16.sampling.vllm_sampler.VllmConfig fields).
          vllm_enforce_eager=True, vllm_max_num_seqs=256,
          # Padding waste at paper scale: response lengths ~ lognormal with this mean and
          # log-space sigma, clipped at the budget; minibatches of `paper_minibatch` rows.
          paper_budget=8192, paper_mean_length=3000.0, paper_sigma=0.6, paper_minibatch=128,
          paper_microbatch=8, paper_bucket=512)))


def _quick_overrides() -> ml_collections.ConfigDict:
  """What `quick=True` sets on top of everything else (module docstring)."""
  return ml_collections.ConfigDict(dict(
      repetitions=2,
      precisions=("fp32", "fp16"),
      sync_precisions=("fp16",),
      peak_matmul_size=512,
      medium=dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2),
      trainer_models=("medium",),
      trainer_response_lengths=(32,),
      trainer_prompt_len=16,
      trainer_tokens_per_step=128,
      sampler_response_lengths=(16,),
      sampler_prompts=2,
      sampler_samples_per_prompt=2,
      sync_models=("small",),
      bitwise_models=("small",),
      vllm_kv_cache_gib=0.25,
      e2e=dict(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=16, num_minibatches=1),
      compare=dict(cases=("jax:fp32",), warmup=1, repetitions=2, memory_iterations=4,
                   prompts_per_step=2, samples_per_prompt=2, max_new_tokens=16,
                   num_minibatches=1, sequence_bucket=16, trl_iterations=2),
  ))
