"""Run results: one run = one directory, written during training and read back into pandas.

Layout of a run directory (see docs/design.md, "Decisions already taken")::

  run_dir/
    config.json      the resolved config (JSON)
    metrics.jsonl    one JSON object per line: {"step": int, "reward/mean": float, ...}
    tb/              TensorBoard event files (every finite scalar of every step)
    plots/           PNG figures
    checkpoints/     orbax train-state checkpoints (written by rl_fp16.checkpoints)
    resumes.jsonl    only when a resume changed an allowed key: one line per such resume

Provenance: config.json is written once, by the first start, and never rewritten. A later start in
the same directory (a resume) must bring the same config: `check_run_config` compares the new
resolved config with config.json key by key (`config_differences`, on flattened dotted names) and
raises `ConfigMismatchError`, listing every differing key as stored -> new, unless the only
differences are in keys of an allow-list (by default `RESUME_ALLOWED_KEYS`: how long to run, how
often to checkpoint, where the directory is, how much to log). Allowed changes leave config.json as
it was (it keeps describing the settings of the steps on disk) and, when the directory already
holds logged steps, are appended to resumes.jsonl as {"time", "resume_step", "last_logged_step",
"changed": {key: [stored, new]}}.

`metrics.jsonl` is strict JSON. Metric values are Python floats; the non-finite values NaN, +inf
and -inf are written as the strings "NaN", "Infinity" and "-Infinity" (the spellings of
JavaScript and of Python's non-strict `json`), and `read_metrics` / `load_runs` turn them back into
floats. Every line is flushed as it is written, so a killed run keeps every step it logged; a line
cut off by the kill is dropped (with a warning) when the file is read or resumed.

TensorBoard events are written with `tensorboardX`, not `clu.metric_writers`: clu's summary
writer needs TensorFlow, which this stack does not install.

Only one process should write a given run directory (on multi-host JAX: process 0).

Plots are built on `matplotlib.figure.Figure` objects with the Agg canvas, not through `pyplot`, so
they touch no global matplotlib state (backend, current figure) and are not leaked in long loops.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import operator
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np
import pandas as pd

from rl_fp16.fileio import write_text_atomic  # re-exported: results.write_text_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PLOTS_DIR = "plots"
CHECKPOINT_DIR = "checkpoints"
RESUMES_FILE = "resumes.jsonl"

# Config keys a resume may change: they decide how long a run goes on, how often it checkpoints,
# where its directory is and how much it logs, not what any step computes. An entry also allows
# every key under it ("logging" allows "logging.level").
RESUME_ALLOWED_KEYS = ("steps", "checkpoint_every", "output_dir", "log_level", "vllm_log_level",
                       "progress", "logging")

STEP_KEY = "step"
RUN_KEY = "run"

# JSON spellings of the non-finite floats (strict JSON has no NaN or Infinity).
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ------------------------------------------------------------------------------------------------
# JSON helpers.


def _encode_float(value: float) -> float | str:
  """Returns `value`, or its string spelling ("NaN", "Infinity", "-Infinity") if not finite."""
  if math.isfinite(value):
    return value
  return _NONFINITE_TO_JSON[repr(value)]


def _decode_value(value: Any) -> Any:
  """Inverse of `_encode_float` for a metric value; None (JSON null) also reads as NaN."""
  if value is None:
    return math.nan
  if isinstance(value, str) and value in _JSON_TO_NONFINITE:
    return _JSON_TO_NONFINITE[value]
  return value


def jsonable(obj: Any) -> Any:
  """Converts a config-like object into plain JSON data (dict / list / str / number / None).

  Handles dataclasses, `ml_collections.ConfigDict` (and FieldReference), mappings, sequences and
  sets (-> list), NumPy and JAX scalars and arrays (-> numbers / nested lists), dtypes and scalar
  types such as `jnp.bfloat16` (-> "bfloat16"), enums (-> name), paths, datetimes, and classes or
  functions (-> "module.qualname"). Non-finite floats become "NaN" / "Infinity" / "-Infinity".
  Anything else is written as its repr(): config.json is a record for people and for `load_runs`,
  not a way to rebuild arbitrary objects.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, int):
    return int(obj)
  if isinstance(obj, float):
    return _encode_float(float(obj))
  if isinstance(obj, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return jsonable(obj.to_dict())
  if isinstance(obj, ml_collections.FieldReference):
    return jsonable(obj.get())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(key): jsonable(value) for key, value in obj.items()}
  if isinstance(obj, enum.Enum):
    return obj.name
  if isinstance(obj, np.dtype):
    return obj.name
  if isinstance(obj, type):
    # NumPy scalar types (np.float32, ml_dtypes.bfloat16) and JAX's (jnp.float32, jnp.bfloat16).
    if issubclass(obj, np.generic):
      return np.dtype(obj).name
    if isinstance(getattr(obj, "dtype", None), np.dtype):
      return obj.dtype.name
    return f"{obj.__module__}.{obj.__qualname__}"
  if isinstance(obj, np.generic):
    if np.iscomplexobj(obj):
      return str(obj)
    item = obj.item()
    return jsonable(item if isinstance(item, (bool, int, float, str)) else float(obj))
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # NumPy and JAX arrays.
    array = np.asarray(obj)
    if array.ndim == 0:
      return jsonable(array[()])
    return [jsonable(item) for item in array]
  if isinstance(obj, (list, tuple)):
    return [jsonable(item) for item in obj]
  if isinstance(obj, (set, frozenset)):
    return [jsonable(item) for item in sorted(obj, key=repr)]
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if isinstance(obj, (datetime.date, datetime.time)):
    return obj.isoformat()
  if callable(obj) and hasattr(obj, "__qualname__"):
    return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
  return repr(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `jsonable(obj)` to `path` as indented, strict JSON, atomically (`write_text_atomic`)."""
  text = json.dumps(jsonable(obj), indent=2, allow_nan=False)
  write_text_atomic(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file written by `write_json_atomic`; errors name the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no JSON file at {path!r}")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"corrupt JSON file {path!r}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Steps, metric values and metrics.jsonl lines.


def _as_step(step: Any) -> int:
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


def _as_float(name: str, value: Any) -> float:
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


def _scan_metrics(path: str) -> tuple[list[tuple[int, str]], bool]:
  """Reads metrics.jsonl as (step, raw line) pairs, in file order.

  Returns:
    (entries, needs_repair): `needs_repair` is True when the last line was cut off (it is dropped,
    with a warning) or lacks its newline, so that appending to the file as is would corrupt it.
  Raises:
    ValueError: a line other than the last is not a JSON object with an integer "step".
  """
  with open(path, encoding="utf-8") as f:
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


# ------------------------------------------------------------------------------------------------
# Provenance: one run directory = one config.


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


# ------------------------------------------------------------------------------------------------
# Writer.


class RunWriter:
  """Writes one run directory: config.json, metrics.jsonl, TensorBoard events, plots/, checkpoints/.

  Usage::

    with RunWriter(run_dir, config) as writer:
      for step in range(num_steps):
        writer.write(step, {"reward/mean": 0.5, "train/loss": loss})  # Any scalars.

  Resuming from a checkpoint taken before step k (steps 0..k-1 done)::

    writer = RunWriter(run_dir, config, resume=True, resume_step=k)  # Drops logged steps >= k.

  Steps may repeat (several `write` calls for one step are merged by the readers) but may not go
  backwards; call `truncate_after` to rewind.
  """

  def __init__(self, run_dir: str | os.PathLike, config: Any, *, resume: bool = False,
               resume_step: int | None = None,
               allowed_changes: Sequence[str] = RESUME_ALLOWED_KEYS):
    """Creates (or, with `resume`, reopens) the run directory.

    Args:
      run_dir: the run directory; created if missing.
      config: the resolved config (dict, ConfigDict, dataclass, ...), written to config.json via
        `jsonable` when the directory has none. An existing config.json is never rewritten: it
        must match `config` but for `allowed_changes` (`check_run_config`, else
        `ConfigMismatchError`); allowed changes made on a resume over logged steps are appended
        to resumes.jsonl. None skips the check and keeps config.json as it is.
      resume: keep an existing metrics.jsonl and append to it. Without it an existing, non-empty
        metrics.jsonl is an error, so that a new run never silently mixes with an old one.
      resume_step: with `resume`, drop logged steps >= resume_step (see `truncate_after`).
      allowed_changes: config keys a resume may change (see `check_run_config`).
    """
    self._run_dir = os.fspath(run_dir)
    if resume_step is not None and not resume:
      raise ValueError(f"resume_step={resume_step} needs resume=True")
    self._metrics_path = os.path.join(self._run_dir, METRICS_FILE)
    has_metrics = (os.path.exists(self._metrics_path)
                   and os.path.getsize(self._metrics_path) > 0)
    if has_metrics and not resume:
      raise FileExistsError(f"{self._metrics_path} already holds metrics; pass resume=True to "
                            "continue that run, or use a new run directory")
    if config is not None:
      changed = init_run_dir(self._run_dir, config, allowed=allowed_changes)
      if changed and has_metrics:
        last = max((step for step, _ in _scan_metrics(self._metrics_path)[0]), default=None)
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "resume_step": resume_step, "last_logged_step": last,
                  "changed": {d.key: [d.old, d.new] for d in changed}}
        with open(os.path.join(self._run_dir, RESUMES_FILE), "a", encoding="utf-8") as f:
          f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
    for sub_dir in (self.tb_dir, self.plots_dir, self.checkpoint_dir):
      os.makedirs(sub_dir, exist_ok=True)

    self._last_step = None
    self._file = None
    self._tb = None
    self._closed = False
    if resume_step is not None:
      self.truncate_after(resume_step)
      return
    if has_metrics:
      entries, needs_repair = _scan_metrics(self._metrics_path)
      if needs_repair:  # A line cut off by a kill: drop it before appending.
        self._rewrite(line for _, line in entries)
      self._last_step = max((step for step, _ in entries), default=None)
    self._open(purge_step=None)

  @property
  def run_dir(self) -> str:
    return self._run_dir

  @property
  def config_path(self) -> str:
    return os.path.join(self._run_dir, CONFIG_FILE)

  @property
  def metrics_path(self) -> str:
    return self._metrics_path

  @property
  def tb_dir(self) -> str:
    return os.path.join(self._run_dir, TB_DIR)

  @property
  def plots_dir(self) -> str:
    return os.path.join(self._run_dir, PLOTS_DIR)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self._run_dir, CHECKPOINT_DIR)

  @property
  def last_step(self) -> int | None:
    """The largest step in metrics.jsonl, or None when it is empty."""
    return self._last_step

  def _open(self, purge_step: int | None) -> None:
    """Opens metrics.jsonl for appending and a new TensorBoard event file."""
    self._file = open(self._metrics_path, "a", encoding="utf-8")
    # Imported here: tensorboardX imports torch (seconds), which readers and plots do not need.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    # Event file names are "events.out.tfevents.<unix seconds>.<host><suffix>" and TensorBoard
    # reads them in name order, which must be the order they were written for `purge_step` to
    # hide the right events; the nanosecond suffix orders files opened within the same second.
    self._tb = tensorboardX.SummaryWriter(
        logdir=self.tb_dir, purge_step=purge_step,
        filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")

  def _close_files(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def _rewrite(self, lines) -> None:
    """Atomically replaces metrics.jsonl by `lines` (each without its newline)."""
    write_text_atomic(self._metrics_path, "".join(line + "\n" for line in lines))

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"RunWriter for {self._run_dir} is closed")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one line {"step": step, **metrics} to metrics.jsonl (flushed) and to TensorBoard.

    Args:
      step: non-negative integer (Python, NumPy or JAX scalar), >= every step written before.
      metrics: flat names ("reward/mean") -> scalars (Python, NumPy or JAX; bool or real number).
        Values are stored as Python floats; non-finite ones go to metrics.jsonl only.
    """
    self._check_open()
    step = _as_step(step)
    if self._last_step is not None and step < self._last_step:
      raise ValueError(f"step {step} is before the last logged step {self._last_step}; call "
                       f"truncate_after({step}) first to rewind the run")
    values = {}
    for name, value in metrics.items():
      if not isinstance(name, str) or not name:
        raise TypeError(f"metric names must be non-empty strings, got {name!r}")
      if name == STEP_KEY:
        raise ValueError(f"{STEP_KEY!r} is reserved for the step and cannot be a metric name")
      values[name] = _as_float(name, value)
    record = {STEP_KEY: step}
    record.update((name, _encode_float(value)) for name, value in values.items())
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    for name, value in values.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, global_step=step)
    self._tb.flush()
    self._last_step = step

  def truncate_after(self, step: int) -> int:
    """Drops every logged line with step >= `step`, so that a run resumed at `step` can rewrite it.

    metrics.jsonl is rewritten atomically. TensorBoard event files cannot be edited; a new event
    file is started with `purge_step=step`, which makes TensorBoard hide the older events at steps
    >= `step`.

    Args:
      step: the first step the resumed run will write (a checkpoint taken after `step` updates).
    Returns:
      The number of lines dropped.
    """
    self._check_open()
    step = _as_step(step)
    self._close_files()
    entries = []
    if os.path.exists(self._metrics_path):
      entries, _ = _scan_metrics(self._metrics_path)
    kept = [(s, line) for s, line in entries if s < step]
    self._rewrite(line for _, line in kept)
    self._last_step = max((s for s, _ in kept), default=None)
    self._open(purge_step=step)
    return len(entries) - len(kept)

  def close(self) -> None:
    """Flushes and closes the files; idempotent."""
    if not self._closed:
      self._close_files()
      self._closed = True

  def __enter__(self) -> RunWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Readers.


def read_config(run_dir: str | os.PathLike) -> dict:
  """Returns the run's config.json as a dict (non-finite floats stay as their strings)."""
  path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in run directory {os.fspath(run_dir)!r}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
  """Reads a run's metrics.jsonl.

  Returns:
    DataFrame with one row per step, sorted by step: an int64 "step" column, then one float64
    column per metric name (in first-seen order). Lines that share a step are merged (the later
    value wins); a metric missing at a step is NaN; "NaN" / "Infinity" / "-Infinity" are restored
    as floats.
  """
  path = os.path.join(os.fspath(run_dir), METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {METRICS_FILE} in run directory {os.fspath(run_dir)!r}")
  by_step: dict[int, dict[str, Any]] = {}
  names: dict[str, None] = {}  # An ordered set.
  for step, line in _scan_metrics(path)[0]:
    record = json.loads(line)
    del record[STEP_KEY]
    names.update(dict.fromkeys(record))
    by_step.setdefault(step, {}).update((k, _decode_value(v)) for k, v in record.items())
  steps = sorted(by_step)
  columns = {STEP_KEY: np.asarray(steps, np.int64)}
  for name in names:
    column = [by_step[step].get(name, math.nan) for step in steps]
    try:
      columns[name] = np.asarray(column, np.float64)
    except (TypeError, ValueError):
      columns[name] = pd.Series(column, dtype=object).to_numpy()  # Not numeric: keep as is.
  return pd.DataFrame(columns, columns=[STEP_KEY, *names])


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


def find_runs(experiment_dir: str | os.PathLike) -> list[str]:
  """Returns every run directory (one holding metrics.jsonl) under `experiment_dir`, sorted.

  Run directories are not searched further (their checkpoints/ can be large).
  """
  root = os.fspath(experiment_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"experiment directory {root!r} does not exist")
  runs = []
  for dir_path, dir_names, file_names in os.walk(root):
    dir_names.sort()
    if METRICS_FILE in file_names:
      runs.append(dir_path)
      dir_names[:] = []
  return sorted(runs)


def load_runs(experiment_dir: str | os.PathLike,
              settings: Sequence[str] | None = None) -> pd.DataFrame:
  """Reads every run under `experiment_dir` into one long DataFrame.

  Args:
    experiment_dir: searched at any depth for run directories (those holding metrics.jsonl).
    settings: flattened config keys to add as columns (e.g. ["algorithm", "precision", "seed",
      "optimizer.learning_rate"]); None adds every key of every run's config.json.
  Returns:
    One row per (run, step), ordered by run then step. Columns: "run" (the run directory relative
    to `experiment_dir`, with "/"; "." if it is the run itself), the settings (None / NaN where a
    run's config lacks one), "step", then the metrics. A config key that clashes with "run",
    "step" or a metric name is renamed "config.<key>".
  """
  root = os.fspath(experiment_dir)
  run_dirs = find_runs(root)
  if not run_dirs:
    raise FileNotFoundError(f"no run directories (directories holding {METRICS_FILE}) under "
                            f"{root!r}")
  frames, configs = [], []
  for run_dir in run_dirs:
    frames.append(read_metrics(run_dir))
    has_config = os.path.exists(os.path.join(run_dir, CONFIG_FILE))
    configs.append(flatten_config(read_config(run_dir)) if has_config else {})

  all_keys = list(dict.fromkeys(key for config in configs for key in config))
  if settings is None:
    keys = all_keys
  else:
    if isinstance(settings, str):
      raise TypeError(f"settings must be a sequence of config keys, got the string {settings!r}")
    keys = list(settings)
    unknown = [key for key in keys if key not in all_keys]
    if unknown:
      raise KeyError(f"settings {unknown} are in no run's {CONFIG_FILE} under {root!r}; "
                     f"known keys: {all_keys}")
  metric_names = {name for frame in frames for name in frame.columns}
  reserved = metric_names | {RUN_KEY, STEP_KEY}
  column_names = {key: f"config.{key}" if key in reserved else key for key in keys}

  parts = []
  for run_dir, frame, config in zip(run_dirs, frames, configs):
    run = os.path.relpath(run_dir, root).replace(os.sep, "/")
    head = {RUN_KEY: run}
    head.update((column_names[key], config.get(key)) for key in keys)
    head_frame = pd.DataFrame({name: pd.Series([value] * len(frame), dtype=object)
                               for name, value in head.items()})
    parts.append(pd.concat([head_frame, frame.reset_index(drop=True)], axis=1))
  result = pd.concat(parts, ignore_index=True, sort=False)
  # Settings were built as object columns (so tuples and None survive); give numbers their dtype.
  for name in column_names.values():
    result[name] = result[name].infer_objects()
  return result


# ------------------------------------------------------------------------------------------------
# Plots.


def _new_figure(num_panels: int, panel_size=(4.5, 3.5), **subplot_kwargs):
  """Returns (figure, list of axes) with `num_panels` side by side, on an Agg canvas."""
  fig = Figure(figsize=(panel_size[0] * num_panels, panel_size[1]), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, num_panels, squeeze=False, **subplot_kwargs)[0]
  return fig, list(axes)


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
  if path is not None:
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=120)
  return fig


def _check_columns(df: pd.DataFrame, names: Sequence[str | None], what: str) -> None:
  missing = [name for name in names if name is not None and name not in df.columns]
  if missing:
    raise KeyError(f"{what}: columns {missing} are not in the DataFrame; it has "
                   f"{list(df.columns)}")


def _sorted_values(series: pd.Series) -> list:
  """Unique values of `series` (NaN/None included once), sorted where they can be compared."""
  values = list(pd.unique(series))
  try:
    return sorted(values)
  except TypeError:
    return sorted(values, key=repr)


def _finite(series: pd.Series) -> pd.Series:
  return pd.to_numeric(series, errors="coerce").replace([np.inf, -np.inf], np.nan)


def plot_curves(df: pd.DataFrame, y: str, *, hue: str | None = "precision",
                col: str | None = "algorithm", x: str = "step", title: str | None = None,
                logy: bool = False, path: str | os.PathLike | None = None) -> Figure:
  """Plots metric `y` against `x`: one panel per value of `col`, one line per value of `hue`.

  Runs that share (col, hue) (e.g. seeds) are averaged at each x; a band shows their min..max.

  Args:
    df: long DataFrame, e.g. from `load_runs` (or `read_metrics` with hue=None, col=None).
    y: metric column, e.g. "reward/mean". Non-finite values are left out.
    hue: column whose values get one line each; None for one line per panel.
    col: column whose values get one panel each; None for a single panel.
    x: x-axis column.
    title: figure title; defaults to `y`.
    logy: log-scale y axis (useful for mismatch metrics spanning decades).
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  _check_columns(df, [x, y, hue, col], "plot_curves")
  data = df.assign(**{y: _finite(df[y])}).dropna(subset=[y])
  if data.empty:
    raise ValueError(f"plot_curves: column {y!r} has no finite values")
  col_values = _sorted_values(data[col]) if col is not None else [None]
  hue_values = _sorted_values(data[hue]) if hue is not None else [None]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = _new_figure(len(col_values), sharey=True)
  for ax, col_value in zip(axes, col_values):
    panel = data if col is None else data[_matches(data[col], col_value)]
    for index, hue_value in enumerate(hue_values):
      lines = panel if hue is None else panel[_matches(panel[hue], hue_value)]
      if lines.empty:
        continue
      stats = lines.groupby(x)[y].agg(["mean", "min", "max", "count"])
      num_runs = lines[RUN_KEY].nunique() if RUN_KEY in lines.columns else int(stats["count"].max())
      label = str(hue_value) if hue is not None else y
      if num_runs > 1:
        label += f" (n={num_runs})"
      color = colors[index % len(colors)]
      ax.plot(stats.index, stats["mean"], color=color, label=label, linewidth=1.5)
      if stats["count"].max() > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2,
                        linewidth=0)
    if col is not None:
      ax.set_title(f"{col} = {col_value}")
    ax.set_xlabel(x)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(title=hue, fontsize="small")
  axes[0].set_ylabel(y)
  fig.suptitle(title if title is not None else y)
  return _save(fig, path)


def _matches(series: pd.Series, value: Any) -> pd.Series:
  """Boolean mask of `series == value`, where a missing value (None / NaN) matches missing ones."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return series.isna()
  return series.map(lambda item: item == value).astype(bool)


def plot_scatter(p_trainer: Sequence[Any], p_sampler: Sequence[Any], *, labels: Sequence[str],
                 max_points: int = 100_000, seed: int = 0,
                 path: str | os.PathLike | None = None) -> Figure:
  """Scatters the trainer's token probability pi against the sampler's mu, one panel per label.

  Tokens where the two engines agree lie on the diagonal (drawn dashed).

  Args:
    p_trainer: one array per label (any shape; flattened): pi of each sampled token, in [0, 1].
      Pass only the response tokens (apply the mask first).
    p_sampler: matching arrays of mu, the same shapes.
    labels: panel titles, e.g. ["bf16", "fp16"]. A single string means one panel, and then
      `p_trainer` / `p_sampler` may be single arrays.
    max_points: at most this many points are drawn per panel (a random subset, fixed `seed`).
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  if isinstance(labels, str):
    labels, p_trainer, p_sampler = [labels], [p_trainer], [p_sampler]
  labels = list(labels)
  if not (len(labels) == len(p_trainer) == len(p_sampler)):
    raise ValueError(f"plot_scatter: got {len(labels)} labels, {len(p_trainer)} p_trainer arrays "
                     f"and {len(p_sampler)} p_sampler arrays; they must agree")
  if not labels:
    raise ValueError("plot_scatter: labels is empty")
  rng = np.random.default_rng(seed)
  fig, axes = _new_figure(len(labels), panel_size=(4.0, 4.0))
  for ax, label, pi, mu in zip(axes, labels, p_trainer, p_sampler):
    pi = np.asarray(pi, np.float64)
    mu = np.asarray(mu, np.float64)
    if pi.shape != mu.shape:
      raise ValueError(f"plot_scatter: for {label!r}, p_trainer has shape {pi.shape} but "
                       f"p_sampler has shape {mu.shape}")
    pi, mu = pi.ravel(), mu.ravel()
    keep = np.isfinite(pi) & np.isfinite(mu)
    pi, mu = pi[keep], mu[keep]
    for name, p in (("p_trainer", pi), ("p_sampler", mu)):
      if p.size and (p.min() < 0.0 or p.max() > 1.0 + 1e-6):
        raise ValueError(f"plot_scatter: {name} for {label!r} has values in [{p.min():.3g}, "
                         f"{p.max():.3g}], outside [0, 1]; pass probabilities, e.g. exp(logp)")
    diff = float(np.mean(np.abs(pi - mu))) if pi.size else math.nan
    if pi.size > max_points:
      chosen = rng.choice(pi.size, size=max_points, replace=False)
      pi, mu = pi[chosen], mu[chosen]
    ax.scatter(mu, pi, s=3, alpha=0.3, linewidths=0, rasterized=True)
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{label}\nmean |pi - mu| = {diff:.2e}  (N = {int(keep.sum())})",
                 fontsize="medium")
    ax.set_xlabel("sampler probability mu")
    ax.set_ylabel("trainer probability pi")
    ax.grid(alpha=0.3)
  fig.suptitle("Token probabilities: trainer vs sampler")
  return _save(fig, path)


def plot_is_quantiles(df: pd.DataFrame, *, kind: str = "token", x: str = STEP_KEY,
                      path: str | os.PathLike | None = None) -> Figure:
  """Plots the importance-weight quantiles is/{kind}_weight_p1, _p50, _p99 over steps, per run.

  One panel per quantile, one line per run (the "run" column; a DataFrame without it is one run),
  with the ideal weight 1 drawn dashed. The y axis is logarithmic when the weights span more than a
  factor of 3 (as in BF16), linear otherwise (FP16 weights all sit near 1).

  Args:
    df: from `load_runs` or `read_metrics`.
    kind: "token" (rho_t = pi_old / mu per token) or "seq" (per-sequence weights).
    x: x-axis column.
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  if kind not in ("token", "seq"):
    raise ValueError(f"plot_is_quantiles: kind must be 'token' or 'seq', got {kind!r}")
  names = [f"is/{kind}_weight_p{q}" for q in (1, 50, 99)]
  _check_columns(df, [x, *names], "plot_is_quantiles")
  runs = _sorted_values(df[RUN_KEY]) if RUN_KEY in df.columns else [None]
  positive = pd.concat([_finite(df[name]) for name in names])
  positive = positive[positive > 0]
  logy = positive.size > 0 and positive.max() > 3.0 * positive.min()
  fig, axes = _new_figure(len(names), sharey=True)
  for ax, name in zip(axes, names):
    for run in runs:
      rows = df if run is None else df[df[RUN_KEY] == run]
      values = _finite(rows[name])
      keep = values > 0 if logy else values.notna()  # A log axis cannot show values <= 0.
      ax.plot(rows[x][keep], values[keep], label=str(run) if run is not None else "run",
              linewidth=1.2)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    if logy:
      ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"{kind} importance weight pi_old / mu")
  if len(runs) > 1 or runs[0] is not None:
    axes[-1].legend(title=RUN_KEY, fontsize="small")
  fig.suptitle(f"{kind.capitalize()} importance-weight quantiles")
  return _save(fig, path)
