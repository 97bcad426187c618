"""Pieces every experiment module shares: the policy model to start from, progress output, and
the config checks its entry point (`rl_fp16.cli.run_main`) runs before it loads a model or
creates a directory: `validate_rl_config` for the RL experiment's typed config, `check_config`
for the other experiments' keys."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from rl_fp16.checkpoints import load_hf
from rl_fp16.config_checks import ConfigChecker, ConfigError
from rl_fp16.models import ModelConfig
from rl_fp16.models.presets import peaked_random_model
from rl_fp16 import rl_experiment
from rl_fp16.names import config_list
from rl_fp16.rl_experiment import RLExperimentConfig

__all__ = ["PolicyModel", "load_policy_model", "progress", "max_model_len",
           "BASE_MODEL_DIR", "random_prompts", "merge_overrides", "clean_lists",
           "ConfigError", "ConfigChecker", "check_shared_keys", "check_config",
           "validate_rl_config"]

# The tiny base model trained by experiments/pretrain_base.py and committed with the repo.
BASE_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny_base")


@dataclasses.dataclass
class PolicyModel:
  """A model to sample from and train, with a way to make prompts for it."""

  config: ModelConfig
  params: Any
  description: str
  make_prompts: Callable[[int, int], list[list[int]]]  # (num, seed) -> token-id prompts
  tokenizer_dir: str | None = None
  eos_token_ids: tuple[int, ...] = ()


def random_prompts(vocab_size: int) -> Callable[[int, int], list[list[int]]]:
  def make(num: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, rng.integers(8, 33)).tolist() for _ in range(num)]
  return make


def _task_prompts(model_dir: str) -> Callable[[int, int], list[list[int]]]:
  from rl_fp16 import seeds  # pylint: disable=g-import-not-at-top
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top

  tok = tokenizer.load_tokenizer(model_dir)
  task = synthetic.load_task_config(model_dir)

  def make(num: int, seed: int) -> list[list[int]]:
    problems = synthetic.generate_problems(task, num, seed=seeds.benchmark_prompts(seed))
    return [tok.encode(p.prompt, add_bos=True) for p in problems]
  return make


def load_policy_model(spec: str, *, seed: int = 0) -> PolicyModel:
  """"default" (committed tiny base model if present, else "random"), "random", or an HF dir."""
  if spec == "default":
    spec = BASE_MODEL_DIR if os.path.isdir(BASE_MODEL_DIR) else "random"
  if spec == "random":
    config, params = peaked_random_model(seed)
    return PolicyModel(config, params, "random Qwen2 (4 layers, d=128, vocab 512) with LM head "
                       "scaled to logit std 4 (peaked, LLM-like next-token distributions; no "
                       "trained base model found)", random_prompts(config.vocab_size))
  if not os.path.isdir(spec):
    raise FileNotFoundError(f"--config.model={spec!r} is neither 'default', 'random' nor a "
                            "Hugging Face model directory")
  config, params = load_hf(spec)
  has_task = os.path.exists(os.path.join(spec, "task_config.json"))
  prompts = _task_prompts(spec) if has_task else random_prompts(config.vocab_size)
  has_tokenizer = os.path.exists(os.path.join(spec, "tokenizer.json"))
  return PolicyModel(config, params, f"{config.model_type} model from {spec} "
                     f"({config.num_params() / 1e6:.2f}M params)", prompts,
                     tokenizer_dir=spec if has_tokenizer else None,
                     eos_token_ids=config.eos_token_ids)


def max_model_len(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
  """Context length an engine needs for these prompts plus the response budget (rounded up)."""
  need = max(len(p) for p in prompts) + max_new_tokens
  return int(-(-need // 64) * 64)


def progress(items: Iterable, **kwargs) -> Iterable:
  """tqdm progress bar on stderr (no-op formatting in logs)."""
  return tqdm.tqdm(items, dynamic_ncols=True, **kwargs)


def merge_overrides(config, overrides: dict[str, Any]) -> None:
  """Sets `overrides` (a nested dict) on the ConfigDict `config` in place, recursing into dicts."""
  for key, value in overrides.items():
    if isinstance(value, dict):
      merge_overrides(config[key], value)
    else:
      config[key] = value


def clean_lists(config, names: Sequence[str] = (), ints: Sequence[str] = ()) -> None:
  """Sets each list field of the ConfigDict `config` (dotted keys, e.g. "compare.cases") to the
  clean tuple `rl_fp16.names.config_list` reads from it: names for `names`, integers for `ints`.
  In place: call it on a copy. Raises ValueError naming the first bad field."""
  for key, item in [*((k, str) for k in names), *((k, int) for k in ints)]:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = config_list(node[leaf], key, item=item)


# Top-level keys with the same meaning in every experiment config that has them (the RL
# experiment's config is typed: `rl_fp16.rl_experiment`).
POSITIVE_INT_KEYS = ("num_prompts", "samples_per_prompt", "max_new_tokens", "max_steps",
                     "batch_size", "eval_every", "eval_problems", "layer_view_sequences")


def check_shared_keys(checker: ConfigChecker) -> None:
  """The checks of keys shared by the other experiments' configs (skipped for keys a config
  lacks): engine, bitwise, precision(s), algorithm, positive counts, temperature, learning rate,
  seed, model and output_dir."""
  from rl_fp16 import objectives  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.engines import ENGINES  # pylint: disable=g-import-not-at-top
  checker.choice("engine", ENGINES)
  checker.precision_pair("precision")
  checker.precision_pairs("precisions")
  checker.choice("bitwise", (False, True))
  checker.engine_precisions("engine", ("precision", "precisions"))
  checker.choice("algorithm", objectives.ALGORITHMS)
  for key in POSITIVE_INT_KEYS:
    checker.integer(key, 1)
  checker.integer("seed", 0)
  checker.number("temperature", above=0)
  checker.number("learning_rate", above=0)
  checker.text("model", "'default', 'random' or a Hugging Face model directory")
  checker.text("output_dir", "the run directory")


def check_config(config) -> None:
  """`check_shared_keys` on `config`; raises `ConfigError` listing every problem."""
  checker = ConfigChecker(config)
  check_shared_keys(checker)
  checker.raise_if_failed()


# -------------------------------------------- the RL experiment's config (rl, sanity) ----


def model_dir_of(spec: str) -> str | None:
  """The Hugging Face directory `load_policy_model(spec)` reads, or None (random, or missing)."""
  if spec == "default":
    spec = BASE_MODEL_DIR
  if not isinstance(spec, str) or spec == "random":
    return None
  return spec if os.path.isfile(os.path.join(spec, "config.json")) else None


def validate_rl_config(config) -> RLExperimentConfig:
  """The typed RL experiment of a config (`rl_experiment.from_config_dict`), whose prompts plus
  response budget fit the model's context; reads the model directory's config and task files, no
  weights, and writes nothing.

  Raises:
    ConfigError: listing every bad value (as `--config.key=value`) with what is allowed.
  """
  experiment = rl_experiment.from_config_dict(config)
  rl_experiment.check_response_budget(experiment, model_dir_of(experiment.model))
  return experiment
