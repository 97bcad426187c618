"""Group-relative advantages: GRPO (mean and std normalised) and Dr.GRPO (mean only).

Rewards are one per row, grouped by prompt: rows ``[i * n, (i + 1) * n)`` are the ``n`` samples of
prompt ``i`` (the `Rollout` order), with ``n = group_size``. Pure and jittable (``group_size``
static); outputs are float32 [B], one sequence-level advantage per row.
"""

from __future__ import annotations

import jax.numpy as jnp

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo")


def _grouped_rewards(rewards, group_size):
  """Validates and reshapes float rewards [B] to float32 [B // group_size, group_size]."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [B], got shape {rewards.shape}")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  batch_size = rewards.shape[0]
  if batch_size % group_size:
    raise ValueError(f"batch size B={batch_size} is not divisible by group_size={group_size}")
  return rewards.reshape(batch_size // group_size, group_size)


def drgrpo_advantages(rewards, group_size):
  """Dr.GRPO advantages R - mean(R over the group).

  Args:
    rewards: float [B], B divisible by ``group_size``.
    group_size: samples per prompt (consecutive rows).

  Returns:
    float32 [B].
  """
  grouped = _grouped_rewards(rewards, group_size)
  return (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(-1)


def grpo_advantages(rewards, group_size, eps=1e-6):
  """GRPO advantages (R - group mean) / (group std + eps).

  The std is the sample (unbiased, ddof=1) standard deviation, as ``torch.std`` computes it in
  verl and oat. A group of one sample has std defined as 0 (its advantage is then 0).

  Args:
    rewards: float [B], B divisible by ``group_size``.
    group_size: samples per prompt (consecutive rows).
    eps: added to the std, so groups with equal rewards get advantage 0.

  Returns:
    float32 [B].
  """
  grouped = _grouped_rewards(rewards, group_size)
  centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
  sample_var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group_size - 1, 1)
  return (centred / (jnp.sqrt(sample_var) + eps)).reshape(-1)


def compute_advantages(name, rewards, group_size):
  """Advantages by estimator name, one of `ADVANTAGE_ESTIMATORS`; float32 [B]."""
  if name == "grpo":
    return grpo_advantages(rewards, group_size)
  if name == "drgrpo":
    return drgrpo_advantages(rewards, group_size)
  raise ValueError(f"Unknown advantage estimator {name!r}; allowed: "
                   f"{', '.join(ADVANTAGE_ESTIMATORS)}")
