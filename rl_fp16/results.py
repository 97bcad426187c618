"""Run results: one run = one directory, written by `RunWriter` and read back into pandas.

Layout of a run directory (see docs/design.md, "Decisions already taken")::

  run_dir/
    config.json      the resolved config (JSON; written once, see rl_fp16.run_config)
    metrics.jsonl    one JSON object per line: {"step": int, "reward/mean": float, ...}
    tb/              TensorBoard event files (every finite scalar of every step)
    plots/           PNG figures (rl_fp16.plots)
    checkpoints/     orbax train-state checkpoints (written by rl_fp16.checkpoints)
    resumes.jsonl    only when a resume changed an allowed key: one line per such resume
    run.lock         the owner's lock (`rl_fp16.run_lock`): pid and host of the last holder

A finished run can be kept small (e.g. committed to git) with `keep_run`: config.json and
metrics.jsonl.gz only; every reader here reads such a directory like a live one.

Every experiment writes its run this way; a one-shot measurement logs its figures at one step
(step 0) with names namespaced by case ("bf16/mismatch/kl_k3").

`metrics.jsonl` is strict JSON. Metric values are Python floats; the non-finite values NaN, +inf
and -inf are written as the strings "NaN", "Infinity" and "-Infinity" (`fileio.encode_float`),
and `read_metrics` / `load_runs` turn them back into floats. Every line is flushed as it is
written, so a killed run keeps every step it logged; a line cut off by the kill is dropped (with a
warning) when the file is read or resumed.

TensorBoard events are written with `tensorboardX`, not `clu.metric_writers`: clu's summary
writer needs TensorFlow, which this stack does not install.

Only one process writes a given run directory: on multi-host JAX, process 0 (the others get a
`rl_fp16.distributed.NullRunWriter`). A `RunWriter` holds the directory's lock
(`rl_fp16.run_lock`, run.lock) from its creation to `close`: another process opening the same
directory is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rl_fp16 import metrics_lines, run_lock
from rl_fp16.fileio import decode_float, encode_float, write_text_atomic
from rl_fp16.run_config import (CONFIG_FILE, RESUME_ALLOWED_KEYS, flatten_config, init_run_dir,
                                record_resume)

METRICS_FILE = "metrics.jsonl"
KEPT_METRICS_FILE = METRICS_FILE + ".gz"  # a kept run's metrics (`keep_run`)
TB_DIR = "tb"
PLOTS_DIR = "plots"
CHECKPOINT_DIR = "checkpoints"

STEP_KEY = metrics_lines.STEP_KEY
RUN_KEY = "run"


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
    Raises:
      run_lock.RunDirectoryLocked: another process holds the directory (nothing is written).
    """
    self._run_dir = os.fspath(run_dir)
    if resume_step is not None and not resume:
      raise ValueError(f"resume_step={resume_step} needs resume=True")
    self._lock = run_lock.acquire(self._run_dir)
    try:
      self._init(config, resume, resume_step, allowed_changes)
    except BaseException:
      self._lock.release()
      raise

  def _init(self, config, resume, resume_step, allowed_changes) -> None:
    self._metrics_path = os.path.join(self._run_dir, METRICS_FILE)
    has_metrics = (os.path.exists(self._metrics_path)
                   and os.path.getsize(self._metrics_path) > 0)
    if has_metrics and not resume:
      raise FileExistsError(f"{self._metrics_path} already holds metrics; pass resume=True to "
                            "continue that run, or use a new run directory")
    if config is not None:
      changed = init_run_dir(self._run_dir, config, allowed=allowed_changes)
      if changed and has_metrics:
        last = max((step for step, _ in metrics_lines.scan(self._metrics_path)[0]), default=None)
        record_resume(self._run_dir, changed, resume_step=resume_step, last_logged_step=last)
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
      entries, needs_repair = metrics_lines.scan(self._metrics_path)
      if needs_repair:  # A line cut off by a kill: drop it before appending.
        self._rewrite(line for _, line in entries)
      self._last_step = max((step for step, _ in entries), default=None)
    self._open(purge_step=None)

  @property
  def run_dir(self) -> str:
    return self._run_dir

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
    step = metrics_lines.as_step(step)
    if self._last_step is not None and step < self._last_step:
      raise ValueError(f"step {step} is before the last logged step {self._last_step}; call "
                       f"truncate_after({step}) first to rewind the run")
    values = {}
    for name, value in metrics.items():
      if not isinstance(name, str) or not name:
        raise TypeError(f"metric names must be non-empty strings, got {name!r}")
      if name == STEP_KEY:
        raise ValueError(f"{STEP_KEY!r} is reserved for the step and cannot be a metric name")
      values[name] = metrics_lines.as_metric_float(name, value)
    record = {STEP_KEY: step}
    record.update((name, encode_float(value)) for name, value in values.items())
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
    step = metrics_lines.as_step(step)
    self._close_files()
    entries = []
    if os.path.exists(self._metrics_path):
      entries, _ = metrics_lines.scan(self._metrics_path)
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
      self._lock.release()

  def __enter__(self) -> RunWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def flatten_metrics(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """The numbers of a nested record as metric names: {"bf16": {"kl": 0.1}} -> {"bf16/kl": 0.1}.

  For one-shot measurements (one `RunWriter.write` of many cases). Bools count as numbers;
  strings, None and lists (e.g. the repetitions behind a median) are left out.
  """
  out = {}
  for key, value in record.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten_metrics(value, name))
    elif isinstance(value, (bool, int, float, np.bool_, np.number)):
      out[name] = float(value)
  return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; cells are formatted with str(), a `|` in a cell escaped as `\\|`."""
  cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Readers.


def read_config(run_dir: str | os.PathLike) -> dict:
  """Returns the run's config.json as a dict (non-finite floats stay as their strings)."""
  path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in run directory {os.fspath(run_dir)!r}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _metrics_path(run_dir: str | os.PathLike) -> str:
  """The run's metrics.jsonl, else its kept metrics.jsonl.gz."""
  for name in (METRICS_FILE, KEPT_METRICS_FILE):
    path = os.path.join(os.fspath(run_dir), name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"no {METRICS_FILE} (or {KEPT_METRICS_FILE}) in run directory "
                          f"{os.fspath(run_dir)!r}")


def keep_run(run_dir: str | os.PathLike, kept_dir: str | os.PathLike) -> None:
  """Copies a run's config.json and its metrics gzipped (metrics.jsonl.gz) to `kept_dir`, each
  written atomically: a finished run's record, small enough to commit."""
  run_dir, kept_dir = os.fspath(run_dir), os.fspath(kept_dir)
  os.makedirs(kept_dir, exist_ok=True)
  for name, opener in ((CONFIG_FILE, open), (KEPT_METRICS_FILE, gzip.open)):
    source = os.path.join(run_dir, CONFIG_FILE if name == CONFIG_FILE else METRICS_FILE)
    target = os.path.join(kept_dir, name)
    with open(source, "rb") as src, opener(target + ".tmp", "wb") as dst:
      shutil.copyfileobj(src, dst)
    os.replace(target + ".tmp", target)


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
  """Reads a run's metrics.jsonl (or a kept run's metrics.jsonl.gz).

  Returns:
    DataFrame with one row per step, sorted by step: an int64 "step" column, then one float64
    column per metric name (in first-seen order). Lines that share a step are merged (the later
    value wins); a metric missing at a step is NaN; "NaN" / "Infinity" / "-Infinity" are restored
    as floats.
  """
  path = _metrics_path(run_dir)
  by_step: dict[int, dict[str, Any]] = {}
  names: dict[str, None] = {}  # An ordered set.
  for step, line in metrics_lines.scan(path)[0]:
    record = json.loads(line)
    del record[STEP_KEY]
    names.update(dict.fromkeys(record))
    by_step.setdefault(step, {}).update((k, decode_float(v)) for k, v in record.items())
  steps = sorted(by_step)
  columns = {STEP_KEY: np.asarray(steps, np.int64)}
  for name in names:
    column = [by_step[step].get(name, math.nan) for step in steps]
    try:
      columns[name] = np.asarray(column, np.float64)
    except (TypeError, ValueError):
      columns[name] = pd.Series(column, dtype=object).to_numpy()  # Not numeric: keep as is.
  return pd.DataFrame(columns, columns=[STEP_KEY, *names])




def find_runs(experiment_dir: str | os.PathLike) -> list[str]:
  """Returns every run directory (one holding metrics.jsonl or a kept metrics.jsonl.gz) under
  `experiment_dir`, sorted.

  Run directories are not searched further (their checkpoints/ can be large).
  """
  root = os.fspath(experiment_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"experiment directory {root!r} does not exist")
  runs = []
  for dir_path, dir_names, file_names in os.walk(root):
    dir_names.sort()
    if METRICS_FILE in file_names or KEPT_METRICS_FILE in file_names:
      runs.append(dir_path)
      dir_names[:] = []
  return sorted(runs)


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run directory read back: where it is, its config.json and its metrics (`read_metrics`)."""

  run_dir: str
  config: Mapping[str, Any]
  frame: pd.DataFrame

  @property
  def steps_done(self) -> int:
    """The last logged step (0 for a run with no metrics)."""
    return int(self.frame[STEP_KEY].max()) if len(self.frame) else 0


def read_runs_by(roots: Sequence[str | os.PathLike],
                 key: Callable[[Mapping[str, Any]], Hashable | None]
                 ) -> tuple[dict[Hashable, RunData], list[str]]:
  """Every run directory under each existing directory of `roots`, by `key(config)` (a study's
  arm; a run whose key is None is left out, its metrics unread).

  A key found more than once keeps the copy with the most logged steps (on a tie, the one from
  the earlier root). Returns (key -> RunData, the run directories without a config.json, which
  are left out).
  """
  runs: dict[Hashable, RunData] = {}
  no_config = []
  for root in roots:
    if not os.path.isdir(root):
      continue
    for run_dir in find_runs(root):
      if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        no_config.append(run_dir)
        continue
      config = read_config(run_dir)
      run_key = key(config)
      if run_key is None:
        continue
      data = RunData(run_dir, config, read_metrics(run_dir))
      if run_key not in runs or data.steps_done > runs[run_key].steps_done:
        runs[run_key] = data
  return runs, no_config


def keep_runs(runs: Iterable[RunData], kept_root: str | os.PathLike) -> list[str]:
  """Keeps each run in `kept_root`/<run directory name> (`keep_run`), unless a kept copy there
  already holds the same metrics; returns the names written."""
  written = []
  for data in runs:
    name = os.path.basename(os.path.normpath(data.run_dir))
    target = os.path.join(os.fspath(kept_root), name)
    if (os.path.exists(os.path.join(target, KEPT_METRICS_FILE))
        and read_metrics(target).equals(data.frame)):
      continue
    keep_run(data.run_dir, target)
    written.append(name)
  return written


def load_runs(experiment_dir: str | os.PathLike, settings: Sequence[str] | None = None, *,
              having: str | None = None) -> pd.DataFrame:
  """Reads every run under `experiment_dir` into one long DataFrame.

  Args:
    experiment_dir: searched at any depth for run directories (those holding metrics.jsonl).
    settings: flattened config keys to add as columns (e.g. ["algorithm", "precision", "seed",
      "optimizer.learning_rate"]); None adds every key of every run's config.json.
    having: only the runs that log this metric (e.g. "reward/mean": RL runs, not one-shot
      measurements in the same directory).
  Returns:
    One row per (run, step), ordered by run then step. Columns: "run" (the run directory relative
    to `experiment_dir`, with "/"; "." if it is the run itself), the settings (None / NaN where a
    run's config lacks one), "step", then the metrics. A config key that clashes with "run",
    "step" or a metric name is renamed "config.<key>".
  """
  root = os.fspath(experiment_dir)
  frames = {run_dir: read_metrics(run_dir) for run_dir in find_runs(root)}
  if having is not None:
    frames = {d: f for d, f in frames.items() if having in f and f[having].notna().any()}
  if not frames:
    raise FileNotFoundError(f"no run directories (directories holding {METRICS_FILE}"
                            f"{'' if having is None else ' with ' + having}) under {root!r}")
  run_dirs, frames, configs = list(frames), list(frames.values()), []
  for run_dir in run_dirs:
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
