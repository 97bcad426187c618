"""The RL update's batch: one typed pytree (`TrainBatch`), built from a rollout in one place."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import struct


@struct.dataclass
class TrainBatch:
  """B rows of S columns as the RL loss (`rl_fp16.train.rl_loss`) and `make_update` take them.

  A pytree: `jax.device_put`, the sharding helpers, jit and the update's scan act on its leaves.
  Each row holds its prompt and response side by side from column 0, right-padded to S; the
  model's positions count the row's real tokens (`attention_mask`) from 0.

  Attributes:
    tokens: int32 [B, S], prompt then response tokens; 0 on padding.
    attention_mask: int32 [B, S], 1 on real (prompt and response) tokens.
    loss_mask: int32 [B, S], 1 on response tokens: the ones the loss scores.
    logp_sampler: float32 [B, S], the engine's log-prob of each response token; 0 elsewhere.
    advantages: float32 [B], one per row.
    logp_old: float32 [B, S], the trainer's log-prob of each response token under the params
      that sampled the batch; 0 elsewhere. None until set (`replace(logp_old=...)`): the loss
      refuses a batch without it.
    logp_old_from_forward: int32 [B] or None: 1 where the row's logp_old is not computed yet and
      is to be its first update's own forward (that update runs at the params that sampled the
      batch); `make_update` fills those rows in as it goes (`rl_fp16.rl_loop.with_logp_old`).
  """

  tokens: Any
  attention_mask: Any
  loss_mask: Any
  logp_sampler: Any
  advantages: Any
  logp_old: Any = None
  logp_old_from_forward: Any = None

  @property
  def width(self) -> int:
    """S, the columns of every row."""
    return self.tokens.shape[1]


def make_batch(tokens, attention_mask, loss_mask, logp_sampler, advantages,
               logp_old=None) -> TrainBatch:
  """The one constructor: host arrays cast to the field dtypes (NumPy), shapes checked.

  Raises:
    ValueError: when a [B, S] field's shape differs from `tokens`' or advantages is not [B].
  """
  batch = TrainBatch(
      tokens=np.asarray(tokens, np.int32), attention_mask=np.asarray(attention_mask, np.int32),
      loss_mask=np.asarray(loss_mask, np.int32), logp_sampler=np.asarray(logp_sampler, np.float32),
      advantages=np.asarray(advantages, np.float32),
      logp_old=None if logp_old is None else np.asarray(logp_old, np.float32))
  shape = batch.tokens.shape
  for name in ("attention_mask", "loss_mask", "logp_sampler", "logp_old"):
    value = getattr(batch, name)
    if value is not None and value.shape != shape:
      raise ValueError(f"TrainBatch.{name} has shape {value.shape}, tokens {shape}")
  if batch.advantages.shape != shape[:1]:
    raise ValueError(f"TrainBatch.advantages has shape {batch.advantages.shape}, expected "
                     f"{shape[:1]}")
  return batch


def batch_width(rollout, sequence_bucket: int) -> int:
  """S for `rollout`: its longest prompt + response rounded up to a multiple of
  `sequence_bucket`, or with `sequence_bucket` 0 the prompt width plus the response width."""
  if sequence_bucket:
    return rollout.packed_width(sequence_bucket)
  return rollout.prompt_tokens.shape[1] + rollout.response_tokens.shape[1]


def rollout_batch(rollout, advantages, width: int) -> TrainBatch:
  """A `Rollout` laid out as a `TrainBatch` of `width` columns (`Rollout.packed_sequence`), the
  sampler's log-probs at their columns; logp_old is left unset (None). Host arrays."""
  tokens, attention_mask, loss_mask = rollout.packed_sequence(width)
  logp_sampler = rollout.pack_response(np.asarray(rollout.logp_sampler, np.float32), width)
  return make_batch(tokens, attention_mask, loss_mask, logp_sampler, advantages)
