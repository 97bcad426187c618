"""experiments.pretrain_base logs its run through RunWriter inside the model directory it writes."""

import os

import pytest

from experiments import pretrain_base
from experiments.configs import pretrain_base as pretrain_base_config
from rl_fp16 import results
from rl_fp16.checkpoints import load_hf


def _config(output_dir, **overrides):
  config = pretrain_base_config.get_config()
  config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, task_min_terms=2,
                task_max_terms=3, batch_size=2, warmup_steps=1, eval_every=1, eval_problems=2,
                target_pass_rate=2.0, output_dir=str(output_dir))
  config.update(overrides)
  return config


@pytest.mark.slow
def test_pretrain_base_logs_each_evaluation_and_continues_the_earlier_log(tmp_path):
  stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
  pretrain_base.train(_config(stage1, max_steps=2))
  load_hf(stage1)  # the model directory is intact around its run directory
  frame = results.read_metrics(stage1 / "pretrain")
  assert frame["step"].tolist() == [1, 2]
  assert {"train/loss", "sft/token_accuracy", "eval/pass_at_1", "time/minutes"} <= set(frame)
  assert results.read_config(stage1 / "pretrain")["max_steps"] == 2

  summary = pretrain_base.train(_config(stage2, max_steps=1, init_from=str(stage1), seed=1))
  frame2 = results.read_metrics(stage2 / "pretrain")
  assert frame2["step"].tolist() == [1, 2, 3]  # stage 1's rows, then stage 2's
  assert frame2["train/loss"].tolist()[:2] == frame["train/loss"].tolist()
  assert [row["step"] for row in summary["log"]] == [1, 2, 3]
  assert results.read_config(stage2 / "pretrain")["init_from"] == str(stage1)
  assert not os.path.exists(f"{stage2}.pretrain")
