"""The trainer's forward holds neither all [B, T, V] logits nor all [B, H, T, S] attention scores:
the chunked LM head + log-softmax (`apply_token_stats`) and the query-blocked attention (`attend`;
a bitwise policy's runs key chunks) give the full computation's numbers within float rounding,
and the compiled step's temporary memory stays below what the full tensors would take."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16 import objectives
from rl_fp16.batch import make_batch
from rl_fp16.models import ModelConfig, apply_logits, default_positions, init_params
from rl_fp16.models import shifted_logprobs
from rl_fp16.models.decoder import apply_token_logprobs, apply_token_stats
from rl_fp16.models.layers import _attend_dense, attend
from rl_fp16.precision import get_policy
from rl_fp16.train import rl_loss, sft_loss

CONFIG = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True, max_position_embeddings=2048)
ROWS, WIDTH = 3, 37
CHUNK_TOKENS = 16  # 5 columns per chunk of 3 rows: 8 chunks over 36 predicting positions
PRECISIONS = ["fp32", "bf16", "fp16", "e8"]


def _inputs():
  tokens = jax.random.randint(jax.random.key(1), (ROWS, WIDTH), 0, CONFIG.vocab_size)
  mask = jnp.ones_like(tokens).at[0, :5].set(0).at[2, 30:].set(0)  # left- and right-padded rows
  return tokens, mask, default_positions(mask)


def _full_stats(policy, params, tokens, mask, positions, temperature):
  """The unchunked reference: all [B, T, V] logits, then `shifted_logprobs`."""
  logits = apply_logits(CONFIG, policy, params, tokens, mask, positions)
  logp, entropy = shifted_logprobs(logits, tokens, mask, dtype=policy.logsoftmax_dtype,
                                   temperature=temperature, with_entropy=True)
  argmax = jnp.argmax(logits[:, :-1], axis=-1)
  return logp, entropy, argmax


@pytest.mark.parametrize("precision", PRECISIONS)
def test_chunked_stats_match_the_full_logits(precision):
  policy = get_policy(precision)
  params = init_params(CONFIG, jax.random.key(0))
  tokens, mask, positions = _inputs()
  assert CHUNK_TOKENS // ROWS < WIDTH - 1  # more than one chunk
  stats = jax.jit(lambda p: apply_token_stats(
      CONFIG, policy, p, tokens, mask, positions, temperature=0.7, with_entropy=True,
      with_argmax=True, chunk_tokens=CHUNK_TOKENS))(params)
  logp, entropy, argmax = _full_stats(policy, params, tokens, mask, positions, 0.7)
  np.testing.assert_allclose(stats["logp"], logp, rtol=0, atol=2e-6)
  np.testing.assert_allclose(stats["entropy"], entropy, rtol=0, atol=1e-5)
  assert (stats["logp"] == 0).sum() == (logp == 0).sum()  # the same entries are masked
  np.testing.assert_array_equal(stats["argmax"][:, 1:], argmax)
  chunked = apply_token_logprobs(CONFIG, policy, params, tokens, mask, positions, 0.7,
                                 CHUNK_TOKENS)
  np.testing.assert_array_equal(chunked, stats["logp"])


def _rl_batch(tokens, mask):
  loss_mask = np.asarray(mask).copy()
  loss_mask[:, :10] = 0
  rng = np.random.default_rng(0)
  logp_old = -rng.uniform(0.5, 6.0, tokens.shape).astype(np.float32) * loss_mask
  sampler = logp_old + rng.normal(0, 0.05, tokens.shape).astype(np.float32) * loss_mask
  return make_batch(np.asarray(tokens), np.asarray(mask), loss_mask, sampler,
                    rng.normal(size=tokens.shape[0]), logp_old=logp_old)


def _full_rl_loss(params, batch, *, policy, algorithm, loss_config, temperature):
  """rl_loss as it was computed before chunking (all logits at once)."""
  positions = default_positions(batch.attention_mask)
  logp, _, _ = _full_stats(policy, params, batch.tokens, batch.attention_mask, positions,
                           temperature)
  loss, _ = objectives.policy_loss(
      algorithm, logp=logp, logp_old=batch.logp_old, logp_sampler=batch.logp_sampler,
      advantages=batch.advantages, mask=batch.loss_mask, config=loss_config)
  return loss


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rl_loss_and_gradients_match_the_full_logits(precision):
  policy = get_policy(precision)
  params = init_params(CONFIG, jax.random.key(0))
  tokens, mask, _ = _inputs()
  batch = _rl_batch(tokens, mask)
  kwargs = dict(policy=policy, algorithm="grpo_token_tis", loss_config=objectives.LossConfig(),
                temperature=0.9)
  chunked = functools.partial(rl_loss, config=CONFIG, logprob_chunk_tokens=CHUNK_TOKENS,
                              **kwargs)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: chunked(p, batch), has_aux=True))(params)
  full_loss, full_grads = jax.jit(jax.value_and_grad(
      lambda p: _full_rl_loss(p, batch, **kwargs)))(params)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5, atol=1e-7)
  assert np.isfinite(metrics["train/entropy"])
  flat, full_flat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(full_grads)
  scale = max(float(jnp.abs(g).max()) for g in full_flat)
  # fp32: kernel-order rounding only; low precision: a few roundings of the compute dtype
  tol = 1e-4 if precision == "fp32" else 2e-2
  for g, g_full in zip(flat, full_flat):
    np.testing.assert_allclose(g, g_full, rtol=0, atol=tol * scale)
    assert float(jnp.abs(g - g_full).mean()) < tol * scale / 20


def test_sft_loss_and_accuracy_match_the_full_logits():
  policy = get_policy("fp32")
  params = init_params(CONFIG, jax.random.key(0))
  tokens, mask, positions = _inputs()
  loss_mask = mask.at[:, :10].set(0)
  batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}
  loss, metrics = sft_loss(params, batch, config=CONFIG, policy=policy,
                           logprob_chunk_tokens=CHUNK_TOKENS)
  logp, _, argmax = _full_stats(policy, params, tokens, mask, positions, 1.0)
  maskf = loss_mask.astype(jnp.float32).at[:, 0].set(0.0)
  np.testing.assert_allclose(loss, -(logp * maskf).sum() / maskf.sum(), rtol=1e-6)
  accuracy = ((argmax == tokens[:, 1:]) * maskf[:, 1:]).sum() / maskf.sum()
  np.testing.assert_allclose(metrics["sft/token_accuracy"], accuracy, rtol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "e11x5"])
def test_blocked_attention_matches_dense(precision):
  policy = get_policy(precision)
  b, t, h, kv, dh = 2, 45, 8, 2, 16
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, dh)).astype(policy.compute_dtype)
  k, v = (jax.random.normal(key, shape).astype(policy.compute_dtype)
          for key, shape in zip(keys[1:3], [(b, kv, dh, t), (b, kv, t, dh)]))
  causal = jnp.tril(jnp.ones((t, t), bool))
  keep = jax.random.bernoulli(keys[3], 0.8, (b, 1, t))
  mask = causal[None] & keep  # arbitrary boolean mask, some queries see no key
  blocked = jax.jit(functools.partial(attend, policy=policy, query_block=8))
  dense = jax.jit(functools.partial(_attend_dense, policy=policy))
  out, ref = blocked(q, k, v, mask), dense(q, k, v, mask)
  tol = 1e-6 if precision == "fp32" else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=0, atol=tol)

  def total(fn, q, k, v):
    return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * jnp.arange(dh))
  grads = jax.jit(jax.grad(functools.partial(total, blocked), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(functools.partial(total, dense), argnums=(0, 1, 2)))(q, k, v)
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                               rtol=10 * tol, atol=10 * tol)


def test_decode_query_attends_as_before():
  """A single query (the KV-cache decode) runs the dense path: its output is unchanged."""
  policy = get_policy("bf16")
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (3, 1, 4, 8)).astype(jnp.bfloat16)
  k, v = (jax.random.normal(key, shape).astype(jnp.bfloat16)
          for key, shape in zip(keys[1:], [(3, 2, 8, 20), (3, 2, 20, 8)]))
  mask = jnp.arange(20)[None, None, :] < jnp.array([5, 12, 20])[:, None, None]
  np.testing.assert_array_equal(attend(q, k, v, mask, policy, query_block=8),
                                _attend_dense(q, k, v, mask, policy))


# ------------------------------------------------------------------------------- memory ----

BIG_VOCAB = ModelConfig(model_type="qwen2", vocab_size=32768, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=4096)


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_rl_step_never_holds_all_float32_logits():
  """The gradient of rl_loss at 2 rows x 1024 tokens over a 32,768 vocabulary: the full float32
  logits would be 256 MiB; the chunked step's temporaries stay under half of that, while the
  unchunked reference needs more than all of it (so the check can fail)."""
  policy = get_policy("bf16")
  rows, width = 2, 1024
  params = jax.eval_shape(lambda: init_params(BIG_VOCAB, jax.random.key(0)))
  tokens = np.ones((rows, width), np.int32)
  batch = _rl_batch(tokens, np.ones_like(tokens))
  kwargs = dict(policy=policy, algorithm="grpo", loss_config=objectives.LossConfig(),
                temperature=1.0)
  logits_bytes = rows * width * BIG_VOCAB.vocab_size * 4

  chunked = functools.partial(rl_loss, config=BIG_VOCAB, logprob_chunk_tokens=64, **kwargs)
  chunked_bytes = _temp_bytes(jax.value_and_grad(lambda p, b: chunked(p, b), has_aux=True),
                              params, batch)
  full_bytes = _temp_bytes(jax.value_and_grad(
      lambda p, b: _full_rl_loss_big(p, b, **kwargs)), params, batch)
  assert full_bytes > logits_bytes, (full_bytes, logits_bytes)
  assert chunked_bytes < logits_bytes / 2, (chunked_bytes, logits_bytes)


def _full_rl_loss_big(params, batch, *, policy, algorithm, loss_config, temperature):
  positions = default_positions(batch.attention_mask)
  logits = apply_logits(BIG_VOCAB, policy, params, batch.tokens, batch.attention_mask, positions)
  logp = shifted_logprobs(logits, batch.tokens, batch.attention_mask,
                          dtype=policy.logsoftmax_dtype, temperature=temperature)
  loss, _ = objectives.policy_loss(
      algorithm, logp=logp, logp_old=batch.logp_old, logp_sampler=batch.logp_sampler,
      advantages=batch.advantages, mask=batch.loss_mask, config=loss_config)
  return loss


@pytest.mark.parametrize("bitwise", [False, True])
def test_attention_backward_never_holds_all_scores(bitwise):
  """The gradient of attention over 8,192 queries and keys, 8 heads: all float32 scores would be
  2 GiB; the blocked attention's temporaries (the bitwise attention's: key chunks) stay under a
  third of that, the dense one's exceed it."""
  policy = get_policy("fp32", bitwise=bitwise)
  b, t, h, kv, dh = 1, 8192, 8, 2, 16
  q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
  v = jax.ShapeDtypeStruct((b, kv, t, dh), jnp.float32)
  k = jax.ShapeDtypeStruct((b, kv, dh, t), jnp.float32)  # `_attend_dense`'s layout
  k_attend = v if bitwise else k  # `attend`'s: `key_slot_axis`
  mask = jax.ShapeDtypeStruct((b, t, t), jnp.bool_)
  scores_bytes = b * h * t * t * 4

  def grad_of(fn):
    return jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m, policy)), argnums=(0, 1, 2))
  blocked_bytes = _temp_bytes(grad_of(attend), q, k_attend, v, mask)
  dense_bytes = _temp_bytes(grad_of(_attend_dense), q, k, v, mask)
  assert dense_bytes > scores_bytes, (dense_bytes, scores_bytes)
  assert blocked_bytes < scores_bytes / 3, (blocked_bytes, scores_bytes)


# ------------------------------------------------------------------- Hugging Face parity ----


@pytest.mark.parametrize("tied", [True, False])
def test_long_sequence_logprobs_match_transformers(tied, tmp_path):
  """Log-probs over 2 x 600 tokens (two query blocks of attention, two LM-head chunks)
  against transformers' log-softmax of its logits, float32."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rl_fp16.checkpoints import load_hf
  from rl_fp16.models import apply_token_logprobs, default_positions
  from rl_fp16.models.decoder import LOGPROB_CHUNK_TOKENS
  from rl_fp16.models.layers import ATTENTION_QUERY_BLOCK
  width = 600
  assert width > ATTENTION_QUERY_BLOCK
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      initializer_range=0.2, tie_word_embeddings=tied), dtype=torch.float32).eval()
  model.save_pretrained(tmp_path / "hf")
  config, params = load_hf(tmp_path / "hf")
  tokens = np.random.default_rng(1).integers(0, 96, (2, width)).astype(np.int32)
  mask = np.ones_like(tokens)
  ours = np.asarray(apply_token_logprobs(config, get_policy("fp32"), params, tokens, mask,
                                         default_positions(mask), 1.0,
                                         chunk_tokens=LOGPROB_CHUNK_TOKENS))
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens)).logits.float()
  theirs = torch.log_softmax(logits, dim=-1)[:, :-1].gather(
      -1, torch.tensor(tokens[:, 1:], dtype=torch.int64)[..., None])[..., 0].numpy()
  np.testing.assert_allclose(ours[:, 1:], theirs, rtol=0, atol=1e-4)
  assert np.all(ours[:, 0] == 0)
