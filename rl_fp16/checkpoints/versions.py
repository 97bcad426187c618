"""Versioned Hugging Face weight directories on shared storage, for samplers in other processes.

    <root>/step_000012/   config.json, model.safetensors (and tokenizer files): a full HF model
    <root>/LATEST         the text "12\n": the newest complete version

The writer builds each version in a temp directory and renames it into place (`save_hf`), then
replaces `LATEST` atomically (`write_text_atomic`), then prunes old versions. A reader that
follows `LATEST` therefore only ever sees complete directories. Pruning keeps the newest `keep`
versions (>= 2, so a sampler still reading the previous version is not pulled from under).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from rl_fp16.checkpoints.hf import save_hf
from rl_fp16.fileio import write_text_atomic
from rl_fp16.models.config import ModelConfig

LATEST_FILE = "LATEST"
_VERSION_RE = re.compile(r"^step_(\d{6,})$")


def version_dir(root: str | os.PathLike, step: int) -> str:
  """`<root>/step_000012` for step 12."""
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"weights version step must be an integer >= 0, got {step!r}")
  return os.path.join(os.fspath(root), f"step_{step:06d}")


def list_versions(root: str | os.PathLike) -> list[int]:
  """Steps of the complete version directories under `root`, ascending (temp dirs excluded)."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    return []
  steps = [int(m.group(1)) for m in map(_VERSION_RE.match, os.listdir(root)) if m]
  return sorted(s for s in steps if os.path.isdir(version_dir(root, s)))


def latest_version(root: str | os.PathLike) -> int | None:
  """The step `<root>/LATEST` points at, or None when there is no pointer yet."""
  path = os.path.join(os.fspath(root), LATEST_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read().strip()
  except FileNotFoundError:
    return None
  if not text.isdigit():
    raise ValueError(f"{path} holds {text!r}; expected a step number")
  return int(text)


def prune_versions(root: str | os.PathLike, *, current: int, keep: int = 2) -> list[int]:
  """Deletes every version newer than `current` (left by a run that crashed after writing them
  and resumed from an earlier checkpoint) and all but the newest `keep` of the others; returns
  the steps deleted."""
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  steps = list_versions(root)
  older = [s for s in steps if s <= current]
  doomed = [s for s in steps if s > current] + older[:-keep]
  for step in doomed:
    shutil.rmtree(version_dir(root, step), ignore_errors=True)
  return sorted(doomed)


def write_version(root: str | os.PathLike, step: int, config: ModelConfig, params: Any, *,
                  dtype: Any = "float32", tokenizer_dir: str | os.PathLike | None = None,
                  keep: int = 2) -> str:
  """Writes `params` as version `step` (atomically), points `LATEST` at it, prunes; returns the
  version's directory.

  Args:
    root: the versions' parent directory (e.g. `<run_dir>/weights`), on storage every sampler
      host can read.
    step: the RL step whose updated params these are (0: the initial params).
    dtype: the stored dtype, the sampler's serving dtype ("float32", "bfloat16", "float16").
    tokenizer_dir: tokenizer files to copy into the version, so that each version is a model a
      vLLM server can start on by itself.
    keep: versions to keep, this one included (see `prune_versions`).
  """
  path = save_hf(version_dir(root, step), config, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
  write_text_atomic(os.path.join(os.fspath(root), LATEST_FILE), f"{step}\n")
  prune_versions(root, current=step, keep=keep)
  return path
