"""The Flax (linen) decoder: one module, two forward paths.

* Full-sequence causal forward (the training engine): the pure jitted `apply_logits` and
  `apply_token_logprobs` (what step functions call), and `forward` / `token_logprobs`, which
  validate and default their inputs first.
* KV-cache forward for incremental decoding (the JAX inference engine): `init_cache`,
  `forward_cached`.

Views into the forward (residual streams, expert choices) live in `rl_fp16.models.probes`; the
shared layers (`Linear`, `RMSNorm`, RoPE, `attend`, `engine_weight`) in `rl_fp16.models.layers`.

Parameters are a plain nested dict (no `{"params": ...}` wrapper) whose names mirror Hugging Face's:

    embed_tokens/embedding [V, D]
    layers_{i}/input_layernorm/scale [D]
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel [in, out] (+ bias [out])
    layers_{i}/self_attn/{q,k}_norm/scale [head_dim]          (qwen3)
    layers_{i}/post_attention_layernorm/scale [D]
    layers_{i}/mlp/{gate,up,down}_proj/kernel [in, out] (+ bias)   (dense layers)
    layers_{i}/mlp/gate/kernel [D, E]                          (qwen3_moe sparse layers, see
    layers_{i}/mlp/experts/{gate,up,down}_proj/kernel [E, in, out]     `rl_fp16.models.moe`)
    norm/scale [D]
    lm_head/kernel [D, V]                                      (untied only)

Every matmul takes inputs in the policy's compute dtype; weights are first rounded to the policy's
param dtype (the engine's storage) and then to the compute dtype. Under an emulated-precision policy
(`DtypePolicy.significand_bits`) the compute dtype is float32 and `policy.round` rounds every value
the decoder holds in the compute dtype (weights, matmul outputs, bias adds, norm outputs, RoPE,
attention probabilities and outputs, the MLP activation product, residual adds); it is the identity
otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models import moe
from rl_fp16.models.config import ModelConfig
from rl_fp16.models.layers import (BITWISE_MIN_ROWS, LMHead, Linear, RMSNorm, apply_rope, attend,
                                   bitwise_min_rows, engine_weight, fused_linear,
                                   held_in_float32, key_slot_axis, rope_inv_freq)
from rl_fp16.precision import DtypePolicy, cast_floating, policy_jit

Params = dict[str, Any]
Cache = tuple[dict[str, jax.Array], ...]  # one {"k", "v"} dict per layer (see `init_cache`)
# The axis of a layer cache's "v" buffer that holds the slots ("k": `layers.key_slot_axis`).
VALUE_SLOT_AXIS = 2


class Attention(nn.Module):
  config: ModelConfig
  policy: DtypePolicy

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    cfg, pol = self.config, self.policy
    h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    std = cfg.initializer_range
    b, t, _ = x.shape
    q, k, v = fused_linear(x, [Linear(h * dh, cfg.qkv_bias, pol, std, name="q_proj"),
                               Linear(kv * dh, cfg.qkv_bias, pol, std, name="k_proj"),
                               Linear(kv * dh, cfg.qkv_bias, pol, std, name="v_proj")], pol)
    q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kv, dh), v.reshape(b, t, kv, dh)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, pol, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, pol, name="k_norm")(k)
    inv_freq = rope_inv_freq(cfg)
    q, k = apply_rope(q, positions, inv_freq, pol), apply_rope(k, positions, inv_freq, pol)
    # The keys [B, Hkv, Dh, t] (bitwise: [B, Hkv, t, Dh], `key_slot_axis`); values [B, Hkv, t, Dh]
    k = k.transpose(0, 2, 1, 3) if pol.bitwise else k.transpose(0, 2, 3, 1)
    v = jnp.swapaxes(v, 1, 2)
    if pol.bitwise:  # float32 holding compute-dtype values: the cache's and the attention's dtype
      k, v = held_in_float32(k, pol), held_in_float32(v, pol)
    new_cache = None
    if layer_cache is not None:
      cache_k = write_cache(layer_cache["k"], k, cache_index, key_slot_axis(pol))
      cache_v = write_cache(layer_cache["v"], v, cache_index, VALUE_SLOT_AXIS)
      new_cache = {"k": cache_k, "v": cache_v}
      k, v = cache_k.astype(k.dtype), cache_v.astype(v.dtype)
    out = attend(q, k, v, mask, pol, causal=layer_cache is None).reshape(
        b, t, h * dh)
    out = Linear(cfg.hidden_size, cfg.o_bias, pol, std, name="o_proj")(out)
    return out, new_cache


def write_cache(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """buffer [B, ...] with new [B, ...] written at slots [index, index + t) along `axis` (the
  slots' axis, `init_cache`); index: one int32 scalar for every row, or int32 [B], one per row.

  On CPU a bfloat16 buffer is written as its uint16 bit patterns: XLA:CPU computes a bfloat16
  dynamic-update-slice in float32, converting the whole buffer there and back.
  """
  dtype = buffer.dtype
  new = new.astype(dtype)
  as_bits = dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
  if as_bits:
    buffer, new = (jax.lax.bitcast_convert_type(a, jnp.uint16) for a in (buffer, new))
  if jnp.ndim(index) == 0:
    out = jax.lax.dynamic_update_slice_in_dim(buffer, new, index, axis)
  else:
    out = jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis - 1))(
        buffer, new, index)
  return jax.lax.bitcast_convert_type(out, dtype) if as_bits else out


class MLP(nn.Module):
  config: ModelConfig
  policy: DtypePolicy

  @nn.compact
  def __call__(self, x):
    cfg, pol = self.config, self.policy
    std, inter, bias = cfg.initializer_range, cfg.intermediate_size, cfg.mlp_bias
    gate, up = fused_linear(x, [Linear(inter, bias, pol, std, name="gate_proj"),
                                Linear(inter, bias, pol, std, name="up_proj")], pol)
    return Linear(cfg.hidden_size, bias, pol, std, name="down_proj")(
        pol.round(jax.nn.silu(gate) * up))


class DecoderLayer(nn.Module):
  """Attention then MLP, pre-norm residual; `sparse` layers use the mixture-of-experts MLP."""

  config: ModelConfig
  policy: DtypePolicy
  sparse: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    cfg, pol = self.config, self.policy
    attn_out, new_cache = Attention(cfg, pol, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, pol, name="input_layernorm")(x), positions, mask, layer_cache,
        cache_index)
    x = pol.round(x + attn_out)
    mlp = moe.SparseMoE(cfg, pol, name="mlp") if self.sparse else MLP(cfg, pol, name="mlp")
    x = pol.round(x + mlp(RMSNorm(cfg.rms_norm_eps, pol, name="post_attention_layernorm")(x)))
    return x, new_cache


class Decoder(nn.Module):
  """Causal LM. `__call__` returns (logits [B, T, V] in the output dtype, new cache, residuals);
  with `with_head=False`, the final normed hidden states [B, T, D] in the compute dtype instead of
  the logits (the LM head is then `lm_head_weight`'s)."""

  config: ModelConfig
  policy: DtypePolicy
  with_head: bool = True

  @nn.compact
  def __call__(self, tokens, positions, mask, cache=None, cache_index=None):
    cfg, pol = self.config, self.policy
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(cfg.initializer_range),
                     name="embed_tokens")
    x = engine_weight(embed.embedding, pol)[tokens]
    residuals = [x]
    new_layers = []
    sparse_layers = set(cfg.moe_layers)
    # Gradient checkpointing (training forward only; the KV-cache path has no backward).
    layer_cls = nn.remat(DecoderLayer) if cfg.remat and cache is None else DecoderLayer
    for i in range(cfg.num_hidden_layers):
      layer_cache = None if cache is None else cache[i]
      x, new_layer_cache = layer_cls(cfg, pol, i in sparse_layers, name=f"layers_{i}")(
          x, positions, mask, layer_cache, cache_index)
      residuals.append(x)
      new_layers.append(new_layer_cache)
    x = RMSNorm(cfg.rms_norm_eps, pol, name="norm")(x)
    new_cache = None
    if cache is not None:
      new_cache = tuple(new_layers)
    if not self.with_head:
      return x, new_cache, residuals
    if cfg.tie_word_embeddings:
      head = engine_weight(embed.embedding, pol).T
    else:
      head = engine_weight(LMHead(cfg, name="lm_head")(), pol)
    return lm_head_logits(x, head, pol), new_cache, residuals


def lm_head_logits(x: jax.Array, head: jax.Array, policy: DtypePolicy) -> jax.Array:
  """Logits [..., V] in `policy.output_dtype` (the matmul accumulates in it) of hidden states
  x [..., D] and the head [D, V], both in the compute dtype."""
  return jnp.matmul(x, head, preferred_element_type=policy.output_dtype).astype(
      policy.output_dtype)


def lm_head_weight(config: ModelConfig, policy: DtypePolicy, params: Params) -> jax.Array:
  """The LM head [D, V] as the decoder computes with it: the tied embedding transposed or
  `lm_head/kernel`, through `engine_weight` (float32 `params`)."""
  if config.tie_word_embeddings:
    kernel = params["embed_tokens"]["embedding"].T
  else:
    kernel = params["lm_head"]["kernel"]
  return engine_weight(kernel, policy)


# ------------------------------------------------------------------------- public functions ----


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random float32 parameters: normal(initializer_range) weights, zero biases, unit norms."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  variables = Decoder(config, DtypePolicy()).init(rng, tokens, jnp.zeros((1, 1), jnp.int32), mask)
  return jax.tree_util.tree_map(lambda x: x, _to_dict(variables["params"]))


def _to_dict(tree):
  """Plain nested dicts all the way down (flax may hand back FrozenDict)."""
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """int32 [B, T]: 0, 1, 2, ... over the real tokens (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """bool [B, T, T]: key s is visible to query t when s <= t and s is a real token."""
  t = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None] & attention_mask.astype(bool)[:, None, :]


def apply_decoder(config: ModelConfig, policy: DtypePolicy, params: Params, tokens: jax.Array,
                  positions: jax.Array, mask: jax.Array, cache: Cache | None = None,
                  cache_index: jax.Array | None = None, *, mutable=False, with_head=True):
  """`Decoder.apply` on float32 `params` rounded to `policy.param_dtype` (not jitted).

  Args:
    tokens, positions: int32 [B, t]; mask: bool [B, t, S]. Without a cache S = t and the mask
      must be causal (False for key s > query t, as `causal_mask`): the attention skips those
      keys blockwise.
    cache, cache_index: as in `forward_cached` (None for the full-sequence path).
    mutable: flax collections to return (e.g. ["intermediates"]); False for none.
    with_head: False returns the final normed hidden states [B, t, D] (compute dtype) in place of
      the logits.
  Returns:
    (logits [B, t, V] in `policy.output_dtype`, new cache or None, residuals [L + 1] x [B, t, D]),
    and the mutated collections when `mutable` names any.
  """
  params = cast_floating(params, policy.param_dtype)
  return Decoder(config, policy, with_head).apply({"params": params}, tokens, positions, mask,
                                                  cache, cache_index, mutable=mutable)


@functools.partial(policy_jit, static_argnames=("config", "policy"))
def apply_logits(config: ModelConfig, policy: DtypePolicy, params: Params, tokens: jax.Array,
                 attention_mask: jax.Array, positions: jax.Array) -> jax.Array:
  """The pure, jitted full-sequence forward (`config`, `policy` static; no input checks).

  Args:
    params: float32 parameter pytree (see the module docstring).
    tokens: int32 [B, T]; attention_mask: int32 [B, T], 1 on real tokens; positions: int32 [B, T].
  Returns:
    logits [B, T, V] in `policy.output_dtype`.

  Under a bitwise policy each row's real tokens are first moved to the front in their order
  (`compact_order`), the layout of the JAX sampler's KV cache, and rows are added until the
  forward has `BITWISE_MIN_ROWS` tokens; the logits come back in the input's layout.
  """
  if not policy.bitwise:
    logits, _, _ = apply_decoder(config, policy, params, tokens, positions,
                                 causal_mask(attention_mask))
    return logits
  order, (tokens, attention_mask, positions) = _bitwise_layout(tokens, attention_mask, positions)
  logits, _, _ = apply_decoder(config, policy, params, tokens, positions,
                               causal_mask(attention_mask))
  return _input_layout(logits, order)


def _bitwise_layout(tokens: jax.Array, attention_mask: jax.Array, positions: jax.Array):
  """(order, (tokens, attention_mask, positions)) in the bitwise layout: each row's real tokens
  moved to the front (`compact_order`, int32 [B, T]) and rows appended until a forward has
  `BITWISE_MIN_ROWS` tokens ([B', T], B' >= B)."""
  rows, width = tokens.shape
  order = compact_order(attention_mask)
  extra = max(0, bitwise_min_rows(width) - rows)
  return order, tuple(jnp.pad(jnp.take_along_axis(x, order, axis=1), ((0, extra), (0, 0)))
                      for x in (tokens, attention_mask, positions))


def _input_layout(x: jax.Array, order: jax.Array) -> jax.Array:
  """[B', T, ...] in the bitwise layout of `order` ([B, T]) -> [B, T, ...] in the input's."""
  inverse = jnp.argsort(order, axis=1)
  inverse = inverse.reshape(inverse.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x[:order.shape[0]], inverse, axis=1)


def compact_order(attention_mask: jax.Array) -> jax.Array:
  """int32 [B, T]: per row, the columns of the real tokens in order, then the padding columns.

  `take_along_axis(x, compact_order(mask), axis=1)` moves each row's real tokens to the front,
  so a token with k real tokens before it sits at column k (its default position).
  """
  columns = jnp.arange(attention_mask.shape[1], dtype=jnp.int32)
  key = jnp.where(attention_mask > 0, columns, attention_mask.shape[1] + columns)
  return jnp.argsort(key, axis=1).astype(jnp.int32)


def prepare_inputs(tokens, attention_mask=None, positions=None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Validated int32 (tokens, attention_mask, positions), each [B, T], with the defaults filled."""
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(tokens)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != tokens.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
  if positions is None:
    positions = default_positions(attention_mask)
  positions = jnp.asarray(positions, jnp.int32)
  if positions.shape != tokens.shape:
    raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
  return tokens, attention_mask, positions


def forward(config: ModelConfig, params: Params, tokens, *, policy: DtypePolicy,
            attention_mask=None, positions=None) -> jax.Array:
  """Full-sequence causal forward (the training engine).

  Args:
    tokens: int [B, T]; left- or right-padded.
    attention_mask: int/bool [B, T], 1 on real tokens (default: all ones).
    positions: int [B, T] RoPE positions (default: running count of real tokens, so left padding
      does not shift positions).
  Returns:
    logits [B, T, V] in `policy.output_dtype`.
  """
  tokens, attention_mask, positions = prepare_inputs(tokens, attention_mask, positions)
  return apply_logits(config, policy, params, tokens, attention_mask, positions)


def logprobs_from_logits(logits: jax.Array, targets: jax.Array, *, dtype=jnp.float32,
                         temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[targets], computed in `dtype`, returned as float32."""
  logits = logits.astype(dtype)
  if temperature != 1.0:
    logits = logits / jnp.asarray(temperature, dtype)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)


def entropy_from_logits(logits: jax.Array, *, dtype=jnp.float32,
                        temperature: float = 1.0) -> jax.Array:
  """Entropy [...] of softmax(logits / temperature), float32."""
  logits = logits.astype(dtype)
  if temperature != 1.0:
    logits = logits / jnp.asarray(temperature, dtype)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1).astype(jnp.float32)


def shifted_logprobs(logits: jax.Array, tokens: jax.Array, attention_mask: jax.Array, *,
                     dtype, temperature: float = 1.0, with_entropy: bool = False):
  """Aligns next-token log-probs with the tokens: entry t is log p(tokens[t] | tokens[<t]).

  Entry 0 and padded entries are 0. Returns logp [B, T] float32 (and entropy [B, T] when asked).
  """
  stats = _align_next_token(_next_token_stats(
      logits[:, :-1], tokens[:, 1:], dtype=dtype, temperature=temperature,
      with_entropy=with_entropy, with_argmax=False), attention_mask)
  return (stats["logp"], stats["entropy"]) if with_entropy else stats["logp"]


# Tokens (rows x columns) per chunk of the trainer's LM head and log-softmax
# (`chunked_token_stats`): one chunk's [rows, columns, V] logits are the most it holds at once.
LOGPROB_CHUNK_TOKENS = 1024
# Float32 logits up to this size are computed whole (`apply_token_stats` with chunk_tokens None).
FULL_LOGITS_MAX_BYTES = 64 * 2**20


def _next_token_stats(logits: jax.Array, targets: jax.Array, *, dtype, temperature: float,
                      with_entropy: bool, with_argmax: bool) -> dict[str, jax.Array]:
  """Per position of logits [..., V] (output dtype) and targets int32 [...]: "logp" (float32
  log softmax(logits / temperature)[target] in `dtype`, as `logprobs_from_logits`), "entropy"
  (float32, as `entropy_from_logits`) and "argmax" (int32, of the logits) when asked."""
  scaled = logits.astype(dtype)
  if temperature != 1.0:
    scaled = scaled / jnp.asarray(temperature, dtype)
  logp_all = jax.nn.log_softmax(scaled, axis=-1)
  stats = {"logp": jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
           .astype(jnp.float32)}
  if with_entropy:
    stats["entropy"] = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1).astype(jnp.float32)
  if with_argmax:
    stats["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return stats


def _align_next_token(stats: dict[str, jax.Array], attention_mask: jax.Array
                      ) -> dict[str, jax.Array]:
  """[B, T - 1] stats of positions 0..T-2 predicting tokens 1..T-1 -> [B, T] aligned with the
  tokens; entry 0 and entries whose token or predecessor is padding are 0 (argmax: -1 at entry 0
  only)."""
  valid = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
  out = {}
  for name, value in stats.items():
    if name == "argmax":
      out[name] = jnp.pad(value, ((0, 0), (1, 0)), constant_values=-1)
    else:
      out[name] = jnp.pad(jnp.where(valid, value, 0.0), ((0, 0), (1, 0)))
  return out


def chunked_token_stats(hidden: jax.Array, head: jax.Array, tokens: jax.Array,
                        attention_mask: jax.Array, *, policy: DtypePolicy,
                        temperature: float = 1.0, with_entropy: bool = False,
                        with_argmax: bool = False,
                        chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                        min_chunk_tokens: int = 1) -> dict[str, jax.Array]:
  """Next-token log-probs (and entropy, argmax) from the final hidden states, the LM head and its
  log-softmax computed one chunk of columns at a time.

  Args:
    hidden: [B, T, D] final normed hidden states (compute dtype); head: [D, V] (compute dtype,
      `lm_head_weight`); tokens, attention_mask: int32 [B, T].
    chunk_tokens: a chunk holds max(1, chunk_tokens // B) columns of every row (static), and
      at least enough columns for `min_chunk_tokens` tokens (at most T - 1).
  Returns:
    {"logp": float32 [B, T]} (+ "entropy" float32 [B, T], "argmax" int32 [B, T]): entry t is
    about position t - 1's prediction of tokens[t], as `shifted_logprobs`; entry 0 and padded
    entries are 0 (argmax: -1 at entry 0 only). Logits in `policy.output_dtype`, log-softmax in
    `policy.logsoftmax_dtype`, per position the same computation as on the full logits.

  Each chunk runs under `jax.checkpoint` in a `lax.map`: the forward and the backward hold one
  chunk's [B, columns, V] logits at a time, never all [B, T, V].
  """
  rows, width = tokens.shape[0], tokens.shape[1] - 1
  columns = max(1, min(width, max(chunk_tokens // rows, -(-min_chunk_tokens // rows))))
  chunks = -(-width // columns)
  pad = chunks * columns - width

  def split(x):  # [B, T - 1, ...] -> [chunks, B, columns, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((rows, chunks, columns) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def per_chunk(chunk):
    h, targets = chunk
    return _next_token_stats(lm_head_logits(h, head, policy), targets,
                             dtype=policy.logsoftmax_dtype, temperature=temperature,
                             with_entropy=with_entropy, with_argmax=with_argmax)

  stats = jax.lax.map(per_chunk, (split(hidden[:, :-1]), split(tokens[:, 1:])))
  stats = {name: jnp.swapaxes(value, 0, 1).reshape(rows, chunks * columns)[:, :width]
           for name, value in stats.items()}
  return _align_next_token(stats, attention_mask)


def apply_token_stats(config: ModelConfig, policy: DtypePolicy, params: Params,
                      tokens: jax.Array, attention_mask: jax.Array, positions: jax.Array, *,
                      temperature: float = 1.0, with_entropy: bool = False,
                      with_argmax: bool = False,
                      chunk_tokens: int | None = None) -> dict[str, jax.Array]:
  """The trainer's forward to per-token statistics (not jitted; no input checks).

  Args:
    tokens, attention_mask, positions: int32 [B, T]; temperature, chunk_tokens: static.
  Returns:
    as `chunked_token_stats`: {"logp"} (+ "entropy", "argmax"), each [B, T].

  The LM head and log-softmax run in chunks of `chunk_tokens` tokens (`chunked_token_stats`);
  with chunk_tokens None, in chunks of `LOGPROB_CHUNK_TOKENS` once the float32 [B, T, V] logits
  would exceed `FULL_LOGITS_MAX_BYTES`, on the full logits of `apply_logits` below that. A
  bitwise policy chunks its compacted, row-padded layout (`apply_logits`), each chunk at least
  `BITWISE_MIN_ROWS` tokens, so its numbers are the full logits' bit for bit; there the argmax
  is -1 wherever the logp is 0 by the padding rule.
  """
  if tokens.shape[1] < 2:
    zeros = jnp.zeros(tokens.shape, jnp.float32)
    stats = {"logp": zeros}
    if with_entropy:
      stats["entropy"] = zeros
    if with_argmax:
      stats["argmax"] = jnp.full(tokens.shape, -1, jnp.int32)
    return stats
  logits_bytes = 4 * tokens.shape[0] * tokens.shape[1] * config.vocab_size
  if chunk_tokens is None and logits_bytes <= FULL_LOGITS_MAX_BYTES:
    logits = apply_logits(config, policy, params, tokens, attention_mask, positions)
    stats = _next_token_stats(logits[:, :-1], tokens[:, 1:], dtype=policy.logsoftmax_dtype,
                              temperature=temperature, with_entropy=with_entropy,
                              with_argmax=with_argmax)
    return _align_next_token(stats, attention_mask)
  chunked = functools.partial(
      chunked_token_stats, head=lm_head_weight(config, policy, params), policy=policy,
      temperature=temperature, with_entropy=with_entropy, with_argmax=with_argmax,
      chunk_tokens=chunk_tokens or LOGPROB_CHUNK_TOKENS)
  if not policy.bitwise:
    hidden, _, _ = apply_decoder(config, policy, params, tokens, positions,
                                 causal_mask(attention_mask), with_head=False)
    return chunked(hidden, tokens=tokens, attention_mask=attention_mask)
  order, (layout_tokens, layout_mask, layout_positions) = _bitwise_layout(
      tokens, attention_mask, positions)
  hidden, _, _ = apply_decoder(config, policy, params, layout_tokens, layout_positions,
                               causal_mask(layout_mask), with_head=False)
  stats = chunked(hidden, tokens=layout_tokens, attention_mask=layout_mask,
                  min_chunk_tokens=BITWISE_MIN_ROWS)
  valid = jnp.pad((attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0), ((0, 0), (1, 0)))
  return {name: jnp.where(valid, _input_layout(value, order), -1 if name == "argmax" else 0.0)
          for name, value in stats.items()}


@functools.partial(policy_jit,
                   static_argnames=("config", "policy", "temperature", "chunk_tokens"))
def apply_token_logprobs(config: ModelConfig, policy: DtypePolicy, params: Params,
                         tokens: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                         temperature: float,
                         chunk_tokens: int | None = None) -> jax.Array:
  """The pure, jitted `token_logprobs` (`config`, `policy`, `temperature`, `chunk_tokens` static;
  no checks).

  Args:
    tokens: int32 [B, T]; attention_mask: int32 [B, T]; positions: int32 [B, T].
    temperature: a Python float.
  Returns:
    float32 [B, T] log p(tokens[t] | tokens[<t]) (0 at t = 0 and at padding), log-softmax in
    `policy.logsoftmax_dtype` (`apply_token_stats`: chunked once the logits are large).
  """
  return apply_token_stats(config, policy, params, tokens, attention_mask, positions,
                           temperature=temperature, chunk_tokens=chunk_tokens)["logp"]


def _check_max_position(config: ModelConfig, tokens, attention_mask, positions) -> None:
  """Refuses sequences longer than the model's `max_position_embeddings` (host-side, at entry)."""
  if positions is not None:
    longest = int(np.max(np.asarray(positions))) + 1 if np.size(positions) else 0
  elif attention_mask is not None:
    mask = np.asarray(attention_mask)
    longest = int((mask != 0).sum(axis=-1).max()) if mask.size else 0
  else:
    longest = int(np.shape(tokens)[-1])
  if longest > config.max_position_embeddings:
    raise ValueError(f"A sequence of {longest} tokens exceeds the model's max_position_embeddings="
                     f"{config.max_position_embeddings}")


def token_logprobs(config: ModelConfig, params: Params, tokens, *, policy: DtypePolicy,
                   attention_mask=None, positions=None, temperature: float = 1.0) -> jax.Array:
  """Per-token log-probabilities from the full-sequence forward.

  Returns:
    float32 [B, T]: entry t is log p(tokens[t] | tokens[<t]) under softmax(logits / temperature),
    with the log-softmax in `policy.logsoftmax_dtype`. Entry 0 (no context) and entries where
    the token or its predecessor is padding are 0.
  Raises:
    ValueError: a position reaches `config.max_position_embeddings` (the model was not trained
      there; RoPE scaling rules are defined up to it).
  """
  _check_max_position(config, tokens, attention_mask, positions)
  tokens, attention_mask, positions = prepare_inputs(tokens, attention_mask, positions)
  return apply_token_logprobs(config, policy, params, tokens, attention_mask, positions,
                              float(temperature))


def cache_dtype(policy: DtypePolicy) -> jnp.dtype:
  """The dtype of `policy`'s KV cache: the compute dtype, except float32 holding compute-dtype
  values for a bitwise policy (`layers.held_in_float32`) and, on CPU, for a float16 one (XLA:CPU
  runs float16 dots in float32: a float16 cache would be converted whole at every decode step,
  so it costs twice the memory of a float16 cache instead)."""
  compute = jnp.dtype(policy.compute_dtype)
  if policy.bitwise or (compute == jnp.float16 and jax.default_backend() == "cpu"):
    return jnp.dtype(jnp.float32)
  return compute


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               policy: DtypePolicy) -> Cache:
  """Zeroed KV cache of `policy`: one {"k", "v"} dict per layer, k [B, kv_heads, head_dim,
  max_len] (each head's keys as columns; bitwise: [B, kv_heads, max_len, head_dim],
  `key_slot_axis`) and v [B, kv_heads, max_len, head_dim], in `cache_dtype(policy)`.

  One buffer per layer (not a stacked [layers, ...] array), so that a decode step updates each
  layer's slots in place instead of re-stacking the whole cache; the layouts the attention's
  dots read (`layers.attend`), so that a step copies no cache.
  """
  kv, dh = config.num_key_value_heads, config.head_dim
  dtype = cache_dtype(policy)
  v_shape = (batch_size, kv, max_len, dh)
  k_shape = v_shape if policy.bitwise else (batch_size, kv, dh, max_len)
  return tuple({"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)}
               for _ in range(config.num_hidden_layers))


def grow_cache(cache: Cache, max_len: int, policy: DtypePolicy) -> Cache:
  """`policy`'s cache with zeroed slots appended up to `max_len` slots (>= its own)."""
  def grow(buffer, axis):
    pad = [(0, 0)] * buffer.ndim
    pad[axis] = (0, max_len - buffer.shape[axis])
    return jnp.pad(buffer, pad)
  return tuple({"k": grow(layer["k"], key_slot_axis(policy)),
                "v": grow(layer["v"], VALUE_SLOT_AXIS)} for layer in cache)


def forward_cached(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array,
                   cache: Cache, cache_index: jax.Array, kv_mask: jax.Array, *,
                   policy: DtypePolicy, with_head: bool = True) -> tuple[jax.Array, Cache]:
  """KV-cache forward for incremental decoding (jittable; call it inside a jitted loop).

  Args:
    tokens: int32 [B, t] new tokens, written to cache slots [cache_index, cache_index + t).
    positions: int32 [B, t] their RoPE positions.
    cache: from `init_cache` (or a previous call).
    cache_index: the first slot to write: an int32 scalar, or int32 [B], one per row.
    kv_mask: bool/int [B, S] over all cache slots: 1 where the slot holds a real token (slots not
      yet written may be 1: causality hides them).
    with_head: False returns the final normed hidden states [B, t, D] in place of the logits
      (e.g. a prefill that needs the logits of one position: `lm_head_logits` on it).
  Returns:
    (logits [B, t, V] in the output dtype, updated cache).
  Raises:
    ValueError: under a bitwise policy, fewer than `BITWISE_MIN_ROWS` tokens (B * t).
  """
  batch, t = tokens.shape
  if policy.bitwise and batch * t < BITWISE_MIN_ROWS:
    raise ValueError(f"A bitwise forward needs at least {BITWISE_MIN_ROWS} tokens per call, got "
                     f"{batch} rows x {t}; pad the batch (the JAX sampler does)")
  max_len = cache[0]["v"].shape[VALUE_SLOT_AXIS]
  query_slot = jnp.asarray(cache_index)[..., None] + jnp.arange(t)  # [t] or [B, t]
  visible = jnp.arange(max_len) <= query_slot[..., None]  # [t, S] or [B, t, S]
  mask = jnp.broadcast_to(visible, (batch, t, max_len)) & kv_mask.astype(bool)[:, None, :]
  logits, new_cache, _ = apply_decoder(config, policy, params, tokens, positions, mask, cache,
                                       cache_index, with_head=with_head)
  return logits, new_cache
