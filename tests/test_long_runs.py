"""The long runs: the registered engine rule, the session budget and the kept run data
(launch.long_runs), and the registered outcomes' report (experiments.long_runs.report)."""

import gzip
import json

import pandas as pd
import pytest

from experiments.long_runs import report
from launch import long_runs
from rl_fp16 import results


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
  results.keep_run(str(run_dir), str(data / first[0]))
  with gzip.open(data / first[0] / "metrics.jsonl.gz", "rt") as f:
    assert f.read() == (run_dir / "metrics.jsonl").read_text()
  # The kept run reads like the live one.
  pd.testing.assert_frame_equal(results.read_metrics(data / first[0]), results.read_metrics(run_dir))
  assert results.find_runs(data) == [str(data / first[0])]
  assert [a[0] for a in long_runs.pending_arms(str(data))][:2] == ["grpo_fp16_seed0",
                                                                   "grpo_fp32_seed0"]


def test_completed_steps_reads_the_run_metrics(tmp_path):
  assert long_runs.completed_steps(str(tmp_path / "missing")) == 0
  _metrics(tmp_path / "metrics.jsonl", {1: 1.0, 2: 1.0, 7: 1.0})
  assert long_runs.completed_steps(str(tmp_path)) == 7


def _fake_run(run_dir, *, precision, seed, mismatch, steps=45):
  """A kept run with every metric the report reads: reward climbing to 1, constant mismatch."""
  with results.RunWriter(run_dir, {"precision": precision, "seed": seed}) as writer:
    for step in range(1, steps + 1):
      writer.write(step, {
          "reward/mean": min(1.0, 0.5 + 0.02 * step), "train/skipped_steps": 0.0,
          "train/updates": 4.0 * step, "train/loss": 0.0, "mismatch/prob_diff_mean": mismatch,
          "mismatch/kl_k3": mismatch ** 2, "is/token_weight_max": 1 + 100 * mismatch,
          "is/seq_weight_p99": 1 + 10 * mismatch, "response/length_mean": 130.0})
  kept = run_dir.parent.parent / "data" / run_dir.name
  results.keep_run(run_dir, kept)
  return kept


def test_report_gives_each_kept_run_its_outcomes_and_decides_nothing_on_missing_seeds(tmp_path):
  _fake_run(tmp_path / "runs" / "grpo_bf16_seed0", precision="bf16", seed=0, mismatch=2e-4)
  _fake_run(tmp_path / "runs" / "grpo_fp16_seed0", precision="fp16", seed=0, mismatch=1e-5)
  out = tmp_path / "results.md"
  text = report.report(str(tmp_path / "data"), str(out), str(tmp_path / "figures"))
  assert out.read_text() == text
  assert "2 of 9 primary runs are finished" in text
  rows = [line for line in text.splitlines() if line.startswith("| grpo_")]
  assert [row.split(" | ")[0] for row in rows] == ["| grpo_bf16_seed0", "| grpo_fp16_seed0"]
  # Reward 0.5 + 0.02 t reaches 1 at step 25; its 20-step mean R(t) is 0.945 at step 34 and
  # (9 x 0.90 + 11) / 20 = 0.955 at step 35 (time to solve), and 1 from step 44: P = F = 1.
  assert rows[0].split(" | ")[1:6] == ["45", "1.000", "1.000", "35", "no"]
  assert "bf16 vs fp32 (H1): not decided: 1 of 3 bf16 seeds and 0 of 3 fp32 seeds" in text
  assert "H3 (fp16's mismatch >= 8x below bf16's in every 20-step window): holds (on the seeds " \
         "finished so far): bf16/fp16 ratio of seed medians 20.0-20.0x over 3 windows" in text
  figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
  assert "reward_mean.png" in figures and "eval_accuracy.png" not in figures  # no eval logged
  assert "![reward/mean](figures/reward_mean.png)" in text
