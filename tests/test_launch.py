"""The XManager sweep launcher (launch.sweep): job lists (--dry_run), sweep helpers, and a real
local sweep. The config files' sweeps themselves: tests/test_sweep_configs.py."""

import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
import pytest

from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RL = ("--override=engine=jax", "--override=steps=2", "--override=prompts_per_step=2",
           "--override=samples_per_prompt=4", "--override=max_new_tokens=24")
DOSE_RESPONSE = "experiments/dose_response/config.py"


def _launch(config, *args, timeout=60):
  """Runs `python -m launch.sweep --config=experiments/configs/CONFIG.py ARGS...` from the
  repository root (`--config=CONFIG` when CONFIG is a path ending in .py)."""
  path = config if config.endswith(".py") else f"experiments/configs/{config}.py"
  process = subprocess.Popen([sys.executable, "-m", "launch.sweep", f"--config={path}", *args],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.terminate()  # SIGTERM: the launcher stops its jobs (a SIGKILL would orphan them)
    process.communicate(timeout=60)
    raise
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _jobs_of(dry_run_output):
  """{job name: (run_dir, command)} from a --dry_run listing."""
  jobs, lines = {}, dry_run_output.splitlines()
  for index, line in enumerate(lines):
    if line.startswith("["):
      name = line.split("] ", 1)[1]
      run_dir = lines[index + 1].removeprefix("  run_dir: ")
      command = lines[index + 2].removeprefix("  command: ")
      jobs[name] = (run_dir, command)
  return jobs


@pytest.fixture(name="parsed_flags")
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def test_sweep_choices_match_the_library():
  from rl_fp16 import objectives, precision  # pylint: disable=g-import-not-at-top
  assert sweep.ALGORITHMS == tuple(objectives.ALGORITHMS)
  assert set(sweep.PRECISIONS) == set(precision.PRESETS)


def test_make_jobs_names_dirs_and_flags(tmp_path):
  variants = [{"algorithm": "grpo", "precision": p, "seed": 0} for p in ("bf16", "bf16-fp16")]
  jobs = sweep.make_jobs(variants, module=sweep.RL_MODULE, config_file=sweep.RL_CONFIG,
                         experiment_dir=str(tmp_path), overrides={"steps": "10"})
  assert [job.name for job in jobs] == ["grpo_bf16_seed0", "grpo_bf16-fp16_seed0"]
  assert jobs[1].run_dir == str(tmp_path / "grpo_bf16-fp16_seed0")
  assert jobs[1].flags() == [
      f"--config={REPO}/experiments/configs/sanity.py", "--config.algorithm=grpo",
      "--config.precision=bf16-fp16", "--config.seed=0", "--config.steps=10",
      f"--config.output_dir={tmp_path}/grpo_bf16-fp16_seed0"]
  assert jobs[0].command()[:3] == [sys.executable, "-m", "experiments.rl"]
  assert jobs[0].command("vertex")[3] == "--config=/rl_fp16/experiments/configs/sanity.py"


def test_a_study_config_sweeps_under_its_folder_name():
  assert sweep.sweep_name("experiments/configs/sanity.py") == "sanity"
  assert sweep.sweep_name("experiments/dose_response/config.py") == "dose_response"
  found = sweep.config_sweep("experiments/dose_response/config.py", sweep_args=["seeds=1"])
  assert found.name == "dose_response" and found.experiment_dir.endswith("runs/dose_response")


def test_make_jobs_errors(tmp_path):
  variant = {"algorithm": "grpo", "precision": "fp16", "seed": 0}
  kwargs = dict(module=sweep.RL_MODULE, config_file=sweep.RL_CONFIG, experiment_dir=str(tmp_path))
  with pytest.raises(ValueError, match="varies"):
    sweep.make_jobs([variant], overrides={"precision": "bf16"}, **kwargs)
  with pytest.raises(ValueError, match="output_dir"):
    sweep.make_jobs([variant], overrides={"output_dir": "/x"}, **kwargs)
  with pytest.raises(ValueError, match="both get run name"):
    sweep.make_jobs([variant, dict(variant)], **kwargs)
  with pytest.raises(ValueError, match="needs 'engine'"):
    sweep.make_jobs([variant], name="{engine}", **kwargs)
  with pytest.raises(ValueError, match="not a plain directory name"):
    sweep.make_jobs([{**variant, "algorithm": "a/b"}], **kwargs)
  with pytest.raises(ValueError, match="no jobs"):
    sweep.make_jobs([], **kwargs)


def test_parse_overrides():
  assert sweep.parse_overrides(["steps=10", "config.engine=jax", "--config.loss.x=a=b"]) == {
      "steps": "10", "engine": "jax", "loss.x": "a=b"}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    sweep.parse_overrides(["steps"])


@pytest.mark.slow  # Importing Vertex AI's client library alone takes tens of seconds.
@pytest.mark.parametrize("executor", ["vertex", "kubernetes"])
def test_cloud_jobs_build_without_launching(parsed_flags, executor):
  del parsed_flags
  job = sweep.make_jobs([{"algorithm": "gspo", "precision": "fp16", "seed": 1}],
                        module=sweep.RL_MODULE, config_file=sweep.RL_CONFIG,
                        experiment_dir="/gcs/bucket/runs")[0]
  xm_executor = sweep.make_executor(executor)
  packageable = sweep.make_packageable(job.module, xm_executor)
  assert type(packageable.executable_spec).__name__ == "PythonContainer"
  assert packageable.executable_spec.entrypoint.module_name == "experiments.rl"
  xm_job = sweep.make_xm_job(job, packageable, executor)
  assert xm_job.args.to_list() == job.flags(sweep.CLOUD_WORKDIR)
  assert xm_job.name == "gspo_fp16_seed1"


def test_sanity_sweep_dry_run(tmp_path):
  exp = tmp_path / "exp"
  result = _launch("sanity", "--dry_run", "--sweep_arg=algorithms=grpo,gspo",
                   "--sweep_arg=precisions=bf16,fp16", "--sweep_arg=seeds=0,1",
                   "--override=steps=3", f"--experiment_dir={exp}", "--max_parallel=2")
  assert result.returncode == 0, result.stderr
  assert "8 job(s), executor local, at most 2 at a time" in result.stdout
  jobs = _jobs_of(result.stdout)
  assert sorted(jobs) == sorted(f"{a}_{p}_seed{s}" for a in ("grpo", "gspo")
                                for p in ("bf16", "fp16") for s in (0, 1))
  run_dir, command = jobs["gspo_fp16_seed1"]
  assert run_dir == str(exp / "gspo_fp16_seed1")
  assert command.endswith(
      "-m experiments.rl --config=" + os.path.join(REPO, "experiments/configs/sanity.py")
      + " --config.algorithm=gspo --config.precision=fp16 --config.seed=1 --config.steps=3"
      f" --config.output_dir={run_dir}")
  assert not exp.exists()  # A dry run writes nothing.


def test_sanity_sweep_defaults_are_the_papers_algorithms(tmp_path):
  result = _launch("sanity", "--dry_run", f"--experiment_dir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert sorted(_jobs_of(result.stdout)) == sorted(
      f"{a}_{p}_seed0" for a in ("grpo", "grpo_token_tis", "gspo", "pg_seq_is", "grpo_seq_mis",
                                 "pg_seq_mis") for p in ("bf16", "fp16"))


def test_precision_ablation_dry_run(tmp_path):
  result = _launch("precision_ablation", "--dry_run", f"--experiment_dir={tmp_path}")
  assert result.returncode == 0, result.stderr
  jobs = _jobs_of(result.stdout)
  pairs = [t if t == s else f"{t}-{s}" for t in ("bf16", "fp16", "fp32")
           for s in ("bf16", "fp16", "fp32")]
  assert sorted(jobs) == sorted(f"grpo_{pair}_seed0" for pair in pairs)
  assert "--config.precision=fp32-bf16 " in jobs["grpo_fp32-bf16_seed0"][1]
  assert "--config.precision=fp16 " in jobs["grpo_fp16_seed0"][1]


def test_offline_mismatch_dry_run(tmp_path):
  result = _launch("offline_mismatch", "--dry_run", "--sweep_arg=engines=jax,vllm",
                   "--sweep_arg=precisions=bf16,fp16,bf16-fp16", f"--experiment_dir={tmp_path}",
                   "--override=num_prompts=2")
  assert result.returncode == 0, result.stderr
  jobs = _jobs_of(result.stdout)
  assert sorted(jobs) == ["offline_jax_seed0", "offline_vllm_seed0"]
  command = jobs["offline_vllm_seed0"][1]
  assert "-m experiments.offline_mismatch" in command
  assert "--config.engine=vllm --config.precisions=bf16,fp16,bf16-fp16" in command
  assert "--config.num_prompts=2" in command


def test_cloud_executor_dry_run(tmp_path):
  result = _launch("sanity", "--dry_run", "--executor=vertex", "--sweep_arg=algorithms=grpo",
                   "--sweep_arg=precisions=fp16", f"--experiment_dir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "executor vertex" in result.stdout
  assert "command: python -m experiments.rl --config=/rl_fp16/experiments/configs/sanity.py" in (
      result.stdout)


def test_skip_kept_drops_only_the_kept_runs(tmp_path):
  """A finished run kept by results.keep_run is not run again; a run directory alone (an
  unfinished run's) is no reason to skip, and the other jobs stay in sweep() order."""
  from rl_fp16 import results
  kept, live = tmp_path / "kept", tmp_path / "live"
  live.mkdir()
  (live / "config.json").write_text("{}")
  (live / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
  results.keep_run(live, kept / "grpo_fp32-e5_seed0")
  (kept / "grpo_fp32-e6_seed0").mkdir()  # started, never kept
  exp = tmp_path / "exp"
  result = _launch(DOSE_RESPONSE, "--dry_run", f"--experiment_dir={exp}",
                   f"--skip_kept={kept}")
  assert result.returncode == 0, result.stderr
  assert ("1 of 30 job(s) already kept in " f"{kept}, not run: grpo_fp32-e5_seed0") in (
      result.stdout)
  names = list(_jobs_of(result.stdout))
  assert len(names) == 29 and "grpo_fp32-e5_seed0" not in names
  assert names[:2] == ["grpo_fp32-e4_seed0", "grpo_fp32-e6_seed0"]
  for name in names:
    results.keep_run(live, kept / name)
  result = _launch(DOSE_RESPONSE, f"--experiment_dir={exp}", f"--skip_kept={kept}")
  assert result.returncode == 0, result.stderr
  assert "every job is kept: nothing to run" in result.stdout
  assert not exp.exists()  # Nothing launched, not even a manifest.
  result = _launch(DOSE_RESPONSE, "--dry_run", f"--experiment_dir={exp}",
                   f"--skip_kept={tmp_path / 'missing'}")
  assert result.returncode != 0
  assert f"--skip_kept={tmp_path / 'missing'}: not a directory" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--sweep_arg=algorithms=ppo"], "choose from"),
    (["--sweep_arg=precisions=fp8"], "precision 'fp8'"),
    (["--sweep_arg=seeds=a"], "must be integers"),
    (["--sweep_arg=engines=jax"], "sweep() takes"),
    (["--override=stpes=3"], "'stpes'"),
    (["--override=algorithm=gspo"], "varies"),
    (["--max_parallel=0"], "max_parallel"),
    (["--executor=vertex", "--cloud_accelerator=XYZ"], "Unknown ResourceType"),
])
def test_bad_flags_fail_clearly(tmp_path, args, message):
  result = _launch("sanity", "--dry_run", f"--experiment_dir={tmp_path}", *args)
  assert result.returncode != 0
  assert message in result.stderr + result.stdout


def _db_flag(tmp_path):
  """Keeps XManager's experiment database in tmp_path instead of ~/.xmanager."""
  config = tmp_path / "xm_db.yaml"
  config.write_text("sql_connector: sqlite\nsql_connection_settings:\n  backend: sqlite\n"
                    f"  db_name: {tmp_path / 'xm.sqlite3'}\n")
  return f"--xm_db_yaml_config_path={config}"


@pytest.mark.slow
def test_local_sweep_runs_through_xmanager(tmp_path, tiny_task_model_dir):
  exp = tmp_path / "exp"
  result = _launch("sanity", "--sweep_arg=algorithms=grpo", "--sweep_arg=precisions=bf16,fp16",
                   f"--experiment_dir={exp}", "--max_parallel=2", _db_flag(tmp_path),
                   f"--override=model={tiny_task_model_dir}", *TINY_RL,
                   timeout=900)  # a hang guard: two parallel jobs took > 300 s on a loaded machine
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "2/2 job(s) succeeded" in result.stdout
  for name in ("grpo_bf16_seed0", "grpo_fp16_seed0"):
    # The job's output came back through the local executor, prefixed with the job name.
    assert f"[{name}] done: final reward" in result.stdout
    with open(exp / name / "metrics.jsonl") as f:
      steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2]
    with open(exp / name / "config.json") as f:
      config = json.load(f)
    assert config["precision"] == name.split("_")[1]
    assert config["output_dir"] == str(exp / name)
  with open(exp / "sweep_sanity.json") as f:
    manifest = json.load(f)
  assert [(job["name"], job["ok"]) for job in manifest["jobs"]] == [
      ("grpo_bf16_seed0", True), ("grpo_fp16_seed0", True)]


@pytest.mark.slow
def test_failed_job_is_reported(tmp_path):
  exp = tmp_path / "exp"
  result = _launch("sanity", "--sweep_arg=algorithms=grpo", "--sweep_arg=precisions=fp16",
                   f"--experiment_dir={exp}", _db_flag(tmp_path),
                   f"--override=model={tmp_path / 'missing'}", *TINY_RL, timeout=300)
  assert result.returncode == 1
  assert "0/1 job(s) succeeded" in result.stdout
  assert "FAILED grpo_fp16_seed0" in result.stdout
  with open(exp / "sweep_sanity.json") as f:
    assert json.load(f)["jobs"][0]["ok"] is False


def _pids_naming(text):
  """PIDs of the processes whose command line contains `text`."""
  pids = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if text.encode() in f.read():
          pids.append(int(entry))
    except (OSError, ValueError):
      continue
  return pids


@pytest.mark.slow
def test_stopping_the_launcher_stops_its_jobs(tmp_path, tiny_task_model_dir):
  # xm_local runs each job as `sh -c COMMAND` in a session of its own and signals only the shell
  # at exit: before the fix a stopped launcher left its jobs running.
  run_dir = str(tmp_path / "exp" / "grpo_fp16_seed0")
  overrides = [a for a in TINY_RL if "steps=" not in a] + ["--override=steps=100000"]
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.sweep", "--config=experiments/configs/sanity.py",
       "--sweep_arg=algorithms=grpo", "--sweep_arg=precisions=fp16",
       f"--experiment_dir={tmp_path / 'exp'}", _db_flag(tmp_path),
       f"--override=model={tiny_task_model_dir}", *overrides],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not [p for p in _pids_naming(f"--config.output_dir={run_dir}")
               if p != launcher.pid]:
      assert launcher.poll() is None and time.time() < deadline, "the job never started"
      time.sleep(1)
    time.sleep(2)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert "interrupted: stopped 1 job(s)" in output, output[-3000:]
    deadline = time.time() + 60
    while _pids_naming(f"--config.output_dir={run_dir}"):
      assert time.time() < deadline, "the job outlived its launcher"
      time.sleep(1)
  finally:
    launcher.kill()
    for pid in _pids_naming(f"--config.output_dir={run_dir}"):
      os.kill(pid, signal.SIGKILL)


def test_launcher_names_come_from_the_library_without_jax():
  """One definition of the names (rl_fp16.names); importing the launcher does not import JAX; a
  sweep accepts every precision the library does (emulated names included) and refuses others."""
  code = ("import sys; from launch import sweep; from rl_fp16 import names; "
          "assert sweep.ALGORITHMS is names.ALGORITHMS and sweep.PRECISIONS is names.PRESETS; "
          "print(sweep.check_precision('fp32-e6'), sweep.check_precision('bf16'), "
          "'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["fp32-e6", "bf16", "False"]
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import sweep  # pylint: disable=g-import-not-at-top
  from rl_fp16 import objectives, precision  # pylint: disable=g-import-not-at-top
  assert objectives.ALGORITHMS is sweep.ALGORITHMS and precision.PRESETS is sweep.PRECISIONS
  with pytest.raises(app.UsageError, match="fp17"):
    sweep.check_precision("fp32-fp17")


def test_a_job_whose_run_directory_is_held_is_reported_as_refused(tmp_path):
  exp = tmp_path / "exp"
  holder = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "lock_holder.py"),
                             str(exp / "grpo_fp16_seed0")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    result = _launch("sanity", "--sweep_arg=algorithms=grpo", "--sweep_arg=precisions=fp16",
                     f"--experiment_dir={exp}", _db_flag(tmp_path),
                     f"--override=model={tmp_path / 'missing'}", *TINY_RL, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 1
  assert "0/1 job(s) succeeded, 1 refused (run directory in use)" in result.stdout, result.stdout
  assert f"REFUSED grpo_fp16_seed0: run directory {exp / 'grpo_fp16_seed0'} is in use by " \
         f"process {holder.pid}" in result.stdout, result.stdout
  assert "FAILED" not in result.stdout
  with open(exp / "sweep_sanity.json") as f:
    job = json.load(f)["jobs"][0]
  assert job["ok"] is False and job["refused"] is True
