"""Bitwise on-policy mode: the JAX sampler's log-probs equal `token_logprobs` bit for bit."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deps import bitwise_equality
from rl_fp16.models import ModelConfig, default_positions, init_params, token_logprobs
from rl_fp16.models import layers
from rl_fp16.models.decoder import apply_token_stats
from rl_fp16.precision import compiler_options, get_policy
from rl_fp16.sampling.jax_sampler import SamplingConfig, generate

_COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=4, head_dim=16, eos_token_id=1, initializer_range=0.2)
MODELS = {
    "qwen2_tied_gqa": ModelConfig(model_type="qwen2", num_key_value_heads=2, qkv_bias=True,
                                  tie_word_embeddings=True, **_COMMON),
    "qwen2_untied": ModelConfig(model_type="qwen2", num_key_value_heads=4, qkv_bias=True,
                                tie_word_embeddings=False, **_COMMON),
    "llama3": ModelConfig(model_type="llama", num_key_value_heads=1, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}, **_COMMON),
    "qwen3_qknorm": ModelConfig(model_type="qwen3", num_key_value_heads=2, **_COMMON),
    "qwen2_mha_dh64": ModelConfig(model_type="qwen2", num_key_value_heads=2, qkv_bias=False,
                                  tie_word_embeddings=True, **dict(_COMMON, hidden_size=128,
                                                                   num_attention_heads=2,
                                                                   head_dim=64)),
    "qwen3_moe": ModelConfig(model_type="qwen3_moe", num_key_value_heads=2,
                             moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             **_COMMON),
}
PRECISIONS = ("fp32", "bf16", "fp16", "e6")
# Each model at least once and each precision in two models (MHA and llama3 RoPE in fp32, whose
# products are inexact there); RL_FP16_BITWISE_MATRIX=full runs every pair.
COVERING = (("qwen2_tied_gqa", "bf16"), ("qwen2_untied", "fp16"), ("qwen2_untied", "e6"),
            ("llama3", "fp32"), ("qwen3_qknorm", "bf16"), ("qwen2_mha_dh64", "fp32"),
            ("qwen3_moe", "fp16"), ("qwen3_moe", "e6"))
PAIRS = (tuple((m, p) for m in MODELS for p in PRECISIONS)
         if os.environ.get("RL_FP16_BITWISE_MATRIX") == "full" else COVERING)
# Prompts of mixed lengths; 3 prompts x 4 samples = 12 rows. Responses of up to 72 tokens span
# two key blocks and several query tiles.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20]]


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Each case compiles its own programs (about a thousand memory mappings); drop them after it."""
  yield
  jax.clear_caches()


def _sampled(config, params, precision, temperature=1.0):
  rollout = generate(config, params, PROMPTS, policy=get_policy(precision, "sampler",
                                                                bitwise=True),
                     n=4, sampling=SamplingConfig(max_new_tokens=72, temperature=temperature),
                     rng=jax.random.key(3), decode_segment=32)
  assert rollout.response_lengths.min() >= 2
  return rollout


def _trainer(config, params, precision, tokens, mask, temperature=1.0):
  return np.asarray(token_logprobs(config, params, tokens, attention_mask=mask,
                                   policy=get_policy(precision, bitwise=True),
                                   temperature=temperature))


def _assert_bitwise(logp_old, rollout, rows=slice(None)):
  real = rollout.response_mask[rows] > 0
  equal = logp_old[real] == rollout.logp_sampler[rows][real]
  assert equal.all(), (f"{(~equal).sum()} of {equal.size} response tokens differ; max |dlogp| "
                       f"{np.abs(logp_old[real] - rollout.logp_sampler[rows][real]).max()}")


@pytest.mark.parametrize("model,precision", PAIRS)
@bitwise_equality
def test_sampler_logprobs_equal_token_logprobs(model, precision):
  config = MODELS[model]
  params = init_params(config, jax.random.key(0))
  rollout = _sampled(config, params, precision)
  tokens, mask, _ = rollout.full_sequence()
  prompt_width = rollout.prompt_tokens.shape[1]
  # All rows at once, in the left-padded full-sequence layout.
  _assert_bitwise(_trainer(config, params, precision, tokens, mask)[:, prompt_width:], rollout)
  # Rows regrouped in reverse order into uneven groups (5 and 7 rows; the 5 with two more
  # rows of other company, so that both groups run in one compiled shape).
  order = np.arange(rollout.batch_size)[::-1]
  small, large = np.split(order, [5])
  for group, company in ((small, order[[-1, 6]]), (large, order[:0])):
    rows = np.concatenate([group, company])
    logp = _trainer(config, params, precision, tokens[rows], mask[rows])[:len(group)]
    _assert_bitwise(logp[:, prompt_width:], rollout, group)
  # Extra right padding.
  pad = ((0, 0), (0, 37))
  logp = _trainer(config, params, precision, np.pad(tokens, pad), np.pad(mask, pad))
  _assert_bitwise(logp[:, prompt_width:prompt_width + tokens.shape[1] - prompt_width], rollout)
  # The packed layout the RL update uses (prompt and response from column 0).
  width = rollout.packed_width(64)
  packed_tokens, packed_mask, _ = rollout.packed_sequence(width)
  logp = _trainer(config, params, precision, packed_tokens, packed_mask)
  _assert_bitwise(rollout.unpack_response(logp), rollout)


@pytest.mark.parametrize("model,precision", [("qwen2_untied", "bf16"), ("qwen3_qknorm", "fp16")])
@bitwise_equality
def test_chunked_lm_head_keeps_sampler_logprobs_bitwise(model, precision):
  """The LM head and log-softmax in chunks (the trainer's path for large logits), at their floor
  of `BITWISE_MIN_ROWS` tokens (chunk_tokens 1): still equal to the sampler bit for bit, in the
  left-padded and packed layouts; entropy too equals the full logits'."""
  config = MODELS[model]
  params = init_params(config, jax.random.key(0))
  rollout = _sampled(config, params, precision)
  policy = get_policy(precision, bitwise=True)
  prompt_width = rollout.prompt_tokens.shape[1]
  left = rollout.full_sequence()[:2]
  packed = rollout.packed_sequence(rollout.packed_width(64))[:2]
  for (tokens, mask), response in ((left, lambda logp: logp[:, prompt_width:]),
                                   (packed, rollout.unpack_response)):
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
    stats = {name: jax.jit(lambda p, c=c: apply_token_stats(
        config, policy, p, tokens, mask, default_positions(mask), with_entropy=True,
        with_argmax=True, chunk_tokens=c), compiler_options=compiler_options(policy))(params)
             for name, c in (("full", None), ("chunked", 1))}
    _assert_bitwise(np.asarray(response(stats["chunked"]["logp"])), rollout)
    np.testing.assert_array_equal(stats["chunked"]["entropy"], stats["full"]["entropy"])
    valid = np.asarray(stats["chunked"]["logp"]) != 0
    np.testing.assert_array_equal(np.asarray(stats["chunked"]["argmax"])[valid],
                                  np.asarray(stats["full"]["argmax"])[valid])


@pytest.mark.parametrize("model,precision", [("llama3", "fp32"), ("qwen2_tied_gqa", "bf16")])
@bitwise_equality
def test_attention_in_key_chunks_keeps_sampler_logprobs_bitwise(model, precision, monkeypatch):
  """The attention's loop over keys one key block per step (the responses' two blocks: a scan
  whose second pass recomputes each block's scores) samples the tokens and log-probs of all keys
  in one step, and the trainer's log-probs still equal the sampler's bit for bit."""
  config = MODELS[model]
  params = init_params(config, jax.random.key(0))
  whole = _sampled(config, params, precision)
  monkeypatch.setattr(layers, "BITWISE_CHUNK_BLOCKS", 1)
  jax.clear_caches()
  chunked = _sampled(config, params, precision)
  np.testing.assert_array_equal(chunked.response_tokens, whole.response_tokens)
  np.testing.assert_array_equal(chunked.logp_sampler, whole.logp_sampler)
  tokens, mask, _ = chunked.full_sequence()
  logp = _trainer(config, params, precision, tokens, mask)
  _assert_bitwise(logp[:, chunked.prompt_tokens.shape[1]:], chunked)


@pytest.mark.parametrize("model,precision", [("llama3", "fp32"), ("qwen3_qknorm", "fp32"),
                                             ("qwen2_tied_gqa", "bf16")])
def test_bitwise_gradient_matches_the_normal_one(model, precision):
  """The bitwise forward's gradient (every parameter: projections, q/k norms, embeddings) equals
  the normal policy's within float rounding, so nothing on its path (RoPE's product pinning, the
  attention's stop-gradient max) cuts it."""
  config = MODELS[model]
  params = init_params(config, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(2, config.vocab_size, (4, 40))

  def grad(bitwise):
    policy = get_policy(precision, bitwise=bitwise)
    return jax.jit(jax.grad(lambda p: -jnp.mean(token_logprobs(config, p, tokens, policy=policy))),
                   compiler_options=compiler_options(policy))(params)

  tol = 1e-4 if precision == "fp32" else 5e-2
  for (path, g), g_normal in zip(jax.tree_util.tree_leaves_with_path(grad(True)),
                                 jax.tree_util.tree_leaves(grad(False))):
    scale = float(np.abs(g_normal).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_normal), rtol=0, atol=tol * scale,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------ the RL loop ----

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from rl_fp16 import objectives, sharding  # noqa: E402
from rl_fp16.checkpoints import load_hf  # noqa: E402
from rl_fp16.checkpoints.train_state import TrainState  # noqa: E402
from rl_fp16.data import synthetic, tokenizer  # noqa: E402
from rl_fp16.data.tasks import SyntheticTask  # noqa: E402
from rl_fp16.models import lora as lora_lib  # noqa: E402
from rl_fp16.precision import (default_loss_scale_config, get_precision_pair,  # noqa: E402
                               init_loss_scale)
from rl_fp16.rl_loop import rl_iteration  # noqa: E402
from rl_fp16.sampling.engines import JaxEngine  # noqa: E402
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rl_steps(model_dir, precision, *, bitwise, lora, steps=3, mesh=None):
  """Metrics of `steps` RL iterations (GRPO, 2 minibatches, packed update) on the tiny task;
  with `mesh`, the state and the LoRA base placed on it and the update sharded over it."""
  model_config, base = load_hf(model_dir)
  task = SyntheticTask(synthetic.load_task_config(model_dir), tokenizer.load_tokenizer(model_dir))
  pair = get_precision_pair(precision, bitwise=bitwise)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2 if lora else 1e-3))
  lora_config = lora_lib.LoraConfig(rank=2, alpha=4.0) if lora else None
  params = lora_lib.init_lora(lora_config, base, jax.random.key(0)) if lora else base
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  engine = JaxEngine(model_config, base, pair.sampler, eos_token_ids=[task.tokenizer.eos_id])
  rl_config = RLConfig(samples_per_prompt=4, num_minibatches=2, max_new_tokens=24,
                       loss=objectives.LossConfig(max_response_len=24), lora=lora_config)
  reward_fn = lambda rollout: (rollout.response_lengths % 2).astype(np.float32)
  base_params = base if lora else None
  if mesh is not None:
    state = sharding.shard_state(state, mesh)
    if lora:
      base_params = jax.device_put(base_params, sharding.param_shardings(base_params, mesh))
  logged = []
  for step in range(steps):
    state, metrics = rl_iteration(state, model_config=model_config, trainer_policy=pair.trainer,
                                  optimizer=optimizer, engine=engine,
                                  prompts=task.prompt_ids(task.problems(4, seed=step)),
                                  reward_fn=reward_fn, rl_config=rl_config, seed=step,
                                  base_params=base_params, mesh=mesh)
    logged.append(metrics)
  return logged


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@bitwise_equality
def test_rl_in_bitwise_mode_logs_zero_mismatch_at_every_step(tiny_task_model_dir, lora):
  logged = _rl_steps(tiny_task_model_dir, "bf16", bitwise=True, lora=lora)
  for step, metrics in enumerate(logged):
    assert metrics["mismatch/prob_diff_max"] == 0.0, (step, metrics["mismatch/prob_diff_max"])
    assert metrics["mismatch/logp_diff_max"] == 0.0, (step, metrics["mismatch/logp_diff_max"])
    assert metrics["train/grad_norm"] > 0 and metrics["train/skipped_steps"] == 0
  # The same run without the mode measures a mismatch with the same metric.
  normal = _rl_steps(tiny_task_model_dir, "bf16", bitwise=False, lora=lora, steps=1)
  assert normal[0]["mismatch/prob_diff_max"] > 0


def _sharded_child(model_dir: str, lora: bool) -> None:
  """Runs in a subprocess with 8 host devices: `_rl_steps` with the update sharded on a
  data=2 x fsdp=4 mesh (as experiments.rl builds it); prints the metrics as JSON."""
  mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
  print(json.dumps(_rl_steps(model_dir, "fp16", bitwise=True, lora=lora, mesh=mesh)))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@bitwise_equality
def test_sharded_rl_in_bitwise_mode_logs_zero_mismatch(tiny_task_model_dir, lora):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharded-child",
                         str(tiny_task_model_dir), str(lora)], cwd=REPO, env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  logged = json.loads(done.stdout.strip().splitlines()[-1])
  for step, metrics in enumerate(logged):
    assert metrics["mismatch/prob_diff_max"] == 0.0, (step, metrics["mismatch/prob_diff_max"])
    assert metrics["train/grad_norm"] > 0 and metrics["train/skipped_steps"] == 0


if __name__ == "__main__" and sys.argv[1:2] == ["--sharded-child"]:
  _sharded_child(sys.argv[2], sys.argv[3] == "True")
