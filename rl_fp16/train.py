"""Pure step functions: `sft_step` (supervised) and `rl_train_step` (policy-gradient update).

Every step takes and returns a `TrainState`. Params and optimizer state are float32 master copies;
the forward/backward runs in the trainer policy's compute dtype. With a loss scale (fp16), the
loss is scaled, the gradients unscaled in float32, and a step whose gradients are not finite is
skipped: params, optimizer state untouched, the scale backed off. bf16/fp32 steps with non-finite
gradients are skipped too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rl_fp16 import precision
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, default_positions, forward, shifted_logprobs
from rl_fp16.models.decoder import _forward
from rl_fp16.precision import DtypePolicy


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW as in the paper's runs: betas 0.9/0.95, no weight decay, grad clip 1.0, constant lr."""

  learning_rate: float = 1e-6
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  warmup_steps: int = 0

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.grad_clip is not None and self.grad_clip <= 0:
      raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW (float32 state)."""
  lr: Any = config.learning_rate
  if config.warmup_steps:
    lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    *args) -> tuple[TrainState, dict[str, jax.Array]]:
  """Differentiates `loss_fn(params, *args) -> (loss, aux)` and applies the update when finite.

  Returns the new state and metrics: `train/loss`, `train/grad_norm`, `train/loss_scale`,
  `train/skipped` (1.0 when the update was skipped), plus `aux`.
  """
  grad_fn = precision.value_and_grad(loss_fn, state.loss_scale, has_aux=True)
  new_loss_scale, finite, (loss, aux), grads = grad_fn(state.params, *args)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  params = precision.select_tree(finite, new_params, state.params)
  opt_state = precision.select_tree(finite, new_opt_state, state.opt_state)
  grad_norm = optax.global_norm(grads)
  metrics = dict(aux)
  metrics.update({
      "train/loss": loss.astype(jnp.float32),
      "train/grad_norm": jnp.where(finite, grad_norm, jnp.nan),
      "train/loss_scale": (jnp.asarray(1.0) if new_loss_scale is None
                           else new_loss_scale.scale.astype(jnp.float32)),
      "train/skipped": 1.0 - finite.astype(jnp.float32),
  })
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            loss_scale=new_loss_scale)
  return new_state, metrics


def sft_loss(params, batch: dict[str, jax.Array], *, config: ModelConfig, policy: DtypePolicy):
  """Mean next-token cross-entropy over `batch["loss_mask"]` positions.

  batch: tokens int32 [B, T], attention_mask int32 [B, T], loss_mask [B, T] (1 where the token is
  a target, e.g. the response; entry t scores log p(tokens[t] | tokens[<t])).
  """
  tokens, attention_mask = batch["tokens"], batch["attention_mask"]
  logits = _forward(config, policy, params, tokens, attention_mask,
                    default_positions(attention_mask))
  logp = shifted_logprobs(logits, tokens, attention_mask, dtype=policy.logsoftmax_dtype)
  mask = batch["loss_mask"].astype(jnp.float32).at[:, 0].set(0.0)
  num_tokens = jnp.maximum(mask.sum(), 1.0)
  loss = -(logp * mask).sum() / num_tokens
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
  accuracy = (correct * mask[:, 1:]).sum() / num_tokens
  return loss, {"sft/token_accuracy": accuracy, "sft/num_tokens": mask.sum()}


@functools.partial(jax.jit, static_argnames=("config", "policy", "optimizer"), donate_argnums=(3,))
def sft_step(config: ModelConfig, policy: DtypePolicy, optimizer: optax.GradientTransformation,
             state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One supervised update on `batch` (see `sft_loss`). Pure; the input state is donated."""
  return apply_gradients(state, optimizer, functools.partial(sft_loss, config=config,
                                                             policy=policy), batch)
