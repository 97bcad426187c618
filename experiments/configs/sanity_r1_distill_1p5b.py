"""The paper's sanity test at paper scale: DeepSeek-R1-Distill-Qwen-1.5B on a perfectible MATH
subset. Runs where a GPU, vLLM and the checkpoint exist (not on the CPU CI machine).

    python -m experiments.rl --config=experiments/configs/sanity_r1_distill_1p5b.py \
        --config.model=/path/to/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data_path=/path/to/perfectible_math.jsonl \
        --config.algorithm=grpo --config.precision=fp16

Hyperparameters as in the paper's runs: 64 prompts x 8 samples per step, up to 8K response tokens,
lr 1e-6 (AdamW 0.9/0.95, no weight decay, grad clip 1.0), temperature 1.0, the R1 prompt template.
The update runs each minibatch in length-sorted micro-batches (`micro_batch_rows`).
"""

import ml_collections

from experiments.configs import sanity


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  config.model = ml_collections.config_dict.placeholder(str)  # a local HF checkpoint directory
  config.engine = "vllm"
  config.task = "math"
  config.data_path = ml_collections.config_dict.placeholder(str)  # JSONL / parquet / tfds dir
  config.template = "r1_distill"
  config.max_prompt_tokens = 1024
  config.prompts_per_step = 64
  config.samples_per_prompt = 8
  config.num_minibatches = 4
  config.max_new_tokens = 8192
  # Each 128-row minibatch in length-sorted micro-batches of 8 rows, each padded to a multiple of
  # 512 tokens (docs/performance.md: 64% padded slots -> 13%; 16 widths compile per program).
  config.micro_batch_rows = 8
  config.sequence_bucket = 512
  config.temperature = 1.0
  config.learning_rate = 1e-6
  config.steps = 1000
  config.checkpoint_every = 50
  config.output_dir = "runs/sanity_r1_distill_1p5b/{algorithm}_{precision}_seed{seed}"
  return config
