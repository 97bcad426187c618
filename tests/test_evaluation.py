"""Held-out evaluation: disjoint from training, scored by the task, the same draw every time."""

import json

import numpy as np
import pytest

from experiments import common
from rl_fp16 import evaluation, rl_experiment
from rl_fp16.data import synthetic, tokenizer
from rl_fp16.data.rl_problems import load_or_build_subset
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.precision import get_policy
from rl_fp16.sampling.engines import JaxEngine


@pytest.fixture(scope="module")
def tiny():
  model = common.load_policy_model("default", seed=0)
  task = SyntheticTask(synthetic.load_task_config(model.tokenizer_dir),
                       tokenizer.load_tokenizer(model.tokenizer_dir))
  engine = JaxEngine(model.config, model.params, get_policy("fp32", "sampler"),
                     eos_token_ids=model.eos_token_ids)
  return model, task, engine


def test_held_out_problems_avoid_the_training_prompts(tiny):
  _, task, _ = tiny
  config = evaluation.EvalConfig(every=5, num_problems=16)
  training = task.problems(40, seed=config.seed)  # the same generator and seed: maximal overlap
  held_out = evaluation.held_out_problems(task, training, config)
  assert len(held_out) == 16
  assert not {p.prompt for p in held_out} & {p.prompt for p in training}
  assert len({p.prompt for p in held_out}) == 16


def test_evaluate_scores_the_engine_samples_with_the_task(tiny):
  _, task, engine = tiny
  config = evaluation.EvalConfig(every=1, num_problems=6, samples_per_problem=3)
  problems = evaluation.held_out_problems(task, [], config)
  metrics = evaluation.evaluate(engine, task, problems, config=config, max_new_tokens=256)
  again = evaluation.evaluate(engine, task, problems, config=config, max_new_tokens=256)
  assert metrics == again  # the same seeded draw
  rollout = engine.generate(task.prompt_ids(problems), n=3, seed=config.seed,
                            sampling=evaluation.SamplingConfig(max_new_tokens=256))
  rewards = task.rewards(problems, rollout)
  assert metrics["eval/accuracy"] == pytest.approx(float(np.mean(rewards)))
  solved = [rewards[rollout.prompt_index == i].max() > 0.5 for i in range(len(problems))]
  assert metrics["eval/pass_at_k"] == pytest.approx(float(np.mean(solved)))
  assert 0.0 < metrics["eval/accuracy"] <= metrics["eval/pass_at_k"] <= 1.0  # the base solves some


def test_eval_schedule_and_refusals():
  config = evaluation.EvalConfig(every=25)
  assert [s for s in range(1, 61) if config.due(s, 60)] == [25, 50, 60]
  assert not evaluation.EvalConfig().due(10, 10)
  with pytest.raises(ValueError, match="every"):
    evaluation.EvalConfig(every=-1)
  with pytest.raises(ValueError, match="temperature"):
    evaluation.EvalConfig(temperature=0.0)


@pytest.mark.slow
def test_rl_run_logs_the_held_out_accuracy_of_the_updated_policy(tiny, tmp_path):
  """experiments.rl evaluates after each `eval.every` steps with the engine's updated weights:
  the logged figures equal a fresh evaluation of the run's final checkpoint."""
  from experiments import rl  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints.train_state import read_state_numpy  # pylint: disable=g-import-not-at-top
  model, task, _ = tiny
  config = sanity.get_config()
  config.update(dict(engine="jax", precision="fp32", steps=2, prompts_per_step=2,
                     samples_per_prompt=4, num_minibatches=1, checkpoint_every=1,
                     learning_rate=3e-3, output_dir=str(tmp_path / "run")))
  config.eval.update(dict(every=1, num_problems=6, samples_per_problem=2))
  rl.run(config)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [("eval/accuracy" in r) for r in rows] == [True, True]
  state, _ = read_state_numpy(str(tmp_path / "run" / "checkpoints"))
  engine = JaxEngine(model.config, state["params"], get_policy("fp32", "sampler"),
                     eos_token_ids=model.eos_token_ids)
  eval_config = evaluation.EvalConfig(**config.eval.to_dict())
  experiment = rl_experiment.from_config_dict(config)
  problems = evaluation.held_out_problems(task, load_or_build_subset(
      experiment.problems, model, task, str(tmp_path / "run"), max_new_tokens=256, seed=0)[0],
      eval_config)
  expected = evaluation.evaluate(engine, task, problems, config=eval_config, max_new_tokens=256)
  assert {k: rows[-1][k] for k in expected} == pytest.approx(expected, abs=1e-6)
