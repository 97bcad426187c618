"""Building blocks of the decoder and the mixture-of-experts MLP: weights, Linear, RMSNorm, RoPE,
grouped-query attention.

`engine_weight` is the one place a stored float32 parameter becomes the value an engine computes
with; the modules here hold parameters (kernels, biases, norm scales) and apply it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models.config import ModelConfig
from rl_fp16.precision import DtypePolicy


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
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.normal(self.init_std),
                        (x.shape[-1], self.features), jnp.float32)
    y = self.policy.round(jnp.matmul(x.astype(self.policy.compute_dtype),
                                     engine_weight(kernel, self.policy)))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = self.policy.round(y + engine_weight(bias, self.policy))
    return y


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
  to an emulated `policy`'s format, as is the result).
  """
  rnd = policy.round if policy is not None else lambda v: v
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = rnd(jnp.cos(angles).astype(x.dtype)), rnd(jnp.sin(angles).astype(x.dtype))
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return rnd(x * cos + rotated * sin)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           policy: DtypePolicy) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, Hkv, Dh] (compute dtype).
    mask: bool [B, T, S], True where query t may attend to key s.
  Returns:
    [B, T, H, Dh] in the compute dtype. Scores and softmax run in `policy.softmax_dtype`.
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=policy.softmax_dtype)
  scores = scores.astype(policy.softmax_dtype) * jnp.asarray(dh ** -0.5, policy.softmax_dtype)
  big_negative = jnp.finfo(policy.softmax_dtype).min
  scores = jnp.where(mask[:, None, None, :, :], scores, big_negative)
  probs = policy.round(jax.nn.softmax(scores, axis=-1).astype(policy.compute_dtype))
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=policy.softmax_dtype)
  return policy.round(out.astype(policy.compute_dtype)).reshape(b, t, h, dh)


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
