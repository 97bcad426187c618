"""A non-finite reward is an error naming its rows and prompts, raised before any update (no
skipped steps, no loss-scale back-off)."""

import os

import jax
import numpy as np
import pytest

from rl_fp16 import objectives, rl_experiment
from rl_fp16.checkpoints import load_hf
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.data import synthetic, tokenizer
from rl_fp16.data.rl_problems import load_or_build_subset
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.precision import default_loss_scale_config, get_precision_pair, init_loss_scale
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.rl_loop import rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer


def test_check_rewards_names_rows_values_and_prompts():
  from rl_fp16.advantages import check_rewards  # pylint: disable=g-import-not-at-top
  rewards = np.array([1, 0, 1, 0, 0, np.nan, 1, 1, np.inf, 0, 0, 0], np.float64)
  with pytest.raises(ValueError) as error:
    check_rewards(rewards, 4, prompts=["p0", "p1", "p2"])
  message = str(error.value)
  assert "2 non-finite reward(s) of 12" in message
  assert "prompt 1 (rows 4-7) 'p1': row 5: nan" in message
  assert "prompt 2 (rows 8-11) 'p2': row 8: inf" in message
  assert "p0" not in message
  ok = check_rewards([1, 0, 0.5, 0], 2)
  assert ok.dtype == np.float32 and ok.tolist() == [1, 0, 0.5, 0]
  with pytest.raises(ValueError, match="do not split into groups of samples_per_prompt=4"):
    check_rewards(np.zeros(6), 4)


def test_rl_iteration_refuses_a_nan_reward_before_any_update(tiny_task_model_dir):
  """fp16: one NaN among 8 rewards used to skip every minibatch and halve the loss scale."""
  config, params = load_hf(tiny_task_model_dir)
  task = SyntheticTask(synthetic.load_task_config(tiny_task_model_dir),
                       tokenizer.load_tokenizer(tiny_task_model_dir))
  pair = get_precision_pair("fp16")
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  engine = JaxEngine(config, params, pair.sampler, eos_token_ids=[task.tokenizer.eos_id])
  rl_config = RLConfig(samples_per_prompt=4, num_minibatches=2, max_new_tokens=16,
                       loss=objectives.LossConfig(max_response_len=16))
  before = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
  scale_before = float(state.loss_scale.scale)
  engine_before = jax.tree_util.tree_map(np.asarray, engine.params)

  def reward_fn(rollout):
    rewards = (rollout.response_lengths % 2).astype(np.float32)
    rewards[6] = np.nan
    return rewards

  with pytest.raises(ValueError, match=r"(?s)1 non-finite reward\(s\) of 8.*prompt 1 \(rows 4-7\)"
                     r": row 6: nan"):
    rl_iteration(state, model_config=config, trainer_policy=pair.trainer, optimizer=optimizer,
                 engine=engine, prompts=task.prompt_ids(task.problems(2, seed=0)),
                 reward_fn=reward_fn, rl_config=rl_config, seed=0)
  # The state was neither updated nor donated; the loss scale was not backed off; no sync.
  assert int(state.step) == 0
  assert float(state.loss_scale.scale) == scale_before
  after = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                   jax.tree_util.tree_leaves(after)))
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(engine_before), jax.tree_util.tree_leaves(engine.params)))


def test_rl_experiment_quotes_the_prompt_of_a_nan_reward(tiny_task_model_dir, tmp_path,
                                                         monkeypatch):
  from experiments import rl  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top

  def rewards_with_nan(self, problems, rollout):
    rewards = np.zeros(rollout.batch_size, np.float32)
    rewards[3] = np.inf  # the second prompt's second sample (samples_per_prompt=2)
    return rewards

  monkeypatch.setattr(SyntheticTask, "rewards", rewards_with_nan)
  config = sanity.get_config()
  config.update(dict(model=tiny_task_model_dir, engine="jax", precision="fp16", steps=1,
                     prompts_per_step=2, samples_per_prompt=2, num_minibatches=1,
                     max_new_tokens=16, checkpoint_every=1, output_dir=str(tmp_path / "run")))
  with pytest.raises(ValueError) as error:
    rl.run(config)
  subset, _, _ = load_or_build_subset(rl_experiment.from_config_dict(config).problems,
                                      rl.common.load_policy_model(config.model), None,
                                      str(tmp_path / "run"), max_new_tokens=16, seed=config.seed)
  prompt = rl.step_problems(subset, 0, 2, config.seed)[1].prompt
  assert f"prompt 1 (rows 2-3) {prompt!r}: row 3: inf" in str(error.value)
  # Nothing was logged or checkpointed for the step.
  metrics = tmp_path / "run" / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()
  checkpoints = tmp_path / "run" / "checkpoints"
  assert not checkpoints.exists() or not os.listdir(checkpoints)
