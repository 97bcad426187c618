"""MATH-style prompts and the math-verify reward (the paper's MATH path).

Templates (`apply_template(name, question)`):
  - ``r1_distill``: DeepSeek-R1-Distill chat format, ending inside an open ``<think>`` block. The
    text begins with the model's BOS string, so tokenize it with ``add_special_tokens=False``.
  - ``qwen_math``: the Qwen2.5-Math chat format with the step-by-step system prompt.
  - ``plain``: ``Question: ...\\nAnswer:`` for base models without a chat format.

Reward (`math_reward`): the content of the last ``\\boxed{...}`` in the response (nested braces
handled) is parsed and compared to the reference with math-verify (``parse`` + ``verify``);
1.0 if equivalent, else 0.0; a truncated response, or one without a box, scores 0.0.

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the
main thread. `math_reward` uses those timeouts in the main thread and turns them off elsewhere
(worker threads of a reward pool); there, and everywhere, boxed answers longer than
``max_answer_chars`` score 0 without being parsed, which keeps sympy away from the inputs most
likely to stall it.
"""

from __future__ import annotations

import threading

R1_DISTILL = "r1_distill"
QWEN_MATH = "qwen_math"
PLAIN = "plain"

_STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: dict[str, str] = {
    R1_DISTILL: ("<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>{question}\n"
                 + _STEP_BY_STEP + "<\uff5cAssistant\uff5c><think>\n"),
    QWEN_MATH: ("<|im_start|>system\n" + _STEP_BY_STEP + "<|im_end|>\n"
                "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"),
    PLAIN: "Question: {question}\nAnswer:",
}

_BOX_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_TIMEOUT_S = 5
DEFAULT_MAX_ANSWER_CHARS = 1000


def template_names() -> list[str]:
  return sorted(TEMPLATES)


def apply_template(name: str, question: str) -> str:
  """The prompt text for `question` in template `name` (see `template_names()`)."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown prompt template {name!r}; allowed: {', '.join(template_names())}")
  # str.replace, not str.format: questions are full of LaTeX braces.
  return TEMPLATES[name].replace("{question}", question)


def _braced_content(text: str, open_index: int) -> str | None:
  """Content of the brace group opening at `text[open_index]`, or None if it never closes."""
  depth = 0
  for i in range(open_index, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[open_index + 1:i]
  return None


def extract_last_boxed(text: str) -> str | None:
  """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in `text`, else None.

  Nested braces are matched: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. The form
  ``\\boxed 5`` (no braces) gives ``5``. A box left open (cut-off text) does not count.
  """
  best_start, best = -1, None
  for command in _BOX_COMMANDS:
    start = text.rfind(command)
    while start != -1:
      rest = start + len(command)
      content = None
      if rest < len(text) and text[rest] == "{":
        content = _braced_content(text, rest)
      elif rest < len(text) and text[rest] == " ":
        token = text[rest:].split(maxsplit=1)
        content = token[0].rstrip("$.") if token else None
      if content is not None:
        if start > best_start:
          best_start, best = start, content.strip()
        break
      start = text.rfind(command, 0, start)
  return best


def _timeout_for_this_thread(timeout_s: int | None) -> int | None:
  # signal.alarm only works in the main thread; elsewhere math-verify must run without it.
  if timeout_s is None or threading.current_thread() is not threading.main_thread():
    return None
  return int(timeout_s)


def verify_answer(predicted: str, reference: str, *, timeout_s: int | None = DEFAULT_TIMEOUT_S
                  ) -> bool:
  """Whether the answer strings `predicted` and `reference` are equivalent under math-verify."""
  import math_verify  # pylint: disable=g-import-not-at-top  (sympy import is slow; load lazily)

  timeout = _timeout_for_this_thread(timeout_s)
  gold = math_verify.parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
  pred = math_verify.parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
  if not gold or not pred:
    return False
  return bool(math_verify.verify(gold, pred, timeout_seconds=timeout))


def math_reward(response: str, reference_answer: str, *, truncated: bool,
                timeout_s: int | None = DEFAULT_TIMEOUT_S,
                max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> float:
  """1.0 if the last boxed answer of `response` equals `reference_answer`, else 0.0.

  Args:
    response: the generated text after the prompt.
    reference_answer: the ground-truth answer, LaTeX without the box (e.g. ``\\frac{1}{2}``).
    truncated: True when generation hit the length limit; such responses score 0.0.
    timeout_s: math-verify's per-call timeout in the main thread (None: no timeout).
    max_answer_chars: boxed answers longer than this score 0.0 without being parsed.
  """
  if truncated:
    return 0.0
  predicted = extract_last_boxed(response)
  if not predicted or len(predicted) > max_answer_chars:
    return 0.0
  reference = str(reference_answer).strip()
  if not reference:
    raise ValueError("reference_answer is empty; every problem needs a ground-truth answer")
  return 1.0 if verify_answer(predicted, reference, timeout_s=timeout_s) else 0.0
