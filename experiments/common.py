"""Pieces every experiment module shares: the policy model to start from, progress output."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from rl_fp16.checkpoints import load_hf
from rl_fp16.models import ModelConfig
from rl_fp16.models.presets import peaked_random_model
from rl_fp16.results import write_json_atomic  # re-exported for experiments

__all__ = ["PolicyModel", "load_policy_model", "progress", "write_json_atomic", "max_model_len",
           "BASE_MODEL_DIR", "quiet_logs", "random_prompts", "merge_overrides", "run_main",
           "markdown_table"]

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
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top

  tok = tokenizer.load_tokenizer(model_dir)
  task = synthetic.load_task_config(model_dir)

  def make(num: int, seed: int) -> list[list[int]]:
    problems = synthetic.generate_problems(task, num, seed=seed + 10_000)
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


def quiet_logs() -> None:
  """Keeps absl INFO chatter (orbax's per-save lines) out of the experiment's output."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


def progress(items: Iterable, **kwargs) -> Iterable:
  """tqdm progress bar on stderr (no-op formatting in logs)."""
  return tqdm.tqdm(items, dynamic_ncols=True, **kwargs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; cells are formatted with str()."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def merge_overrides(config, overrides: dict[str, Any]) -> None:
  """Sets `overrides` (a nested dict) on the ConfigDict `config` in place, recursing into dicts."""
  for key, value in overrides.items():
    if isinstance(value, dict):
      merge_overrides(config[key], value)
    else:
      config[key] = value


def run_main(run: Callable[[Any], Any], *, lock_config: bool = True) -> None:
  """An experiment module's entry point, called under `if __name__ == "__main__":`.

  Defines the required `--config` flag (an ml_collections config file; overrides as
  `--config.key=value`), then runs `run(config)` under absl with quiet logs. Flags are defined
  here, not at import, so that experiments can import each other.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=lock_config)
  flags.mark_flags_as_required(["config"])

  def main(argv):
    del argv
    quiet_logs()
    run(flags.FLAGS.config)

  app.run(main)
