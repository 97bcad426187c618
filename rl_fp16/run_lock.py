"""One owner per run directory: an exclusive `fcntl.flock` on `run_dir/run.lock`.

The lock belongs to the process (the kernel drops it when the process ends, however it ends), so
a run killed with kill -9 never blocks its own resume; the file stays behind and only records the
last holder (pid, host, start time) for the message a refused process prints. Taking the lock
again in the process that holds it nests (`RunLock` counts), so an experiment and the
`RunWriter` it opens share one lock. On a multi-process run only process 0 takes it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading

LOCK_FILE = "run.lock"

_held: dict[str, "RunLock"] = {}  # realpath of a run directory -> this process's lock on it
_guard = threading.Lock()


class RunDirectoryLocked(RuntimeError):
  """Another process holds the run directory (`acquire`); names the holder."""


def _path(run_dir: str | os.PathLike) -> str:
  return os.path.join(os.path.realpath(os.fspath(run_dir)), LOCK_FILE)


def _describe(text: str) -> str:
  """The holder recorded in a lock file's `text`, as words."""
  try:
    record = json.loads(text)
    return (f"process {record['pid']} on host {record['host']} (since {record['started']})")
  except (ValueError, KeyError, TypeError):
    return "another process (not yet recorded)"


class RunLock:
  """This process's hold on a run directory; `release` once per `acquire`."""

  def __init__(self, run_dir: str, fd: int):
    self.run_dir = run_dir
    self._fd = fd
    self._count = 1

  def release(self) -> None:
    """Drops one hold; the last one unlocks (the lock file stays). Idempotent past zero."""
    with _guard:
      if self._count == 0:
        return
      self._count -= 1
      if self._count:
        return
      _held.pop(self.run_dir, None)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def acquire(run_dir: str | os.PathLike) -> RunLock:
  """Makes this process the run directory's one owner (creates the directory if missing).

  Writes nothing when refused. Returns a `RunLock`; a process that already holds `run_dir` gets
  the same lock back, held once more.

  Raises:
    RunDirectoryLocked: another process holds it; the message names its pid and host.
  """
  path = _path(run_dir)
  key = os.path.dirname(path)
  with _guard:
    if key in _held:
      _held[key]._count += 1
      return _held[key]
    os.makedirs(key, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
      os.close(fd)
      raise RunDirectoryLocked(
          f"{key} is in use by {_describe(holder)}: a run directory has one owner at a time "
          f"({path}). Wait for that run to end (or stop it) and rerun to resume, or pass another "
          "--config.output_dir.") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    lock = _held[key] = RunLock(key, fd)
    return lock


def holder(run_dir: str | os.PathLike) -> str | None:
  """Who holds the run directory now, as words, or None when nobody does. Reads only."""
  path = _path(run_dir)
  if os.path.dirname(path) in _held:
    return f"this process ({os.getpid()})"
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)
