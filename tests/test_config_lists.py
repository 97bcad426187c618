"""Config fields that list names are tuples, read by `rl_fp16.names.config_list`: a tuple as the
config file holds it, and the 1-tuple ml_collections makes of a command-line override `--config.precisions=fp32,bf16` (it does not split on commas)."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from rl_fp16.names import config_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(config_file, *overrides):
  """The ConfigDict the experiment entry points get from `--config=FILE` and `--config.K=V`."""
  argv = ["prog", f"--config={os.path.join(REPO, config_file)}", *overrides]
  values = flags.FlagValues()
  # The override flags are defined from the command line (sys.argv unless sys_argv is given).
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("value,expected", [
    (("fp32", "bf16", "fp16"), ("fp32", "bf16", "fp16")),
    (["fp32", " bf16 "], ("fp32", "bf16")),
    (("fp32,bf16-fp16",), ("fp32", "bf16-fp16")),  # --config.precisions=fp32,bf16-fp16
    (("fp16",), ("fp16",)),
    ((" fp32 , bf16,",), ("fp32", "bf16")),
    (("fp32,bf16", "fp16"), ("fp32", "bf16", "fp16")),
    ("fp32,bf16", ("fp32", "bf16")),  # a string, e.g. from an older config.json
])
def test_names(value, expected):
  assert config_list(value, "precisions") == expected


@pytest.mark.parametrize("value,expected", [
    ((256, 1024), (256, 1024)),
    ((32,), (32,)),
    (("256,1024",), (256, 1024)),
    ([16, " 32 "], (16, 32)),
])
def test_integers(value, expected):
  assert config_list(value, "trainer_response_lengths", item=int) == expected


@pytest.mark.parametrize("value,item,problem", [
    (("",), str, "it is empty"),  # --config.precisions=
    ((), str, "it is empty"),
    ((" , ",), str, "it is empty"),
    ((1,), str, "1 is not a name"),
    (("fp32", None), str, "None is not a name"),
    (None, str, "a NoneType is not a list"),
    (("256,long",), int, "'256,long' is not a comma-separated list of integers"),
    ((True,), int, "True is not an integer"),
    ((2.5,), int, "2.5 is not an integer"),
])
def test_errors_name_the_field_and_the_value(value, item, problem):
  with pytest.raises(ValueError) as error:
    config_list(value, "benchmark.precisions", item=item)
  message = str(error.value)
  assert message.startswith(f"config.benchmark.precisions={value!r}: {problem}"), message
  assert "--config.benchmark.precisions=" in message


def test_command_line_overrides_through_config_flags():
  """What ml_collections hands over for each spelling, and what config_list makes of it."""
  config = _parse("experiments/configs/offline_mismatch.py")
  assert config.precisions == ("fp32", "bf16", "fp16")
  config = _parse("experiments/configs/offline_mismatch.py", "--config.precisions=fp32,bf16")
  assert config.precisions == ("fp32,bf16",)  # not split: config_list does it
  assert config_list(config.precisions, "precisions") == ("fp32", "bf16")
  config = _parse("experiments/configs/offline_mismatch.py", "--config.precisions=fp16")
  assert config_list(config.precisions, "precisions") == ("fp16",)
  config = _parse("experiments/configs/offline_mismatch.py",
                  "--config.precisions=('fp32', 'bf16-fp16')")  # launch.sweep's tuple literal
  assert config_list(config.precisions, "precisions") == ("fp32", "bf16-fp16")
  config = _parse("experiments/benchmark/config.py", "--config.trainer_response_lengths=256,1024",
                  "--config.sampler_response_lengths=16")
  assert config.trainer_response_lengths == (256, 1024)  # ints parse as a tuple literal
  assert config_list(config.sampler_response_lengths, "sampler_response_lengths",
                     item=int) == (16,)


# Documented command lines (docs/*.md, config docstrings) that pass list fields with commas.
DOCUMENTED = [
    ("experiments/configs/offline_mismatch.py",
     ["--config.engine=vllm", "--config.precisions=fp32,bf16,fp16,bf16-fp16"],
     {"precisions": ("fp32", "bf16", "fp16", "bf16-fp16")}),
    ("experiments/configs/offline_mismatch.py",  # docs/dose_response.md
     ["--config.engine=jax", "--config.precisions=fp32,fp32-e24,fp32-bf16,fp32-e8,fp32-fp16,"
      "fp32-e11,fp32-e11x5,bf16,e8,fp16,e11"],
     {"precisions": ("fp32", "fp32-e24", "fp32-bf16", "fp32-e8", "fp32-fp16", "fp32-e11",
                     "fp32-e11x5", "bf16", "e8", "fp16", "e11")}),
    ("experiments/gpu_check/config.py",  # docs/gpu.md
     ["--config.stages=paper,mismatch", "--config.highest_pairs=fp32,bf16,fp16"],
     {"stages": ("paper", "mismatch"), "highest_pairs": ("fp32", "bf16", "fp16")}),
    ("experiments/benchmark/config.py",  # docs/performance.md
     ["--config.sections=sync", "--config.sync_models=medium", "--config.sync_precisions=fp16",
      "--config.precisions=fp16"],
     {"sections": ("sync",), "sync_models": ("medium",), "sync_precisions": ("fp16",),
      "precisions": ("fp16",)}),
    ("experiments/benchmark/config.py",  # docs/performance.md
     ["--config.sections=sync,e2e", "--config.compare.cases=vllm:fp16"],
     {"sections": ("sync", "e2e"), "compare.cases": ("vllm:fp16",)}),
    ("experiments/benchmark/config.py",  # the config file's comment on compare.cases
     ["--config.compare.cases='jax:fp32,vllm:fp16'"],
     {"compare.cases": ("jax:fp32", "vllm:fp16")}),
]


def test_ml_collections_refuses_unquoted_cases():
  """`a:b,c:d` is a Python syntax error, which ml_collections' tuple parser refuses (a bare
  `fp32,bf16` is not: it is kept as one string). Hence the quotes in benchmark.py's comment."""
  with pytest.raises(flags.IllegalFlagValueError, match="use quotes"):
    _parse("experiments/benchmark/config.py", "--config.compare.cases=jax:fp32,vllm:fp16")


@pytest.mark.parametrize("config_file,overrides,expected", DOCUMENTED)
def test_documented_command_lines(config_file, overrides, expected):
  config = _parse(config_file, *overrides)
  for key, want in expected.items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert config_list(node, key) == want


def test_experiments_read_command_line_lists():
  """The consumers: benchmark.resolve_config and common.clean_lists leave clean tuples; the
  config checks read `--config.precisions=a,b` and keep their messages."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments.benchmark import benchmark  # pylint: disable=g-import-not-at-top

  resolved = benchmark.resolve_config(_parse(
      "experiments/benchmark/config.py", "--config.sections=peak,trainer",
      "--config.trainer_response_lengths=64", "--config.compare.cases='jax:fp32,jax:fp16'"))
  assert resolved.sections == ("peak", "trainer")
  assert resolved.trainer_response_lengths == (64,)
  assert resolved.compare.cases == ("jax:fp32", "jax:fp16")
  with pytest.raises(ValueError, match=r"config.sections=\('',\): it is empty"):
    benchmark.resolve_config(_parse("experiments/benchmark/config.py", "--config.sections="))

  config = _parse("experiments/gpu_check/config.py", "--config.stages=paper,mismatch")
  common.clean_lists(config, ["stages", "paper.precisions"])
  assert config.stages == ("paper", "mismatch") and config.paper.precisions == ("bf16", "fp16")

  common.check_config(_parse("experiments/configs/offline_mismatch.py", "--config.engine=jax",
                             "--config.precisions=fp32,bf16-fp16,e8"))
  with pytest.raises(common.ConfigError, match="must list at least one precision pair"):
    common.check_config(_parse("experiments/configs/offline_mismatch.py",
                               "--config.precisions="))
  with pytest.raises(common.ConfigError, match="Unknown precision pair 'fp17'"):
    common.check_config(_parse("experiments/configs/offline_mismatch.py",
                               "--config.precisions=fp32,fp17"))
  with pytest.raises(common.ConfigError, match="e8: "):  # vLLM cannot sample emulated precisions
    common.check_config(_parse("experiments/configs/offline_mismatch.py", "--config.engine=vllm",
                               "--config.precisions=fp32,fp32-e8"))


def test_quick_and_cpu_variants_keep_their_settings():
  """The values the variants had as comma-separated strings, now tuples."""
  from experiments.benchmark import benchmark  # pylint: disable=g-import-not-at-top
  from experiments.benchmark import config as benchmark_config  # pylint: disable=g-import-not-at-top
  from experiments.gpu_check import config as gpu_check_config  # pylint: disable=g-import-not-at-top

  config = benchmark_config.get_config()
  config.quick = True
  quick = benchmark.resolve_config(config)
  assert quick.sections == ("peak", "trainer", "samplers", "sync", "e2e", "bitwise",
                            "compare")
  assert quick.precisions == ("fp32", "fp16") and quick.sync_precisions == ("fp16",)
  assert quick.trainer_models == ("medium",) and quick.trainer_response_lengths == (32,)
  assert quick.sampler_models == ("small",) and quick.sampler_response_lengths == (16,)
  assert quick.sync_models == ("small",) and quick.compare.cases == ("jax:fp32",)
  full = benchmark.resolve_config(benchmark_config.get_config())
  assert full.trainer_response_lengths == (256, 1024) and full.compare.cases == (
      "jax:fp32", "jax:bf16", "jax:fp16", "vllm:fp32", "vllm_compiled:fp32")

  cpu = gpu_check_config.get_config("cpu")
  assert cpu.stages == ("mismatch", "trainer") and cpu.highest_pairs == ("fp32",)
  assert cpu.mismatch.precisions == ("fp32", "bf16", "fp16")
  assert cpu.benchmark.trainer_models == ("medium",)
  assert cpu.benchmark.trainer_response_lengths == (32,)
  assert cpu.benchmark.precisions == ("fp32", "bf16", "fp16")
  assert cpu.paper.precisions == ("bf16", "fp16")
  gpu = gpu_check_config.get_config()
  assert gpu.mismatch.precisions == ("fp32", "bf16", "fp16", "bf16-fp16")
  assert gpu.benchmark.trainer_models == ("small", "medium")
  assert gpu.benchmark.trainer_response_lengths == (1024,)
