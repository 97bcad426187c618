"""The vLLM sampler's I/O: token-id prompts -> vLLM requests, vLLM's outputs -> one `Rollout`.

Row ``i * n + j`` of the rollout is prompt ``i``'s sample ``j``, drawn with the integer seed
``seeds.sampler_row(seed, i * n + j)`` (vLLM adds the sample index to a request's seed), so
results do not depend on batching and no two (base seed, row) pairs share a generator.
Greedy decoding sends each prompt ``n`` times with ``n = 1`` (vLLM refuses ``n > 1`` when greedy)
and its ``logp_sampler`` is 0 (a point mass).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import vllm

from rl_fp16 import seeds
from rl_fp16.sampling.rollout import FINISH_EOS, FINISH_LENGTH, Rollout

# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


def single_eos_token_id(eos_token_ids: Sequence[int] | None) -> int | None:
  """The one token id a response stops on (a request takes one), or None for none."""
  eos = list(eos_token_ids or [])
  if len(eos) > 1:
    raise ValueError(f"The vLLM engine stops on one eos token id, got {eos}")
  return eos[0] if eos else None


def _copies_and_samples(n: int, temperature: float) -> tuple[int, int]:
  """(requests per prompt, samples per request)."""
  return (n, 1) if temperature < GREEDY_TEMPERATURE else (1, n)


def build_requests(prompts: Sequence[list[int]], *, n: int, max_new_tokens: int,
                   temperature: float, seed: int | None, eos_token_id: int | None
                   ) -> tuple[list[dict[str, Any]], list[vllm.SamplingParams]]:
  """The requests and their sampling parameters for ``llm.generate`` (checked prompts)."""
  copies, per_request = _copies_and_samples(n, temperature)
  params = [
      vllm.SamplingParams(
          n=per_request,
          max_tokens=max_new_tokens,
          temperature=temperature,
          # vLLM adds the sample index j to a request's seed.
          seed=None if seed is None else seeds.sampler_row(seed, i * n),
          logprobs=0,  # The sampled token only.
          flat_logprobs=True,
          detokenize=False,
          # EOS is the caller's: no tokenizer or generation-config EOS stops a response.
          ignore_eos=True,
          stop_token_ids=None if eos_token_id is None else [eos_token_id],
      ) for i in range(len(prompts)) for _ in range(copies)
  ]
  requests = [{"prompt_token_ids": p} for p in prompts for _ in range(copies)]
  return requests, params


def to_rollout(outputs: Sequence[Any], prompts: Sequence[list[int]], *, n: int,
               max_new_tokens: int, temperature: float, eos_token_id: int | None
               ) -> Rollout:
  """The `Rollout` of `build_requests`' outputs: left-padded prompts of the longest prompt's
  length, responses right-padded to ``max_new_tokens``, ``logp_sampler`` from vLLM."""
  copies, per_request = _copies_and_samples(n, temperature)
  if len(outputs) != len(prompts) * copies:
    raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts) * copies} "
                       "requests")
  completions = []
  for k, output in enumerate(outputs):
    samples = sorted(output.outputs, key=lambda c: c.index)
    if len(samples) != per_request:
      raise RuntimeError(f"vLLM returned {len(samples)} samples for request {k}, expected "
                         f"{per_request}")
    completions += samples

  greedy = temperature < GREEDY_TEMPERATURE
  b, p_len, t_len = len(prompts) * n, max(len(p) for p in prompts), max_new_tokens
  prompt_tokens = np.zeros((b, p_len), np.int32)
  prompt_mask = np.zeros((b, p_len), np.int32)
  response_tokens = np.zeros((b, t_len), np.int32)
  response_mask = np.zeros((b, t_len), np.int32)
  logp_sampler = np.zeros((b, t_len), np.float32)
  finish_reasons = []
  for row, completion in enumerate(completions):
    prompt = prompts[row // n]
    prompt_tokens[row, p_len - len(prompt):] = prompt
    prompt_mask[row, p_len - len(prompt):] = 1
    tokens = list(completion.token_ids)
    if not 0 < len(tokens) <= t_len:
      raise RuntimeError(f"vLLM returned {len(tokens)} tokens for row {row}, expected 1 to "
                         f"{t_len}")
    response_tokens[row, :len(tokens)] = tokens
    response_mask[row, :len(tokens)] = 1
    if not greedy:
      logp_sampler[row, :len(tokens)] = _sampled_logprobs(completion.logprobs, tokens, row)
    finish_reasons.append(_finish_reason(completion, tokens, eos_token_id, row))
  return Rollout(
      prompt_tokens=prompt_tokens,
      prompt_mask=prompt_mask,
      response_tokens=response_tokens,
      response_mask=response_mask,
      logp_sampler=logp_sampler,
      finish_reasons=tuple(finish_reasons),
      prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), n),
  )


def _sampled_logprobs(logprobs: Any, tokens: list[int], row: int) -> list[float]:
  """The sampled token's log-prob at each position of a completion (``flat_logprobs`` layout)."""
  if logprobs is None or len(logprobs) != len(tokens):
    raise RuntimeError(f"vLLM returned no log-prob for some tokens of row {row}")
  values = []
  for t, token in enumerate(tokens):
    for k in range(logprobs.start_indices[t], logprobs.end_indices[t]):
      if logprobs.token_ids[k] == token:
        values.append(logprobs.logprobs[k])
        break
    else:
      raise RuntimeError(f"vLLM returned no log-prob for token {token} at row {row}, step {t}")
  return values


def _finish_reason(completion: Any, tokens: list[int], eos_token_id: int | None,
                   row: int) -> str:
  if completion.finish_reason == "length":
    return FINISH_LENGTH
  if completion.finish_reason == "stop" and eos_token_id is not None and tokens[-1] == eos_token_id:
    return FINISH_EOS
  raise RuntimeError(f"row {row} finished with vLLM reason {completion.finish_reason!r} "
                     f"(stop_reason {completion.stop_reason!r}); expected EOS or length")
