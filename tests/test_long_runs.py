"""launch.long_runs: the registered engine rule, the session budget and the kept run data."""

import gzip
import json

import pytest

from launch import long_runs


def _metrics(path, seconds_by_step):
  path.write_text("".join(json.dumps({"step": s, "time/step_s": t}) + "\n"
                          for s, t in seconds_by_step.items()))
  return str(path)


def test_speed_figure_is_the_median_of_steps_3_to_10(tmp_path):
  seconds = {1: 500.0, 2: 90.0, **{s: float(s) for s in range(3, 11)}}
  assert long_runs.median_step_seconds(_metrics(tmp_path / "m.jsonl", seconds)) == 6.5
  with pytest.raises(ValueError, match="3..10"):
    long_runs.median_step_seconds(_metrics(tmp_path / "short.jsonl", {1: 1.0, 2: 1.0, 3: 1.0}))


def test_rule_takes_the_first_configuration_within_40_s_else_the_last():
  measured = [("vllm", 64, 55.0), ("jax", 64, 41.0), ("vllm", 32, 39.9), ("jax", 32, 20.0)]
  assert long_runs.choose(measured) == {"engine": "vllm", "prompts_per_step": 32,
                                        "seconds_per_step": 39.9, "overrun": False}
  over = long_runs.choose([("vllm", 16, 70.0), ("jax", 16, 60.0)])
  assert (over["engine"], over["prompts_per_step"], over["overrun"]) == ("jax", 16, True)


def test_session_budget_tightens_the_registered_40_s():
  assert long_runs.step_budget(300, 2.0) == 24.0
  assert long_runs.step_budget(100, 2.0) == 40.0
  measured = [("vllm", 64, 36.0), ("jax", 64, 30.0), ("vllm", 32, 19.0)]
  assert long_runs.choose(measured)["prompts_per_step"] == 64
  assert long_runs.choose(measured, budget=24.0)["prompts_per_step"] == 32


def test_finished_runs_are_kept_and_skipped(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text("{}")
  _metrics(run_dir / "metrics.jsonl", {1: 2.0, 2: 3.0})
  data = tmp_path / "data"
  assert len(long_runs.pending_arms(str(data))) == 9
  first = long_runs.pending_arms(str(data))[0]
  assert first == ("grpo_bf16_seed0", "bf16", 0)
  long_runs.keep_run_data(str(run_dir), str(data / first[0]))
  with gzip.open(data / first[0] / "metrics.jsonl.gz", "rt") as f:
    assert f.read() == (run_dir / "metrics.jsonl").read_text()
  assert [a[0] for a in long_runs.pending_arms(str(data))][:2] == ["grpo_fp16_seed0",
                                                                   "grpo_fp32_seed0"]


def test_completed_steps_reads_the_run_metrics(tmp_path):
  assert long_runs.completed_steps(str(tmp_path / "missing")) == 0
  _metrics(tmp_path / "metrics.jsonl", {1: 1.0, 2: 1.0, 7: 1.0})
  assert long_runs.completed_steps(str(tmp_path)) == 7
