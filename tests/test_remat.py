"""Gradient checkpointing (`ModelConfig.remat`): the same gradients, recomputed activations,
less memory for the backward pass."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models import apply_logits
from rl_fp16.precision import get_policy

CONFIG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True, max_position_embeddings=512)


def _loss(config, params, tokens):
  mask = jnp.ones_like(tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits = apply_logits(config, get_policy("fp32"), params, tokens, mask, positions)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1))


def _grad_fn(config):
  return jax.jit(jax.value_and_grad(lambda p, t: _loss(config, p, t)))


def test_remat_gives_the_same_loss_and_gradients():
  params = init_params(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, CONFIG.vocab_size)
  with jax.default_matmul_precision("highest"):
    loss, grads = _grad_fn(CONFIG)(params, tokens)
    loss_remat, grads_remat = _grad_fn(CONFIG.replace(remat=True))(params, tokens)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for g, g_remat in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "s32": 4, "u32": 4, "pred": 1, "bool": 1}


def _residual_bytes(config, params, tokens) -> int:
  """Bytes the backward pass keeps from the forward (JAX's own list of residuals, the params
  themselves excluded)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda p: _loss(config, p, tokens), params)
  total = 0
  for line in out.getvalue().splitlines():
    match = re.match(r"(\w+)\[([\d,]*)\]", line)
    if match and "from the argument" not in line:
      shape = [int(d) for d in match.group(2).split(",") if d]
      total += _BYTES[match.group(1)] * int(np.prod(shape))
  return total


def test_remat_keeps_only_the_layer_inputs_for_the_backward():
  params = init_params(CONFIG, jax.random.key(0))
  batch, length = 4, 256
  tokens = jnp.zeros((batch, length), jnp.int32)
  kept = {remat: _residual_bytes(CONFIG.replace(remat=remat), params, tokens)
          for remat in (False, True)}
  # Without remat every layer keeps its [B, H, T, T] attention scores and probabilities.
  scores = batch * CONFIG.num_attention_heads * length * length * 4
  assert kept[False] > CONFIG.num_hidden_layers * scores
  assert kept[True] < 0.1 * kept[False], kept


def test_remat_is_an_execution_option_not_a_hugging_face_field():
  config = CONFIG.replace(remat=True)
  assert "remat" not in config.to_hf()
  assert ModelConfig.from_hf(config.to_hf()).remat is False
  with pytest.raises(ValueError, match="remat"):
    CONFIG.replace(remat="yes")
