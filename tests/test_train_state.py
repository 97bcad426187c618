"""Orbax train-state checkpoints: a restored run continues bit-identically."""

import os

import jax
import numpy as np
import pytest

from rl_fp16.checkpoints.train_state import Checkpointer, TrainState
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import LossScaleConfig, get_policy, init_loss_scale
from rl_fp16.train import OptimizerConfig, make_optimizer, make_train_step

CONFIG = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True)
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3))


def _batch(state):
  # The step in the state drives the data (as the RL step does in experiments.rl).
  rng = np.random.default_rng(int(state.step))
  tokens = rng.integers(0, 48, (4, 12)).astype(np.int32)
  return dict(tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=np.ones_like(tokens))


def _run(state, steps, policy):
  losses = []
  for _ in range(steps):
    batch = _batch(state)
    state, metrics = make_train_step(CONFIG, policy, OPTIMIZER, loss="sft")(state, batch)
    losses.append(float(metrics["train/loss"]))
  return state, losses


def _fresh(precision):
  policy = get_policy(precision)
  kind = "dynamic" if policy.needs_loss_scaling else "none"
  return TrainState.create(init_params(CONFIG, jax.random.key(0)), OPTIMIZER,
                           loss_scale=init_loss_scale(LossScaleConfig(kind=kind,
                                                                      growth_interval=2)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_restored_run_continues_bit_identically(tmp_path, precision):
  policy = get_policy(precision)
  reference, reference_losses = _run(_fresh(precision), 6, policy)

  checkpointer = Checkpointer(tmp_path / "ckpt")
  state, losses = _run(_fresh(precision), 3, policy)
  checkpointer.save(state, extra={"note": "after 3 steps"})
  del state
  restored, extra = Checkpointer(tmp_path / "ckpt").restore(_fresh(precision))
  assert extra == {"note": "after 3 steps"}
  assert int(restored.step) == 3
  resumed, more_losses = _run(restored, 3, policy)
  assert losses + more_losses == reference_losses
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_and_reports_missing(tmp_path):
  checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpointer.restore(_fresh("fp32"))
  state = _fresh("fp32")
  for step in range(3):
    checkpointer.save(state.replace(step=state.step + step))
  assert checkpointer.all_steps() == [1, 2] and checkpointer.latest_step() == 2
  # No temporary directories are left next to the finished checkpoints.
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]


# ------------------------------------------------------------------------------------------------
# A damaged newest checkpoint costs that checkpoint, not the run.


def _damage(directory, step, how):
  """Damages the checkpoint at `step` as a crash or a disk fault would."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  root = os.path.join(directory, str(step))
  metadata = os.path.join(root, "state", "_METADATA")
  data = max((f for f in glob.glob(f"{root}/state/**/d/*", recursive=True) if os.path.isfile(f)),
             key=os.path.getsize)
  if how == "truncated_metadata":
    with open(metadata, "r+b") as f:
      f.truncate(os.path.getsize(metadata) // 2)
  elif how == "truncated_data":
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
  elif how == "deleted_file":
    os.remove(metadata)
  elif how == "empty_dir":
    shutil.rmtree(root)
    os.makedirs(root)


def _saved(directory, steps):
  state = _fresh("fp32")
  checkpointer = Checkpointer(directory, max_to_keep=None)
  for step in steps:
    state = state.replace(step=np.int32(step),
                          params=jax.tree_util.tree_map(lambda x: x + 1, state.params))
    checkpointer.save(state, extra={"rl_step": step})
  checkpointer.close()
  return state


@pytest.mark.parametrize("how", ["truncated_metadata", "truncated_data", "deleted_file",
                                 "empty_dir"])
def test_a_damaged_newest_checkpoint_is_skipped_and_moved_aside(tmp_path, how):
  directory = str(tmp_path / "checkpoints")
  _saved(directory, [1, 2, 3])
  _damage(directory, 3, how)
  _damage(directory, 2, how)
  checkpointer = Checkpointer(directory, max_to_keep=2)
  state, extra, skipped = checkpointer.restore_newest(_fresh("fp32"))
  assert int(state.step) == 1 and extra == {"rl_step": 1}
  assert [s.step for s in skipped] == [3, 2]
  for s in skipped:
    assert s.moved_to == str(tmp_path / "checkpoints_skipped" / str(s.step))
    assert os.path.isdir(s.moved_to)  # kept, not deleted
    assert f"skipped the checkpoint at step {s.step} (" in str(s)
  assert checkpointer.all_steps() == [1]
  checkpointer.close()


def test_no_restorable_checkpoint_names_each_and_moves_none(tmp_path):
  from rl_fp16.checkpoints.train_state import CheckpointsUnreadable  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "checkpoints")
  _saved(directory, [1, 2])
  _damage(directory, 2, "truncated_metadata")
  _damage(directory, 1, "empty_dir")
  checkpointer = Checkpointer(directory)
  with pytest.raises(CheckpointsUnreadable,
                     match=r"(?s)restores \(none was moved\).*step 2: JSONDecodeError.*step 1: "):
    checkpointer.restore_newest(_fresh("fp32"))
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_a_complete_checkpoint_of_another_state_is_not_moved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _saved(directory, [1])
  other = TrainState.create({"w": np.zeros(3, np.float32)}, OPTIMIZER, loss_scale=None)
  checkpointer = Checkpointer(directory)
  with pytest.raises(Exception):
    checkpointer.restore_newest(other)
  assert checkpointer.all_steps() == [1]
  checkpointer.close()
