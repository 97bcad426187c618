"""Glue between a verifiable task, its tokenizer and the engines: prompts, SFT batches, rewards."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rl_fp16.data import perfectible, synthetic
from rl_fp16.data.tokenizer import CharTokenizer
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.sampling.rollout import FINISH_LENGTH, Rollout


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """The chained-arithmetic task with its tokenizer."""

  config: synthetic.SyntheticTaskConfig
  tokenizer: CharTokenizer

  def problems(self, num: int, seed: int) -> list[synthetic.Problem]:
    return synthetic.generate_problems(self.config, num, seed=seed)

  def prompt_ids(self, problems: Sequence[synthetic.Problem]) -> list[list[int]]:
    """<bos> + prompt, as token ids."""
    return [self.tokenizer.encode(p.prompt, add_bos=True) for p in problems]

  def sft_batch(self, problems: Sequence[synthetic.Problem], seq_len: int) -> dict[str, np.ndarray]:
    """tokens / attention_mask / loss_mask int32 [B, seq_len]: <bos> prompt solution <eos>,
    right-padded; the loss covers the solution and <eos>."""
    batch = len(problems)
    tokens = np.zeros((batch, seq_len), np.int32)
    attention_mask = np.zeros((batch, seq_len), np.int32)
    loss_mask = np.zeros((batch, seq_len), np.int32)
    for row, problem in enumerate(problems):
      prompt = self.tokenizer.encode(problem.prompt, add_bos=True)
      response = self.tokenizer.encode(problem.solution, add_eos=True)
      ids = prompt + response
      if len(ids) > seq_len:
        raise ValueError(f"Problem of {len(ids)} tokens does not fit seq_len={seq_len}; raise "
                         "seq_len or lower the task's max_terms")
      tokens[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
      loss_mask[row, len(prompt):len(ids)] = 1
    return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}

  def decode_responses(self, rollout: Rollout) -> list[str]:
    texts = []
    for row in range(rollout.batch_size):
      ids = rollout.response_tokens[row, :rollout.response_lengths[row]]
      texts.append(self.tokenizer.decode([int(i) for i in ids if i < self.tokenizer.vocab_size]))
    return texts

  def rewards(self, problems: Sequence[synthetic.Problem], rollout: Rollout) -> np.ndarray:
    """float32 [B]: 1 for a correct final answer; truncated responses score 0.

    Row i of the rollout answers `problems[rollout.prompt_index[i]]`.
    """
    texts = self.decode_responses(rollout)
    return np.array([
        synthetic.score(problems[rollout.prompt_index[row]], texts[row],
                        truncated=rollout.finish_reasons[row] == FINISH_LENGTH)
        for row in range(rollout.batch_size)], np.float32)

  def _longest_problem(self) -> synthetic.Problem:
    return synthetic.make_problem([self.config.max_operand] * self.config.max_terms,
                                  [self.config.operators[0]] * (self.config.max_terms - 1),
                                  self.config.modulus)

  def max_sequence_len(self) -> int:
    """Longest <bos> prompt solution <eos> this task config can produce, in tokens."""
    worst = self._longest_problem()
    return len(self.tokenizer.encode(worst.prompt + worst.solution)) + 2

  def max_prompt_len(self) -> int:
    """Longest <bos> prompt (`prompt_ids`) this task config can produce, in tokens."""
    return len(self.prompt_ids([self._longest_problem()])[0])

  def pass_rates_subset(self, engine, problems: Sequence[synthetic.Problem], *, k: int,
                        low: float, high: float, max_new_tokens: int, seed: int,
                        batch_size: int = 32) -> tuple[list[synthetic.Problem], list[float]]:
    """The paper's perfectible subset: problems whose pass rate over k samples of `engine` lies
    in [low, high], with those pass rates."""
    calls = iter(range(1_000_000))
    by_prompt = {}
    for problem in problems:
      by_prompt.setdefault(problem.prompt, problem)

    def sample_fn(prompt_texts: list[str], num: int):
      batch = [by_prompt[text] for text in prompt_texts]
      rollout = engine.generate(self.prompt_ids(batch), n=num, seed=seed + next(calls),
                                sampling=SamplingConfig(max_new_tokens=max_new_tokens))
      texts = self.decode_responses(rollout)
      truncated = [r == FINISH_LENGTH for r in rollout.finish_reasons]
      return [list(zip(texts[i * num:(i + 1) * num], truncated[i * num:(i + 1) * num]))
              for i in range(len(batch))]

    def score_fn(problem, response):
      text, truncated = response
      return synthetic.score(problem, text, truncated=truncated)

    return perfectible.build_perfectible_subset(problems, sample_fn, score_fn, k=k, low=low,
                                                high=high, batch_size=batch_size)


def problem_from_record(record: dict) -> synthetic.Problem:
  """A synthetic `Problem` from a JSON record written by `perfectible.write_subset`."""
  return synthetic.Problem(prompt=record["prompt"], answer=str(record["answer"]),
                           solution=record["solution"], terms=tuple(record["terms"]),
                           operators=tuple(record["operators"]), modulus=record.get("modulus"))


@dataclasses.dataclass(frozen=True)
class MathTask:
  """MATH-style problems: a prompt template, a Hugging Face tokenizer and the math-verify reward.

  Attributes:
    tokenizer: a `transformers` tokenizer (the policy model's).
    template: "r1_distill", "qwen_math" or "plain" (`rl_fp16.rewards.math.apply_template`).
    max_prompt_tokens: prompts are refused above this length (a clear error, not a truncation).
  """

  tokenizer: Any
  template: str = "r1_distill"
  max_prompt_tokens: int = 1024

  def prompt_ids(self, problems: Sequence[Any]) -> list[list[int]]:
    from rl_fp16.rewards.math import apply_template  # pylint: disable=g-import-not-at-top

    ids = []
    for problem in problems:
      text = apply_template(self.template, problem.question)
      # The templates carry their own special tokens (e.g. R1's <｜begin▁of▁sentence｜>).
      tokens = self.tokenizer.encode(text, add_special_tokens=False)
      if len(tokens) > self.max_prompt_tokens:
        raise ValueError(f"Problem {problem.uid or problem.question[:40]!r} has a prompt of "
                         f"{len(tokens)} tokens > max_prompt_tokens={self.max_prompt_tokens}")
      ids.append(tokens)
    return ids

  def decode_responses(self, rollout: Rollout) -> list[str]:
    texts = []
    for row in range(rollout.batch_size):
      ids = rollout.response_tokens[row, :rollout.response_lengths[row]]
      texts.append(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))
    return texts

  def rewards(self, problems: Sequence[Any], rollout: Rollout) -> np.ndarray:
    """float32 [B]: math-verify on the last boxed answer; truncated responses score 0."""
    from rl_fp16.rewards.math import math_reward  # pylint: disable=g-import-not-at-top

    texts = self.decode_responses(rollout)
    return np.array([
        math_reward(texts[row], problems[rollout.prompt_index[row]].answer,
                    truncated=rollout.finish_reasons[row] == FINISH_LENGTH)
        for row in range(rollout.batch_size)], np.float32)

  def max_sequence_len(self) -> int:
    return self.max_prompt_tokens

  def max_prompt_len(self) -> int:
    """Longest prompt `prompt_ids` returns (longer ones are refused): `max_prompt_tokens`."""
    return self.max_prompt_tokens
