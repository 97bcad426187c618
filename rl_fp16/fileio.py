"""Atomic file writes: readers see the old file or the new one, never a partial write."""

from __future__ import annotations

import os
import uuid


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically: a temp file in the same directory, then replace.

  Readers see either the old file or the new one, never a partial write. The parent directory is
  created if needed; the new file gets the usual permissions (0o666 minus the umask).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp_path = os.path.join(
      directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
