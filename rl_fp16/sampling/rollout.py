"""The one result type every sampling engine returns."""

from __future__ import annotations

import dataclasses

import numpy as np

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True)
class Rollout:
  """A batch of sampled responses, one row per (prompt, sample) pair.

  Rows are grouped by prompt: rows ``[i * n, (i + 1) * n)`` are the ``n`` samples of prompt ``i``.

  Attributes:
    prompt_tokens: int32 [B, P], left-padded prompts (pad id 0 where ``prompt_mask`` is 0).
    prompt_mask: int32 [B, P], 1 on real prompt tokens.
    response_tokens: int32 [B, T], right-padded responses (pad id 0 where ``response_mask`` is 0).
    response_mask: int32 [B, T], 1 on generated tokens (a sampled EOS token included).
    logp_sampler: float32 [B, T], log-probability of each sampled token under the distribution it
      was sampled from (the inference engine's mu); 0 where ``response_mask`` is 0.
    finish_reasons: tuple of B strings, ``"eos"`` or ``"length"``.
    prompt_index: int32 [B], index of each row's prompt in the request.
  """

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  response_tokens: np.ndarray
  response_mask: np.ndarray
  logp_sampler: np.ndarray
  finish_reasons: tuple[str, ...]
  prompt_index: np.ndarray

  def __post_init__(self):
    b, t = self.response_tokens.shape
    for name in ("response_mask", "logp_sampler"):
      if getattr(self, name).shape != (b, t):
        raise ValueError(f"Rollout.{name} has shape {getattr(self, name).shape}, expected {(b, t)}")
    if self.prompt_tokens.shape[0] != b or self.prompt_mask.shape != self.prompt_tokens.shape:
      raise ValueError(f"Rollout prompt arrays {self.prompt_tokens.shape}/{self.prompt_mask.shape} "
                       f"do not match batch size {b}")
    if len(self.finish_reasons) != b:
      raise ValueError(f"Rollout.finish_reasons has {len(self.finish_reasons)} entries, "
                       f"expected {b}")
    bad = set(self.finish_reasons) - {FINISH_EOS, FINISH_LENGTH}
    if bad:
      raise ValueError(f"Rollout.finish_reasons has {sorted(bad)}; allowed: eos, length")

  @property
  def batch_size(self) -> int:
    return self.response_tokens.shape[0]

  @property
  def response_lengths(self) -> np.ndarray:
    """int32 [B]: number of generated tokens per row."""
    return self.response_mask.sum(axis=1).astype(np.int32)

  def full_sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt and response concatenated for the trainer's full-sequence forward.

    Returns:
      tokens int32 [B, P + T], attention_mask int32 [B, P + T] (left pad of the prompt and right pad
      of the response are 0), loss_mask int32 [B, P + T] (1 on response tokens only). Entry
      ``P + t`` of ``token_logprobs`` on these tokens aligns with ``logp_sampler[:, t]``.
    """
    tokens = np.concatenate([self.prompt_tokens, self.response_tokens], axis=1).astype(np.int32)
    attention_mask = np.concatenate([self.prompt_mask, self.response_mask], axis=1).astype(np.int32)
    loss_mask = np.concatenate([np.zeros_like(self.prompt_mask), self.response_mask],
                               axis=1).astype(np.int32)
    return tokens, attention_mask, loss_mask

  def with_prompt_width(self, multiple: int) -> "Rollout":
    """The same rollout with prompts left-padded to a multiple of `multiple` columns, so that the
    trainer sees few distinct shapes (each new shape is a recompilation)."""
    width = self.prompt_tokens.shape[1]
    target = max(multiple, -(-width // multiple) * multiple)
    if target == width:
      return self
    pad = ((0, 0), (target - width, 0))
    return dataclasses.replace(self, prompt_tokens=np.pad(self.prompt_tokens, pad),
                               prompt_mask=np.pad(self.prompt_mask, pad))

  def packed_width(self, bucket: int, max_width: int | None = None) -> int:
    """Columns of `packed_sequence`: the longest prompt + response, rounded up to a multiple of
    `bucket` (and capped at `max_width`, e.g. the longest possible prompt + response, when
    given). Few distinct widths means few recompilations of the trainer."""
    if bucket < 1:
      raise ValueError(f"bucket must be >= 1, got {bucket}")
    need = int((self.prompt_mask.sum(axis=1) + self.response_lengths).max())
    width = max(bucket, -(-need // bucket) * bucket)
    return width if max_width is None else max(need, min(width, int(max_width)))

  def _packed_columns(self) -> np.ndarray:
    """int [B, T]: the packed column of each response entry (prompt length + t)."""
    prompt_lengths = self.prompt_mask.sum(axis=1).astype(np.int64)
    return prompt_lengths[:, None] + np.arange(self.response_tokens.shape[1])[None, :]

  def packed_sequence(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt and response of each row side by side from column 0, right-padded to `width`.

    The same real tokens at the same positions as `full_sequence` (positions count real tokens
    from 0 in both), without the left padding of short prompts or the right padding of the
    response up to the longest possible one; so the trainer's forward sees
    `packed_width(...)` columns instead of P + T.

    Returns tokens int32 [B, width], attention_mask int32 [B, width] (1 on prompt and response
    tokens), loss_mask int32 [B, width] (1 on response tokens). Raises ValueError when a row does
    not fit.
    """
    rows, prompt_width = self.prompt_tokens.shape
    prompt_lengths = self.prompt_mask.sum(axis=1).astype(np.int64)
    need = int((prompt_lengths + self.response_lengths).max())
    if width < need:
      raise ValueError(f"width {width} < longest prompt + response {need}")
    tokens = np.zeros((rows, width), np.int32)
    attention_mask = np.zeros((rows, width), np.int32)
    loss_mask = np.zeros((rows, width), np.int32)
    for row in range(rows):  # left-padded prompts: the real tokens are the last p columns
      p = prompt_lengths[row]
      tokens[row, :p] = self.prompt_tokens[row, prompt_width - p:]
      attention_mask[row, :p] = self.prompt_mask[row, prompt_width - p:]
    tokens[:, :] = self.pack_response(self.response_tokens, width, base=tokens)
    attention_mask[:, :] = self.pack_response(self.response_mask, width, base=attention_mask)
    loss_mask[:, :] = self.pack_response(self.response_mask, width, base=loss_mask)
    return tokens, attention_mask, loss_mask

  def pack_response(self, values: np.ndarray, width: int, base: np.ndarray | None = None
                    ) -> np.ndarray:
    """Response-aligned values [B, T] (e.g. `logp_sampler`) at their `packed_sequence` columns,
    [B, width]; other columns keep `base` (default zeros). Entries past a row's response length
    must be 0 (they are padding)."""
    rows, length = values.shape
    out = np.zeros((rows, max(width, length) + self.prompt_tokens.shape[1]), values.dtype)
    if base is not None:
      out[:, :width] = base
    real = self.response_mask > 0
    columns = self._packed_columns()
    row_index = np.broadcast_to(np.arange(rows)[:, None], (rows, length))
    out[row_index[real], columns[real]] = values[real]
    return out[:, :width]

  def unpack_response(self, packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_response`: [B, width] -> response-aligned [B, T], 0 on padding."""
    columns = np.minimum(self._packed_columns(), packed.shape[1] - 1)
    values = np.take_along_axis(packed, columns, axis=1)
    return np.where(self.response_mask > 0, values, np.zeros((), packed.dtype))
