"""Every setting of an RL run, typed: `RLExperimentConfig`, and its one conversion from a config
file's ConfigDict.

A config file (experiments/configs/sanity.py) is `config_dict(RLExperimentConfig(...))`: the
flat layout users override on the command line (`--config.learning_rate`, `--config.loss.
token_is_cap`), whose defaults are the dataclasses'. `from_config_dict` reads such a ConfigDict
(or a run's config.json) back into the dataclasses; each checks its own fields, and every
problem is listed at once as `ConfigError`, each line naming the user's key, the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any

from rl_fp16 import colocation, evaluation, names
from rl_fp16.config_checks import ConfigError, FieldChecks, FieldProblems
from rl_fp16.data.rl_problems import PerfectibleConfig, ProblemsConfig
from rl_fp16.models.lora import LoraConfig
from rl_fp16.objectives import LossConfig
from rl_fp16.run_config import RESUME_ALLOWED_KEYS, flatten_config
from rl_fp16.train import OptimizerConfig, RLConfig

# The fields an RL run directory's name may use: output_dir="runs/{algorithm}_{precision}".
OUTPUT_DIR_FIELDS = ("algorithm", "precision", "seed", "engine", "advantage", "bitwise")
# Keys a resume may change (`rl_fp16.run_config.check_run_config`), and the multi-host
# coordinator.
RESUME_ALLOWED = RESUME_ALLOWED_KEYS + ("distributed",)
# Keys a config file may hold that no RL code reads (kept in config.json): the paper recipe's
# names (experiments/configs/paper.py) and the MoE base model's shape (experiments.pretrain_base).
INFORMATION_KEYS = ("paper_run", "paper_script", "moe_base")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class RLExperimentConfig:
  """An RL run (experiments/rl.py): what it trains, how, and where it writes.

  Attributes:
    model: "default" (the committed tiny base), "random" or a Hugging Face model directory.
    engine: "vllm" or "jax" (`rl_fp16.sampling.engines.ENGINES`).
    precision: a precision pair: "bf16", "fp16", "fp32", "TRAINER-SAMPLER" ("bf16-fp16"), or
      emulated "eK" names (JAX engine only).
    bitwise: the JAX sampler's log-probs equal the trainer's bit for bit (docs/bitwise.md).
    decode_row_group: JAX engine: decode the rows in groups of this many, one group after the
      other (0: all at once); the same tokens, faster on a CPU in fp32 when the model's weights
      are small (docs/performance.md).
    seed: seeds the problems' order, the sampling and any LoRA init.
    steps: RL steps; prompts_per_step: problems per step (x `rl.samples_per_prompt` rows).
    checkpoint_every: RL steps between checkpoints (and the last).
    output_dir: the run directory; may name the fields of `OUTPUT_DIR_FIELDS`.
    vllm_log_level: vLLM's own logger level ("WARNING" keeps its INFO lines out).
    weight_sync: "memory" (the engine in this process) or "directory" (versioned HF dirs read
      by a sampler worker; docs/sharding.md).
    rl: what one RL iteration does (algorithm, advantage, loss, batch shape, LoRA).
    optimizer: AdamW and gradient clipping.
    problems: the task and the subset to train on.
    eval: held-out evaluation (every 0: off).
    colocate: how vLLM and the trainer share a GPU.
    mesh: device counts per axis of the sharded trainer ({"data", "fsdp", "tensor"}; -1 = the
      rest), or None for one device.
    distributed: `jax.distributed.initialize` keywords of a multi-host run, or None.
    expert_mismatch_every: MoE models log the expert-set mismatch every this many steps (0:
      never).
  """

  model: str = "default"
  engine: str = "vllm"
  precision: str = "bf16"
  bitwise: bool = False
  decode_row_group: int = 0
  seed: int = 0
  steps: int = 20
  prompts_per_step: int = 8
  checkpoint_every: int = 10
  output_dir: str = "runs/rl/{algorithm}_{precision}_seed{seed}"
  vllm_log_level: str = "WARNING"
  weight_sync: str = "memory"
  rl: RLConfig = RLConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  problems: ProblemsConfig = ProblemsConfig()
  eval: evaluation.EvalConfig = evaluation.EvalConfig()
  colocate: colocation.ColocationConfig = colocation.ColocationConfig()
  mesh: Mapping[str, int] | None = None
  distributed: Mapping[str, Any] | None = None
  expert_mismatch_every: int = 1

  def __post_init__(self):
    checks = FieldChecks(self)
    self._check_run(checks)
    self._check_together(checks)
    checks.done()

  def _check_run(self, checks: FieldChecks) -> None:
    from rl_fp16.sampling.directory_sync import WEIGHT_SYNC_MODES  # pylint: disable=g-import-not-at-top
    from rl_fp16.sampling.engines import ENGINES  # pylint: disable=g-import-not-at-top
    checks.text("model", "'default', 'random' or a Hugging Face model directory")
    checks.choice("engine", ENGINES)
    checks.choice("bitwise", (False, True))
    for name in ("steps", "prompts_per_step", "checkpoint_every"):
      checks.integer(name, 1)
    checks.integer("seed", 0)
    checks.integer("expert_mismatch_every", 0)
    checks.integer("decode_row_group", 0)
    checks.text("output_dir", "the run directory")
    checks.choice("vllm_log_level", LOG_LEVELS)
    checks.choice("weight_sync", WEIGHT_SYNC_MODES)
    for axis, count in (self.mesh or {}).items():
      checks.check(axis in MESH_AXES and isinstance(count, int) and not isinstance(count, bool)
                   and (count >= 1 or count == -1), "mesh", f"{axis}={count!r}: each of "
                   f"{', '.join(MESH_AXES)} must be a positive device count, or -1 for the rest")

  def _check_together(self, checks: FieldChecks) -> None:
    """Checks of one field against another (or of the run directory's name)."""
    self._check_precision(checks)
    rows = self.prompts_per_step * self.rl.samples_per_prompt
    if isinstance(rows, int) and rows % self.rl.num_minibatches:
      checks.fail("rl.num_minibatches", f"must divide the {rows} rollouts of a step "
                  f"(prompts_per_step {self.prompts_per_step} x samples_per_prompt "
                  f"{self.rl.samples_per_prompt})")
    minibatch = rows // self.rl.num_minibatches if isinstance(rows, int) else None
    micro = self.rl.micro_batch_rows
    if minibatch and isinstance(micro, int) and micro and minibatch % micro:
      checks.fail("rl.micro_batch_rows", f"must divide the {minibatch} rows of a minibatch "
                  f"({rows} rollouts / num_minibatches {self.rl.num_minibatches})")
    checks.check(not self.eval.every or self.problems.task == "synthetic", "eval.every",
                 "held-out evaluation draws fresh problems from the synthetic task's generator; "
                 "allowed with task 'math': 0")
    checks.check(self.engine == "jax" or not self.decode_row_group, "decode_row_group",
                 f"groups the JAX engine's decode; engine {self.engine!r} takes 0")
    if self.colocate.sleep_level in (1, 2):
      checks.check(self.engine == "vllm" and self.weight_sync == "memory", "colocate.sleep_level",
                   f"sleep mode needs --config.engine=vllm with --config.weight_sync=memory (the "
                   f"sampler in this process); got engine {self.engine!r}, weight_sync "
                   f"{self.weight_sync!r}")
    if isinstance(self.output_dir, str) and not checks.problems:
      try:
        run_dir(self)
      except (KeyError, IndexError, ValueError) as e:
        checks.fail("output_dir", f"may use only the fields {{{'}, {'.join(OUTPUT_DIR_FIELDS)}}} "
                    f"({type(e).__name__}: {e})")

  def _check_precision(self, checks: FieldChecks) -> None:
    """A precision pair the engine can sample in (bitwise when `bitwise`)."""
    from rl_fp16.precision import get_precision_pair  # pylint: disable=g-import-not-at-top
    from rl_fp16.sampling.engines import check_engine_policy  # pylint: disable=g-import-not-at-top
    try:
      pair = get_precision_pair(self.precision, bitwise=self.bitwise is True)
    except (ValueError, AttributeError, TypeError) as e:
      checks.fail("precision", str(e))
      return
    try:
      check_engine_policy(self.engine, pair.sampler)
    except ValueError as e:
      if self.engine in names.ENGINES:
        checks.fail("precision", f"{self.precision}: {e}")


def run_dir(config: RLExperimentConfig) -> str:
  """The run directory: `output_dir` with its {field}s filled in, absolute."""
  fields = dict(algorithm=config.rl.algorithm, precision=config.precision, seed=config.seed,
                engine=config.engine, advantage=config.rl.advantage, bitwise=config.bitwise)
  return os.path.abspath(config.output_dir.format(**fields))


# ------------------------------------------------------------------------ the flat layout ----
# Where each field sits in a config file: a dotted path in RLExperimentConfig -> the user's key.

def _fields(cls, *, skip=()) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def _layout() -> dict[str, str]:
  keys = {name: name for name in _fields(RLExperimentConfig, skip=(
      "rl", "optimizer", "problems", "eval", "colocate", "mesh", "distributed",
      "expert_mismatch_every"))}
  keys["expert_mismatch_every"] = "expert_mismatch.every"
  keys.update({f"rl.{name}": name for name in _fields(RLConfig, skip=("loss", "lora"))})
  keys.update({f"rl.loss.{name}": f"loss.{name}"
               for name in _fields(LossConfig, skip=("max_response_len",))})
  keys.update({f"rl.lora.{name}": f"lora.{name}" for name in _fields(LoraConfig)})
  keys.update({f"optimizer.{name}": (name if name in ("learning_rate", "grad_clip")
                                     else f"optimizer.{name}")
               for name in _fields(OptimizerConfig)})
  keys.update({f"problems.{name}": name for name in _fields(ProblemsConfig, skip=("perfectible",))})
  keys.update({f"problems.perfectible.{name}": f"perfectible.{name}"
               for name in _fields(PerfectibleConfig)})
  keys.update({f"eval.{name}": f"eval.{name}" for name in _fields(evaluation.EvalConfig)})
  keys.update({f"colocate.{name}": f"colocate.{name}"
               for name in _fields(colocation.ColocationConfig)})
  return keys


LAYOUT = _layout()
USER_KEYS = {key: path for path, key in LAYOUT.items()}
# Fields set from another key: the loss's Dr.GRPO constant is the generation budget.
DERIVED = {"rl.loss.max_response_len": "max_new_tokens"}
# Blocks a config file holds only when it uses them: {block: RLExperimentConfig field}.
OPTIONAL_BLOCKS = {"mesh": "mesh", "distributed": "distributed"}


def user_key(path: str) -> str:
  """The config-file key of a dotted field path ("rl.loss.token_is_cap" -> "loss.token_is_cap");
  a path inside a part ("rl.lora") names that part's block."""
  if path in LAYOUT or path in DERIVED:
    return LAYOUT.get(path) or DERIVED[path]
  for prefix, block in (("rl.lora", "lora"), ("rl.loss", "loss"), ("mesh", "mesh"),
                        ("distributed", "distributed")):
    if path == prefix or path.startswith(prefix + "."):
      return block + path[len(prefix):]
  return path


# ---------------------------------------------------------------------------- conversion ----

def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"rl.loss.token_is_cap": 2.0} -> {"rl": {"loss": {"token_is_cap": 2.0}}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


class _Builder:
  """Builds the dataclasses of one config, collecting each one's problems as user-key lines.

  A part that refuses some fields is rebuilt from its other fields (the refused ones at their
  defaults), so that the checks of the whole config still see the user's valid values.
  """

  def __init__(self):
    self.problems: list[tuple[str, str, str]] = []  # (built part, field path, line)
    self.failed: list[str] = []  # parts left to their defaults (or fields at theirs)

  def build(self, path: str, cls, values: Mapping[str, Any]):
    """`cls(**values)`; when refused, records why and returns the rebuilt part (or None)."""
    try:
      return cls(**values)
    except FieldProblems as e:
      bad = {problem.field for problem in e.problems}
      for problem in e.problems:
        field = f"{path}.{problem.field}" if path else problem.field
        self.problems.append((path, field, f"--config.{user_key(field)}={problem.value!r}: "
                                           f"{problem.allowed}"))
    except (ValueError, TypeError) as e:
      bad = set(values)
      self.problems.append((path, path, f"--config.{user_key(path)}: {e}"))
    if path and bad < set(values):
      try:
        part = cls(**{k: v for k, v in values.items() if k not in bad})
        self.failed.extend(f"{path}.{field}" for field in bad)
        return part
      except (ValueError, TypeError):
        pass
    self.failed.append(path)
    return None

  def lines(self) -> list[str]:
    """The problems in config-file order, without those of the whole config that came from a
    refused value's stand-in default."""
    def knock_on(part: str, field: str) -> bool:
      return not part and any(field == f or field.startswith(f + ".") for f in self.failed if f)
    kept = [(field, line) for part, field, line in self.problems if not knock_on(part, field)]
    return [line for _, line in sorted(kept, key=lambda kept: _file_order(kept[0]))]


def _file_order(path: str) -> int:
  """Where a field's key sits in a config file (problems are listed in that order)."""
  keys = list(LAYOUT.values())
  key = user_key(path)
  return keys.index(key) if key in keys else len(keys)


def from_config_dict(config: Any) -> RLExperimentConfig:
  """The typed form of an RL config file's ConfigDict (or a dict such as a run's config.json).

  Keys missing from `config` take the dataclasses' defaults; `lora.enabled` False (or no `lora`
  block) means no LoRA; `loss.max_response_len` is `max_new_tokens`. Reads no model and writes
  nothing.

  Raises:
    ConfigError: listing every problem, each as `--config.key=value: what is allowed`: values a
      dataclass refuses, and keys no field holds (but `INFORMATION_KEYS`).
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  blocks = {block: dict(raw.pop(block)) for block in OPTIONAL_BLOCKS if raw.get(block) is not None}
  for key in INFORMATION_KEYS:
    raw.pop(key, None)
  flat = flatten_config(raw)
  lora_enabled = flat.pop("lora.enabled", False)
  unknown = [f"--config.{key}: no such key of an RL config" for key in flat
             if key not in USER_KEYS]
  if lora_enabled not in (False, True):
    unknown.append(f"--config.lora.enabled={lora_enabled!r}: allowed: False, True")
  tree = _nest({USER_KEYS[key]: _from_json(value) for key, value in flat.items()
                if key in USER_KEYS})
  builder = _Builder()
  parts = _build_parts(builder, tree, lora_enabled is True)
  top = {key: value for key, value in tree.items() if not isinstance(value, dict)}
  experiment = builder.build("", RLExperimentConfig, {**top, **parts, **blocks})
  problems = unknown + builder.lines()
  if problems:
    raise ConfigError.listing(problems, "RL experiment config")
  return experiment


def _build_parts(builder: _Builder, tree: dict[str, Any], lora_enabled: bool
                 ) -> dict[str, Any]:
  """The parts of an `RLExperimentConfig` that build (a refused one is left to its default)."""
  rl = dict(tree.get("rl", {}))
  max_new_tokens = rl.get("max_new_tokens", RLConfig.max_new_tokens)
  loss = builder.build("rl.loss", LossConfig,
                       {**rl.pop("loss", {}), "max_response_len": max_new_tokens})
  lora_values = rl.pop("lora", {})
  lora = builder.build("rl.lora", LoraConfig, lora_values) if lora_enabled else None
  problems = dict(tree.get("problems", {}))
  perfectible = builder.build("problems.perfectible", PerfectibleConfig,
                              problems.pop("perfectible", {}))
  parts = {"optimizer": builder.build("optimizer", OptimizerConfig, tree.get("optimizer", {})),
           "eval": builder.build("eval", evaluation.EvalConfig, tree.get("eval", {})),
           "colocate": builder.build("colocate", colocation.ColocationConfig,
                                     tree.get("colocate", {}))}
  if loss is not None and (lora is not None or not lora_enabled):
    parts["rl"] = builder.build("rl", RLConfig, {**rl, "loss": loss, "lora": lora})
  else:
    builder.failed.append("rl")
  if perfectible is not None:
    parts["problems"] = builder.build("problems", ProblemsConfig,
                                      {**problems, "perfectible": perfectible})
  else:
    builder.failed.append("problems")
  return {name: part for name, part in parts.items() if part is not None}


def _from_json(value: Any) -> Any:
  """Lists read from config.json (or ConfigDict tuples) as tuples."""
  return tuple(value) if isinstance(value, list) else value


def config_dict(config: RLExperimentConfig):
  """`config` in the config-file layout, as a ConfigDict a user overrides (`--config.key=`).

  Fields that are None hold typed placeholders (`--config.colocate.sampler_memory_fraction=0.5`
  works); `lora.enabled` is whether `rl.lora` is set (its fields default to `LoraConfig`'s with
  rank 1, alpha 2); `mesh` and `distributed` appear only when set.
  """
  from ml_collections import config_dict as ml_config_dict  # pylint: disable=g-import-not-at-top
  lora = config.rl.lora or LoraConfig(rank=1, alpha=2.0)
  values = {"lora.enabled": config.rl.lora is not None}
  for path, key in LAYOUT.items():
    part, _, name = path.rpartition(".")
    owner = lora if part == "rl.lora" else _walk(config, part)
    value = getattr(owner, name)
    values[key] = (ml_config_dict.placeholder(_field_type(type(owner), name)) if value is None
                   else value)
  tree = _nest(values)
  for block, name in OPTIONAL_BLOCKS.items():
    if getattr(config, name) is not None:
      tree[block] = dict(getattr(config, name))
  return ml_config_dict.ConfigDict(tree)


def _walk(value: Any, path: str) -> Any:
  for part in filter(None, path.split(".")):
    value = getattr(value, part)
  return value


def _field_type(cls, name: str) -> type:
  """The non-None type of an optional field (`float | None` -> float)."""
  hint = typing.get_type_hints(cls)[name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


# ------------------------------------------------------------------------ response budget ----

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


def check_response_budget(config: RLExperimentConfig, model_dir: str | None) -> None:
  """The longest prompt of the problem set plus `max_new_tokens` fits the model's context.

  Reads `model_dir`'s config.json and, for the synthetic task, its task config and tokenizer (the
  task's longest prompt: every subset and held-out problem is drawn from it); for MATH the prompt
  bound is `problems.max_prompt_tokens`. Skipped when `model_dir` is None or lacks the task files.

  Raises:
    ConfigError: naming `--config.max_new_tokens` (or `--config.model` when its config.json
      cannot be read).
  """
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  from rl_fp16.data.tasks import SyntheticTask  # pylint: disable=g-import-not-at-top
  from rl_fp16.models import ModelConfig  # pylint: disable=g-import-not-at-top
  if model_dir is None:
    return
  try:
    max_positions = ModelConfig.from_hf(model_dir).max_position_embeddings
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError.listing([f"--config.model={config.model!r}: its config.json cannot be read "
                               f"({type(e).__name__}: {e})"], "RL experiment config") from None
  if config.problems.task == "math":
    longest = config.problems.max_prompt_tokens
    prompt = f"--config.max_prompt_tokens ({longest})"
  else:
    if not os.path.exists(os.path.join(model_dir, synthetic.TASK_CONFIG_FILE)):
      return
    task = SyntheticTask(synthetic.load_task_config(model_dir),
                         tokenizer.load_tokenizer(model_dir))
    longest = task.max_prompt_len()
    prompt = f"the longest prompt ({longest} tokens)"
  max_new_tokens = config.rl.max_new_tokens
  problem = response_budget_problem(longest, max_new_tokens, max_positions, prompt)
  if problem:
    raise ConfigError.listing([f"--config.max_new_tokens={max_new_tokens!r}: {problem}"],
                              "RL experiment config")
