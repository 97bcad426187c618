"""The train state and its orbax checkpoints.

A `TrainState` holds what the updates change: float32 params, the optax state, the loss-scale
state (or None) and the step. It holds no PRNG key and no data position: a run's sampling seeds
and problem order come from its config seed and the RL step (experiments/rl.py). Orbax writes
each checkpoint to a temporary directory and renames it into place, so a crash mid-save leaves the
previous checkpoint as the latest complete one; a checkpoint damaged later (a truncated or
missing file) is skipped by `Checkpointer.restore_newest`, which falls back to an older one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax.training.dynamic_scale import DynamicScale


class TrainState(struct.PyTreeNode):
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, optimizer updates applied so far (skipped fp16 steps included).
    params: float32 nested dict (master weights).
    opt_state: optax state (float32).
    loss_scale: `DynamicScale` for fp16 training, None otherwise.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: DynamicScale | None

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, *,
             loss_scale: DynamicScale | None) -> "TrainState":
    """The state at step 0: `params` as float32 master weights and a fresh optimizer state."""
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return cls(step=jnp.asarray(0, jnp.int32), params=params, opt_state=optimizer.init(params),
               loss_scale=loss_scale)


class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, state: TrainState, *, extra: dict[str, Any] | None = None,
           force: bool = False) -> None:
    """Saves at `state.step` (blocking); `extra` is JSON metadata stored beside it."""
    step = int(jax.device_get(state.step))
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     extra=ocp.args.JsonSave(extra or {})),
                       force=force)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, template: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """Restores the given (default: latest) step into the structure of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]

  def restore_newest(self, template: TrainState, *, move_aside: bool = True
                     ) -> tuple[TrainState, dict[str, Any], list[SkippedCheckpoint]]:
    """Restores the newest checkpoint that restores completely, newest first.

    A checkpoint that fails to restore and also fails to read without a template
    (`checkpoint_fault`: a truncated, missing or empty file) is skipped; once an older one
    restores, each skipped one is moved (with `move_aside`) to `<directory>_skipped/<step>`, never
    deleted, so that later saves and resumes no longer see it.

    Returns:
      (state, extra, the skipped checkpoints, newest first).
    Raises:
      FileNotFoundError: no checkpoint at all.
      CheckpointsUnreadable: none restores; names each checkpoint and its fault (none is moved).
      Exception: orbax's own error when a checkpoint reads completely but does not fit
        `template` (another model or code), as from `restore`.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    faults = []
    for step in steps:
      try:
        state, extra = self.restore(template, step)
      except Exception:  # pylint: disable=broad-except
        fault = checkpoint_fault(self.directory, step)
        if fault is None:
          raise
        faults.append((step, fault))
        continue
      skipped = [SkippedCheckpoint(s, f, self._move_aside(s) if move_aside else None)
                 for s, f in faults]
      return state, extra, skipped
    raise CheckpointsUnreadable(
        f"No checkpoint in {self.directory} restores (none was moved):\n"
        + "\n".join(f"  step {s}: {f}" for s, f in faults))

  def _move_aside(self, step: int) -> str:
    """Moves the checkpoint at `step` to `<directory>_skipped/<step>[.N]`; returns where."""
    target = os.path.join(f"{self.directory}_skipped", str(step))
    suffix = 0
    while os.path.exists(target + (f".{suffix}" if suffix else "")):
      suffix += 1
    target += f".{suffix}" if suffix else ""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


@dataclasses.dataclass(frozen=True)
class SkippedCheckpoint:
  """A checkpoint `Checkpointer.restore_newest` passed over: its step, its fault, and where it
  was moved (None when it was left in place)."""

  step: int
  fault: str
  moved_to: str | None

  def __str__(self) -> str:
    where = f"; moved to {self.moved_to}" if self.moved_to else ""
    return f"skipped the checkpoint at step {self.step} ({self.fault}){where}"


class CheckpointsUnreadable(ValueError):
  """No checkpoint of a directory restores; the message names each one and its fault."""


def checkpoint_fault(directory: str | os.PathLike, step: int) -> str | None:
  """Why the checkpoint at `step` cannot be read in full without a template (a truncated,
  missing or empty file), or None when every array and its JSON metadata read."""
  try:
    read_state_numpy(directory, step)
    path = os.path.join(os.path.abspath(os.fspath(directory)), str(step), "extra", "metadata")
    with open(path, encoding="utf-8") as f:
      json.load(f)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
  return None


def read_state_numpy(directory: str | os.PathLike, step: int | None = None
                     ) -> tuple[dict[str, Any], int]:
  """A checkpoint's train state as a nested dict of NumPy arrays, and its step (default: latest).

  Reads checkpoints written on any device topology (e.g. by a multi-process run) on any machine,
  without a template: for comparing runs, or looking at weights in a notebook.
  """
  directory = os.path.abspath(os.fspath(directory))
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory}")
  path = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args)), step
