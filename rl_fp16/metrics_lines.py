"""The lines of a run's metrics.jsonl: what a step and a metric value may be, and reading the
lines back (a line cut off by a kill is dropped). Used by `rl_fp16.results`' writer and readers.
"""

from __future__ import annotations

import gzip
import json
import operator
import warnings
from typing import Any

import numpy as np

STEP_KEY = "step"




def as_step(step: Any) -> int:
  """Returns `step` (Python int, NumPy or JAX integer scalar) as a non-negative int."""
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"step must be an integer, got the bool {step!r}")
  try:
    value = operator.index(step)
  except TypeError:
    raise TypeError(
        f"step must be an integer, got {step!r} of type {type(step).__name__}") from None
  if value < 0:
    raise ValueError(f"step must be >= 0, got {value}")
  return value


def as_metric_float(name: str, value: Any) -> float:
  """Returns a scalar metric value (Python, NumPy or JAX; bool or number) as a Python float."""
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f"metric {name!r} must be a number, got {value!r}")
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
  if array.dtype.kind in "cOUSMm":
    raise TypeError(f"metric {name!r} must be a real number, got {value!r} of dtype {array.dtype}")
  try:
    return float(array.reshape(()))
  except (TypeError, ValueError) as e:
    raise TypeError(f"metric {name!r} must be a real number, got {value!r}") from e


def scan(path: str) -> tuple[list[tuple[int, str]], bool]:
  """Reads metrics.jsonl as (step, raw line) pairs, in file order.

  Returns:
    (entries, needs_repair): `needs_repair` is True when the last line was cut off (it is dropped,
    with a warning) or lacks its newline, so that appending to the file as is would corrupt it.
  Raises:
    ValueError: a line other than the last is not a JSON object with an integer "step".
  """
  with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  needs_repair = bool(text) and not text.endswith("\n")
  entries = []
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if index == len(lines) - 1:  # The final, unterminated line: a write cut off by a kill.
        warnings.warn(f"{path}:{index + 1}: dropping a truncated last line {line[:80]!r}")
        needs_repair = True
        break
      raise ValueError(f"{path}:{index + 1}: not valid JSON ({e}): {line[:80]!r}") from e
    step = record.get(STEP_KEY) if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
      raise ValueError(f"{path}:{index + 1}: expected a JSON object with an integer "
                       f"{STEP_KEY!r}, got {line[:80]!r}")
    entries.append((step, line))
  return entries, needs_repair
