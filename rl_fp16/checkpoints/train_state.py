"""The train state and its orbax checkpoints.

A `TrainState` holds what the updates change: float32 params, the optax state, the loss-scale
state (or None) and the step. It holds no PRNG key and no data position: a run's sampling seeds
and problem order come from its config seed and the RL step (experiments/rl.py). Orbax writes
each checkpoint to a temporary directory and renames it into place, so a crash mid-save leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

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

  def close(self) -> None:
    self._manager.close()


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
