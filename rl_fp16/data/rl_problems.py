"""The problems an RL run trains on: its task, its perfectible subset and each step's problems.

`load_task` picks the task (the synthetic task shipped with a model directory, or MATH problems),
`load_or_build_subset` the problems to train on (a MATH file, or the synthetic perfectible subset:
shipped with the model, cached in the run directory, or built now by `build_subset`), and
`step_problems` the problems of one step. The `config` arguments are the RL experiment's config
(experiments/configs/sanity.py): only the keys named in each docstring are read.
"""

from __future__ import annotations

import os

import numpy as np

from rl_fp16 import seeds
from rl_fp16.data import math_data, perfectible
from rl_fp16.data.tasks import MathTask, SyntheticTask, problem_from_record
from rl_fp16.precision import get_policy
from rl_fp16.sampling.engines import JaxEngine

PERFECTIBLE_FILE = "perfectible.jsonl"  # the subset's file name, next to a model or in a run dir
TASKS = ("synthetic", "math")


def load_task(model, config=None):
  """The task to train on: the synthetic task of the model directory (default), or MATH problems
  from `config.data_path` when `config.task == "math"`.

  Reads `config.task`, and for MATH `config.template` and `config.max_prompt_tokens`.
  """
  if config is not None and config.get("task", "synthetic") == "math":
    import transformers  # pylint: disable=g-import-not-at-top
    if model.tokenizer_dir is None:
      raise ValueError(f"The MATH task needs a model directory with a tokenizer; got "
                       f"{model.description}")
    return MathTask(transformers.AutoTokenizer.from_pretrained(model.tokenizer_dir),
                    template=config.template, max_prompt_tokens=config.max_prompt_tokens)
  if config is not None and config.get("task", "synthetic") != "synthetic":
    raise ValueError(f"Unknown --config.task={config.task!r}; allowed: synthetic, math")
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
  return task.pass_rates_subset(engine, task.problems(pool, seed=seeds.perfectible_pool(seed)), k=k, low=low,
                                high=high, max_new_tokens=max_new_tokens, seed=seed)


def load_or_build_subset(config, model, task, run_dir: str):
  """The problems to train on: (problems, pass rates, the file they came from or went to).

  MATH: the problems of `config.data_path` (JSONL / parquet / tfds directory; e.g. a perfectible
  subset written by `rl_fp16.data.perfectible.write_subset`). Synthetic: the perfectible subset
  shipped with the model, cached in the run dir, or built now (`config.perfectible`,
  `config.max_new_tokens`, `config.seed`).
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
                               max_new_tokens=config.max_new_tokens, seed=config.seed)
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
