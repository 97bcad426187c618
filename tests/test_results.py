"""Run directories: RunWriter round trips, resume, TensorBoard events, load_runs and plots."""

import dataclasses
import json
import math
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest
from tensorboardX.proto import event_pb2

from rl_fp16 import fileio, plots, results


@dataclasses.dataclass
class _Optimizer:
  learning_rate: float = 1e-6
  betas: tuple = (0.9, 0.999)


@dataclasses.dataclass
class _Config:
  algorithm: str = "grpo"
  precision: str = "fp16"
  seed: int = 0
  optimizer: _Optimizer = dataclasses.field(default_factory=_Optimizer)


def _read_tb_events(tb_dir):
  """Parses every TFRecord event file under `tb_dir` into a list of Event protos."""
  events = []
  for name in sorted(os.listdir(tb_dir)):
    assert "tfevents" in name
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      pos += 12  # uint64 length + uint32 masked CRC of the length.
      events.append(event_pb2.Event.FromString(data[pos:pos + length]))
      pos += length + 4  # Payload + uint32 masked CRC of the payload.
  return events


def _tb_scalars(tb_dir):
  """Returns {(tag, step): value} of every scalar summary under `tb_dir`."""
  return {(value.tag, event.step): value.simple_value
          for event in _read_tb_events(tb_dir) for value in event.summary.value}


def test_write_read_round_trip(tmp_path):
  run_dir = tmp_path / "run"
  rows = [
      {"reward/mean": 0.25, "train/loss": np.float32(1.5), "train/skipped_steps": np.int64(2),
       "is/frac_masked": jnp.asarray(0.125, jnp.bfloat16), "train/ok": True},
      {"reward/mean": float("nan"), "train/loss": jnp.asarray(float("inf")),
       "train/skipped_steps": -np.inf, "is/frac_masked": jnp.float32(0.5), "train/ok": False},
      {"reward/mean": 0.75, "train/loss": np.asarray([2.0]), "train/skipped_steps": 3,
       "is/frac_masked": 0.0, "train/ok": np.bool_(True)},
  ]
  with results.RunWriter(run_dir, {"algorithm": "grpo", "seed": np.int32(3)}) as writer:
    for step, row in enumerate(rows):
      writer.write(np.int64(step) if step else jnp.asarray(0), row)
    assert os.path.isdir(writer.plots_dir) and writer.plots_dir == str(run_dir / "plots")
    assert os.path.isdir(writer.checkpoint_dir)
    assert writer.checkpoint_dir == str(run_dir / "checkpoints")

  # The file is strict JSON with the documented spellings of the non-finite values.
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  second = json.loads(lines[1], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
  assert second["reward/mean"] == "NaN" and second["train/loss"] == "Infinity"
  assert second["train/skipped_steps"] == "-Infinity" and second["step"] == 1

  df = results.read_metrics(run_dir)
  assert list(df.columns) == ["step", "reward/mean", "train/loss", "train/skipped_steps",
                              "is/frac_masked", "train/ok"]
  assert df["step"].tolist() == [0, 1, 2] and df["step"].dtype == np.int64
  expected = pd.DataFrame(
      {"step": [0, 1, 2], "reward/mean": [0.25, math.nan, 0.75],
       "train/loss": [1.5, math.inf, 2.0], "train/skipped_steps": [2.0, -math.inf, 3.0],
       "is/frac_masked": [0.125, 0.5, 0.0], "train/ok": [1.0, 0.0, 1.0]})
  pd.testing.assert_frame_equal(df, expected)
  assert results.read_config(run_dir) == {"algorithm": "grpo", "seed": 3}


def test_config_serialisation(tmp_path):
  config = ml_collections.ConfigDict({
      "model": {"dtype": jnp.bfloat16, "np_dtype": np.dtype("float16"), "layers": np.int64(2)},
      "lr": np.float32(0.5), "clip": float("inf"), "shape": (2, 3), "array": np.arange(3),
      "path": tmp_path / "x", "dataclass": _Optimizer()})
  fileio.write_json_atomic(tmp_path / "config.json", config)
  got = json.loads((tmp_path / "config.json").read_text())
  assert got == {"model": {"dtype": "bfloat16", "np_dtype": "float16", "layers": 2}, "lr": 0.5,
                 "clip": "Infinity", "shape": [2, 3], "array": [0, 1, 2],
                 "path": str(tmp_path / "x"),
                 "dataclass": {"learning_rate": 1e-6, "betas": [0.9, 0.999]}}
  assert fileio.jsonable(jnp.float32) == "float32"
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # No temp file left behind.

  fileio.write_text_atomic(tmp_path / "sub" / "note.txt", "hello\n")
  assert (tmp_path / "sub" / "note.txt").read_text() == "hello\n"


def test_write_rejects_bad_input(tmp_path):
  with results.RunWriter(tmp_path / "run", {}) as writer:
    with pytest.raises(TypeError, match="step must be an integer"):
      writer.write(1.0, {"a": 1.0})
    with pytest.raises(ValueError, match="step must be >= 0"):
      writer.write(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="'a'.*shape \\(2,\\)"):
      writer.write(0, {"a": np.zeros(2)})
    with pytest.raises(TypeError, match="'a'"):
      writer.write(0, {"a": "high"})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, {"step": 1.0})
    writer.write(5, {"a": 1.0})
    with pytest.raises(ValueError, match="truncate_after"):
      writer.write(4, {"a": 1.0})
  with pytest.raises(RuntimeError, match="closed"):
    writer.write(6, {"a": 1.0})
  with pytest.raises(FileExistsError, match="resume=True"):
    results.RunWriter(tmp_path / "run", {})


def test_resume_truncates_and_appends(tmp_path):
  run_dir = tmp_path / "run"
  with results.RunWriter(run_dir, {"seed": 0}) as writer:
    for step in range(6):
      writer.write(step, {"a": float(step)})
  # A kill in the middle of a write leaves a partial last line.
  with open(run_dir / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "a": 6.')

  with pytest.warns(UserWarning, match="truncated last line"):
    assert results.read_metrics(run_dir)["step"].tolist() == list(range(6))
  with pytest.warns(UserWarning, match="truncated last line"):
    writer = results.RunWriter(run_dir, None, resume=True)  # Drops the partial line.
  assert writer.last_step == 5
  assert (run_dir / "metrics.jsonl").read_text().endswith('"a": 5.0}\n')
  assert writer.truncate_after(4) == 2
  writer.write(4, {"a": 40.0})
  writer.write(4, {"b": 1.0})  # A second write for the same step is merged by the reader.
  writer.close()
  df = results.read_metrics(run_dir)
  assert df["step"].tolist() == [0, 1, 2, 3, 4]
  assert df["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 40.0]
  assert df["b"].isna().tolist() == [True] * 4 + [False]
  assert results.read_config(run_dir) == {"seed": 0}  # config=None kept the old config.

  # resume_step in the constructor does the same; no temp files are left behind.
  with results.RunWriter(run_dir, {"seed": 0}, resume=True, resume_step=2) as writer:
    assert writer.last_step == 1
    writer.write(2, {"a": 20.0})
  assert results.read_metrics(run_dir)["a"].tolist() == [0.0, 1.0, 20.0]
  assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "metrics.jsonl", "plots",
                                         "run.lock", "tb"]


def test_tensorboard_events(tmp_path):
  run_dir = tmp_path / "run"
  with results.RunWriter(run_dir, {}) as writer:
    writer.write(0, {"reward/mean": 0.5, "train/loss": np.float32(2.0)})
    writer.write(1, {"reward/mean": jnp.asarray(0.75), "train/loss": float("nan")})
    writer.write(2, {"reward/mean": 1.0})
  scalars = _tb_scalars(run_dir / "tb")
  assert scalars == {("reward/mean", 0): 0.5, ("train/loss", 0): 2.0,
                     ("reward/mean", 1): 0.75, ("reward/mean", 2): 1.0}  # NaN left out.

  # Resuming at step 1 starts a new event file that tells TensorBoard to purge steps >= 1.
  with results.RunWriter(run_dir, {}, resume=True, resume_step=1) as writer:
    writer.write(1, {"reward/mean": 0.25})
  events = _read_tb_events(run_dir / "tb")
  assert len(os.listdir(run_dir / "tb")) == 2
  assert any(e.step == 1 and e.session_log.status == event_pb2.SessionLog.START for e in events)
  assert [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value][-1] == (
      "reward/mean", 1, 0.25)


def _write_run(run_dir, config, num_steps, offset):
  with results.RunWriter(run_dir, config) as writer:
    for step in range(num_steps):
      writer.write(step, {
          "reward/mean": offset + 0.1 * step, "mismatch/prob_diff_mean": 1e-3 * (offset + 1),
          "is/token_weight_p1": 0.9 - 0.01 * offset, "is/token_weight_p50": 1.0,
          "is/token_weight_p99": 1.1 + 0.01 * offset})


@pytest.fixture(name="experiment_dir")
def _experiment_dir(tmp_path):
  root = tmp_path / "exp"
  _write_run(root / "bf16" / "seed0", _Config(precision="bf16", seed=0), 4, 0)
  _write_run(root / "bf16" / "seed1", _Config(precision="bf16", seed=1), 4, 1)
  _write_run(root / "fp16-gspo", ml_collections.ConfigDict(
      {"algorithm": "gspo", "precision": "fp16", "seed": 0,
       "optimizer": {"learning_rate": 2e-6}, "run": "name-clash"}), 3, 2)
  (root / "notes").mkdir()
  return root


def test_load_runs(experiment_dir):
  df = results.load_runs(experiment_dir)
  assert list(df.columns[:8]) == ["run", "algorithm", "precision", "seed",
                                  "optimizer.learning_rate", "optimizer.betas", "config.run",
                                  "step"]
  assert set(df.columns[8:]) == {"reward/mean", "mismatch/prob_diff_mean", "is/token_weight_p1",
                                 "is/token_weight_p50", "is/token_weight_p99"}
  assert len(df) == 4 + 4 + 3
  assert df.groupby("run").size().to_dict() == {"bf16/seed0": 4, "bf16/seed1": 4, "fp16-gspo": 3}
  last = df[df["run"] == "fp16-gspo"].iloc[-1]
  got = (last["algorithm"], last["precision"], last["seed"], last["step"])
  assert got == ("gspo", "fp16", 0, 2)
  assert last["optimizer.learning_rate"] == 2e-6 and last["config.run"] == "name-clash"
  assert last["reward/mean"] == pytest.approx(2.2)
  assert df.loc[0, "optimizer.betas"] == (0.9, 0.999)
  assert pd.isna(last["optimizer.betas"])
  assert df["seed"].dtype == np.int64 and df["optimizer.learning_rate"].dtype == np.float64

  chosen = results.load_runs(experiment_dir, settings=["precision", "optimizer.learning_rate"])
  assert list(chosen.columns[:4]) == ["run", "precision", "optimizer.learning_rate", "step"]
  pd.testing.assert_frame_equal(chosen.drop(columns=["precision", "optimizer.learning_rate"]),
                                df.drop(columns=list(df.columns[1:7])))

  with pytest.raises(KeyError, match="optimizer.lr"):
    results.load_runs(experiment_dir, settings=["optimizer.lr"])
  with pytest.raises(FileNotFoundError, match="notes"):
    results.load_runs(experiment_dir / "notes")
  assert results.load_runs(experiment_dir / "fp16-gspo")["run"].unique().tolist() == ["."]


def test_plots(experiment_dir, tmp_path):
  df = results.load_runs(experiment_dir)
  paths = {name: tmp_path / "plots" / f"{name}.png" for name in ("curves", "scatter", "is")}
  fig = plots.plot_curves(df, "reward/mean", path=paths["curves"])
  assert len(fig.axes) == 2  # One panel per algorithm.
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["bf16 (n=2)"]  # grpo.
  plots.plot_curves(df, "mismatch/prob_diff_mean", hue="precision", col=None, logy=True)
  with pytest.raises(KeyError, match="'lr'"):
    plots.plot_curves(df, "reward/mean", hue="lr")

  rng = np.random.default_rng(0)
  mu = rng.uniform(size=(8, 64))
  noisy = np.clip(mu + rng.normal(0, 0.05, mu.shape), 0, 1)
  fig = plots.plot_scatter([noisy, mu], [mu, mu],
                             labels=["bf16", "fp16"], path=paths["scatter"])
  assert len(fig.axes) == 2
  with pytest.raises(ValueError, match="exp"):
    plots.plot_scatter(np.log(mu), mu, labels="bf16")

  fig = plots.plot_is_quantiles(df, path=paths["is"])
  assert len(fig.axes) == 3 and fig.axes[0].get_yscale() == "linear"  # Weights near 1.
  spread = df.assign(**{"is/token_weight_p99": 10.0})
  assert plots.plot_is_quantiles(spread).axes[0].get_yscale() == "log"
  plots.plot_is_quantiles(results.read_metrics(experiment_dir / "fp16-gspo"))

  paths["seeds"] = tmp_path / "plots" / "seeds.png"
  fig = plots.plot_seed_curves(df, "reward/mean", smooth=2, path=paths["seeds"])
  assert [ax.get_title() for ax in fig.axes] == ["precision = bf16", "precision = fp16"]
  bf16_lines = fig.axes[0].get_lines()
  assert len(bf16_lines) == 3 and bf16_lines[-1].get_label() == "median of 2 seeds"
  # Seeds 0 and 1 log offset + 0.1 * step; the 2-step mean starts at step 1.
  np.testing.assert_allclose(bf16_lines[-1].get_ydata(), [np.nan, 0.55, 0.65, 0.75],
                             equal_nan=True)
  for path in paths.values():
    assert path.stat().st_size > 1024 and path.read_bytes()[:4] == b"\x89PNG"


def test_flatten_metrics_keeps_the_numbers_of_a_nested_record():
  record = {"bf16": {"mismatch/kl_k3": np.float32(0.5), "tokens": 7, "ok": True,
                     "engine": "jax", "values": [1.0, 2.0], "none": None}, "seconds": 3.0}
  assert results.flatten_metrics(record) == {"bf16/mismatch/kl_k3": 0.5, "bf16/tokens": 7.0,
                                             "bf16/ok": 1.0, "seconds": 3.0}
  assert results.flatten_metrics({"a": 1}, prefix="peak") == {"peak/a": 1.0}


def test_load_runs_having_a_metric_keeps_only_the_runs_that_log_it(tmp_path):
  with results.RunWriter(tmp_path / "rl", {"seed": 1}) as writer:
    writer.write(1, {"reward/mean": 0.5})
  with results.RunWriter(tmp_path / "offline", {"engine": "jax"}) as writer:
    writer.write(0, {"bf16/mismatch/kl_k3": 0.1})
  df = results.load_runs(tmp_path, having="reward/mean")
  assert df["run"].tolist() == ["rl"] and df["seed"].tolist() == [1]
  assert "engine" not in df and "bf16/mismatch/kl_k3" not in df
  with pytest.raises(FileNotFoundError, match="with train/loss"):
    results.load_runs(tmp_path, having="train/loss")


def test_markdown_table_layout():
  table = results.markdown_table(("run", "F"), [("grpo_bf16_seed0", 0.983), ("x | y", None)])
  assert table.splitlines() == [
      "| run | F |",
      "|---|---|",
      "| grpo_bf16_seed0 | 0.983 |",
      "| x \\| y | None |",
  ]


# ------------------------------------------------------------------------------------------------
# One owner per run directory.


def _hold_run_dir(run_dir):
  """Another process holding `run_dir` (tests/lock_holder.py); kill it to let go."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  holder = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          "lock_holder.py"), str(run_dir)],
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def _listing(run_dir):
  return {p: os.stat(os.path.join(run_dir, p)).st_mtime_ns for p in os.listdir(run_dir)}


def test_a_second_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  from rl_fp16 import run_lock  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / "run"
  holder = _hold_run_dir(run_dir)
  try:
    before = _listing(run_dir)
    with pytest.raises(run_lock.RunDirectoryLocked,
                       match=f"in use by process {holder.pid} on host {socket.gethostname()}"):
      results.RunWriter(run_dir, {"a": 1})
    assert _listing(run_dir) == before  # nothing written
    assert run_lock.holder(run_dir).startswith(f"process {holder.pid} ")
  finally:
    holder.kill()  # SIGKILL: the kernel drops its lock; the lock file stays
    holder.wait()
  assert os.path.exists(run_dir / run_lock.LOCK_FILE) and run_lock.holder(run_dir) is None
  with results.RunWriter(run_dir, {"a": 1}) as writer:
    writer.write(1, {"x": 1.0})
    with run_lock.acquire(run_dir):  # the process that owns it may take it again (nested)
      pass
    assert run_lock.holder(run_dir) == f"this process ({os.getpid()})"
  assert run_lock.holder(run_dir) is None
  with open(run_dir / run_lock.LOCK_FILE) as f:
    assert json.load(f)["pid"] == os.getpid()  # the last holder, for the message


def _run(root, name, config, steps):
  with results.RunWriter(root / name, config) as writer:
    for step in range(1, steps + 1):
      writer.write(step, {"reward/mean": 0.1 * step})


def test_read_runs_by_keeps_the_longest_copy_and_skips_unkeyed_runs(tmp_path):
  kept, live = tmp_path / "kept", tmp_path / "live"
  _run(kept, "a_seed0", {"arm": "a"}, 3)
  _run(live, "a_seed0", {"arm": "a"}, 3)  # a tie: the earlier root's copy stays
  _run(kept, "b_seed0", {"arm": "b"}, 2)
  _run(live, "b_seed0", {"arm": "b"}, 4)  # more steps: this copy wins
  _run(live, "other", {"arm": "other"}, 5)
  os.makedirs(live / "no_config")
  with open(live / "no_config" / results.METRICS_FILE, "w") as f:
    f.write('{"step": 1}\n')
  runs, no_config = results.read_runs_by(
      [str(kept), str(live), str(tmp_path / "absent")],
      lambda config: None if config["arm"] == "other" else config["arm"])
  assert sorted(runs) == ["a", "b"]
  assert runs["a"].run_dir == str(kept / "a_seed0") and runs["a"].steps_done == 3
  assert runs["b"].run_dir == str(live / "b_seed0") and runs["b"].steps_done == 4
  assert runs["b"].config["arm"] == "b" and len(runs["b"].frame) == 4
  assert no_config == [str(live / "no_config")]


def test_keep_runs_writes_each_run_once(tmp_path):
  _run(tmp_path / "live", "a_seed0", {"arm": "a"}, 3)
  runs, _ = results.read_runs_by([str(tmp_path / "live")], lambda config: config["arm"])
  assert results.keep_runs(runs.values(), tmp_path / "data") == ["a_seed0"]
  assert results.keep_runs(runs.values(), tmp_path / "data") == []  # same metrics: skipped
  assert results.read_metrics(tmp_path / "data" / "a_seed0").equals(runs["a"].frame)
