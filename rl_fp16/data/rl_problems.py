"""The problems an RL run trains on: its task, its perfectible subset and each step's problems.

`load_task` picks the task (the synthetic task shipped with a model directory, or MATH problems),
`load_or_build_subset` the problems to train on (a MATH file, or the synthetic perfectible subset:
shipped with the model, cached in the run directory, or built now by `build_subset`), and
`step_problems` the problems of one step. What to load is a `ProblemsConfig`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from rl_fp16 import seeds
from rl_fp16.config_checks import FieldChecks
from rl_fp16.data import math_data, perfectible
from rl_fp16.data.tasks import MathTask, SyntheticTask, problem_from_record
from rl_fp16.precision import get_policy
from rl_fp16.sampling.engines import JaxEngine

PERFECTIBLE_FILE = "perfectible.jsonl"  # the subset's file name, next to a model or in a run dir
TASKS = ("synthetic", "math")


@dataclasses.dataclass(frozen=True)
class PerfectibleConfig:
  """The perfectible subset: of `pool` fresh problems, those whose pass rate over `k` samples
  (fp32 JAX engine, temperature 1) lies in [low, high]."""

  pool: int = 256
  k: int = 16
  low: float = 0.2
  high: float = 0.8

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.integer("pool", 1)
    checks.integer("k", 1)
    checks.number("low", at_least=0, at_most=1)
    checks.number("high", at_least=0, at_most=1)
    if not checks.problems:
      checks.check(self.low <= self.high, "low", f"must be <= high ({self.high})")
    checks.done()


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
  """Where an RL run's problems come from.

  Attributes:
    task: one of `TASKS`: "synthetic" (the model directory's task_config.json; trains on its
      perfectible subset) or "math" (problems from `data_path`, math-verify reward).
    data_path: MATH problems (JSONL / parquet / tfds directory); required by task "math".
    template: the MATH prompt template (`rl_fp16.data.tasks.MathTask`).
    max_prompt_tokens: MATH prompts longer than this are refused.
    perfectible: how the synthetic task's subset is built when no file holds it.
  """

  task: str = "synthetic"
  data_path: str = ""
  template: str = "r1_distill"
  max_prompt_tokens: int = 1024
  perfectible: PerfectibleConfig = PerfectibleConfig()

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.choice("task", TASKS)
    checks.integer("max_prompt_tokens", 1)
    if self.task == "math":
      checks.text("data_path", "the MATH problems (JSONL / parquet / tfds directory) for task "
                  "'math'")
      if isinstance(self.data_path, str) and self.data_path.strip():
        checks.check(os.path.exists(self.data_path), "data_path", "no such file or directory")
    checks.done()


def load_task(model, config: ProblemsConfig = ProblemsConfig()):
  """The task to train on: the synthetic task of the model directory, or MATH problems from
  `config.data_path` (`config.template`, `config.max_prompt_tokens`) when `config.task` is
  "math"."""
  if config.task == "math":
    import transformers  # pylint: disable=g-import-not-at-top
    if model.tokenizer_dir is None:
      raise ValueError(f"The MATH task needs a model directory with a tokenizer; got "
                       f"{model.description}")
    return MathTask(transformers.AutoTokenizer.from_pretrained(model.tokenizer_dir),
                    template=config.template, max_prompt_tokens=config.max_prompt_tokens)
  if model.tokenizer_dir is None:
    raise ValueError(f"RL needs a model with a tokenizer and task_config.json; got "
                     f"{model.description}. Train one with experiments.pretrain_base.")
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  return SyntheticTask(synthetic.load_task_config(model.tokenizer_dir),
                       tokenizer.load_tokenizer(model.tokenizer_dir))


def build_subset(model, task: SyntheticTask, *, pool: int, k: int, low: float, high: float,
                 max_new_tokens: int, seed: int):
  """The perfectible subset of `pool` fresh problems: pass rate over k samples in [low, high].

  Sampled with the fp32 JAX engine at temperature 1, so the subset does not depend on the
  precision under study.
  """
  engine = JaxEngine(model.config, model.params, get_policy("fp32", "sampler"),
                     eos_token_ids=model.eos_token_ids, batch_bucket=64)
  return task.pass_rates_subset(engine, task.problems(pool, seed=seeds.perfectible_pool(seed)),
                                k=k, low=low, high=high, max_new_tokens=max_new_tokens, seed=seed)


def load_or_build_subset(config: ProblemsConfig, model, task, run_dir: str, *,
                         max_new_tokens: int, seed: int):
  """The problems to train on: (problems, pass rates, the file they came from or went to).

  MATH: the problems of `config.data_path` (e.g. a perfectible subset written by
  `rl_fp16.data.perfectible.write_subset`). Synthetic: the perfectible subset shipped with the
  model, cached in the run dir, or built now (`config.perfectible`, sampling `max_new_tokens`
  tokens from `seed`).
  """
  if isinstance(task, MathTask):
    problems = math_data.load_math_problems(config.data_path)
    rates = [float(p.metadata.get("pass_rate", float("nan"))) for p in problems]
    return problems, rates, config.data_path
  for path in (os.path.join(model.tokenizer_dir, PERFECTIBLE_FILE),
               os.path.join(run_dir, PERFECTIBLE_FILE)):
    if os.path.exists(path):
      records, rates = perfectible.read_subset(path)
      return [problem_from_record(r) for r in records], rates, path
  pc = config.perfectible
  print(f"building the perfectible subset: {pc.pool} problems x {pc.k} samples (fp32 JAX engine)")
  subset, rates = build_subset(model, task, pool=pc.pool, k=pc.k, low=pc.low, high=pc.high,
                               max_new_tokens=max_new_tokens, seed=seed)
  path = os.path.join(run_dir, PERFECTIBLE_FILE)
  perfectible.write_subset(path, subset, rates)
  return subset, rates, path


def step_problems(subset, step: int, prompts_per_step: int, seed: int):
  """The problems of a step: epochs over the subset, each in a seeded random order."""
  per_epoch = max(len(subset) // prompts_per_step, 1)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng(seeds.epoch_order(seed, epoch)).permutation(len(subset))
  chosen = order[index * prompts_per_step:(index + 1) * prompts_per_step]
  if len(chosen) < prompts_per_step:  # tiny subsets: wrap around
    chosen = np.resize(order, prompts_per_step)
  return [subset[i] for i in chosen]


def problem_text(problem) -> str:
  """A problem's prompt as a person reads it (synthetic `prompt`, MATH `question`)."""
  return str(getattr(problem, "prompt", None) or getattr(problem, "question", "") or problem)
