"""experiments.offline_mismatch writes its run through RunWriter: one metrics.jsonl row per run."""

import os

import pytest

from experiments import offline_mismatch
from experiments.configs import offline_mismatch as offline_mismatch_config
from rl_fp16 import results, run_config


def _config(output_dir):
  config = offline_mismatch_config.get_config()
  config.engine, config.model, config.precisions = "jax", "random", ("fp32", "bf16", "fp16")
  config.num_prompts, config.samples_per_prompt, config.max_new_tokens = 2, 2, 8
  config.layer_view_sequences = 2
  config.output_dir = str(output_dir)
  return config


@pytest.mark.slow
def test_offline_mismatch_writes_one_row_read_back_by_results(tmp_path):
  run_dir = tmp_path / "offline"
  summary = offline_mismatch.run(_config(run_dir))
  assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "metrics.jsonl", "plots",
                                         "run.lock", "tb", "tokens.csv"]
  frame = results.read_metrics(run_dir)
  assert frame["step"].tolist() == [0]
  row = frame.iloc[0]
  for pair, metrics in summary["metrics"].items():
    for name, value in metrics.items():
      assert row[f"{pair}/{name}"] == pytest.approx(value), name
  assert row["fp16_over_bf16/mismatch/kl_k3"] == pytest.approx(
      summary["fp16_over_bf16_reduction"]["mismatch/kl_k3"])
  assert row["layer_view/bf16/full/0"] == pytest.approx(summary["layer_view"]["bf16/full"][0])
  assert results.read_config(run_dir)["precisions"] == ["fp32", "bf16", "fp16"]
  assert len(os.listdir(run_dir / "plots")) == 4
  # A rerun with the same config replaces the measurement; another config is refused.
  offline_mismatch.run(_config(run_dir))
  assert results.read_metrics(run_dir)["step"].tolist() == [0]
  other = _config(run_dir)
  other.num_prompts = 3
  with pytest.raises(run_config.ConfigMismatchError, match="num_prompts"):
    offline_mismatch.run(other)
