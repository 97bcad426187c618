"""Checks of config values that name every bad field at once.

Two checkers share one wording: `FieldChecks` for a typed config (a dataclass), `ConfigChecker`
for the keys of an untyped ml_collections config.

A config dataclass checks itself in `__post_init__` with a `FieldChecks`: each check records
(field, value, what is allowed), and `done()` raises one `FieldProblems` listing them all. The
predicates (`integer_problem`, `number_problem`) are the only wording of "an integer >= 1" or "a
finite number > 0"; experiments' checks of their own keys use them too. A program that builds a
dataclass from a user's config (`rl_fp16.rl_experiment`) catches `FieldProblems` and names each
field as the user set it (`--config.loss.clip_eps_low=-1`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

from rl_fp16.names import config_list


@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad field: its name in the dataclass, its value, and what is allowed."""

  field: str
  value: Any
  allowed: str

  def __str__(self) -> str:
    return f"{self.field}={self.value!r}: {self.allowed}"


class FieldProblems(ValueError):
  """A config dataclass's bad fields, all of them (`problems`, in the order checked)."""

  def __init__(self, owner: str, problems: Sequence[Problem]):
    self.owner = owner
    self.problems = list(problems)
    super().__init__(f"{owner}: " + "; ".join(map(str, self.problems)))


class ConfigError(ValueError):
  """A user's config that cannot work, found before any model is loaded or file written.

  `problems` holds its lines (`--config.key=value: what is allowed`), one per problem.
  """

  def __init__(self, message: str, problems: Sequence[str] = ()):
    super().__init__(message)
    self.problems = list(problems) or [message]

  @classmethod
  def listing(cls, problems: Sequence[str], what: str = "config") -> "ConfigError":
    """One error listing every problem: "Invalid {what} (N problems):" then a line each."""
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return cls(f"Invalid {what} ({count}):\n" + "\n".join(f"  {p}" for p in problems), problems)


def integer_problem(value: Any, minimum: int = 1) -> str | None:
  """What is wrong with `value` as an int >= `minimum` (bools refused), or None."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    return f"must be an integer >= {minimum}"
  return None


def number_problem(value: Any, *, above: float | None = None, at_least: float | None = None,
                   at_most: float | None = None) -> str | None:
  """What is wrong with `value` as a finite real in the bounds (`above` exclusive), or None."""
  ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
        and (above is None or value > above) and (at_least is None or value >= at_least)
        and (at_most is None or value <= at_most))
  if ok:
    return None
  bounds = [f"> {above}" if above is not None else "",
            f">= {at_least}" if at_least is not None else "",
            f"<= {at_most}" if at_most is not None else ""]
  return "must be a finite number " + " and ".join(b for b in bounds if b)


def choice_problem(value: Any, allowed: Sequence[Any]) -> str | None:
  """"allowed: a, b" when `value` is not one of `allowed`, else None."""
  if value in allowed:
    return None
  return f"allowed: {', '.join(map(str, allowed))}"


class FieldChecks:
  """Collects the bad fields of one dataclass instance; `done()` raises them together."""

  def __init__(self, instance: Any):
    self.instance = instance
    self.problems: list[Problem] = []

  def value(self, field: str) -> Any:
    """The value of `field`; a dotted field ("rl.num_minibatches") is read through the parts."""
    value = self.instance
    for part in field.split("."):
      value = getattr(value, part)
    return value

  def fail(self, field: str, allowed: str) -> None:
    self.problems.append(Problem(field, self.value(field), allowed))

  def _record(self, field: str, problem: str | None) -> None:
    if problem is not None:
      self.fail(field, problem)

  def check(self, ok: bool, field: str, allowed: str) -> None:
    if not ok:
      self.fail(field, allowed)

  def choice(self, field: str, allowed: Sequence[Any]) -> None:
    self._record(field, choice_problem(self.value(field), allowed))

  def integer(self, field: str, minimum: int = 1) -> None:
    self._record(field, integer_problem(self.value(field), minimum))

  def number(self, field: str, **bounds: float) -> None:
    """A finite real; `bounds`: above (exclusive), at_least, at_most."""
    self._record(field, number_problem(self.value(field), **bounds))

  def text(self, field: str, what: str) -> None:
    value = self.value(field)
    self.check(isinstance(value, str) and bool(value.strip()), field, f"must be set: {what}")

  def done(self) -> None:
    """Raises `FieldProblems` when any check failed."""
    if self.problems:
      raise FieldProblems(type(self.instance).__name__, self.problems)


class ConfigChecker:
  """Collects every problem of a config, then raises them together as one `ConfigError`.

  Each check names the key as the user sets it (`--config.loss.aggregation=...`), the bad value
  and what is allowed. Checks of a key the config does not have are skipped.
  """

  def __init__(self, config):
    self.config = config
    self.errors: list[str] = []

  def has(self, key: str) -> bool:
    node = self.config
    for part in key.split("."):
      try:
        if part not in node:
          return False
      except TypeError:
        return False
      node = node[part]
    return True

  def get(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def fail(self, key: str, message: str) -> None:
    value = self.get(key) if self.has(key) else None
    self.errors.append(f"--config.{key}={value!r}: {message}")

  def choice(self, key: str, allowed: Sequence[Any]) -> None:
    problem = self.has(key) and choice_problem(self.get(key), allowed)
    if problem:
      self.fail(key, problem)

  def integer(self, key: str, minimum: int = 1) -> None:
    """An int >= minimum (positive by default)."""
    problem = self.has(key) and integer_problem(self.get(key), minimum)
    if problem:
      self.fail(key, problem)

  def number(self, key: str, **bounds: float) -> None:
    """A finite real number; `bounds`: above (exclusive), at_least, at_most."""
    problem = self.has(key) and number_problem(self.get(key), **bounds)
    if problem:
      self.fail(key, problem)

  def text(self, key: str, what: str) -> None:
    """A non-empty string (unset placeholders are None)."""
    if self.has(key):
      value = self.get(key)
      if not isinstance(value, str) or not value.strip():
        self.fail(key, f"must be set: {what}")

  def precision_pair(self, key: str) -> None:
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    if self.has(key):
      try:
        get_precision_pair(self.get(key))
      except (ValueError, AttributeError, TypeError) as e:
        self.fail(key, str(e))

  def precision_pairs(self, key: str) -> None:
    """A non-empty list of precision pairs (`rl_fp16.names.config_list`)."""
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    if not self.has(key):
      return
    try:
      names = config_list(self.get(key), key)
    except ValueError:
      names = ()
      self.fail(key, "must list at least one precision pair, e.g. 'fp32,bf16,fp16'")
    for name in names:
      try:
        get_precision_pair(name)
      except ValueError as e:
        self.fail(key, str(e))

  def engine_precisions(self, engine_key: str, precision_keys: Sequence[str]) -> None:
    """The engine can sample in each (valid) precision pair's sampler policy (bitwise when the
    config's `bitwise` is True)."""
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    from rl_fp16.sampling.engines import check_engine_policy  # pylint: disable=g-import-not-at-top
    if not self.has(engine_key):
      return
    for key in precision_keys:
      if not self.has(key):
        continue
      try:  # "precision" is one name, "precisions" a list of them.
        listed = config_list(self.get(key), key)
      except ValueError:
        continue  # reported by precision_pair(s)
      bitwise = self.has("bitwise") and self.get("bitwise") is True
      for name in listed:
        try:
          check_engine_policy(self.get(engine_key),
                              get_precision_pair(name, bitwise=bitwise).sampler)
        except ValueError as e:
          self.fail(key, f"{name}: {e}")

  def check(self, condition: bool, key: str, message: str) -> None:
    if not condition:
      self.fail(key, message)

  def raise_if_failed(self, what: str = "config") -> None:
    if self.errors:
      raise ConfigError.listing(self.errors, what)
