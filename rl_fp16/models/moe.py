"""Qwen3-MoE style sparse MLP (router + top-k experts) and the expert-set mismatch metric.

The sparse block mirrors Hugging Face's `Qwen3MoeSparseMoeBlock` (transformers 5.19):

1. router logits = x @ gate in the compute dtype ([..., E]);
2. probabilities = softmax(logits) in float32 (as transformers and vLLM do, in every precision);
3. top-k of the probabilities; with `norm_topk_prob` the k weights are renormalised (float32) to
   sum to 1; the weights are then rounded to the compute dtype;
4. y = sum over the k chosen experts of weight * down(silu(gate(x)) * up(x)), in the compute dtype.

Experts are evaluated densely (every expert on every token, one einsum over the expert axis; a
bitwise policy runs the down projection as one 2-D dot per expert) and the k chosen outputs
gathered: exact, and cheap at the tiny scales this repository trains on, but E / k times the FLOPs
of a grouped (sorted-token) kernel at Qwen3-30B-A3B scale.

Parameters of a sparse layer (HF's per-expert `[out, in]` weights transposed and stacked):

    mlp/gate/kernel [D, E]                                     (router)
    mlp/experts/{gate,up}_proj/kernel [E, D, moe_intermediate_size]
    mlp/experts/down_proj/kernel [E, moe_intermediate_size, D]

The selected experts (int32 [B, T, k], in descending router probability) are sown into the
`intermediates` collection as `expert_choices`; `probes.expert_choices` collects them, and
`probes.rollout_expert_mismatch` compares the trainer's and the sampler's choices on a rollout with
the metric here. This module imports neither the decoder nor the probes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models.config import ModelConfig
from rl_fp16.models.layers import StackedKernel, engine_weight, linear
from rl_fp16.precision import DtypePolicy

EXPERT_CHOICES = "expert_choices"
ROUTER_SOFTMAX_DTYPE = jnp.float32


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k routing from router logits [..., E].

  Returns:
    (weights float32 [..., k], indices int32 [..., k]), in descending probability.
  """
  probs = jax.nn.softmax(logits.astype(ROUTER_SOFTMAX_DTYPE), axis=-1)
  weights, indices = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, indices.astype(jnp.int32)


class SparseMoE(nn.Module):
  """Router + top-k experts. Maps x [B, T, D] to [B, T, D] in the compute dtype."""

  config: ModelConfig
  policy: DtypePolicy

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, pol = self.config, self.policy
    x = x.astype(pol.compute_dtype)
    router = StackedKernel((cfg.hidden_size, cfg.num_experts), cfg.initializer_range,
                           name="gate")()
    logits = linear(x, engine_weight(router, pol), None, pol)  # [B, T, E], compute dtype
    weights, indices = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    self.sow("intermediates", EXPERT_CHOICES, indices)

    experts = _Experts(cfg, name="experts")
    w_gate, w_up, w_down = (engine_weight(w, pol) for w in experts())
    gate = pol.round(jnp.einsum("btd,edi->btei", x, w_gate))
    up = pol.round(jnp.einsum("btd,edi->btei", x, w_up))
    hidden = pol.round(jax.nn.silu(gate) * up)
    if pol.bitwise:  # a 2-D dot per expert: batched over experts, a row's bits depend on its rows
      out = jnp.stack([jnp.matmul(hidden[:, :, e], w_down[e]) for e in range(cfg.num_experts)],
                      axis=2)
    else:
      out = jnp.einsum("btei,eid->bted", hidden, w_down)
    out = pol.round(out)  # [B, T, E, D]
    chosen = jnp.take_along_axis(out, indices[..., None], axis=2)  # [B, T, k, D]
    return pol.round(jnp.sum(chosen * pol.round(weights.astype(pol.compute_dtype))[..., None],
                             axis=2))


class _Experts(nn.Module):
  """The experts' stacked gate / up / down kernels ([E, D, I], [E, D, I], [E, I, D])."""

  config: ModelConfig

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg = self.config
    e, d, inter, std = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                        cfg.initializer_range)
    return (StackedKernel((e, d, inter), std, name="gate_proj")(),
            StackedKernel((e, d, inter), std, name="up_proj")(),
            StackedKernel((e, inter, d), std, name="down_proj")())


# ----------------------------------------------------------------------------- the metric ----


def expert_set_differs(choices_a: Any, choices_b: Any) -> np.ndarray:
  """bool [...]: whether the selected expert sets differ (order within the k ignored).

  Args:
    choices_a, choices_b: int [..., k] expert indices of the same shape, e.g. [L_moe, B, T, k]
      from `probes.expert_choices` and `probes.expert_choices_cached`.
  """
  a, b = np.asarray(choices_a), np.asarray(choices_b)
  if a.shape != b.shape:
    raise ValueError(f"choices_a has shape {a.shape}, choices_b {b.shape}; they must agree")
  if a.ndim < 1:
    raise ValueError("choices must have a trailing top-k axis")
  return np.any(np.sort(a, axis=-1) != np.sort(b, axis=-1), axis=-1)


def _broadcast_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
  if mask is None:
    return np.ones(shape, bool)
  mask = np.asarray(mask)
  if mask.shape != shape[len(shape) - mask.ndim:]:
    raise ValueError(f"mask has shape {mask.shape}; it must match the trailing dimensions of the "
                     f"choices' token shape {shape}")
  return np.broadcast_to(mask.astype(bool), shape)


def expert_mismatch(choices_a: Any, choices_b: Any, mask: Any = None) -> float:
  """Fraction of masked-in routing decisions whose selected expert SET differs.

  Args:
    choices_a, choices_b: int [..., k] (e.g. [L_moe, B, T, k]).
    mask: 0/1 over trailing token dimensions (e.g. [B, T], applied to every layer); None: all.
  Returns:
    A float in [0, 1]; NaN when the mask selects nothing.
  """
  differs = expert_set_differs(choices_a, choices_b)
  mask = _broadcast_mask(mask, differs.shape)
  count = int(mask.sum())
  return float(differs[mask].sum() / count) if count else float("nan")


def expert_mismatch_metrics(choices_a: Any, choices_b: Any, mask: Any = None, *,
                            prefix: str = "mismatch/expert_set_diff") -> dict[str, float]:
  """Flat metrics for [L_moe, B, T, k] choices and a [B, T] mask.

  Returns:
    {prefix: fraction over (layer, token) decisions, prefix + "_any_layer": fraction of tokens
    whose set differs in at least one layer, prefix + "_layer{j}": per sparse layer j (the j-th
    entry of `config.moe_layers`)}.
  """
  differs = expert_set_differs(choices_a, choices_b)
  if differs.ndim != 3:
    raise ValueError(f"expected choices [L_moe, B, T, k], got {np.shape(choices_a)}")
  token_mask = _broadcast_mask(mask, differs.shape[1:])
  count = int(token_mask.sum())

  def frac(values):
    return float(values[token_mask].sum() / count) if count else float("nan")

  out = {prefix: expert_mismatch(choices_a, choices_b, token_mask),
         f"{prefix}_any_layer": frac(differs.any(axis=0))}
  for j in range(differs.shape[0]):
    out[f"{prefix}_layer{j}"] = frac(differs[j])
  return out
