"""Building blocks of the decoder and the mixture-of-experts MLP: weights, Linear, RMSNorm, RoPE,
grouped-query attention.

`engine_weight` is the one place a stored float32 parameter becomes the value an engine computes
with; the modules here hold parameters (kernels, biases, norm scales) and apply it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models.config import ModelConfig
from rl_fp16.precision import DtypePolicy, bitwise_dots, round_to_bits


# The bitwise forward's shapes (docs/bitwise.md): every dot of a Linear has at least
# BITWISE_MIN_ROWS rows and BITWISE_MIN_COLUMNS columns; attention runs key blocks of
# BITWISE_KEY_BLOCK.
BITWISE_MIN_ROWS = 64
BITWISE_MIN_COLUMNS = 16
BITWISE_KEY_BLOCK = 64
# Key blocks per step of the bitwise attention's loop over keys: one step's scores are the most
# it holds at once.
BITWISE_CHUNK_BLOCKS = 8


def bitwise_min_rows(rows_per_unit: int) -> int:
  """Units (queries, tokens) a bitwise forward computes at once so that every dot it runs has at
  least `BITWISE_MIN_ROWS` rows, given `rows_per_unit` dot rows per unit.

  XLA:CPU picks its dot kernel by shape: below about 64 rows a row's result depends on how many
  rows share the dot (`precision.bitwise_dots`, docs/bitwise.md).
  """
  return -(-BITWISE_MIN_ROWS // rows_per_unit)


def engine_weight(x: jax.Array, policy: DtypePolicy) -> jax.Array:
  """A float32 weight rounded to the engine's storage dtype (`policy.param_dtype`), then to the
  compute dtype (and to an emulated policy's format); same shape as x."""
  return policy.round(x.astype(policy.param_dtype).astype(policy.compute_dtype))


class Linear(nn.Module):
  """y = x @ kernel + bias in the compute dtype; kernel is [in, out] (HF weight transposed)."""

  features: int
  use_bias: bool
  policy: DtypePolicy
  init_std: float

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    """(kernel [in_features, features], bias [features] or None) as the engine computes with them
    (`engine_weight`: compute dtype)."""
    kernel = self.param("kernel", nn.initializers.normal(self.init_std),
                        (in_features, self.features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = engine_weight(self.param("bias", nn.initializers.zeros, (self.features,),
                                      jnp.float32), self.policy)
    return engine_weight(kernel, self.policy), bias

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, *self.weights(x.shape[-1]), self.policy)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
           policy: DtypePolicy) -> jax.Array:
  """x [..., in] @ kernel [in, out] (+ bias [out]) in the compute dtype, each result rounded by
  the policy: [..., out]. A bitwise policy pads a kernel of fewer than `BITWISE_MIN_COLUMNS`
  columns with zero columns (the dot's result for a row depends on its rows below that)."""
  out_features = kernel.shape[-1]
  if policy.bitwise and out_features < BITWISE_MIN_COLUMNS:
    kernel = jnp.pad(kernel, ((0, 0), (0, BITWISE_MIN_COLUMNS - out_features)))
  y = policy.round(jnp.matmul(x.astype(policy.compute_dtype), kernel))[..., :out_features]
  return y if bias is None else policy.round(y + bias)


def fused_linear(x: jax.Array, layers: list[Linear], policy: DtypePolicy) -> list[jax.Array]:
  """`[layer(x) for layer in layers]` as one matmul of x against the layers' kernels side by
  side (and their biases, which all or none have); each output [..., layer.features].

  A bitwise policy runs one matmul per layer: its dots keep the shapes docs/bitwise.md fixes.
  """
  weights = [layer.weights(x.shape[-1]) for layer in layers]
  if policy.bitwise:
    return [linear(x, kernel, bias, policy) for kernel, bias in weights]
  biases = [bias for _, bias in weights]
  bias = None if biases[0] is None else jnp.concatenate(biases)
  y = linear(x, jnp.concatenate([kernel for kernel, _ in weights], axis=1), bias, policy)
  return jnp.split(y, np.cumsum([layer.features for layer in layers])[:-1], axis=-1)


class RMSNorm(nn.Module):
  """RMSNorm with statistics in `policy.norm_dtype`; the scale multiplies in the compute dtype."""

  eps: float
  policy: DtypePolicy

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    stats = x.astype(self.policy.norm_dtype)
    variance = jnp.mean(jnp.square(stats), axis=-1, keepdims=True)
    normed = (stats * jax.lax.rsqrt(variance + self.eps)).astype(self.policy.compute_dtype)
    return self.policy.round(engine_weight(scale, self.policy) * self.policy.round(normed))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """float32 [head_dim // 2] inverse frequencies, with `llama3` scaling when configured."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  rope = config.rope_dict
  if rope.get("rope_type") == "llama3":
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               policy: DtypePolicy | None = None) -> jax.Array:
  """Rotates x [B, T, H, Dh] by positions [B, T] (half-split layout, as Hugging Face Qwen/Llama).

  Angles and cos/sin are computed in float32 and rounded to x's dtype, as transformers does (and
  to an emulated `policy`'s format, as is the result). Under a bitwise policy in float32 each
  product is rounded apart from the sum (`_product_not_contracted`).
  """
  rnd = policy.round if policy is not None else lambda v: v
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = rnd(jnp.cos(angles).astype(x.dtype)), rnd(jnp.sin(angles).astype(x.dtype))
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  if policy is not None and policy.bitwise and x.dtype == jnp.float32:
    return rnd(_product_not_contracted(x, cos) + _product_not_contracted(rotated, sin))
  return rnd(x * cos + rotated * sin)


def _product_not_contracted(x: jax.Array, trig: jax.Array) -> jax.Array:
  """float32 x * trig (|trig| <= 1) rounded on its own: never contracted with the add it feeds
  into one fused multiply-add, which XLA:CPU does in some fusions and not in others."""
  return _rounded_apart(x * trig, trig)


@jax.custom_jvp
def _rounded_apart(product: jax.Array, trig: jax.Array) -> jax.Array:
  """`product` as it is, its bits OR-ed with a zero only known at run time (trig > 2 is never
  true): an integer step that no compiler sees through. Differentiable as the identity."""
  zero = (trig > 2).astype(jnp.uint32)
  bits = jax.lax.bitcast_convert_type(product, jnp.uint32) | zero
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


@_rounded_apart.defjvp
def _rounded_apart_jvp(primals, tangents):
  return _rounded_apart(*primals), tangents[0]


# Queries per block of the non-bitwise attention (`attend`): one block's [B, H, block, S] scores
# are the most it holds at once.
ATTENTION_QUERY_BLOCK = 512
# A causal attention (`attend(causal=True)`) of T queries runs them in blocks of
# T / ATTENTION_CAUSAL_BLOCKS queries (`causal_block_size`), each against the keys up to its last
# query only.
ATTENTION_CAUSAL_BLOCKS = 4
ATTENTION_MIN_CAUSAL_BLOCK = 64


def key_slot_axis(policy: DtypePolicy) -> int:
  """The axis of the keys [B, Hkv, ., .] (`attend`'s k, a layer's KV cache) that holds the slots:
  3 ([B, Hkv, Dh, S]: the keys are the columns of the scores dot) for a normal policy, 2
  ([B, Hkv, S, Dh]: its rows, as `_attend_bitwise` takes them) for a bitwise one."""
  return 2 if policy.bitwise else 3


def causal_block_size(t: int, query_block: int = ATTENTION_QUERY_BLOCK) -> int:
  """Queries per block of a causal `attend` of t queries: t / ATTENTION_CAUSAL_BLOCKS rounded up,
  clipped to [ATTENTION_MIN_CAUSAL_BLOCK, query_block]."""
  return min(query_block, max(ATTENTION_MIN_CAUSAL_BLOCK, -(-t // ATTENTION_CAUSAL_BLOCKS)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, policy: DtypePolicy, *,
           query_block: int = ATTENTION_QUERY_BLOCK, causal: bool = False) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, H, Dh]; k: [B, Hkv, Dh, S], each head's keys as columns ([B, Hkv, S, Dh] under a
      bitwise policy: `key_slot_axis`); v: head-major [B, Hkv, S, Dh] (compute dtype).
    mask: bool [B, T, S], True where query t may attend to key s.
    query_block: a non-bitwise policy attends `query_block` queries at a time (static).
    causal: the keys are the queries' own columns (S == T) and mask[:, t, s] is False for s > t,
      as in the full-sequence forward (`causal_mask`); the attention then skips the keys after
      each block's last query (static).
  Returns:
    [B, T, H, Dh] in the compute dtype. Scores and softmax run in `policy.softmax_dtype`.

  A causal attention runs `_attend_dense` (a bitwise policy: `_attend_bitwise`) per block of
  `causal_block_size(T, query_block)` queries, each against keys [0, block end). Otherwise a
  bitwise policy runs `_attend_bitwise` on all queries; a non-bitwise one with T > query_block
  runs `_attend_dense` per block of query_block queries against all keys, in a `lax.map`. With
  T > query_block every non-bitwise block runs under `jax.checkpoint` (`_attend_bitwise` bounds
  its own memory): the forward and the backward hold one block's scores at a time, never all
  [B, H, T, S]. Every query's softmax is over all the keys its mask lets it see, as in one block.
  """
  b, t, h, dh = q.shape
  if causal:
    if k.shape[key_slot_axis(policy)] != t:
      raise ValueError(f"A causal attention needs as many keys as queries, got "
                       f"{k.shape[key_slot_axis(policy)]} keys "
                       f"for {t} queries")
    return _attend_causal_blocks(q, k, v, mask, policy, causal_block_size(t, query_block),
                                 remat=t > query_block and not policy.bitwise)
  if policy.bitwise:
    return _attend_bitwise(q, k, v, mask, policy)
  if t <= query_block:
    return _attend_dense(q, k, v, mask, policy)
  blocks = -(-t // query_block)
  pad = blocks * query_block - t

  def split(x):  # [B, T, ...] -> [blocks, B, query_block, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((b, blocks, query_block) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def per_block(block):
    q_block, mask_block = block
    return _attend_dense(q_block, k, v, mask_block, policy)

  out = jax.lax.map(per_block, (split(q), split(mask)))
  return jnp.swapaxes(out, 0, 1).reshape(b, blocks * query_block, h, dh)[:, :t]


def _attend_causal_blocks(q, k, v, mask, policy: DtypePolicy, block: int, remat: bool):
  """`attend(causal=True)`: queries [start, end) against keys [0, end), one block after another
  (static slices; each under `jax.checkpoint` when `remat`), concatenated over T. Each block is
  `_attend_bitwise` under a bitwise policy (the keys left out are masked for every query of the
  block: they would add exact zeros), `_attend_dense` otherwise."""
  t = q.shape[1]
  block_attention = _attend_bitwise if policy.bitwise else _attend_dense
  if remat:
    block_attention = jax.checkpoint(block_attention, static_argnums=(4,))
  outs = []
  for start in range(0, t, block):
    end = min(t, start + block)
    keys = jax.lax.slice_in_dim(k, 0, end, axis=key_slot_axis(policy))
    outs.append(block_attention(q[:, start:end], keys, v[:, :, :end], mask[:, start:end, :end],
                                policy))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _attend_dense(q, k, v, mask, policy: DtypePolicy):
  """`attend` of a non-bitwise policy on all of q's queries at once: masked scores
  [B, Hkv, H // Hkv * T, S] in `policy.softmax_dtype`, softmax, probabilities rounded to the
  compute dtype, weighted values.

  Each key head's queries (its H // Hkv query heads times T) are the rows of one plain batched
  matmul against the keys' columns, then against the head-major values: no operand is transposed
  (XLA:CPU's matmul kernels copy a transposed operand at every call).
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[1]
  groups = h // kv_heads
  q = q.reshape(b, t, kv_heads, groups, dh).transpose(0, 2, 3, 1, 4).reshape(
      b, kv_heads, groups * t, dh)
  scores = jnp.einsum("bkmd,bkds->bkms", q, k, preferred_element_type=policy.softmax_dtype)
  scores = scores.astype(policy.softmax_dtype) * jnp.asarray(dh ** -0.5, policy.softmax_dtype)
  big_negative = jnp.finfo(policy.softmax_dtype).min
  row_mask = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, groups) + mask.shape[1:])
  scores = jnp.where(row_mask.reshape(b, kv_heads, groups * t, -1), scores, big_negative)
  probs = policy.round(jax.nn.softmax(scores, axis=-1).astype(policy.compute_dtype))
  out = jnp.einsum("bkms,bksd->bkmd", probs, v, preferred_element_type=policy.softmax_dtype)
  out = policy.round(out.astype(policy.compute_dtype)).reshape(b, kv_heads, groups, t, dh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def held_in_float32(x: jax.Array, policy: DtypePolicy) -> jax.Array:
  """`x` rounded to the compute dtype and held in float32, the rounding pinned (`round_to_bits`:
  XLA may drop a cast to the compute dtype and back, not this)."""
  x = x.astype(jnp.float32)
  compute = jnp.dtype(policy.compute_dtype)
  if compute == jnp.float32:
    return x
  info = jnp.finfo(compute)
  return round_to_bits(x, info.nmant + 1, info.nexp)


def _attend_bitwise(q, k, v, mask, policy: DtypePolicy):
  """`attend` of a bitwise policy: a query's result does not depend on how many queries are
  computed with it, nor on the number of keys past its own, and every sum over keys is a dot or
  an add of dot outputs, never a fused reduction.

  The queries are the columns of the dots, zero columns padding them to a multiple of
  `precision.bitwise_dots().column_quantum` (at such counts XLA:CPU gives a column the same
  result whatever the count), the keys their rows, in
  blocks of `BITWISE_KEY_BLOCK` from slot 0 (so a key must sit at the slot of its position: the
  decoder's compacted layout). Two passes: each query's maximum (pre-scaled) score over all
  blocks, then per block in order exp(scores - max) in the compute dtype against [v, 1], which
  gives the weighted values and the softmax denominator in one dot; the blocks' products are
  added in order (a block masked for every query adds exact zeros). Past `BITWISE_CHUNK_BLOCKS`
  blocks both passes scan over chunks of that many blocks, the second (under `jax.checkpoint`)
  recomputing each chunk's scores: one chunk's scores are held at a time. The dots take float32
  operands holding compute-dtype values (`held_in_float32`; k and v may come so already: the
  decoder's bitwise K, V and cache).
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[1]
  groups = h // kv_heads
  dtype = policy.softmax_dtype
  q = held_in_float32(policy.round(q * jnp.asarray(dh ** -0.5, q.dtype)), policy)
  # [B, T, Hkv, G, Dh] -> columns [B, Hkv, Dh, T * G], column t * G + g
  q = q.reshape(b, t, kv_heads, groups, dh).transpose(0, 2, 4, 1, 3).reshape(
      b, kv_heads, dh, t * groups)
  pad_n = -(t * groups) % bitwise_dots().column_quantum
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad_n)))
  k, v = (x if x.dtype == jnp.float32 else held_in_float32(x, policy) for x in (k, v))
  v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  mask = jnp.swapaxes(mask, 1, 2)[:, None]  # [B, 1, S, T]

  def columns(mask_block):  # [B, 1, block, T] -> [B, 1, block, T * G (+ pad)]
    mask_block = jnp.repeat(mask_block, groups, axis=-1)
    return jnp.pad(mask_block, ((0, 0), (0, 0), (0, 0), (0, pad_n)))

  blocks = -(-k.shape[2] // BITWISE_KEY_BLOCK)
  chunk = min(blocks, BITWISE_CHUNK_BLOCKS)
  chunks = -(-blocks // chunk)

  def key_chunks(x):  # [B, Hkv | 1, S, d] -> [chunks, B, Hkv | 1, chunk, block, d], zero-padded
    x = jnp.pad(x, ((0, 0), (0, 0), (0, chunks * chunk * BITWISE_KEY_BLOCK - x.shape[2]), (0, 0)))
    x = x.reshape(x.shape[:2] + (chunks, chunk, BITWISE_KEY_BLOCK) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0)

  k, v, mask = key_chunks(k), key_chunks(v), key_chunks(mask)
  big_negative = jnp.finfo(dtype).min

  def chunk_scores(k_chunk, mask_chunk):  # per block of the chunk: [B, Hkv, block, columns]
    return [jnp.where(columns(mask_chunk[:, :, c]),
                      jnp.einsum("bksd,bkdn->bksn", k_chunk[:, :, c], q,
                                 preferred_element_type=dtype).astype(dtype), big_negative)
            for c in range(chunk)]

  def chunk_max(col_max, scores):
    return functools.reduce(jnp.maximum, [s.max(axis=2) for s in scores], col_max)

  def weighted(col_max, acc, v_chunk, scores):  # the blocks' products, added in order
    for c, block_scores in enumerate(scores):
      probs = held_in_float32(policy.round(
          jnp.exp(block_scores - col_max).astype(policy.compute_dtype)), policy)
      acc = acc + jnp.einsum("bksd,bksn->bkdn", v_chunk[:, :, c], probs,
                             preferred_element_type=dtype).astype(dtype)
    return acc

  col_max = jnp.full(q.shape[:2] + q.shape[3:], big_negative, dtype)
  acc = jnp.zeros(q.shape[:2] + (dh + 1, q.shape[3]), dtype)
  if chunks == 1:
    scores = chunk_scores(k[0], mask[0])
    acc = weighted(chunk_max(col_max, scores)[:, :, None], acc, v[0], scores)
  else:  # one chunk's scores at a time, recomputed in the second pass and the backward
    col_max = jax.lax.scan(lambda m, keys: (chunk_max(m, chunk_scores(*keys)), None), col_max,
                           (k, mask))[0]
    col_max = jax.lax.stop_gradient(col_max)[:, :, None]  # the softmax does not depend on it

    @jax.checkpoint
    def weighted_step(acc, keys):
      k_chunk, v_chunk, mask_chunk = keys
      return weighted(col_max, acc, v_chunk, chunk_scores(k_chunk, mask_chunk)), None

    acc = jax.lax.scan(weighted_step, acc, (k, v, mask))[0]
  out = policy.round((acc[:, :, :dh] / acc[:, :, dh:]).astype(policy.compute_dtype))
  out = out[..., :t * groups].reshape(b, kv_heads, dh, t, groups)
  return out.transpose(0, 3, 1, 4, 2).reshape(b, t, h, dh)


class StackedKernel(nn.Module):
  """Holds one float32 parameter `kernel` of `shape` (e.g. the experts' stacked weights)."""

  shape: tuple[int, ...]
  init_std: float

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", nn.initializers.normal(self.init_std), self.shape, jnp.float32)


class LMHead(nn.Module):
  """Holds the untied output projection kernel [D, V] (float32)."""

  config: ModelConfig

  @nn.compact
  def __call__(self) -> jax.Array:
    cfg = self.config
    return self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                      (cfg.hidden_size, cfg.vocab_size), jnp.float32)
