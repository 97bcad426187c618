"""experiments.gpu_check at its CPU smoke size: every stage runs and the summary is complete."""

import json
import math

import pytest

from experiments.gpu_check import config as gpu_check_config
from experiments.gpu_check import gpu_check
from experiments.gpu_check import scale
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


def _scale_config(tmp_path):
  config = gpu_check_config.get_config("scale_cpu")
  config.output_dir = str(tmp_path / "scale")
  config.budget_s = 1200.0  # a loaded CPU must not skip; the skip path is tested below
  return config


@pytest.mark.slow
def test_gpu_check_scale_reports_every_section_at_a_tiny_shape(tmp_path):
  summary = gpu_check.run(_scale_config(tmp_path))
  assert summary["errors"] == {} and summary["skipped"] == []
  train = summary["paper_train"]
  assert [r["precision"] for r in train] == ["bf16", "fp16"]
  for row in train:
    assert row["tokens"] == 128 and row["compiles_per_step"] == 0
    assert 0 < row["mfu_compute_dtype_peak"] and isinstance(row["meets_mfu_goal"], bool)
    assert row["compute_dtype_peak_flops_per_s"] > 0  # measured in this run
    assert row["xla_plan_gib"]["arguments"] > 0
  assert summary["bandwidth"]["bytes_per_s"]["median"] > 0
  assert [r["rows"] for r in summary["paper_decode"]] == [4, 16]
  for row in summary["paper_decode"]:
    assert row["tokens_per_s"] > 0 and 0 < row["floor_ms_per_decode_step"]
    assert row["x_floor"] == pytest.approx(
        row["ms_per_decode_step"] / row["floor_ms_per_decode_step"])
  iterations = summary["rl_iterations"]
  assert [r["iteration"] for r in iterations] == [0, 1]
  for row in iterations:
    phases = [row[name.split("/")[1]] for name in scale.RL_PHASES]
    assert all(p >= 0 for p in phases) and row["step_s"] == pytest.approx(sum(phases))
    assert abs(row["wall_s"] - row["step_s"]) <= 0.05 * row["wall_s"] + 0.2
    assert row["rows"] == 8 and row["response_tokens"] == 8 * 16  # no EOS: the whole budget
    assert row["host_peak_rss_gib"] > 0
  updates = summary["paper_update"]
  assert [r["micro_batch_rows"] for r in updates] == [0, 2]
  whole, micro = updates
  assert whole["real_tokens"] == micro["real_tokens"] > 0 and whole["width"] == micro["width"]
  assert micro["padding_frac"] < whole["padding_frac"]  # the micro-batches pad less
  assert whole["padding_frac"] == pytest.approx(
      1 - whole["real_tokens"] / (whole["rows"] * whole["width"]))
  for row in updates:
    assert row["compiles_per_step"] == 0 and row["real_tokens_per_s"] > 0
  written = json.loads((tmp_path / "scale" / "summary.json").read_text())
  assert [r["wall_s"] for r in written["rl_iterations"]] == [r["wall_s"] for r in iterations]
  assert written["paper_decode"][1]["x_floor"] == summary["paper_decode"][1]["x_floor"]
  report = (tmp_path / "scale" / "summary.md").read_text()
  for title in ("Paper-scale train step", "Paper-scale JAX sampler decode",
                "End-to-end RL iteration", "Paper-scale minibatch update"):
    assert title in report
  assert sorted(results.load_runs(tmp_path / "scale")["run"]) == ["minibatch", "paper", "rl"]


def test_budget_skips_a_case_that_does_not_fit_and_says_why():
  now = [0.0]
  budget = scale.Budget(100.0, clock=lambda: now[0])
  assert budget.allows("a", 60.0)
  now[0] = 50.0
  assert not budget.allows("b", 60.0)
  assert budget.skipped == [{"case": "b", "reason": "estimated 60 s, only 50 s left of the "
                                                    "100 s budget"}]
  assert scale.Budget(0.0).allows("c", 1e9)  # no budget


def test_decode_floor_counts_weights_once_per_step_and_the_growing_cache():
  model = gpu_check.paper_model_config(gpu_check_config.get_config("cpu").paper)
  floor = scale.decode_floor_s(model, rows=2, prompt_len=3, steps=2, itemsize=2, bytes_per_s=1.0)
  kv_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * 2
  assert floor == pytest.approx(2 * model.num_params() * 2 + 2 * kv_token * (3 + 4))
