"""A synthetic verifiable reasoning task: chained arithmetic written out step by step.

A problem is a chain of small operands, e.g. ``q: 3+5+2+8+1``; the solution folds it left to right,
one step per operand, and ends with the final-answer line::

    q: 3+5+2+8+1
    3+5=8; 8+2=10; 10+8=18; 18+1=19
    a: 19

The prompt is the first line (newline included); the response is the rest. Every step copies the
running value, finds the next operand in the prompt and does one small operation, so per-step
accuracy compounds over the chain: a tiny model gets short chains right and long ones partly right,
which is the regime where RL has something to improve. The number of operands sets the response
length (character tokens): about 10 tokens per step, so the default 12-28 operands give ~100-270
tokens and ~90 operands give ~1K. `operators` and `modulus` make the task harder or easier.

`score` is the exact verifier: 1.0 when the response ends with the final-answer line holding the
right integer, 0.0 otherwise (no marker, junk after the answer, or a truncated response).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Sequence

from rl_fp16 import fileio

ANSWER_MARKER = "a:"
PROMPT_MARKER = "q:"
STEP_SEPARATOR = "; "
OPERATORS = "+-*"
# Every character a prompt or a solution can contain.
ALPHABET = "0123456789" + OPERATORS + "=;: \naq"

_ANSWER_RE = re.compile(r"(?:^|\n)a: ?(-?\d+)[ \n]*\Z")


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
  """Configuration of the chained-arithmetic task.

  Attributes:
    seed: default seed of `generate_problems`.
    min_terms: fewest operands in a problem (>= 2); the response has `terms - 1` steps.
    max_terms: most operands in a problem (inclusive).
    max_operand: operands are drawn uniformly from [0, max_operand].
    operators: the operators drawn from, uniformly per step; a non-empty subset of "+-*".
    modulus: if set, the running value is reduced modulo this after every step (keeps numbers
      short); required when "*" is an operator.
  """

  seed: int = 0
  min_terms: int = 12
  max_terms: int = 28
  max_operand: int = 9
  operators: str = "+"
  modulus: int | None = None

  def __post_init__(self):
    if self.min_terms < 2:
      raise ValueError(f"min_terms={self.min_terms}; must be >= 2 (one step at least)")
    if self.max_terms < self.min_terms:
      raise ValueError(f"max_terms={self.max_terms} is below min_terms={self.min_terms}")
    if not 1 <= self.max_operand <= 99:
      raise ValueError(f"max_operand={self.max_operand}; allowed: 1 .. 99")
    if not self.operators or set(self.operators) - set(OPERATORS):
      raise ValueError(
          f"operators={self.operators!r}; allowed: a non-empty subset of {OPERATORS!r}")
    if self.modulus is not None and self.modulus < 2:
      raise ValueError(f"modulus={self.modulus}; allowed: None or an integer >= 2")
    if "*" in self.operators and self.modulus is None:
      raise ValueError("operators contain '*' but modulus is None; products grow without bound, "
                       "so set a modulus (e.g. 10)")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task instance.

  Attributes:
    prompt: the question line, e.g. "q: 3+5+2\\n".
    answer: the reference final answer as a decimal string, e.g. "10".
    solution: the reference response (steps and final-answer line), the SFT target.
    terms: the operands.
    operators: the operator between operand i and i + 1 (len(terms) - 1 of them).
    modulus: the modulus the problem was solved under, or None.
  """

  prompt: str
  answer: str
  solution: str
  terms: tuple[int, ...]
  operators: tuple[str, ...]
  modulus: int | None = None


def _apply(value: int, op: str, operand: int, modulus: int | None) -> int:
  if op == "+":
    out = value + operand
  elif op == "-":
    out = value - operand
  elif op == "*":
    out = value * operand
  else:
    raise ValueError(f"operator {op!r}; allowed: {OPERATORS!r}")
  return out % modulus if modulus is not None else out


def _check_chain(terms: Sequence[int], operators: Sequence[str]) -> None:
  if len(terms) < 2:
    raise ValueError(f"need at least 2 terms, got {len(terms)}")
  if len(operators) != len(terms) - 1:
    raise ValueError(f"need len(terms) - 1 = {len(terms) - 1} operators, got {len(operators)}")
  if any(t < 0 for t in terms):
    raise ValueError(f"terms must be non-negative, got {list(terms)}")


def format_prompt(terms: Sequence[int], operators: Sequence[str]) -> str:
  """The prompt line of a chain, e.g. ([3, 5, 2], "++") -> "q: 3+5+2\\n"."""
  _check_chain(terms, operators)
  expr = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(operators, terms[1:]))
  return f"{PROMPT_MARKER} {expr}\n"


def solve(terms: Sequence[int], operators: Sequence[str],
          modulus: int | None = None) -> tuple[str, int]:
  """The step-by-step solution text of a chain and its final value."""
  _check_chain(terms, operators)
  value = terms[0]
  steps = []
  for op, operand in zip(operators, terms[1:]):
    new = _apply(value, op, operand, modulus)
    steps.append(f"{value}{op}{operand}={new}")
    value = new
  return f"{STEP_SEPARATOR.join(steps)}\n{ANSWER_MARKER} {value}", value


def make_problem(terms: Sequence[int], operators: Sequence[str],
                 modulus: int | None = None) -> Problem:
  """A `Problem` from explicit operands and operators."""
  solution, value = solve(terms, operators, modulus)
  return Problem(prompt=format_prompt(terms, operators), answer=str(value), solution=solution,
                 terms=tuple(int(t) for t in terms), operators=tuple(operators), modulus=modulus)


def generate_problems(config: SyntheticTaskConfig, num: int,
                      seed: int | None = None) -> list[Problem]:
  """`num` problems drawn deterministically from `seed` (default `config.seed`).

  The first n problems of a call do not depend on `num`.
  """
  if num < 0:
    raise ValueError(f"num={num}; must be >= 0")
  rng = random.Random(config.seed if seed is None else seed)
  problems = []
  for _ in range(num):
    n = rng.randint(config.min_terms, config.max_terms)
    terms = [rng.randint(0, config.max_operand) for _ in range(n)]
    ops = [rng.choice(config.operators) for _ in range(n - 1)]
    problems.append(make_problem(terms, ops, config.modulus))
  return problems


def extract_answer(response: str) -> str | None:
  """The integer on the final-answer line that ends `response`, or None if there is none."""
  match = _ANSWER_RE.search(response)
  return match.group(1) if match else None


def score(problem_or_answer: Problem | str | int, response: str, *,
          truncated: bool = False) -> float:
  """1.0 if `response` ends with "a: <reference answer>", else 0.0.

  Args:
    problem_or_answer: a `Problem`, or the reference answer itself (str or int).
    response: the generated text after the prompt, special tokens removed.
    truncated: True when generation stopped at the length limit; such responses score 0.
  """
  if truncated:
    return 0.0
  reference = (problem_or_answer.answer if isinstance(problem_or_answer, Problem)
               else str(problem_or_answer)).strip()
  if not re.fullmatch(r"-?\d+", reference):
    raise ValueError(f"reference answer {reference!r} is not an integer; this task's answers are")
  predicted = extract_answer(response)
  if predicted is None:
    return 0.0
  return 1.0 if int(predicted) == int(reference) else 0.0


TASK_CONFIG_FILE = "task_config.json"


def save_task_config(directory: str, config: SyntheticTaskConfig) -> str:
  """Writes `task_config.json` beside a model so that its prompts can be re-created."""
  path = os.path.join(directory, TASK_CONFIG_FILE)
  fileio.write_text_atomic(path, json.dumps(dataclasses.asdict(config), indent=2) + "\n")
  return path


def load_task_config(directory: str) -> SyntheticTaskConfig:
  """Reads the `task_config.json` written by `save_task_config`."""
  path = os.path.join(directory, TASK_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {TASK_CONFIG_FILE} in {directory}")
  with open(path) as f:
    return SyntheticTaskConfig(**json.load(f))
