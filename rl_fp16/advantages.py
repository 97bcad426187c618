"""Group-relative advantages: GRPO (mean and std normalised) and Dr.GRPO (mean only).

Rewards are one per row, grouped by prompt: rows ``[i * n, (i + 1) * n)`` are the ``n`` samples of
prompt ``i`` (the `Rollout` order), with ``n = group_size``. Pure and jittable (``group_size``
static); outputs are float32 [B], one sequence-level advantage per row.

`check_rewards` is the host-side gate in front of them: a non-finite reward would make every
advantage of its group (and so every loss and gradient of the batch) non-finite, every update would
be skipped as if the loss scale had overflowed, and fp16 would back its scale off for nothing.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from rl_fp16.names import ADVANTAGE_ESTIMATORS  # re-exported (rl_fp16.names)


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


def check_rewards(rewards, samples_per_prompt: int,
                  prompts: Sequence[str] | None = None) -> np.ndarray:
  """The rewards of a rollout as float32 [B], after checking that every one is finite.

  Host-side (NumPy), called on the reward function's output before any advantage or update.

  Args:
    rewards: one reward per row [B]; rows ``[i * n, (i + 1) * n)`` belong to prompt ``i`` of the
      step (``n = samples_per_prompt``).
    samples_per_prompt: ``n``.
    prompts: optional text of each of the ``B // n`` prompts, quoted in the error.
  Returns:
    float32 [B].
  Raises:
    ValueError: a reward is NaN or infinite (naming each such row, its value and its prompt), or
      the shape does not fit ``samples_per_prompt``.
  """
  rewards = np.asarray(rewards, np.float32)
  if rewards.ndim != 1:
    raise ValueError(f"the reward function must return one reward per row [B], got shape "
                     f"{rewards.shape}")
  n = samples_per_prompt
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"samples_per_prompt must be a positive int, got {n!r}")
  if rewards.shape[0] % n:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of "
                     f"samples_per_prompt={n}")
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size == 0:
    return rewards
  groups = sorted({int(row) // n for row in bad})
  lines = []
  for group in groups:
    rows = [int(r) for r in bad if r // n == group]
    values = ", ".join(f"row {r}: {rewards[r]}" for r in rows)
    text = ""
    if prompts is not None and group < len(prompts):
      prompt = str(prompts[group])
      text = f" {prompt[:200]!r}" + ("..." if len(prompt) > 200 else "")
    lines.append(f"  prompt {group} (rows {group * n}-{group * n + n - 1}){text}: {values}")
  raise ValueError(
      f"the reward function returned {bad.size} non-finite reward(s) of {rewards.shape[0]} "
      f"(samples_per_prompt={n}; rows [i*{n}, (i+1)*{n}) are prompt i of this step):\n"
      + "\n".join(lines) + "\nNo update was made: a non-finite reward would turn the whole "
      "batch's loss non-finite and every update would be skipped. Fix the reward function "
      "(e.g. return 0 for a response it cannot score).")


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
