"""The `paper` config variant resolves, per algorithm, to the released oat scripts' recipe."""

import numpy as np
import pytest

from experiments import rl
from experiments.configs import paper
from rl_fp16 import advantages, objectives, rl_experiment
from rl_fp16.train import OptimizerConfig

# What each run name must resolve to: (algorithm, advantage, aggregation, caps that matter).
EXPECTED = {
    "grpo": ("grpo", "drgrpo", "token_sum_norm", {}),
    "grpo_token_tis": ("grpo_token_tis", "drgrpo", "token_sum_norm", {"token_is_cap": 2.0}),
    "grpo_token_mis": ("grpo_token_mis", "drgrpo", "token_sum_norm", {"token_is_cap": 2.0}),
    "grpo_seq_mis": ("grpo_seq_mis", "drgrpo", "token_sum_norm", {"seq_is_cap": 10.0}),
    "gspo": ("gspo", "grpo", "seq_mean_token_mean", {"gspo_eps_low": 3e-4, "gspo_eps_high": 4e-4}),
    "pg": ("pg", "drgrpo", "token_sum_norm", {}),
    "pg_seq_is": ("pg_seq_is", "drgrpo", "token_sum_norm", {}),
    # The released "PG-Seq-MIS" script truncates at 3: sequence TIS.
    "pg_seq_tis": ("pg_seq_tis", "drgrpo", "token_sum_norm", {"seq_is_cap": 3.0}),
    "pg_seq_mis": ("pg_seq_tis", "drgrpo", "token_sum_norm", {"seq_is_cap": 3.0}),
}


def test_every_algorithm_has_a_variant():
  assert set(paper.RECIPES) == set(objectives.ALGORITHMS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_variant_resolves_to_the_recipe(name):
  algorithm, advantage, aggregation, caps = EXPECTED[name]
  config = paper.get_config(name)
  rl_config = rl_experiment.from_config_dict(config).rl
  assert (rl_config.algorithm, rl_config.advantage) == (algorithm, advantage)
  assert rl_config.loss.aggregation == aggregation
  # Dr.GRPO divides the token sum by the generation budget.
  assert rl_config.loss.max_response_len == config.max_new_tokens
  for key, value in caps.items():
    assert getattr(rl_config.loss, key) == value, key
  # Everything the recipe does not set keeps LossConfig's defaults (PPO clip 0.2 / 0.2 = oat's).
  defaults = objectives.LossConfig()
  assert (rl_config.loss.clip_eps_low, rl_config.loss.clip_eps_high) == (0.2, 0.2)
  for key in ("token_is_cap", "seq_is_cap", "gspo_eps_low", "gspo_eps_high"):
    if key not in caps:
      assert getattr(rl_config.loss, key) == getattr(defaults, key), key
  # 64 prompts x 8 samples, 4 minibatches of 128, one epoch, temperature 1.
  assert (config.prompts_per_step, config.samples_per_prompt) == (64, 8)
  assert config.prompts_per_step * config.samples_per_prompt // rl_config.num_minibatches == 128
  assert rl_config.num_minibatches == 4 and rl_config.epochs == 1
  assert rl_config.temperature == 1.0
  assert config.steps >= 300


def test_optimizer_is_the_papers():
  opt = rl_experiment.from_config_dict(paper.get_config("grpo")).optimizer
  assert (opt.b1, opt.b2, opt.weight_decay, opt.grad_clip, opt.warmup_steps) == (
      0.9, 0.95, 0.0, 1.0, 0)


def test_resolved_advantages_and_aggregation_compute_the_recipe():
  # Dr.GRPO: R - group mean, no std; token sum / (B * generation budget).
  rewards = np.array([1, 0, 0, 0, 1, 1, 1, 0], np.float32)
  config = rl_experiment.from_config_dict(paper.get_config("grpo")).rl
  adv = np.asarray(advantages.compute_advantages(config.advantage, rewards, 4))
  np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
  loss = np.ones((2, 5), np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  budget = config.loss.max_response_len
  got = objectives.aggregate(loss, mask, config.loss.aggregation, max_response_len=budget)
  np.testing.assert_allclose(float(got), 4 / (2 * budget))
  # GSPO: std-normalised advantages; mean over sequences of each sequence's token mean.
  gspo = rl_experiment.from_config_dict(paper.get_config("gspo")).rl
  adv = np.asarray(advantages.compute_advantages(gspo.advantage, rewards, 4))
  np.testing.assert_allclose(adv[:4], np.array([0.75, -0.25, -0.25, -0.25]) / np.std(
      [1, 0, 0, 0], ddof=1), rtol=1e-5)
  loss = np.array([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]], np.float32)
  got = objectives.aggregate(loss, mask, gspo.loss.aggregation)
  np.testing.assert_allclose(float(got), (2 + 4) / 2)


def test_unknown_run_is_refused():
  with pytest.raises(ValueError, match="grpo_tis.*allowed"):
    paper.get_config("grpo_tis")


def test_rl_builds_the_optimizer_from_the_config(tiny_task_model_dir, tmp_path, monkeypatch):
  """experiments.rl hands the learner the config's optimizer (so overrides take effect)."""
  captured = {}

  class Stop(Exception):
    pass

  def capture(*args, **kwargs):
    del args
    captured.update(kwargs)
    raise Stop

  monkeypatch.setattr(rl, "setup", capture)
  config = paper.get_config("grpo")
  config.update(dict(model=tiny_task_model_dir, engine="jax", prompts_per_step=2,
                     samples_per_prompt=4, num_minibatches=2, output_dir=str(tmp_path / "run")))
  config.optimizer.b2 = 0.999
  with pytest.raises(Stop):
    rl.run(config)
  assert captured["optimizer_config"] == OptimizerConfig(
      learning_rate=config.learning_rate, grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0)
