"""experiments.gpu_check at its CPU smoke size: every stage runs and the summary is complete."""

import json
import math

import pytest

from experiments.gpu_check import config as gpu_check_config
from experiments.gpu_check import gpu_check
from rl_fp16 import results


def _config(tmp_path, **overrides):
  config = gpu_check_config.get_config("cpu")
  config.benchmark.precisions = ("fp32", "fp16")
  config.output_dir = str(tmp_path / "gpu_check")
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_gpu_check_runs_every_stage_and_writes_the_summary(tmp_path):
  summary = gpu_check.run(_config(tmp_path))
  assert summary["errors"] == {}
  assert summary["device"]["backend"] == "cpu"
  pairs = [(r["pair"], r["matmul_precision"]) for r in summary["mismatch"]]
  assert pairs == [("fp32", "default"), ("bf16", "default"), ("fp16", "default"),
                   ("fp32", "highest")]
  by_pair = {p: r for p, r in zip(pairs, summary["mismatch"])}
  for row in summary["mismatch"]:
    assert all(math.isfinite(row[key]) for _, key in gpu_check.MISMATCH_COLUMNS)
    assert row["tokens"] > 0
  # Rounding to 8 or 11 significand bits disagrees more than float32 does.
  fp32 = by_pair[("fp32", "default")]["mismatch/logp_diff_mean"]
  assert 0 <= fp32 < by_pair[("bf16", "default")]["mismatch/logp_diff_mean"]
  assert fp32 < by_pair[("fp16", "default")]["mismatch/logp_diff_mean"]

  trainer = [(r["precision"], r["matmul_precision"]) for r in summary["trainer"]]
  assert trainer == [("fp32", "default"), ("fp16", "default"), ("fp32", "highest")]
  for row in summary["trainer"]:
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"])
    assert row["mfu_fp32_peak"] > 0 and row["compiles_per_step"] == 0
  assert set(summary["peaks"]) == {"default", "highest"}

  out = tmp_path / "gpu_check"
  written = json.loads((out / "summary.json").read_text())
  assert written["mismatch"] == json.loads(json.dumps(summary["mismatch"]))
  report = (out / "summary.md").read_text()
  assert "Trainer vs JAX sampler" in report and "RL train step" in report
  # Each stage is a run directory that rl_fp16.results reads (one row at step 0).
  runs = results.load_runs(out)
  assert sorted(runs["run"]) == ["benchmark_default", "benchmark_highest", "mismatch_default",
                                 "mismatch_highest"]
  assert runs["step"].tolist() == [0, 0, 0, 0]
  mismatch_row = results.read_metrics(out / "mismatch_default").iloc[0]
  assert mismatch_row["bf16/mismatch/logp_diff_mean"] == pytest.approx(
      by_pair[("bf16", "default")]["mismatch/logp_diff_mean"])
  trainer_row = results.read_metrics(out / "benchmark_default").iloc[0]
  speeds = [trainer_row[name] for name in trainer_row.index
            if name.startswith("trainer/") and name.endswith("/tokens_per_s/median")]
  assert speeds == pytest.approx([r["tokens_per_s"] for r in summary["trainer"][:2]])
  assert trainer_row["peak/float32/flops_per_s/median"] > 0


def test_gpu_check_keeps_going_past_a_failed_stage_then_fails(tmp_path):
  config = _config(tmp_path, fp32_highest=False, stages=("mismatch",))
  config.mismatch.precisions = ("fp32", "fp8")
  with pytest.raises(RuntimeError, match="mismatch"):
    gpu_check.run(config)
  written = json.loads((tmp_path / "gpu_check" / "summary.json").read_text())
  [(stage, error)] = written["errors"].items()
  assert stage.startswith("mismatch") and "fp8" in error
  assert "FAILED" in (tmp_path / "gpu_check" / "summary.md").read_text()


def test_gpu_check_rejects_unknown_stages_and_variants(tmp_path):
  with pytest.raises(ValueError, match="trainr"):
    gpu_check.run(_config(tmp_path, stages=("mismatch", "trainr")))
  with pytest.raises(ValueError, match="tpu"):
    gpu_check_config.get_config("tpu")
