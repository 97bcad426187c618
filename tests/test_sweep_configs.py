"""Sweeps in config files, run by the generic launcher (`python -m launch.sweep --config=FILE`).

The expected job lists below are the `--dry_run` output of the three launch scripts this launcher
replaced (launch/sanity_sweep.py, launch/precision_ablation.py, launch/offline_mismatch.py, at
their defaults, --experiment_dir={exp}), captured before they were deleted: the sweeps now in
experiments/configs/{sanity,precision_ablation,offline_mismatch}.py must give the same jobs.
"""

import os
import shlex
import subprocess
import sys
import textwrap

from ml_collections.config_flags import tuple_parser
import pytest

from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")

# (job name, command line after the Python interpreter), from the old scripts' --dry_run.
OLD_SANITY_SWEEP = [
    ('grpo_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_bf16_seed0'),
    ('grpo_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp16_seed0'),
    ('grpo_token_tis_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo_token_tis --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_token_tis_bf16_seed0'),
    ('grpo_token_tis_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo_token_tis --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_token_tis_fp16_seed0'),
    ('gspo_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=gspo --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/gspo_bf16_seed0'),
    ('gspo_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=gspo --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/gspo_fp16_seed0'),
    ('pg_seq_is_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=pg_seq_is --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/pg_seq_is_bf16_seed0'),
    ('pg_seq_is_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=pg_seq_is --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/pg_seq_is_fp16_seed0'),
    ('grpo_seq_mis_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo_seq_mis --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_seq_mis_bf16_seed0'),
    ('grpo_seq_mis_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo_seq_mis --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_seq_mis_fp16_seed0'),
    ('pg_seq_mis_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=pg_seq_mis --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/pg_seq_mis_bf16_seed0'),
    ('pg_seq_mis_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=pg_seq_mis --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/pg_seq_mis_fp16_seed0'),
]
OLD_PRECISION_ABLATION = [
    ('grpo_fp32_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp32 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp32_seed0'),
    ('grpo_fp32-bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp32-bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp32-bf16_seed0'),
    ('grpo_fp32-fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp32-fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp32-fp16_seed0'),
    ('grpo_bf16-fp32_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=bf16-fp32 --config.seed=0 '
     '--config.output_dir={exp}/grpo_bf16-fp32_seed0'),
    ('grpo_bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_bf16_seed0'),
    ('grpo_bf16-fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=bf16-fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_bf16-fp16_seed0'),
    ('grpo_fp16-fp32_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp16-fp32 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp16-fp32_seed0'),
    ('grpo_fp16-bf16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp16-bf16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp16-bf16_seed0'),
    ('grpo_fp16_seed0',
     '-m experiments.rl --config={repo}/experiments/configs/sanity.py '
     '--config.algorithm=grpo --config.precision=fp16 --config.seed=0 '
     '--config.output_dir={exp}/grpo_fp16_seed0'),
]
OLD_OFFLINE_MISMATCH = [
    ('offline_vllm_seed0',
     '-m experiments.offline_mismatch '
     '--config={repo}/experiments/configs/offline_mismatch.py --config.engine=vllm '
     '--config.precisions=fp32,bf16,fp16 --config.seed=0 '
     '--config.output_dir={exp}/offline_vllm_seed0'),
]


# Precision ablation: the old script ran its jobs with sanity.py; the sweep now lives in
# precision_ablation.py and its jobs name that file (the configs agree, see below).
NEW_PRECISION_ABLATION = [
    (name, command.replace("configs/sanity.py", "configs/precision_ablation.py"))
    for name, command in OLD_PRECISION_ABLATION]


@pytest.mark.parametrize("config_file,expected", [
    ("sanity.py", OLD_SANITY_SWEEP),
    ("precision_ablation.py", NEW_PRECISION_ABLATION),
    ("offline_mismatch.py", OLD_OFFLINE_MISMATCH),
])
def test_config_sweeps_give_the_old_scripts_jobs(tmp_path, config_file, expected):
  exp = tmp_path / "EXP"
  found = sweep.config_sweep(os.path.join(CONFIGS, config_file), experiment_dir=str(exp))
  got = [(job.name, job.command()) for job in found.jobs]
  assert got == [(name, [sys.executable, *command.format(repo=REPO, exp=exp).split(" ")])
                 for name, command in expected]
  assert [job.run_dir for job in found.jobs] == [str(exp / name) for name, _ in expected]
  assert found.name == config_file.removesuffix(".py")  # EXP/sweep_sanity.json etc.


def test_precision_ablation_config_is_the_sanity_config():
  """The ablation's jobs changed --config from sanity.py to precision_ablation.py: with each job's
  precision and output_dir set, the two files give the same config."""
  from experiments.configs import precision_ablation, sanity  # pylint: disable=g-import-not-at-top
  ablation, base = precision_ablation.get_config(), sanity.get_config()
  for config in (ablation, base):
    config.precision, config.output_dir = "fp16-bf16", "/x"
  assert ablation.to_dict() == base.to_dict()
  assert precision_ablation.GRID == tuple(
      c["precision"] for c in precision_ablation.sweep())


def test_generic_launcher_dry_run_on_cpu(tmp_path):
  """The brief's check: `python -m launch.sweep --config=experiments/configs/sanity.py --dry_run`
  works with no GPU visible, and sweep arguments and overrides reach the jobs."""
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--config=experiments/configs/sanity.py",
       "--dry_run", f"--experiment_dir={tmp_path}", "--sweep_arg=algorithms=grpo,gspo",
       "--sweep_arg=seeds=0,1", "--sweep_arg=precisions=fp16", "--override=steps=3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "4 job(s), executor local" in result.stdout
  assert ("--config.algorithm=gspo --config.precision=fp16 --config.seed=1 --config.steps=3 "
          f"--config.output_dir={tmp_path}/gspo_fp16_seed1") in result.stdout


def _write_config(tmp_path, body):
  path = tmp_path / "my_sweep.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


TOY_CONFIG = """
    import ml_collections

    MODULE = "experiments.toy"
    NAME = "{variant}_r{loss[rank]}"

    def get_config(arg="small"):
      config = ml_collections.ConfigDict()
      config.variant = arg
      config.steps = 1
      config.loss = ml_collections.ConfigDict(dict(rank=1, targets=("q",)))
      config.output_dir = "runs/toy"
      return config

    def sweep(ranks=(1, 2), targets=("q", "v"), arg="small"):
      for rank in ranks:
        yield {"variant": arg, "loss": {"rank": rank, "targets": tuple(targets)}}
"""


def test_nested_dicts_tuples_module_name_and_arg(tmp_path):
  config = _write_config(tmp_path, TOY_CONFIG)
  found = sweep.config_sweep(f"{config}:big", experiment_dir=str(tmp_path / "exp"),
                             overrides=["steps=5"], sweep_args=["ranks=4", "targets=k,o"])
  (job,) = found.jobs
  assert job.name == "big_r4" and job.module == "experiments.toy"
  assert job.flags() == [
      f"--config={config}:big", "--config.variant=big", "--config.loss.rank=4",
      "--config.loss.targets=('k', 'o')", "--config.steps=5",
      f"--config.output_dir={tmp_path}/exp/big_r4"]
  # The tuple is written in the form ml_collections' config flags parse back.
  assert tuple_parser.TupleParser().parse("('k', 'o')") == ("k", "o")
  assert found.name == "my_sweep"
  other = sweep.config_sweep(config, module="experiments.other", experiment_dir=str(tmp_path))
  assert [j.name for j in other.jobs] == ["small_r1", "small_r2"]
  assert {j.module for j in other.jobs} == {"experiments.other"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(overrides=["loss.rank=3"]), "varies"),  # A nested key the sweep sets.
    (dict(overrides=["loss=3"]), "varies"),
    (dict(overrides=["stepz=3"]), "'stepz'"),
    (dict(sweep_args=["rank=3"]), r"sweep\(\) takes"),
    (dict(sweep_args=["ranks"]), "KEY=VALUE"),
])
def test_config_sweep_errors(tmp_path, kwargs, message):
  config = _write_config(tmp_path, TOY_CONFIG)
  with pytest.raises(ValueError, match=message):
    sweep.config_sweep(config, experiment_dir=str(tmp_path), **kwargs)


def test_config_without_sweep_is_refused(tmp_path):
  with pytest.raises(ValueError, match="has no sweep"):
    sweep.config_sweep(_write_config(tmp_path, "def get_config():\n  return {}\n"))
  with pytest.raises(ValueError, match="no config file"):
    sweep.config_sweep(str(tmp_path / "missing.py"))


def test_dose_response_sweep_through_the_launcher(tmp_path):
  config_file = os.path.join(REPO, "experiments", "dose_response", "config.py")
  found = sweep.config_sweep(config_file + ":grpo",
                             experiment_dir=str(tmp_path))
  assert len(found.jobs) == 30 and len({j.name for j in found.jobs}) == 30
  job = next(j for j in found.jobs if j.name == "grpo_seq_mis_fp32-e6_seed0")
  settings = dict(job.settings)
  assert settings["precision"] == "fp32-e6" and settings["loss.seq_is_cap"] == "10.0"
  assert job.flags()[0] == f"--config={config_file}:grpo"
  assert shlex.join(job.command()).startswith(f"{sys.executable} -m experiments.rl ")
