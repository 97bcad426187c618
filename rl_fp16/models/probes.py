"""Views into the decoder's forward: residual streams, mixture-of-experts expert choices, and the
rollout-level expert-set mismatch between the trainer's and the JAX sampler's paths.

Diagnostics, not the training or sampling path: this module sits on top of `decoder` and `moe`
(it imports both; neither imports it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models import moe
from rl_fp16.models.config import ModelConfig
from rl_fp16.models.decoder import (Params, apply_decoder, causal_mask, default_positions,
                                    init_cache, prepare_inputs)
from rl_fp16.precision import DtypePolicy

# ----------------------------------------------------------------------- residual streams ----


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def residual_stream(config: ModelConfig, policy: DtypePolicy, params: Params, tokens: jax.Array,
                    attention_mask: jax.Array) -> tuple[list[jax.Array], jax.Array]:
  """Residual stream after the embedding and after each layer ([L + 1] x [B, T, D]) and logits."""
  positions = default_positions(attention_mask)
  logits, _, residuals = apply_decoder(config, policy, params, tokens, positions,
                                       causal_mask(attention_mask))
  return residuals, logits


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def residual_stream_cached(config: ModelConfig, policy: DtypePolicy, params: Params,
                           tokens: jax.Array, attention_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Like `residual_stream`, but through the KV-cache path, one token at a time.

  Returns residuals [L + 1, B, T, D] and logits [B, T, V]: what the inference engine computes when
  it decodes these tokens incrementally.
  """
  batch, length = tokens.shape
  cache = init_cache(config, batch, length, policy)
  positions = default_positions(attention_mask)

  def step(cache, index):
    token = jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1)
    position = jax.lax.dynamic_slice_in_dim(positions, index, 1, axis=1)
    visible = ((jnp.arange(length)[None, None, :] <= index)
               & attention_mask.astype(bool)[:, None, :])
    logits, new_cache, residuals = apply_decoder(config, policy, params, token, position, visible,
                                                 cache, index)
    return new_cache, (jnp.stack(residuals)[:, :, 0], logits[:, 0])

  _, (residuals, logits) = jax.lax.scan(step, cache, jnp.arange(length))
  return jnp.transpose(residuals, (1, 2, 0, 3)), jnp.transpose(logits, (1, 0, 2))


# ------------------------------------------------------------------------ expert choices ----


def _apply_with_choices(config, policy, params, tokens, positions, mask, cache=None,
                        cache_index=None):
  """`apply_decoder`, plus the sparse layers' expert choices: int32 [L_moe, B, t, k]."""
  if not config.moe_layers:
    raise ValueError(f"a {config.model_type} config has no mixture-of-experts layers")
  (logits, new_cache, residuals), state = apply_decoder(
      config, policy, params, tokens, positions, mask, cache, cache_index,
      mutable=["intermediates"])
  sown = state["intermediates"]
  choices = jnp.stack([sown[f"layers_{i}"]["mlp"][moe.EXPERT_CHOICES][0]
                       for i in config.moe_layers])
  return logits, new_cache, residuals, choices


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def _expert_choices(config, policy, params, tokens, attention_mask, positions):
  logits, _, _, choices = _apply_with_choices(config, policy, params, tokens, positions,
                                              causal_mask(attention_mask))
  return choices, logits


def expert_choices(config: ModelConfig, params: Params, tokens, *, policy: DtypePolicy,
                   attention_mask=None, positions=None, return_logits: bool = False):
  """Experts each sparse layer selects in the full-sequence forward (the training engine).

  Args:
    tokens, attention_mask, positions: as in `decoder.forward`.
  Returns:
    int32 [L_moe, B, T, k] (layer j is `config.moe_layers[j]`; the k in descending router
    probability), and logits [B, T, V] when `return_logits`.
  """
  tokens, attention_mask, positions = prepare_inputs(tokens, attention_mask, positions)
  choices, logits = _expert_choices(config, policy, params, tokens, attention_mask, positions)
  return (choices, logits) if return_logits else choices


@functools.partial(jax.jit, static_argnames=("config", "policy", "prefill_len"))
def _expert_choices_cached(config, policy, params, tokens, attention_mask, prefill_len):
  batch, length = tokens.shape
  cache = init_cache(config, batch, length, policy)
  positions = default_positions(attention_mask)
  kv_mask = attention_mask.astype(bool)
  choices, logits = [], []
  if prefill_len:
    visible = (jnp.arange(length)[None, :] <= jnp.arange(prefill_len)[:, None])[None]
    out, cache, _, prefill_choices = _apply_with_choices(
        config, policy, params, tokens[:, :prefill_len], positions[:, :prefill_len],
        visible & kv_mask[:, None, :], cache, jnp.asarray(0, jnp.int32))
    choices.append(prefill_choices)
    logits.append(out)

  def step(cache, index):
    token = jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1)
    position = jax.lax.dynamic_slice_in_dim(positions, index, 1, axis=1)
    visible = (jnp.arange(length)[None, None, :] <= index) & kv_mask[:, None, :]
    out, new_cache, _, step_choices = _apply_with_choices(config, policy, params, token,
                                                          position, visible, cache, index)
    return new_cache, (step_choices[:, :, 0], out[:, 0])

  if prefill_len < length:
    _, (step_choices, step_logits) = jax.lax.scan(step, cache, jnp.arange(prefill_len, length))
    choices.append(jnp.transpose(step_choices, (1, 2, 0, 3)))  # [T', L, B, k] -> [L, B, T', k]
    logits.append(jnp.transpose(step_logits, (1, 0, 2)))
  return jnp.concatenate(choices, axis=2), jnp.concatenate(logits, axis=1)


def expert_choices_cached(config: ModelConfig, params: Params, tokens, *, policy: DtypePolicy,
                          attention_mask=None, prefill_len: int = 0,
                          return_logits: bool = False):
  """Experts each sparse layer selects in the KV-cache forward (the in-process sampler's path).

  The first `prefill_len` tokens go through one prefill call (as `JaxSampler` does with the
  prompt), the rest one token at a time, like `residual_stream_cached`.

  Args:
    tokens: int [B, T]; attention_mask: int/bool [B, T] (default all ones). Positions are the
      running count of real tokens, as in `decoder.forward`.
  Returns:
    int32 [L_moe, B, T, k], and logits [B, T, V] when `return_logits`.
  """
  tokens, attention_mask, _ = prepare_inputs(tokens, attention_mask, None)
  if not 0 <= prefill_len <= tokens.shape[1]:
    raise ValueError(f"prefill_len={prefill_len} is outside [0, {tokens.shape[1]}]")
  choices, logits = _expert_choices_cached(config, policy, params, tokens, attention_mask,
                                           int(prefill_len))
  return (choices, logits) if return_logits else choices


# ------------------------------------------------------------ rollout expert-set mismatch ----


def decision_mask(loss_mask: Any, attention_mask: Any) -> np.ndarray:
  """int32 [B, S]: positions whose forward output predicts a response token.

  Those are the routing decisions behind the response log-probabilities: the last prompt token and
  every response token but the last (position s predicts token s + 1).
  """
  loss_mask, attention_mask = np.asarray(loss_mask), np.asarray(attention_mask)
  predicts = np.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
  return (predicts * attention_mask).astype(np.int32)


def rollout_expert_mismatch(config: ModelConfig, params: Any, rollout: Any, *,
                            trainer_policy: DtypePolicy, sampler_policy: DtypePolicy,
                            prefix: str = "mismatch/expert_set_diff") -> dict[str, float]:
  """Expert-set mismatch between the trainer's forward and the JAX sampler's KV-cache forward.

  The trainer path is `expert_choices` (full sequence, `trainer_policy`); the sampler path replays
  the rollout through the KV cache as `JaxSampler` decodes it (prompt prefilled in one call, then
  one token at a time, `sampler_policy`). Compared on `decision_mask` positions.

  Args:
    rollout: a `rl_fp16.sampling.Rollout`.
  Returns:
    `moe.expert_mismatch_metrics` of the two, plus `prefix + "_num_decisions"` (tokens compared).
  """
  tokens, attention_mask, loss_mask = rollout.full_sequence()
  trainer = expert_choices(config, params, tokens, policy=trainer_policy,
                           attention_mask=attention_mask)
  sampler = expert_choices_cached(config, params, tokens, policy=sampler_policy,
                                  attention_mask=attention_mask,
                                  prefill_len=rollout.prompt_tokens.shape[1])
  mask = decision_mask(loss_mask, attention_mask)
  metrics = moe.expert_mismatch_metrics(trainer, sampler, mask, prefix=prefix)
  metrics[f"{prefix}_num_decisions"] = float(mask.sum())
  return metrics
