"""Configs are checked before a model is loaded or a run directory is created, and errors name
the key, the bad value and what is allowed."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (override, a fragment of the message). The model path does not exist: a check that came after
# loading the model would fail with FileNotFoundError instead.
BAD_VALUES = [
    (dict(steps=0), "--config.steps=0: must be an integer >= 1"),
    (dict(prompts_per_step=0), "--config.prompts_per_step=0: must be an integer >= 1"),
    (dict(checkpoint_every=0), "--config.checkpoint_every=0: must be an integer >= 1"),
    (dict(max_new_tokens=0), "--config.max_new_tokens=0: must be an integer >= 1"),
    (dict(engine="vlm"), "--config.engine='vlm': allowed: jax, vllm"),
    (dict(algorithm="ppo"), "--config.algorithm='ppo': allowed: grpo,"),
    (dict(advantage="rloo"), "--config.advantage='rloo': allowed: grpo, drgrpo"),
    (dict(precision="fp17"), "--config.precision='fp17': Unknown precision pair"),
    (dict(num_minibatches=3), "--config.num_minibatches=3: must divide the 16 rollouts"),
    (dict(num_minibatches=2, micro_batch_rows=3),
     "--config.micro_batch_rows=3: must divide the 8 rows of a minibatch"),
    (dict(micro_batch_rows=2, sequence_bucket=0),
     "--config.micro_batch_rows=2: micro-batches need sequence_bucket > 0"),
    (dict(temperature=0.0), "--config.temperature=0.0: must be a finite number > 0"),
    (dict(samples_per_prompt=1), "--config.samples_per_prompt=1: must be an integer >= 2"),
    (dict(learning_rate=-1e-3), "--config.learning_rate=-0.001: must be a finite number > 0"),
    (dict(task="chess"), "--config.task='chess': allowed: synthetic, math"),
    (dict(output_dir="runs/{algo}"), "--config.output_dir='runs/{algo}': may use only the fields"),
    (dict(vllm_log_level="LOUD"), "--config.vllm_log_level='LOUD': allowed: DEBUG, INFO, WARNING"),
    (dict(engine="vllm", precision="fp32-e8"),
     "--config.precision='fp32-e8': fp32-e8: The vLLM engine cannot sample in an emulated"),
    (dict(engine="vllm", bitwise=True),
     "--config.precision='bf16': bf16: The vLLM engine cannot sample bitwise"),
    (dict(decode_row_group=-1), "--config.decode_row_group=-1: must be an integer >= 0"),
    (dict(engine="vllm", decode_row_group=8),
     "--config.decode_row_group=8: groups the JAX engine's decode; engine 'vllm' takes 0"),
]


def _config(tmp_path, **overrides):
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  config = sanity.get_config()
  config.update(dict(model=str(tmp_path / "no_such_model"), engine="jax", steps=2,
                     prompts_per_step=2, samples_per_prompt=8, num_minibatches=2,
                     max_new_tokens=16, output_dir=str(tmp_path / "run")))
  config.update(overrides)
  return config


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES])
def test_bad_rl_config_is_refused_before_model_or_run_directory(tmp_path, override, message):
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as error:
    rl.run(_config(tmp_path, **override))
  assert isinstance(error.value, common.ConfigError), repr(error.value)
  assert message in str(error.value)
  assert "max_response_len" not in str(error.value)  # the user's key, not an internal field
  assert not os.path.exists(tmp_path / "run")


def test_nested_and_combined_problems_are_listed_together(tmp_path):
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path, steps=0)
  config.loss.aggregation = "mean"
  config.lora.enabled = True
  config.lora.rank = 0
  config.perfectible.low = 0.9
  with pytest.raises(common.ConfigError) as error:
    common.validate_rl_config(config)
  message = str(error.value)
  assert "(4 problems)" in message
  for fragment in ("--config.steps=0", "--config.loss.aggregation='mean': allowed: token_mean",
                   "--config.lora.rank=0", "--config.perfectible.low=0.9: must be <="):
    assert fragment in message


def test_every_rl_config_file_validates_and_has_vllm_log_level():
  import importlib  # pylint: disable=g-import-not-at-top
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  for name in ("sanity", "moe", "lora", "sharded", "precision_ablation"):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    assert config.vllm_log_level == "WARNING", name
    common.validate_rl_config(config)
  # The paper-scale config needs a model and data: it says so instead of failing later.
  from experiments.configs import sanity_r1_distill_1p5b  # pylint: disable=g-import-not-at-top
  with pytest.raises(common.ConfigError, match=r"(?s)--config.model=None: must be set.*"
                     r"--config.data_path=None: must be set"):
    common.validate_rl_config(sanity_r1_distill_1p5b.get_config())
  from rl_fp16 import rl_experiment  # pylint: disable=g-import-not-at-top
  assert "vllm_log_level" in rl_experiment.RESUME_ALLOWED


def test_rl_passes_vllm_log_level_to_the_engine(tiny_task_model_dir, tmp_path, monkeypatch):
  from experiments import rl  # pylint: disable=g-import-not-at-top
  seen = {}

  class Stop(Exception):
    pass

  def fake_make_synced_engine(weight_sync, name, *args, **kwargs):
    seen.update(kwargs, name=name, weight_sync=weight_sync)
    raise Stop

  monkeypatch.setattr(rl, "make_synced_engine", fake_make_synced_engine)
  config = _config(tmp_path, model=tiny_task_model_dir, vllm_log_level="INFO")
  with pytest.raises(Stop):
    rl.run(config)
  assert seen["vllm_log_level"] == "INFO" and seen["name"] == "jax"
  assert seen["weight_sync"] == "memory" and seen["first_step"] == 0


def _cli(module, config_file, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, f"--config={config_file}", *overrides],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module,config_file,overrides,message", [
    ("experiments.rl", "experiments/configs/sanity.py", ["--config.steps=0"],
     "--config.steps=0: must be an integer >= 1"),
    ("experiments.sanity", "experiments/configs/sanity.py",
     ["--config.engine=jax", "--config.steps=1", "--config.prompts_per_step=2",
      "--config.max_new_tokens=16", "--compare=bf16,fp17"], "--config.precision='fp17'"),
    ("experiments.offline_mismatch", "experiments/configs/offline_mismatch.py",
     ["--config.num_prompts=0", "--config.precisions=fp32,fp17"],
     "--config.num_prompts=0: must be an integer >= 1"),
    ("experiments.pretrain_base", "experiments/configs/pretrain_base.py",
     ["--config.max_steps=0"], "--config.max_steps=0: must be an integer >= 1"),
], ids=["rl", "sanity", "offline_mismatch", "pretrain_base"])
def test_command_line_prints_the_problem_without_a_traceback(tmp_path, module, config_file,
                                                             overrides, message):
  out = tmp_path / "out"
  done = _cli(module, config_file, *overrides, f"--config.output_dir={out}")
  assert done.returncode == 2, done.stderr[-3000:]
  assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert not out.exists()


def test_vllm_engine_refuses_an_emulated_sampler_before_starting():
  """make_engine checks the policy first: vLLM would silently sample in its own dtype."""
  from rl_fp16.precision import get_policy  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.engines import make_engine  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="cannot sample in an emulated precision"):
    make_engine("vllm", None, None, get_policy("e8", "sampler"), workdir="/nonexistent")


@pytest.mark.parametrize("overrides,fragments", [
    (["--config.num_minibatch=4"],
     ["--config.num_minibatch=4: no such key", "did you mean --config.num_minibatches?"]),
    (["--config.loss.agregation=token_mean"],
     ["--config.loss.agregation=token_mean: no such key",
      "did you mean --config.loss.aggregation?"]),
    (["--config.los.aggregation=token_mean"],
     ["--config.los.aggregation=token_mean: no such key", "did you mean --config.loss?"]),
    (["--config.steps=0", "--config.num_minibatch=4", "--config.zzzz=1"],
     ["(3 problems)", "--config.steps=0: must be an integer >= 1",
      "--config.num_minibatch=4: no such key", "--config.zzzz=1: no such key"]),
], ids=["top_level", "nested", "parent", "listed_with_other_problems"])
@pytest.mark.parametrize("module", ["experiments.rl", "experiments.sanity"])
def test_misspelt_key_is_listed_with_a_suggestion(tmp_path, module, overrides, fragments):
  out = tmp_path / "out"
  done = _cli(module, "experiments/configs/sanity.py", "--config.engine=jax", *overrides,
              f"--config.output_dir={out}")
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  for fragment in fragments:
    assert fragment in done.stderr, done.stderr[-3000:]
  assert not out.exists()


def test_unknown_override_problems_suggest_the_nearest_key():
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16 import cli  # pylint: disable=g-import-not-at-top
  config = sanity.get_config()
  argv = ["prog", "--config=x.py", "--config.steps=3", "--config.num_minibatch=4",
          "--config.eval.evry=2", "--config.qqq", "--noconfig.lora.enabeld"]
  problems = cli.unknown_override_problems(config, argv)
  assert problems == [
      "--config.num_minibatch=4: no such key; did you mean --config.num_minibatches?",
      "--config.eval.evry=2: no such key; did you mean --config.eval.every?",
      f"--config.qqq: no such key; the keys are: {', '.join(sorted(config.keys()))}",
      "--noconfig.lora.enabeld: no such key; did you mean --config.lora.enabled?"]
  assert cli.unknown_override_problems(config, ["prog", "--config.steps=3"]) == []


def test_response_budget_beyond_the_context_is_refused_before_the_run_directory(
    tiny_task_model_dir, tmp_path):
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  # The tiny task model has 512 positions; the synthetic prompts are a few dozen tokens.
  config = _config(tmp_path, model=tiny_task_model_dir, max_new_tokens=500)
  with pytest.raises(common.ConfigError, match=r"--config.max_new_tokens=500: the longest prompt "
                     r"\(\d+ tokens\) plus the response budget .* exceeds the model's "
                     r"max_position_embeddings=512; allowed: at most \d+"):
    rl.run(config)
  assert not os.path.exists(tmp_path / "run")
  common.validate_rl_config(_config(tmp_path, model=tiny_task_model_dir, max_new_tokens=400))


def test_math_prompt_budget_beyond_the_context_is_refused(tiny_task_model_dir, tmp_path):
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  data = tmp_path / "problems.jsonl"
  data.write_text('{"problem": "1+1", "answer": "2"}\n')
  config = _config(tmp_path, model=tiny_task_model_dir, task="math", data_path=str(data),
                   max_prompt_tokens=256, max_new_tokens=300)
  with pytest.raises(common.ConfigError, match=r"--config.max_new_tokens=300: .*max_prompt_tokens"
                     r" \(256\) plus the response budget .* max_position_embeddings=512"):
    rl.run(config)
  assert not os.path.exists(tmp_path / "run")


def test_command_line_refuses_a_budget_beyond_the_default_models_context(tmp_path):
  out = tmp_path / "out"
  done = _cli("experiments.rl", "experiments/configs/sanity.py", "--config.engine=jax",
              "--config.max_new_tokens=5000", f"--config.output_dir={out}")
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "--config.max_new_tokens=5000:" in done.stderr
  assert "max_position_embeddings=1024" in done.stderr
  assert not out.exists()


def test_rl_config_can_set_the_buckets(tmp_path):
  from experiments import common  # pylint: disable=g-import-not-at-top
  from rl_fp16.train import RLConfig  # pylint: disable=g-import-not-at-top
  defaults = common.validate_rl_config(_config(tmp_path)).rl
  assert (defaults.prompt_bucket, defaults.sequence_bucket) == (
      RLConfig.prompt_bucket, RLConfig.sequence_bucket)
  rl_config = common.validate_rl_config(_config(tmp_path, prompt_bucket=8, sequence_bucket=0)).rl
  assert (rl_config.prompt_bucket, rl_config.sequence_bucket) == (8, 0)
  for key, value, message in (("prompt_bucket", 0, "--config.prompt_bucket=0: must be an integer"
                               " >= 1"), ("sequence_bucket", -1, "--config.sequence_bucket=-1: "
                                          "must be an integer >= 0")):
    with pytest.raises(common.ConfigError, match=message.replace("(", r"\(")):
      common.validate_rl_config(_config(tmp_path, **{key: value}))


def test_config_file_and_typed_config_are_one_layout():
  """Every field of the typed config has one key in the config file, the defaults of a config
  file are the dataclasses', and a config round-trips through its file layout."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from experiments.configs import paper, sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16 import rl_experiment  # pylint: disable=g-import-not-at-top
  from rl_fp16.models.lora import LoraConfig  # pylint: disable=g-import-not-at-top
  experiment = sanity.experiment()
  assert rl_experiment.from_config_dict(sanity.get_config()) == dataclasses.replace(
      experiment, rl=dataclasses.replace(experiment.rl, loss=dataclasses.replace(
          experiment.rl.loss, max_response_len=experiment.rl.max_new_tokens)))
  assert len(set(rl_experiment.LAYOUT.values())) == len(rl_experiment.LAYOUT)
  changed = dataclasses.replace(
      paper.experiment("gspo"), precision="fp16", bitwise=True, engine="jax",
      mesh={"data": 1, "fsdp": -1, "tensor": 1},
      rl=dataclasses.replace(paper.experiment("gspo").rl, lora=LoraConfig(rank=4, alpha=8.0,
                                                                          targets=("q_proj",))))
  assert rl_experiment.from_config_dict(rl_experiment.config_dict(changed)) == changed
  config = sanity.get_config()
  config.colocate.sampler_memory_fraction = 0.5  # a typed placeholder takes a float
  assert rl_experiment.from_config_dict(config).colocate.sampler_memory_fraction == 0.5


def test_unknown_config_file_keys_and_part_problems_are_listed(tmp_path):
  from experiments import common  # pylint: disable=g-import-not-at-top
  from rl_fp16 import rl_experiment  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path, samples_per_prompt=1).to_dict()
  config["learning_rat"] = 1e-3
  config["optimizer"]["b2"] = 2.0
  config["eval"]["every"] = -1
  with pytest.raises(common.ConfigError) as error:
    rl_experiment.from_config_dict(config)
  assert error.value.problems == [
      "--config.learning_rat: no such key of an RL config",
      "--config.samples_per_prompt=1: must be an integer >= 2",
      "--config.optimizer.b2=2.0: must be a finite number >= 0 and <= 1",
      "--config.eval.every=-1: must be an integer >= 0"], error.value.problems
