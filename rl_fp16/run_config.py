"""A run directory's config.json: written once, by the first start, and checked on every later one.

A later start in the same directory (a resume) must bring the same config: `check_run_config`
compares the new resolved config with config.json key by key (`config_differences`, on flattened
dotted names) and raises `ConfigMismatchError`, listing every differing key as stored -> new, unless
the only differences are in keys of an allow-list (by default `RESUME_ALLOWED_KEYS`: how long to
run, how often to checkpoint, where the directory is, how much to log). Allowed changes leave
config.json as it was (it keeps describing the settings of the steps on disk) and, when the
directory already holds logged steps, are appended to resumes.jsonl by `record_resume` as
{"time", "resume_step", "last_logged_step", "changed": {key: [stored, new]}}.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rl_fp16.fileio import jsonable, read_json, write_json_atomic

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"

# Config keys a resume may change: they decide how long a run goes on, how often it checkpoints,
# where its directory is and how much it logs, not what any step computes. An entry also allows
# every key under it ("logging" allows "logging.level").
RESUME_ALLOWED_KEYS = ("steps", "checkpoint_every", "output_dir", "log_level", "vllm_log_level",
                       "progress", "logging")


class ConfigMismatchError(ValueError):
  """A run directory's config.json differs from the config of a new start in a key that matters."""


@dataclasses.dataclass(frozen=True)
class ConfigDifference:
  """One flattened config key whose stored and new values differ (`MISSING` when absent)."""

  key: str
  old: Any
  new: Any

  def __str__(self) -> str:
    return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


class _Missing:
  def __repr__(self) -> str:
    return "<absent>"


MISSING = _Missing()


def _show(value: Any) -> str:
  return repr(value) if value is MISSING else json.dumps(value)


def _is_allowed(key: str, allowed: Sequence[str]) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allowed)


def config_differences(old: Any, new: Any,
                       allowed: Sequence[str] = ()) -> list[ConfigDifference]:
  """The keys whose values differ between two configs, except those in `allowed`.

  Pure. Both configs go through `jsonable` (so a ConfigDict, a dataclass and the dict read back
  from config.json compare equal when they hold the same values) and `flatten_config` (nested keys
  as "loss.clip_eps_low"). A key present on one side only is a difference whose other value is
  `MISSING`.

  Args:
    old: the stored config (e.g. `read_config(run_dir)`).
    new: the new resolved config.
    allowed: keys whose changes are ignored; an entry also covers the keys under it.
  Returns:
    One `ConfigDifference(key, old, new)` per differing key, sorted by key.
  """
  flat_old = flatten_config(json.loads(json.dumps(jsonable(old), allow_nan=False)))
  flat_new = flatten_config(json.loads(json.dumps(jsonable(new), allow_nan=False)))
  out = []
  for key in sorted(set(flat_old) | set(flat_new)):
    if _is_allowed(key, allowed):
      continue
    a, b = flat_old.get(key, MISSING), flat_new.get(key, MISSING)
    # 1 and 1.0 are the same setting; True and 1 are not.
    same = (a == b and type(a) is type(b)) or (
        isinstance(a, (int, float)) and isinstance(b, (int, float))
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
    if not same:
      out.append(ConfigDifference(key, a, b))
  return out


def check_run_config(run_dir: str | os.PathLike, config: Any, *,
                     allowed: Sequence[str] = RESUME_ALLOWED_KEYS) -> list[ConfigDifference]:
  """Checks that `config` may (re)start in `run_dir`; reads only, creates nothing.

  Returns:
    [] when the directory has no config.json (a new run) or holds the same config; otherwise the
    differences in `allowed` keys, which a resume may bring.
  Raises:
    ConfigMismatchError: config.json differs from `config` in a key outside `allowed`. The message
      lists every such key (stored -> new) and says how to start a new run instead.
  """
  run_dir = os.fspath(run_dir)
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  stored = read_json(path)
  refused = [d for d in config_differences(stored, config) if not _is_allowed(d.key, allowed)]
  if refused:
    lines = "\n".join(f"  {d}" for d in refused)
    raise ConfigMismatchError(
        f"{run_dir} holds a run made with another config; continuing it with this one would mix "
        f"settings (its {CONFIG_FILE} would no longer describe the steps on disk). Differences "
        f"(stored -> now):\n{lines}\n"
        f"To start a new run, pass another directory (e.g. --config.output_dir=...); to resume "
        f"this one, rerun with the settings of its {CONFIG_FILE}. A resume may change only: "
        f"{', '.join(allowed)}.")
  return config_differences(stored, config, ())


def init_run_dir(run_dir: str | os.PathLike, config: Any, *,
                 allowed: Sequence[str] = RESUME_ALLOWED_KEYS) -> list[ConfigDifference]:
  """Creates `run_dir` and writes config.json on the first start; on a later one only checks it.

  Same checks and return value as `check_run_config`; config.json is never rewritten.
  """
  differences = check_run_config(run_dir, config, allowed=allowed)
  path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
  os.makedirs(os.fspath(run_dir), exist_ok=True)
  if not os.path.exists(path):
    write_json_atomic(path, config)
  return differences



def record_resume(run_dir: str | os.PathLike, changed: Sequence[ConfigDifference], *,
                  resume_step: int | None, last_logged_step: int | None) -> None:
  """Appends one line to the run's resumes.jsonl: the allowed keys a resume changed."""
  record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "resume_step": resume_step, "last_logged_step": last_logged_step,
            "changed": {d.key: [d.old, d.new] for d in changed}}
  with open(os.path.join(os.fspath(run_dir), RESUMES_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")


def flatten_config(config: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """Flattens nested dicts into {"optimizer.learning_rate": ...}; lists become tuples."""
  flat = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
      for key, item in value.items():
        visit(f"{prefix}{sep}{key}" if prefix else str(key), item)
    elif isinstance(value, list):
      flat[prefix] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    else:
      flat[prefix] = value

  visit("", config)
  return flat
