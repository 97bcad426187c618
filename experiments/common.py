"""Pieces every experiment module shares: the policy model to start from, progress output, and
the config checks every entry point runs before it loads a model or creates a directory."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from rl_fp16.checkpoints import load_hf
from rl_fp16.checkpoints.train_state import CheckpointsUnreadable
from rl_fp16.models import ModelConfig
from rl_fp16.models.lora import LoraConfig
from rl_fp16.models.presets import peaked_random_model
from rl_fp16 import run_config
from rl_fp16.names import config_list
from rl_fp16.run_config import ConfigMismatchError
from rl_fp16.run_lock import RunDirectoryLocked

__all__ = ["PolicyModel", "load_policy_model", "progress", "max_model_len",
           "BASE_MODEL_DIR", "quiet_logs", "random_prompts", "merge_overrides", "clean_lists",
           "run_main", "unknown_override_problems",
           "ConfigError", "ConfigChecker", "check_shared_keys",
           "RL_OUTPUT_DIR_FIELDS", "RL_RESUME_ALLOWED", "rl_run_dir", "validate_rl_config",
           "make_rl_config", "make_lora_config"]

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


def quiet_logs() -> None:
  """Keeps absl INFO chatter (orbax's per-save lines) out of the experiment's output."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


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


class ConfigError(ValueError):
  """An experiment config that cannot work, found before any model is loaded or file written.

  `problems` holds its lines (`--config.key=value: what is allowed`), one per problem.
  """

  def __init__(self, message: str, problems: Sequence[str] = ()):
    super().__init__(message)
    self.problems = list(problems) or [message]

  @classmethod
  def listing(cls, problems: Sequence[str], what: str = "config") -> "ConfigError":
    """One error listing every problem: "Invalid {what} (N problems):" then a line each."""
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return cls(f"Invalid {what} ({count}):\n" + "\n".join(f"  {p}" for p in problems), problems)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigChecker:
  """Collects every problem of a config, then raises them together as one `ConfigError`.

  Each check names the key as the user sets it (`--config.loss.aggregation=...`), the bad value
  and what is allowed. Checks of a key the config does not have are skipped.
  """

  def __init__(self, config):
    self.config = config
    self.errors: list[str] = []

  def has(self, key: str) -> bool:
    node = self.config
    for part in key.split("."):
      try:
        if part not in node:
          return False
      except TypeError:
        return False
      node = node[part]
    return True

  def get(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def fail(self, key: str, message: str) -> None:
    value = self.get(key) if self.has(key) else None
    self.errors.append(f"--config.{key}={value!r}: {message}")

  def choice(self, key: str, allowed: Sequence[Any]) -> None:
    if self.has(key) and self.get(key) not in allowed:
      self.fail(key, f"allowed: {', '.join(map(str, allowed))}")

  def integer(self, key: str, minimum: int = 1) -> None:
    """An int >= minimum (positive by default)."""
    if not self.has(key):
      return
    value = self.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
      self.fail(key, f"must be an integer >= {minimum}")

  def number(self, key: str, *, above: float | None = None, at_least: float | None = None,
             at_most: float | None = None) -> None:
    """A finite real number in the given bounds (`above` is exclusive)."""
    if not self.has(key):
      return
    value = self.get(key)
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (above is None or value > above)
          and (at_least is None or value >= at_least) and (at_most is None or value <= at_most))
    if not ok:
      bounds = [f"> {above}" if above is not None else "",
                f">= {at_least}" if at_least is not None else "",
                f"<= {at_most}" if at_most is not None else ""]
      self.fail(key, "must be a finite number " + " and ".join(b for b in bounds if b))

  def text(self, key: str, what: str) -> None:
    """A non-empty string (unset placeholders are None)."""
    if self.has(key):
      value = self.get(key)
      if not isinstance(value, str) or not value.strip():
        self.fail(key, f"must be set: {what}")

  def precision_pair(self, key: str) -> None:
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    if self.has(key):
      try:
        get_precision_pair(self.get(key))
      except (ValueError, AttributeError, TypeError) as e:
        self.fail(key, str(e))

  def precision_pairs(self, key: str) -> None:
    """A non-empty list of precision pairs (`rl_fp16.names.config_list`)."""
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    if not self.has(key):
      return
    try:
      names = config_list(self.get(key), key)
    except ValueError:
      names = ()
      self.fail(key, "must list at least one precision pair, e.g. 'fp32,bf16,fp16'")
    for name in names:
      try:
        get_precision_pair(name)
      except ValueError as e:
        self.fail(key, str(e))

  def engine_precisions(self, engine_key: str, precision_keys: Sequence[str]) -> None:
    """The engine can sample in each (valid) precision pair's sampler policy (bitwise when the
    config's `bitwise` is True)."""
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    from rl_fp16.sampling.engines import check_engine_policy  # pylint: disable=g-import-not-at-top
    if not self.has(engine_key):
      return
    for key in precision_keys:
      if not self.has(key):
        continue
      try:  # "precision" is one name, "precisions" a list of them.
        listed = config_list(self.get(key), key)
      except ValueError:
        continue  # reported by precision_pair(s)
      bitwise = self.has("bitwise") and self.get("bitwise") is True
      for name in listed:
        try:
          check_engine_policy(self.get(engine_key),
                              get_precision_pair(name, bitwise=bitwise).sampler)
        except ValueError as e:
          self.fail(key, f"{name}: {e}")

  def check(self, condition: bool, key: str, message: str) -> None:
    if not condition:
      self.fail(key, message)

  def raise_if_failed(self, what: str = "config") -> None:
    if self.errors:
      raise ConfigError.listing(self.errors, what)


# Top-level keys with the same meaning in every experiment config that has them.
POSITIVE_INT_KEYS = ("steps", "prompts_per_step", "num_prompts", "samples_per_prompt",
                     "num_minibatches", "epochs", "max_new_tokens", "checkpoint_every",
                     "max_prompt_tokens", "max_steps", "batch_size", "eval_every",
                     "eval_problems", "layer_view_sequences")


def check_shared_keys(checker: ConfigChecker) -> None:
  """The checks of keys shared by the experiment configs (skipped for keys a config lacks):
  engine, bitwise, precision(s), algorithm, advantage, positive counts, temperature, learning
  rate, seed, model, output_dir and vllm_log_level."""
  from rl_fp16 import advantages, objectives  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.engines import ENGINES  # pylint: disable=g-import-not-at-top
  checker.choice("engine", ENGINES)
  checker.precision_pair("precision")
  checker.precision_pairs("precisions")
  checker.choice("bitwise", (False, True))
  checker.engine_precisions("engine", ("precision", "precisions"))
  checker.choice("algorithm", objectives.ALGORITHMS)
  checker.choice("advantage", advantages.ADVANTAGE_ESTIMATORS)
  for key in POSITIVE_INT_KEYS:
    checker.integer(key, 1)
  checker.integer("seed", 0)
  checker.number("temperature", above=0)
  checker.number("learning_rate", above=0)
  checker.text("model", "'default', 'random' or a Hugging Face model directory")
  checker.text("output_dir", "the run directory")
  checker.choice("vllm_log_level", LOG_LEVELS)
  check_sync_and_colocation(checker)


def check_sync_and_colocation(checker: ConfigChecker) -> None:
  """`weight_sync` (memory / directory) and `colocate` (vLLM's memory share, sleep level)."""
  from rl_fp16 import colocation  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.directory_sync import WEIGHT_SYNC_MODES  # pylint: disable=g-import-not-at-top
  checker.choice("weight_sync", WEIGHT_SYNC_MODES)
  key = "colocate.sampler_memory_fraction"
  if checker.has(key) and checker.get(key) is not None:
    checker.number(key, above=0, at_most=colocation.MAX_SAMPLER_FRACTION)
  checker.choice("colocate.sleep_level", colocation.SLEEP_LEVELS)
  level = checker.get("colocate.sleep_level") if checker.has("colocate.sleep_level") else 0
  if level in (1, 2):
    engine = checker.get("engine") if checker.has("engine") else None
    sync = checker.get("weight_sync") if checker.has("weight_sync") else "memory"
    checker.check(engine == "vllm" and sync == "memory", "colocate.sleep_level",
                  f"sleep mode needs --config.engine=vllm with --config.weight_sync=memory (the "
                  f"sampler in this process); got engine {engine!r}, weight_sync {sync!r}")


def check_config(config) -> None:
  """`check_shared_keys` on `config`; raises `ConfigError` listing every problem."""
  checker = ConfigChecker(config)
  check_shared_keys(checker)
  checker.raise_if_failed()


# A config override on the command line: --config.key=value, --config.key or --noconfig.key.
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]+)(?:=.*)?", re.DOTALL)


def _unknown_override(config, key: str) -> str | None:
  """What is wrong with the dotted `key` of `config`, or None when every part of it exists."""
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    parent = ".".join(parts[:depth])
    if not hasattr(node, "keys"):
      return f"no such key; --config.{parent} is a value, not a group of keys"
    if part in node:
      node = node[part]
      continue
    keys = sorted(map(str, node.keys()))
    prefix = f"--config.{parent}." if parent else "--config."
    close = difflib.get_close_matches(part, keys, n=1)
    if close:
      return f"no such key; did you mean {prefix}{close[0]}?"
    where = f"the keys of --config.{parent}" if parent else "the keys"
    return f"no such key; {where} are: {', '.join(keys)}"
  return None


def _unknown_overrides(config, argv: Sequence[str]) -> dict[int, str]:
  """{index in argv: problem line} for each override of a key that `config` lacks."""
  found = {}
  for index, arg in enumerate(argv):
    match = _OVERRIDE.fullmatch(arg)
    problem = match and _unknown_override(config, match.group(1))
    if problem:
      found[index] = f"{arg}: {problem}"
  return found


def unknown_override_problems(config, argv: Sequence[str]) -> list[str]:
  """One line per command-line override in `argv` (`--config.key=value`, `--config.key`,
  `--noconfig.key`) whose key the ConfigDict `config` lacks: the argument as typed, then
  "no such key" with the nearest key (difflib), or the keys there are. Pure."""
  return list(_unknown_overrides(config, argv).values())


def _config_file_arg(argv: Sequence[str]) -> str | None:
  """The value of `--config=FILE` (or `--config FILE`) in `argv`, or None."""
  for index, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _split_unknown_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without the overrides of unknown keys, their problem lines). The keys are looked up
  in the config file named by `--config` as it is, before any override; when that file cannot be
  read, argv is returned whole (the flag parser then reports it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = _config_file_arg(argv)
  if path is None:
    return list(argv), []
  only_file = [argv[0], f"--config={path}"]
  file_flags = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=file_flags, lock_config=False,
                                  sys_argv=only_file)
  try:
    file_flags(only_file)
    base = file_flags.config
  except Exception:  # pylint: disable=broad-except
    return list(argv), []
  if not isinstance(base, config_dict.ConfigDict):
    return list(argv), []
  unknown = _unknown_overrides(base, argv)
  return [arg for i, arg in enumerate(argv) if i not in unknown], list(unknown.values())


def run_main(run: Callable[[Any], Any], *, lock_config: bool = True,
             validate: Callable[[Any], None] = check_config) -> None:
  """An experiment module's entry point, called under `if __name__ == "__main__":`.

  Defines the required `--config` flag (an ml_collections config file; overrides as
  `--config.key=value`), checks the config with `validate` (by default `check_config`: the keys
  every experiment shares; a module with a full check of its own passes it), then runs
  `run(config)` under absl with quiet logs. An override of a key the config file lacks
  (`--config.num_minibatch=4`) is listed with the nearest key, together with `validate`'s
  problems. A `ConfigError` (a bad value or key), a `ConfigMismatchError` (a run directory
  holding another config) or a `RunDirectoryLocked` (a run directory another process holds) ends
  the program with its message and exit status 2, without a traceback; `CheckpointsUnreadable`
  (no checkpoint of the run restores) with its message and status 1. Flags are defined here,
  not at import, so that experiments can import each other.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv, unknown = _split_unknown_overrides(sys.argv)
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=lock_config, sys_argv=argv)
  flags.mark_flags_as_required(["config"])

  def main(unused_argv):
    del unused_argv
    quiet_logs()
    try:
      if unknown:
        problems = list(unknown)
        try:
          validate(flags.FLAGS.config)
        except ConfigError as e:
          problems += e.problems
        raise ConfigError.listing(problems)
      validate(flags.FLAGS.config)
      run(flags.FLAGS.config)
    except (ConfigError, ConfigMismatchError, RunDirectoryLocked) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    except CheckpointsUnreadable as e:  # the run's data, not its config: status 1
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from None

  app.run(main, argv=argv)


# -------------------------------------------- the RL experiment's config (rl, sanity) ----
# Shared by experiments.rl (which runs it) and experiments.sanity (which checks every run's config
# before the first starts, then runs `python -m experiments.rl` per precision).

RL_OUTPUT_DIR_FIELDS = ("algorithm", "precision", "seed", "engine", "advantage", "bitwise")
# Keys a resume may change (see rl_fp16.run_config.check_run_config): the length of the run,
# how often it checkpoints, where its directory is, how much vLLM logs, and the multi-host
# coordinator.
RL_RESUME_ALLOWED = run_config.RESUME_ALLOWED_KEYS + ("distributed",)


def rl_run_dir(config) -> str:
  """The run directory of an RL config: `output_dir` with its {field}s filled in, absolute."""
  fields = {k: config.get(k) for k in RL_OUTPUT_DIR_FIELDS}
  return os.path.abspath(config.output_dir.format(**fields))


def validate_rl_config(config) -> None:
  """Checks every value of an RL experiment config; reads no model and writes nothing.

  Raises:
    ConfigError: listing every bad value (as `--config.key=value`) with what is allowed.
  """
  from rl_fp16 import objectives  # pylint: disable=g-import-not-at-top
  from rl_fp16.data.rl_problems import TASKS  # pylint: disable=g-import-not-at-top
  from rl_fp16.models.lora import LORA_TARGETS  # pylint: disable=g-import-not-at-top
  check = ConfigChecker(config)
  check_shared_keys(check)
  for key in ("engine", "precision", "algorithm", "advantage", "steps", "prompts_per_step",
              "samples_per_prompt", "num_minibatches", "epochs", "max_new_tokens", "temperature",
              "learning_rate", "seed", "checkpoint_every", "output_dir", "model"):
    check.check(check.has(key), key, "missing from the config")
  check.integer("samples_per_prompt", 2)  # group-relative advantages need groups
  counts = [config.get(k) for k in ("prompts_per_step", "samples_per_prompt", "num_minibatches")]
  if all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
    rows = config.prompts_per_step * config.samples_per_prompt
    check.check(rows % config.num_minibatches == 0, "num_minibatches",
                f"must divide the {rows} rollouts of a step (prompts_per_step "
                f"{config.prompts_per_step} x samples_per_prompt {config.samples_per_prompt})")
  if check.has("grad_clip") and config.grad_clip is not None:
    check.number("grad_clip", above=0)
  check.choice("task", TASKS)
  if config.get("task", "synthetic") == "math":
    check.text("data_path", "the MATH problems (JSONL / parquet / tfds directory) for task 'math'")
    if isinstance(config.get("data_path"), str) and config.data_path:
      check.check(os.path.exists(config.data_path), "data_path", "no such file or directory")
  if check.has("loss"):
    check.choice("loss.aggregation", objectives.AGGREGATIONS)
    for key in ("token_is_cap", "seq_is_cap"):
      check.number(f"loss.{key}", above=0)
    for key in ("clip_eps_low", "clip_eps_high", "gspo_eps_low", "gspo_eps_high"):
      check.number(f"loss.{key}", at_least=0)
  if check.has("perfectible"):
    check.integer("perfectible.pool", 1)
    check.integer("perfectible.k", 1)
    check.number("perfectible.low", at_least=0, at_most=1)
    check.number("perfectible.high", at_least=0, at_most=1)
    low, high = config.perfectible.get("low"), config.perfectible.get("high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
      check.check(low <= high, "perfectible.low", f"must be <= perfectible.high ({high})")
  if check.has("lora") and config.lora.get("enabled", False):
    check.integer("lora.rank", 1)
    check.number("lora.alpha", above=0)
    targets = config.lora.get("targets")
    check.check(not isinstance(targets, str) and bool(targets)
                and all(t in LORA_TARGETS for t in targets), "lora.targets",
                f"must be a non-empty list of: {', '.join(LORA_TARGETS)}")
  check.integer("prompt_bucket", 1)  # both optional (`RL_BUCKET_KEYS`)
  check.integer("sequence_bucket", 0)
  if check.has("expert_mismatch"):
    check.integer("expert_mismatch.every", 0)
  if check.has("eval"):
    check.integer("eval.every", 0)
    check.integer("eval.num_problems", 1)
    check.integer("eval.samples_per_problem", 1)
    check.number("eval.temperature", above=0)
    check.integer("eval.seed", 0)
    check.check(not config.eval.get("every") or config.get("task", "synthetic") == "synthetic",
                "eval.every", "held-out evaluation draws fresh problems from the synthetic task's "
                "generator; allowed with task 'math': 0")
  if check.has("mesh"):
    for axis in ("data", "fsdp", "tensor"):
      value = config.mesh.get(axis)
      check.check(isinstance(value, int) and (value >= 1 or value == -1), f"mesh.{axis}",
                  "must be a positive device count, or -1 for the rest of the devices")
  if check.has("output_dir") and isinstance(config.output_dir, str) and not check.errors:
    try:
      rl_run_dir(config)
    except (KeyError, IndexError, ValueError) as e:
      check.fail("output_dir", f"may use only the fields {{{'}, {'.join(RL_OUTPUT_DIR_FIELDS)}}} "
                 f"({type(e).__name__}: {e})")
  if not check.errors:  # anything the library's own checks still refuse
    try:
      make_rl_config(config)
    except ValueError as e:
      check.errors.append(str(e))
  if not check.errors:
    check_response_budget(check)
  check.raise_if_failed("RL experiment config")


def model_dir_of(spec: str) -> str | None:
  """The Hugging Face directory `load_policy_model(spec)` reads, or None (random, or missing)."""
  if spec == "default":
    spec = BASE_MODEL_DIR
  if spec == "random" or not os.path.isfile(os.path.join(spec, "config.json")):
    return None
  return spec


def response_budget_problem(longest_prompt: int, max_new_tokens: int, max_positions: int,
                            prompt: str) -> str | None:
  """Why a prompt of `longest_prompt` tokens plus `max_new_tokens` does not fit a context of
  `max_positions`, or None when it fits. `prompt` names the prompt bound. Pure."""
  need = longest_prompt + max_new_tokens
  if need <= max_positions:
    return None
  allowed = (f"at most {max_positions - longest_prompt}" if longest_prompt < max_positions
             else "none: the prompts alone fill the context")
  return (f"{prompt} plus the response budget needs {need} positions, which exceeds the model's "
          f"max_position_embeddings={max_positions}; allowed: {allowed}")


def check_response_budget(check: ConfigChecker) -> None:
  """The longest prompt of the problem set plus `max_new_tokens` fits the model's context.

  Reads the model directory's config.json and, for the synthetic task, its task config and
  tokenizer (the task's longest prompt: every subset and held-out problem is drawn from it); for
  MATH the prompt bound is `max_prompt_tokens` (longer prompts are refused). Skipped when the
  model directory or its task files are missing (loading the model then says so).
  """
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  from rl_fp16.data.tasks import MathTask, SyntheticTask  # pylint: disable=g-import-not-at-top
  config = check.config
  model_dir = model_dir_of(config.model)
  if model_dir is None:
    return
  try:
    max_positions = ModelConfig.from_hf(model_dir).max_position_embeddings
  except (OSError, ValueError, KeyError, TypeError) as e:
    check.fail("model", f"its config.json cannot be read ({type(e).__name__}: {e})")
    return
  if config.get("task", "synthetic") == "math":
    longest = config.get("max_prompt_tokens", MathTask.max_prompt_tokens)
    prompt = f"--config.max_prompt_tokens ({longest})"
  else:
    if not os.path.exists(os.path.join(model_dir, synthetic.TASK_CONFIG_FILE)):
      return
    task = SyntheticTask(synthetic.load_task_config(model_dir),
                         tokenizer.load_tokenizer(model_dir))
    longest = task.max_prompt_len()
    prompt = f"the longest prompt ({longest} tokens)"
  problem = response_budget_problem(longest, config.max_new_tokens, max_positions, prompt)
  if problem:
    check.fail("max_new_tokens", problem)


def make_lora_config(config) -> LoraConfig | None:
  """`config.lora` as a `LoraConfig`, or None when absent or not enabled."""
  lora = config.get("lora")
  if lora is None or not lora.enabled:
    return None
  return LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))


# Optional RL config keys passed as they are to `RLConfig` (absent: its defaults).
RL_BUCKET_KEYS = ("prompt_bucket", "sequence_bucket")


def make_rl_config(config) -> RLConfig:
  """The library's `RLConfig` of an RL experiment config (raises ValueError on what it refuses)."""
  from rl_fp16 import objectives  # pylint: disable=g-import-not-at-top
  from rl_fp16.train import RLConfig  # pylint: disable=g-import-not-at-top
  loss = objectives.LossConfig(max_response_len=config.max_new_tokens, **config.loss.to_dict())
  return RLConfig(algorithm=config.algorithm, advantage=config.advantage, loss=loss,
                  samples_per_prompt=config.samples_per_prompt,
                  num_minibatches=config.num_minibatches, epochs=config.epochs,
                  temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                  lora=make_lora_config(config),
                  **{key: config[key] for key in RL_BUCKET_KEYS if key in config})
