"""The names a user types (algorithms, advantages, engines, precisions), defined once, JAX-free.

The library modules re-export them (`objectives.ALGORITHMS`, `precision.PRESETS`, ...); the
launchers import this module directly, so that starting a sweep does not import JAX.
"""

from __future__ import annotations

import re

ALGORITHMS = (
    "grpo",
    "grpo_token_tis",
    "grpo_token_mis",
    "grpo_seq_mis",
    "gspo",
    "pg",
    "pg_seq_is",
    "pg_seq_tis",
    "pg_seq_mis",
)
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo")
ENGINES = ("jax", "vllm")
PRESETS = ("fp32", "bf16", "fp16")

# Emulated precision: "e8" = 8 significand bits with float32's exponent range; "e11x5" = 11 bits
# with 5 exponent bits (float16's range, subnormals and overflow to inf).
EMULATED_PRESET = re.compile(r"^e(\d+)(?:x(\d+))?$")
FLOAT32_SIGNIFICAND_BITS = 24
FLOAT32_EXPONENT_BITS = 8


def check_format(significand_bits, exponent_bits) -> None:
  """ValueError unless 1 <= significand_bits <= 24 (or None) and 2 <= exponent_bits <= 8."""
  for name, value, low, high in (
      ("significand_bits", significand_bits, 1, FLOAT32_SIGNIFICAND_BITS),
      ("exponent_bits", exponent_bits, 2, FLOAT32_EXPONENT_BITS)):
    if value is None and name == "significand_bits":
      continue
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise ValueError(f"{name} must be an int in [{low}, {high}] (float32 values are rounded), "
                       f"got {value!r}")


def parse_emulated(name: str) -> tuple[int, int] | None:
  """`"e8"` -> (8, 8), `"e11x5"` -> (11, 5): (significand_bits, exponent_bits); None if not
  `eK[xE]`.

  Raises ValueError for an `eK[xE]` name whose numbers are out of range.
  """
  match = EMULATED_PRESET.match(name)
  if match is None:
    return None
  bits = int(match.group(1))
  exponent_bits = int(match.group(2)) if match.group(2) else FLOAT32_EXPONENT_BITS
  try:
    check_format(bits, exponent_bits)
  except ValueError as e:
    raise ValueError(f"Bad emulated precision {name!r}: {e}") from e
  return bits, exponent_bits


def is_precision_name(name: str) -> bool:
  """True for a preset (`fp32`, `bf16`, `fp16`) or a well-formed emulated name (`e8`, `e11x5`)."""
  try:
    return name in PRESETS or parse_emulated(name) is not None
  except ValueError:
    return False


def precision_pair_parts(name: str) -> tuple[str, str]:
  """`"bf16"` -> ("bf16", "bf16"); `"fp32-e6"` -> ("fp32", "e6"); ValueError for anything else."""
  parts = name.split("-")
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or not all(is_precision_name(p) for p in parts):
    raise ValueError(f"Unknown precision pair {name!r}; allowed: one of {list(PRESETS)} or "
                     f"TRAINER-SAMPLER with each in {list(PRESETS)}, e.g. 'bf16-fp16'; emulated "
                     "'eK' / 'eKxE' on either side, e.g. 'fp32-e6'")
  return parts[0], parts[1]


def check_precisions_and_seeds(precisions, seeds) -> None:
  """ValueError for a bad precision pair name or a seed that is not an int (sweep arguments)."""
  for precision in precisions:
    try:
      precision_pair_parts(precision)
    except ValueError as e:
      raise ValueError(f"precision {precision!r}: {e}") from None
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"seeds must be integers, got {list(seeds)}")


def config_list(value, field: str, *, item: type = str) -> tuple:
  """A config field that lists names (or ints, `item=int`) as a clean, non-empty tuple.

  Config files hold tuples (`config.precisions = ("fp32", "bf16")`). A command-line override
  `--config.precisions=fp32,bf16` reaches a tuple field as the 1-tuple `("fp32,bf16",)`
  (ml_collections does not split on commas), so every string element is split on commas and
  stripped, empty parts dropped: `("fp32,bf16",)`, `("fp32", "bf16")`, `["fp32", " bf16"]` and
  `"fp32,bf16"` all give `("fp32", "bf16")`. With `item=int`, ints stay as they are and string
  parts are converted (`("256,1024",)` -> (256, 1024)).

  Args:
    value: the field's value: a tuple or list of strings (of ints with `item=int`), or a string.
    field: the key as the user sets it (e.g. "precisions", "benchmark.trainer_models"), for errors.
    item: str (names) or int.
  Raises:
    ValueError: naming the field and its value, for an item of the wrong type or an empty result.
  """
  if item not in (str, int):
    raise ValueError(f"config_list: item must be str or int, got {item!r}")
  what = "names" if item is str else "integers"
  example = f"--config.{field}={'a,b' if item is str else '1,2'}"

  def fail(problem: str) -> ValueError:
    return ValueError(f"config.{field}={value!r}: {problem}; expected a non-empty tuple of {what} "
                      f"(on the command line: {example})")

  elements = [value] if isinstance(value, str) else value
  if not isinstance(elements, (tuple, list)):
    raise fail(f"a {type(value).__name__} is not a list")
  out = []
  for element in elements:
    if isinstance(element, str):
      parts = [p.strip() for p in element.split(",") if p.strip()]
      if item is int:
        try:
          parts = [int(p) for p in parts]
        except ValueError:
          raise fail(f"{element!r} is not a comma-separated list of integers") from None
      out.extend(parts)
    elif item is int and isinstance(element, int) and not isinstance(element, bool):
      out.append(element)
    else:
      raise fail(f"{element!r} is not {'a name' if item is str else 'an integer'}")
  if not out:
    raise fail("it is empty")
  return tuple(out)
