"""launch.long_runs: the registered engine rule and the round-robin schedule (pure parts)."""

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


def test_round_robin_advances_the_least_advanced_run_by_a_chunk():
  assert long_runs.next_chunk({"a": 0, "b": 0}, steps=300, chunk=25) == ("a", 25)
  assert long_runs.next_chunk({"a": 25, "b": 0}, steps=300, chunk=25) == ("b", 25)
  assert long_runs.next_chunk({"a": 25, "b": 31}, steps=300, chunk=25) == ("a", 50)
  assert long_runs.next_chunk({"a": 290, "b": 300}, steps=300, chunk=25) == ("a", 300)
  assert long_runs.next_chunk({"a": 300, "b": 300}, steps=300, chunk=25) is None


def test_completed_steps_reads_the_run_metrics(tmp_path):
  assert long_runs.completed_steps(str(tmp_path / "missing")) == 0
  _metrics(tmp_path / "metrics.jsonl", {1: 1.0, 2: 1.0, 7: 1.0})
  assert long_runs.completed_steps(str(tmp_path)) == 7
