"""The in-process JAX inference engine: jitted batched KV-cache decoding.

Shapes are bucketed (prompt length to a multiple of `prompt_bucket`, batch to a multiple of
`batch_bucket`) so that a training loop does not recompile at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16.models import ModelConfig, default_positions, forward_cached, init_cache
from rl_fp16.models.decoder import (grow_cache, lm_head_logits, lm_head_weight,
                                    logprobs_from_logits)
from rl_fp16.models.layers import BITWISE_KEY_BLOCK, BITWISE_MIN_ROWS, bitwise_min_rows
from rl_fp16.precision import DtypePolicy, policy_jit
from rl_fp16.sampling.rollout import FINISH_EOS, FINISH_LENGTH, Rollout


# `JaxEngine`'s keywords, and those of them that only the JAX engine takes.
JAX_ENGINE_OPTIONS = ("eos_token_ids", "prompt_bucket", "batch_bucket", "decode_row_group")
JAX_ONLY_OPTIONS = ("prompt_bucket", "batch_bucket", "decode_row_group")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding settings shared by the samplers."""

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0: off

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature} (greedy decoding is not "
                       "an RL sampling distribution)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def process_logits(logits: jax.Array, *, temperature, top_p, top_k: int,
                   use_top_p: bool) -> jax.Array:
  """float32 [B, V] logits of the distribution actually sampled from.

  Temperature first, then top-k, then top-p (nucleus); removed entries are -inf, so
  `log_softmax` of the result is the renormalised distribution over the kept set.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if use_top_p:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p  # the top token is always kept
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _round_up(x: int, multiple: int) -> int:
  return max(multiple, -(-x // multiple) * multiple)


def decode_segments(max_new_tokens: int, segment: int) -> list[int]:
  """The decode steps at which each segment of `_decode` ends (the last is max_new_tokens)."""
  if segment <= 0 or segment >= max_new_tokens:
    return [max_new_tokens]
  return list(range(segment, max_new_tokens, segment)) + [max_new_tokens]


@functools.partial(policy_jit, static_argnames=("config", "policy", "max_new_tokens", "top_k",
                                             "use_top_p", "eos_ids", "segment", "row_offset",
                                             "row_group", "logp_temperature"))
def _decode(config: ModelConfig, policy: DtypePolicy, params, prompt_tokens, prompt_mask,
            row_source, rng, temperature, top_p, *, max_new_tokens: int, top_k: int,
            use_top_p: bool, eos_ids: tuple[int, ...], segment: int = 0, row_offset: int = 0,
            row_group: int = 0, logp_temperature: float | None = None):
  """Prefill + while-loop decode. Returns (response_tokens, logp, response_mask, hit_eos).

  prompt_tokens, prompt_mask: int32 [U, P], the distinct prompts; row_source: int32 [B], the
  prompt each of the B decoded rows continues. The prefill runs once per distinct prompt and its
  KV cache and last logits are copied to the rows (a row's prefill does not depend on the other
  rows, so its tokens are those of a prefill of its own, up to float rounding).

  `row_offset` > 0: these rows are rows [row_offset, row_offset + B) of a larger batch sampled
  with the same `rng` (one process's share of a step): each decode step draws the Gumbel noise of
  that larger batch's first row_offset + B rows and keeps the last B, so every row gets the token
  it would get in the whole batch (`jax.random.categorical` is argmax(logits + Gumbel noise)).

  The decode runs on the device until every row has finished (or max_new_tokens), in segments
  of `segment` steps (0: one): during the segment ending at step e, the KV cache (and so every
  decode step's attention) spans prompt_len + e slots instead of prompt_len + max_new_tokens
  (a bitwise policy: rounded up to whole `BITWISE_KEY_BLOCK`s); the cache grows (zero-padded) between segments. The slots a segment leaves out are the ones
  causality hides anyway, so the sampled tokens are the same (tests/test_speed_levers.py).

  `row_group` > 0 (it must divide B): the rows decode in groups of `row_group`, one group after
  the other, each to its own end (all its rows finished, or max_new_tokens). Every row draws the
  Gumbel noise of its row in the whole batch, so the tokens are the ones of the whole batch
  decoded at once; a group's KV cache is a fraction of the batch's and stays in the CPU's caches
  between steps.

  Under a bitwise policy the prompts come right-padded (at least `BITWISE_MIN_ROWS` tokens in
  all) and every token's keys sit at the slot of its position (the decoder's compacted layout):
  the cache (float32 holding compute-dtype values, `layers.held_in_float32`) is written at a
  per-row slot, and a token's log-prob is `logprobs_from_logits` of its logits at
  `logp_temperature` (a Python float, the same value as `temperature`), as in `token_logprobs`;
  top-k / top-p must be off.
  """
  distinct, prompt_len = prompt_tokens.shape
  batch = row_source.shape[0]
  compact = policy.bitwise
  ends = decode_segments(max_new_tokens, segment)

  def cache_width(end):  # a bitwise cache spans whole key blocks, which its attention reads
    width = prompt_len + end
    return -(-width // BITWISE_KEY_BLOCK) * BITWISE_KEY_BLOCK if compact else width

  def slot_mask(mask):  # [rows, P] -> [rows, cache_width(max_new_tokens)]
    rows = mask.shape[0]
    return (jnp.ones((rows, cache_width(max_new_tokens)), jnp.int32) if compact else
            jnp.concatenate([mask, jnp.ones((rows, max_new_tokens), jnp.int32)], axis=1))

  cache = init_cache(config, distinct, cache_width(ends[0]), policy)
  hidden, cache = forward_cached(config, params, prompt_tokens, default_positions(prompt_mask),
                                 cache, jnp.asarray(0, jnp.int32),
                                 slot_mask(prompt_mask)[:, :cache_width(ends[0])], policy=policy,
                                 with_head=False)
  # The LM head only after each prompt's last token (the last column, or right-aligned rows'
  # last real token), not over every prompt position.
  last = (jnp.sum(prompt_mask, axis=1) - 1 if compact else
          jnp.full((distinct,), prompt_len - 1)).astype(jnp.int32)
  hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [U, 1, D]
  prompt_mask = prompt_mask[row_source]
  hidden, cache = jax.tree_util.tree_map(lambda x: x[row_source], (hidden, cache))
  logits = lm_head_logits(hidden, lm_head_weight(config, policy, params), policy)
  next_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B]
  kv_mask = slot_mask(prompt_mask)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  grouped = 0 < row_group < batch
  if grouped and batch % row_group:
    raise ValueError(f"row_group={row_group} must divide the {batch} decoded rows")

  def sample(logits_last, key, first_row):
    processed = process_logits(logits_last, temperature=temperature, top_p=top_p, top_k=top_k,
                               use_top_p=use_top_p)
    if row_offset or grouped:  # the noise of rows [first_row, first_row + R) of the batch
      noise = jax.random.gumbel(key, (row_offset + batch, processed.shape[1]), processed.dtype)
      noise = jax.lax.dynamic_slice_in_dim(noise, row_offset + first_row, processed.shape[0])
      token = jnp.argmax(processed + noise, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
    if compact:
      return token, logprobs_from_logits(logits_last, token, dtype=policy.logsoftmax_dtype,
                                         temperature=logp_temperature)
    logp_all = jax.nn.log_softmax(processed, axis=-1)
    return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]

  def make_body(window_mask, next_position, first_row):
    def body(carry):
      step, cache, logits_last, done, out_tokens, out_logp, out_mask, rng = carry
      rng, key = jax.random.split(rng)
      token, logp = sample(logits_last, key, first_row)
      active = ~done
      out_tokens = out_tokens.at[:, step].set(jnp.where(active, token, 0))
      out_logp = out_logp.at[:, step].set(jnp.where(active, logp, 0.0))
      out_mask = out_mask.at[:, step].set(active.astype(jnp.int32))
      done = done | (active & jnp.any(token[:, None] == eos[None, :], axis=1))
      write_slot = next_position + step if compact else prompt_len + step
      new_logits, cache = forward_cached(config, params, token[:, None],
                                         (next_position + step)[:, None], cache,
                                         write_slot, window_mask, policy=policy)
      return step + 1, cache, new_logits[:, -1], done, out_tokens, out_logp, out_mask, rng
    return body

  def make_cond(end):
    def cond(carry):
      step, done = carry[0], carry[3]
      return (step < end) & ~jnp.all(done)
    return cond

  def decode_rows(cache, logits_last, next_position, kv_mask, first_row):
    """The segmented decode loop of R rows (rows [first_row, first_row + R) of the batch)."""
    rows = logits_last.shape[0]
    carry = (jnp.asarray(0, jnp.int32), cache, logits_last, jnp.zeros((rows,), bool),
             jnp.zeros((rows, max_new_tokens), jnp.int32),
             jnp.zeros((rows, max_new_tokens), jnp.float32),
             jnp.zeros((rows, max_new_tokens), jnp.int32), rng)
    for j, end in enumerate(ends):
      width = cache_width(end)
      if j:  # grow the cache to this segment's window
        carry = carry[:1] + (grow_cache(carry[1], width, policy),) + carry[2:]
      carry = jax.lax.while_loop(
          make_cond(end), make_body(kv_mask[:, :width], next_position, first_row), carry)
    _, _, _, done, out_tokens, out_logp, out_mask, _ = carry
    return out_tokens, out_logp, out_mask, done

  rows_state = (cache, logits[:, -1], next_position, kv_mask)
  if not grouped:
    return decode_rows(*rows_state, jnp.asarray(0, jnp.int32))
  groups = batch // row_group
  per_group = jax.tree_util.tree_map(
      lambda x: x.reshape((groups, row_group) + x.shape[1:]), rows_state)
  outs = jax.lax.map(lambda xs: decode_rows(*xs),
                     per_group + (jnp.arange(groups, dtype=jnp.int32) * row_group,))
  return jax.tree_util.tree_map(lambda x: x.reshape((batch,) + x.shape[2:]), outs)


def right_align(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded int [B, P] tokens and mask -> the same rows with the real tokens first."""
  lengths = mask.sum(axis=1)
  columns = (np.arange(tokens.shape[1])[None, :] + tokens.shape[1] - lengths[:, None]
             ) % tokens.shape[1]
  return np.take_along_axis(tokens, columns, axis=1), np.take_along_axis(mask, columns, axis=1)


def pad_prompts(prompt_token_ids: Sequence[Sequence[int]], n: int, *, prompt_bucket: int = 16,
                batch_bucket: int = 1, min_rows: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Repeats each prompt n times (grouped) and left-pads to a bucketed length.

  Returns prompt_tokens int32 [B', P], prompt_mask int32 [B', P], prompt_index int32 [B] where
  B = len(prompts) * n and B' >= B is B rounded up to `batch_bucket`, and to at least
  `min_rows` (extra rows are copies).
  """
  if not prompt_token_ids:
    raise ValueError("No prompts given")
  if n < 1:
    raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
  for i, p in enumerate(prompt_token_ids):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token")
  prompt_index = np.repeat(np.arange(len(prompt_token_ids), dtype=np.int32), n)
  rows = len(prompt_index)
  padded_rows = max(_round_up(rows, batch_bucket), min_rows)
  width = _round_up(max(len(p) for p in prompt_token_ids), prompt_bucket)
  tokens = np.zeros((padded_rows, width), np.int32)
  mask = np.zeros((padded_rows, width), np.int32)
  for row in range(padded_rows):
    prompt = prompt_token_ids[prompt_index[min(row, rows - 1)]]
    tokens[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1
  return tokens, mask, prompt_index


def generate(config: ModelConfig, params, prompt_token_ids: Sequence[Sequence[int]], *,
             policy: DtypePolicy, n: int, sampling: SamplingConfig, rng: jax.Array,
             eos_token_ids: Sequence[int] | None = None, prompt_bucket: int = 16,
             batch_bucket: int = 1, decode_segment: int = 64, decode_row_group: int = 0,
             row_offset: int = 0) -> Rollout:
  """Samples `n` responses per prompt with the in-process JAX engine.

  Runs in the sampler's dtype policy (weights rounded to `policy.param_dtype`, activations and the
  KV cache's values in `policy.compute_dtype`; the cache's storage: `decoder.cache_dtype`).
  `logp_sampler` is the log-probability of each sampled token under the distribution it was drawn
  from: softmax of the temperature-scaled logits, renormalised over the top-k / top-p set when
  those are on. Deterministic for a fixed `rng`.

  Args:
    prompt_token_ids: list of token-id lists (unpadded).
    eos_token_ids: tokens that end a response (default: the config's eos ids).
    decode_segment: decode steps per KV-cache window (see `_decode`; 0: the whole response
      budget from the first step). Each segment is one more while loop to compile.
    decode_row_group: decode the rows in groups of this many, one group after the other (see
      `_decode`; 0: all at once); more rows than one group are padded to a multiple of it. The
      tokens are the same; on a CPU a group's smaller KV cache stays in the CPU's caches. Ignored
      under a bitwise policy, whose dots need BITWISE_MIN_ROWS rows.
    row_offset: the index of this call's first row in a larger batch sampled with the same `rng`
      (a process's share of a step, `rl_fp16.distributed`): the rows get the tokens they would
      get there. Needs `jax_threefry_partitionable` (JAX's default), under which a row's random
      bits depend on its index and not on the batch size.
  Returns:
    A `Rollout` with len(prompts) * n rows grouped by prompt.
  """
  longest = max((len(p) for p in prompt_token_ids), default=0)
  if longest + sampling.max_new_tokens > config.max_position_embeddings:
    raise ValueError(
        f"A prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds the "
        f"model's max_position_embeddings={config.max_position_embeddings}; shorten the prompt "
        "or the response budget")
  vocab = config.vocab_size
  for i, p in enumerate(prompt_token_ids):
    bad = [t for t in p if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"Prompt {i} has token ids {bad[:5]} outside [0, {vocab})")
  eos = tuple(int(t) for t in (config.eos_token_ids if eos_token_ids is None else eos_token_ids))
  if row_offset < 0:
    raise ValueError(f"row_offset must be >= 0, got {row_offset}")
  if decode_row_group < 0:
    raise ValueError(f"decode_row_group must be >= 0 (0: all rows at once), got {decode_row_group}")
  row_group = 0 if policy.bitwise or len(prompt_token_ids) * n <= decode_row_group else (
      decode_row_group)
  if row_offset and not jax.config.jax_threefry_partitionable:
    raise ValueError("row_offset > 0 needs jax_threefry_partitionable=True (JAX's default): "
                     "without it a row's random bits depend on the batch size")
  if policy.bitwise and (sampling.top_k or sampling.top_p < 1.0):
    raise ValueError(f"A bitwise policy samples from the full softmax that token_logprobs "
                     f"computes; got top_k={sampling.top_k}, top_p={sampling.top_p} (allowed: "
                     "top_k=0, top_p=1.0)")
  prompt_tokens, prompt_mask, prompt_index = pad_prompts(
      prompt_token_ids, n, prompt_bucket=prompt_bucket,
      batch_bucket=math.lcm(batch_bucket, row_group) if row_group else batch_bucket,
      min_rows=BITWISE_MIN_ROWS if policy.bitwise else 1)
  rows = len(prompt_index)
  # One prefill per distinct prompt (padding rows copy the last row's).
  decode_tokens, decode_mask = prompt_tokens[:rows:n], prompt_mask[:rows:n]
  row_source = prompt_index[np.minimum(np.arange(len(prompt_tokens)), rows - 1)]
  if policy.bitwise:  # the trainer's compacted layout, in at least BITWISE_MIN_ROWS tokens
    decode_tokens, decode_mask = right_align(decode_tokens, decode_mask)
    short = bitwise_min_rows(decode_tokens.shape[1]) - len(decode_tokens)
    if short > 0:
      decode_tokens, decode_mask = (np.concatenate([x, np.repeat(x[-1:], short, axis=0)])
                                    for x in (decode_tokens, decode_mask))
  out_tokens, out_logp, out_mask, hit_eos = _decode(
      config, policy, params, jnp.asarray(decode_tokens), jnp.asarray(decode_mask),
      jnp.asarray(row_source), rng,
      jnp.asarray(sampling.temperature, jnp.float32), jnp.asarray(sampling.top_p, jnp.float32),
      max_new_tokens=sampling.max_new_tokens, top_k=sampling.top_k,
      use_top_p=sampling.top_p < 1.0, eos_ids=eos, segment=decode_segment,
      row_offset=int(row_offset), row_group=row_group,
      logp_temperature=float(sampling.temperature) if policy.bitwise else None)
  out_tokens, out_logp, out_mask, hit_eos = jax.device_get((out_tokens, out_logp, out_mask,
                                                            hit_eos))
  return Rollout(
      prompt_tokens=prompt_tokens[:rows],
      prompt_mask=prompt_mask[:rows],
      response_tokens=np.asarray(out_tokens[:rows], np.int32),
      response_mask=np.asarray(out_mask[:rows], np.int32),
      logp_sampler=np.asarray(out_logp[:rows], np.float32),
      finish_reasons=tuple(FINISH_EOS if e else FINISH_LENGTH for e in hit_eos[:rows]),
      prompt_index=prompt_index,
  )
