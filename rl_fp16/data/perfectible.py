"""Perfectible-subset construction (the paper's sanity-test set).

A problem is "perfectible" when the starting policy solves it sometimes but not always: its pass
rate over k samples lies in [low, high] (the paper: 40 samples, 20%-80%). On that subset a sound RL
algorithm should push the training reward above 95%.

The sampler is injected: `sample_fn(prompts, k)` returns k responses per prompt, so any engine
(the JAX sampler, vLLM, a fake in tests) plugs in. `score_fn(problem, response)` returns the reward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rl_fp16 import fileio

SampleFn = Callable[[list[str], int], Sequence[Sequence[Any]]]
ScoreFn = Callable[[Any, Any], float]
PASS_RATE_FIELD = "pass_rate"
_EPS = 1e-9  # Inclusive bounds despite float rounding of low/high.


def default_prompt(problem: Any) -> str:
  """`problem.prompt` (attribute) or `problem["prompt"]` (mapping)."""
  if isinstance(problem, Mapping) and "prompt" in problem:
    return problem["prompt"]
  prompt = getattr(problem, "prompt", None)
  if isinstance(prompt, str):
    return prompt
  raise ValueError(f"problem of type {type(problem).__name__} has no 'prompt'; pass prompt_fn "
                   "(e.g. lambda p: apply_template('r1_distill', p.question))")


def compute_pass_rates(problems: Sequence[Any], sample_fn: SampleFn, score_fn: ScoreFn, *, k: int,
                       prompt_fn: Callable[[Any], str] | None = None,
                       batch_size: int | None = None) -> list[float]:
  """Mean score of k samples for every problem, in order.

  Args:
    problems: any problem objects; `prompt_fn` turns one into its prompt text.
    sample_fn: `sample_fn(prompts, k)` -> one sequence of k responses per prompt.
    score_fn: `score_fn(problem, response)` -> reward in [0, 1].
    k: samples per problem.
    prompt_fn: problem -> prompt text; default `default_prompt`.
    batch_size: prompts per `sample_fn` call; None sends all at once.
  """
  if k < 1:
    raise ValueError(f"k={k}; must be >= 1")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; must be >= 1 or None")
  prompt_fn = prompt_fn or default_prompt
  step = batch_size or max(len(problems), 1)
  rates = []
  for start in range(0, len(problems), step):
    batch = problems[start:start + step]
    prompts = [prompt_fn(p) for p in batch]
    responses = sample_fn(prompts, k)
    if len(responses) != len(batch):
      raise ValueError(f"sample_fn returned {len(responses)} response lists for {len(batch)} "
                       "prompts; expected one list per prompt")
    for i, (problem, samples) in enumerate(zip(batch, responses)):
      if len(samples) != k:
        raise ValueError(f"sample_fn returned {len(samples)} responses for prompt {start + i}; "
                         f"expected k={k}")
      rates.append(sum(float(score_fn(problem, r)) for r in samples) / k)
  return rates


def select_perfectible(problems: Sequence[Any], pass_rates: Sequence[float], *, low: float = 0.2,
                       high: float = 0.8) -> tuple[list[Any], list[float]]:
  """The problems whose pass rate lies in [low, high], with their pass rates."""
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"low={low}, high={high}; need 0 <= low <= high <= 1")
  if len(problems) != len(pass_rates):
    raise ValueError(f"{len(problems)} problems but {len(pass_rates)} pass rates")
  kept = [(p, r) for p, r in zip(problems, pass_rates) if low - _EPS <= r <= high + _EPS]
  return [p for p, _ in kept], [r for _, r in kept]


def build_perfectible_subset(problems: Sequence[Any], sample_fn: SampleFn, score_fn: ScoreFn, *,
                             k: int, low: float = 0.2, high: float = 0.8,
                             prompt_fn: Callable[[Any], str] | None = None,
                             batch_size: int | None = None) -> tuple[list[Any], list[float]]:
  """Samples k responses per problem and keeps those with pass rate in [low, high].

  Returns:
    (subset, pass_rates): the kept problems in their original order, and each one's pass rate.
  """
  if not 0.0 <= low <= high <= 1.0:  # Fail before sampling.
    raise ValueError(f"low={low}, high={high}; need 0 <= low <= high <= 1")
  rates = compute_pass_rates(problems, sample_fn, score_fn, k=k, prompt_fn=prompt_fn,
                             batch_size=batch_size)
  return select_perfectible(problems, rates, low=low, high=high)


def _as_record(problem: Any) -> dict[str, Any]:
  if dataclasses.is_dataclass(problem) and not isinstance(problem, type):
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    metadata = fields.pop("metadata", None)  # MathProblem: flatten, as its loaders expect.
    if isinstance(metadata, Mapping):
      fields.update(metadata)
    return fields
  if isinstance(problem, Mapping):
    return dict(problem)
  raise TypeError(f"cannot write a problem of type {type(problem).__name__}; expected a dataclass "
                  "or a mapping")


def write_subset(path: str | os.PathLike[str], subset: Sequence[Any],
                 pass_rates: Sequence[float]) -> pathlib.Path:
  """Writes one JSON object per problem (its fields plus "pass_rate"), atomically.

  The file appears complete or not at all (temp file in the same directory, then rename).
  """
  if len(subset) != len(pass_rates):
    raise ValueError(f"{len(subset)} problems but {len(pass_rates)} pass rates")
  path = pathlib.Path(path)
  lines = []
  for problem, rate in zip(subset, pass_rates):
    record = _as_record(problem)
    record[PASS_RATE_FIELD] = float(rate)
    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  fileio.write_text_atomic(path, "".join(lines))
  return path


def read_subset(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[float]]:
  """The records and pass rates written by `write_subset` (records keep their "pass_rate")."""
  path = pathlib.Path(path)
  records, rates = [], []
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      record = json.loads(line)
      if PASS_RATE_FIELD not in record:
        raise ValueError(f"{path}: line {line_no} has no {PASS_RATE_FIELD!r} field")
      records.append(record)
      rates.append(float(record[PASS_RATE_FIELD]))
  return records, rates
