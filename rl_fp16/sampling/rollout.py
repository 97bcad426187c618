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
