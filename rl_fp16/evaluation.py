"""Held-out evaluation during RL: the policy's accuracy on problems it never trains on.

The held-out set is drawn once per run from the task's own generator with a seed of its own and
with every problem whose prompt is in the training set removed; every evaluation samples it with
the same seed, so two evaluations differ only through the policy. Metrics (float, per evaluation):
`eval/accuracy` (mean reward over all samples), `eval/pass_at_k` (fraction of problems with at
least one correct sample, k = `samples_per_problem`), `eval/response_length_mean`,
`eval/truncated_frac`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rl_fp16.config_checks import FieldChecks
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.sampling.rollout import FINISH_LENGTH


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """When and on what to evaluate.

  Attributes:
    every: evaluate after every `every`-th RL step and after the last; 0 turns evaluation off.
    num_problems: size of the held-out set.
    samples_per_problem: responses sampled per problem (the k of pass@k).
    temperature: sampling temperature (1.0: the distribution RL trains).
    seed: seeds the held-out problems and every evaluation's sampling.
  """

  every: int = 0
  num_problems: int = 64
  samples_per_problem: int = 4
  temperature: float = 1.0
  seed: int = 20_251_130

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.integer("every", 0)
    checks.integer("num_problems", 1)
    checks.integer("samples_per_problem", 1)
    checks.number("temperature", above=0)
    checks.integer("seed", 0)
    checks.done()

  def due(self, rl_step: int, last_step: int) -> bool:
    """Whether to evaluate after RL step `rl_step` (1-based) of a run of `last_step` steps."""
    return bool(self.every) and (rl_step % self.every == 0 or rl_step == last_step)


def held_out_problems(task, training: Sequence[Any], config: EvalConfig) -> list[Any]:
  """`config.num_problems` fresh problems of `task` (its `problems(num, seed)` generator) whose
  prompts are not among `training`'s; raises if the generator cannot supply that many."""
  seen = {p.prompt for p in training}
  candidates = task.problems(4 * config.num_problems, seed=config.seed)
  held_out, prompts = [], set()
  for problem in candidates:
    if problem.prompt not in seen and problem.prompt not in prompts:
      held_out.append(problem)
      prompts.add(problem.prompt)
    if len(held_out) == config.num_problems:
      return held_out
  raise ValueError(f"Only {len(held_out)} of {len(candidates)} generated problems are new and "
                   f"distinct; lower EvalConfig.num_problems={config.num_problems}")


def evaluate(engine, task, problems: Sequence[Any], *, config: EvalConfig,
             max_new_tokens: int) -> dict[str, float]:
  """Samples `config.samples_per_problem` responses per problem with `engine` and scores them
  with `task.rewards` (module doc for the metrics)."""
  k = config.samples_per_problem
  rollout = engine.generate(task.prompt_ids(problems), n=k, seed=config.seed,
                            sampling=SamplingConfig(max_new_tokens=max_new_tokens,
                                                    temperature=config.temperature))
  rewards = np.asarray(task.rewards(problems, rollout), np.float64)
  solved = np.zeros(len(problems), bool)
  np.logical_or.at(solved, np.asarray(rollout.prompt_index), rewards > 0.5)
  return {
      "eval/accuracy": float(rewards.mean()),
      "eval/pass_at_k": float(solved.mean()),
      "eval/response_length_mean": float(np.mean(rollout.response_lengths)),
      "eval/truncated_frac": float(np.mean([r == FINISH_LENGTH
                                            for r in rollout.finish_reasons])),
  }
