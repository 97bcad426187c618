r"""Shared machinery of the XManager launch scripts: job specs, run-directory names, launching.

A sweep is a function that yields config variants (dicts of `--config.KEY=VALUE` settings, in the
style of big_vision). `make_jobs` turns the variants into `JobSpec`s, one run directory per job
under one experiment directory, named by the job's settings (EXP/grpo_fp16_seed0). `main` then
prints them (`--dry_run`) or launches them through XManager with at most `--max_parallel` running
at a time.

How the jobs run (xmanager 0.8.1):
- `--executor=local` (the default): each job is `xm.binary(path=sys.executable,
  args=["-m", MODULE])` on the `xm_local.Local` executor. The local packager turns an `xm.Binary`
  into an `xm_local` `LocalBinary` after checking that the path exists, with no Docker and no Bazel,
  and the local executor starts `PYTHON -m MODULE --config=... --config.KEY=VALUE ...` in a shell
  in a new session, with the launcher's environment and working directory (plus PYTHONPATH naming
  this repository). Each job's output reaches the launcher's terminal with a `[job name]` prefix.
  Packaging `xm.python_container` for the local executor would build a Docker image; that is not
  needed here and is not used.
- `--executor=vertex` or `--executor=kubernetes`: the same jobs, packaged as
  `xm.python_container` (a Docker image of this repository, installed from
  requirements/lock.txt) on `xm_local.Vertex` / `xm_local.Kubernetes`. Not runnable on this
  machine (it needs Docker or Cloud Build, Google Cloud credentials, and an experiment directory
  the containers can write, e.g. a Cloud Storage FUSE path such as /gcs/BUCKET/runs).

XManager keeps its own record of experiments in ~/.xmanager/experiments.sqlite3 (change it with
--xm_db_yaml_config_path). The launcher also writes EXP/sweep_NAME.json: the jobs, their command
lines and, when they end, their outcome.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from xmanager import xm
from xmanager import xm_local  # Also defines XManager's --xm_* flags.

from rl_fp16 import names

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXECUTORS = ("local", "vertex", "kubernetes")
CLOUD_WORKDIR = "/rl_fp16"  # Where the repository lies inside the cloud image.
DEFAULT_NAME = "{algorithm}_{precision}_seed{seed}"

# The RL experiment and its choices (rl_fp16.names is JAX-free: the launcher does not import JAX).
RL_MODULE = "experiments.rl"
RL_CONFIG = "experiments/configs/sanity.py"
ALGORITHMS = names.ALGORITHMS
PRECISIONS = names.PRESETS

_EXPERIMENT_DIR = flags.DEFINE_string(
    "experiment_dir", None, "Directory of this sweep; each job writes EXP/<job name>. "
    "Defaults to runs/<sweep name> under the current directory.")
_EXECUTOR = flags.DEFINE_enum(
    "executor", "local", EXECUTORS, "Where the jobs run: 'local' (this machine, no Docker) or a "
    "cluster through XManager ('vertex', 'kubernetes'; needs Docker and Google Cloud set-up).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the jobs (names, run directories, command "
                             "lines) and exit without running anything.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 1, "At most this many jobs run at a time.",
                                     lower_bound=1)
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE config override for every job, passed as --config.KEY=VALUE "
    "(e.g. --override=steps=10 --override=engine=jax). Repeat the flag for several.")
_CLOUD_BASE_IMAGE = flags.DEFINE_string(
    "cloud_base_image", "python:3.11-slim", "Base Docker image for --executor=vertex/kubernetes.")
_CLOUD_ACCELERATOR = flags.DEFINE_string(
    "cloud_accelerator", None, "Accelerator per job for --executor=vertex/kubernetes, an "
    "xm.ResourceType name such as A100, V100, T4 (None: CPU only).")
_CLOUD_ACCELERATOR_COUNT = flags.DEFINE_integer(
    "cloud_accelerator_count", 1, "How many --cloud_accelerator per job.", lower_bound=1)


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One experiment run: `python -m MODULE --config=CONFIG_FILE --config.KEY=VALUE ...`.

  Attributes:
    name: the job's name, also the name of its run directory.
    module: the experiment module, e.g. "experiments.rl".
    config_file: the config file, relative to the repository root.
    settings: (KEY, VALUE) config overrides, in order; VALUE as passed on the command line.
    run_dir: absolute path of the run directory (passed as --config.output_dir).
  """

  name: str
  module: str
  config_file: str
  settings: tuple[tuple[str, str], ...]
  run_dir: str

  def flags(self, repo_root: str = REPO_ROOT) -> list[str]:
    """The job's command-line flags; the config file is looked up under `repo_root`."""
    return ([f"--config={os.path.join(repo_root, self.config_file)}"]
            + [f"--config.{key}={value}" for key, value in self.settings]
            + [f"--config.output_dir={self.run_dir}"])

  def command(self, executor: str = "local") -> list[str]:
    """The command line the job runs (for a cloud executor: inside the container)."""
    if executor == "local":
      return [sys.executable, "-m", self.module, *self.flags(REPO_ROOT)]
    return ["python", "-m", self.module, *self.flags(CLOUD_WORKDIR)]


def format_value(value: Any) -> str:
  """A config value as written after `--config.KEY=`."""
  if isinstance(value, (list, tuple)):
    return ",".join(format_value(item) for item in value)
  return str(value)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
  """Parses ["steps=10", "config.engine=jax"] into {"steps": "10", "engine": "jax"}."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
      raise ValueError(f"--override={item!r}: expected KEY=VALUE, e.g. --override=steps=10")
    overrides[key] = value
  return overrides


def run_name(template: str, variant: Mapping[str, Any]) -> str:
  """The run directory name of a variant, e.g. "{algorithm}_{precision}_seed{seed}"."""
  try:
    name = template.format(**variant)
  except KeyError as e:
    raise ValueError(f"run name template {template!r} needs {e} but the variant has only "
                     f"{sorted(variant)}") from None
  if not name or name in (".", "..") or "/" in name or os.sep in name or any(
      c.isspace() for c in name):
    raise ValueError(f"run name {name!r} (from {template!r}) is not a plain directory name")
  return name


def make_jobs(variants: Iterable[Mapping[str, Any]], *, module: str, config_file: str,
              experiment_dir: str, name: str = DEFAULT_NAME,
              overrides: Mapping[str, str] | None = None) -> list[JobSpec]:
  """Builds one JobSpec per config variant.

  Args:
    variants: config settings per job, e.g. {"algorithm": "grpo", "precision": "fp16", "seed": 0}.
    module: experiment module run with `python -m`.
    config_file: config file relative to the repository root.
    experiment_dir: every run directory is EXPERIMENT_DIR/<name>.
    name: run name template, formatted with the variant.
    overrides: settings added to every job (e.g. {"steps": "10"}); may not set a swept key or
      output_dir (the launcher sets it).
  Returns:
    The jobs, in the order of `variants`.
  Raises:
    ValueError: two variants share a run name, or an override clashes with a swept setting.
  """
  overrides = dict(overrides or {})
  experiment_dir = os.path.abspath(experiment_dir)
  if "output_dir" in overrides:
    raise ValueError("--override=output_dir=... is not allowed: each job's output_dir is "
                     "EXPERIMENT_DIR/<job name>; set --experiment_dir instead")
  jobs, seen = [], {}
  for variant in variants:
    clash = sorted(set(variant) & set(overrides))
    if clash:
      raise ValueError(f"--override sets {clash}, which this sweep varies; choose its values with "
                       "the sweep's own flags instead")
    job_name = run_name(name, variant)
    if job_name in seen:
      raise ValueError(f"variants {seen[job_name]} and {dict(variant)} both get run name "
                       f"{job_name!r}")
    seen[job_name] = dict(variant)
    settings = tuple((key, format_value(value)) for key, value in
                     [*variant.items(), *overrides.items()])
    jobs.append(JobSpec(name=job_name, module=module, config_file=config_file, settings=settings,
                        run_dir=os.path.join(experiment_dir, job_name)))
  if not jobs:
    raise ValueError("the sweep has no jobs; check the sweep flags")
  return jobs


def describe(jobs: Sequence[JobSpec], *, executor: str = "local", max_parallel: int = 1) -> str:
  """A listing of the jobs for --dry_run: name, run directory and command line of each."""
  lines = [f"{len(jobs)} job(s), executor {executor}, at most {max_parallel} at a time:"]
  for index, job in enumerate(jobs, 1):
    lines.append(f"[{index}/{len(jobs)}] {job.name}")
    lines.append(f"  run_dir: {job.run_dir}")
    lines.append(f"  command: {shlex.join(job.command(executor))}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# XManager.


def job_env(executor: str) -> dict[str, str]:
  """Environment variables set for every job."""
  if executor != "local":
    return {"PYTHONUNBUFFERED": "1"}
  path = os.environ.get("PYTHONPATH")
  return {
      "PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else ""),
      # Progress bars reach the launcher through a pipe, one redraw per update; fewer redraws.
      "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "10"),
  }


def cloud_requirements():
  """xm.JobRequirements of a cloud job, from --cloud_accelerator(_count)."""
  if not _CLOUD_ACCELERATOR.value:
    return xm.JobRequirements()
  try:
    return xm.JobRequirements(**{_CLOUD_ACCELERATOR.value: _CLOUD_ACCELERATOR_COUNT.value})
  except AttributeError as e:  # xmanager 0.8.1: ResourceType has no architecture().
    raise app.UsageError(
        f"--cloud_accelerator={_CLOUD_ACCELERATOR.value}: this xmanager cannot express "
        f"accelerator requirements ({e}); use a newer xmanager or leave the flag out") from e
  except KeyError as e:
    raise app.UsageError(f"--cloud_accelerator: {e}") from e


def make_executor(executor: str):
  """The XManager executor for one job."""
  if executor == "local":
    return xm_local.Local(experimental_stream_output=True)
  requirements = cloud_requirements()
  if executor == "vertex":
    return xm_local.Vertex(requirements=requirements)
  if executor == "kubernetes":
    return xm_local.Kubernetes(requirements=requirements)
  raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")


def make_packageable(module: str, executor):
  """What XManager packages for `module`: the local Python binary, or a Docker image of the repo."""
  if isinstance(executor, xm_local.Local):
    return xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable,
                     args=["-m", module])
  repo = os.path.basename(REPO_ROOT)
  return xm.python_container(
      executor_spec=executor.Spec(), path=REPO_ROOT, base_image=_CLOUD_BASE_IMAGE.value,
      entrypoint=xm.ModuleName(module),
      docker_instructions=[
          "ENV LANG=C.UTF-8",
          f"COPY {repo}/requirements/ {CLOUD_WORKDIR}/requirements/",
          "RUN python -m pip install -q 'uv>=0.5' && python -m uv pip install --system "
          f"--no-deps -r {CLOUD_WORKDIR}/requirements/lock.txt",
          f"COPY {repo}/ {CLOUD_WORKDIR}",
          f"WORKDIR {CLOUD_WORKDIR}",
          "RUN python -m uv pip install --system --no-deps -e .",
      ])


def make_xm_job(job: JobSpec, executable, executor_name: str):
  """The xm.Job of one JobSpec, for an already packaged executable."""
  repo_root = REPO_ROOT if executor_name == "local" else CLOUD_WORKDIR
  return xm.Job(executable=executable, executor=make_executor(executor_name), name=job.name,
                args=job.flags(repo_root), env_vars=job_env(executor_name))


@dataclasses.dataclass
class JobResult:
  """How a launched job ended."""

  job: JobSpec
  ok: bool
  seconds: float
  error: str = ""


class _JobsFailed(Exception):
  """Some jobs failed (each is reported in its JobResult)."""


async def _run_job(experiment, job: JobSpec, executable, executor: str, slots: asyncio.Semaphore,
                   counts: collections.Counter, total: int) -> JobResult:
  """Adds one job as a work unit once a slot is free, and waits for it to end."""
  async with slots:
    if executor == "local":
      os.makedirs(job.run_dir, exist_ok=True)
    print(f"launching {job.name} -> {job.run_dir}", flush=True)
    start = time.time()
    try:
      work_unit = await experiment.add(make_xm_job(job, executable, executor))
      await work_unit.wait_until_complete()
      result = JobResult(job, ok=True, seconds=time.time() - start)
    except xm.ExperimentUnitError as e:
      result = JobResult(job, ok=False, seconds=time.time() - start, error=str(e))
    counts["ok" if result.ok else "failed"] += 1
    print(f"{'finished' if result.ok else 'FAILED'} {job.name} after {result.seconds / 60:.1f} "
          f"min ({counts.total()}/{total} done, {counts['failed']} failed)", flush=True)
    return result


async def _launch(jobs: Sequence[JobSpec], *, executor: str, max_parallel: int,
                  title: str) -> list[JobResult]:
  """Runs the jobs as work units of one XManager experiment, at most `max_parallel` at a time."""
  outcomes = []
  try:
    async with xm_local.create_experiment(experiment_title=title) as experiment:
      modules = list(dict.fromkeys(job.module for job in jobs))
      packaged = experiment.package(
          [make_packageable(module, make_executor(executor)) for module in modules])
      executables = dict(zip(modules, packaged))
      slots, counts = asyncio.Semaphore(max_parallel), collections.Counter()
      outcomes = list(await asyncio.gather(*(
          _run_job(experiment, job, executables[job.module], executor, slots, counts, len(jobs))
          for job in jobs)))
      if not all(r.ok for r in outcomes):
        # Every job has ended. Leaving with an exception keeps the local experiment from waiting
        # for its jobs a second time and re-raising a failed job's exit code as an error.
        raise _JobsFailed()
  except _JobsFailed:
    pass
  return outcomes


def _write_manifest(path: str, sweep_name: str, jobs: Sequence[JobSpec], executor: str,
                    results: Sequence[JobResult] | None = None) -> None:
  outcome = {r.job.name: r for r in results or ()}
  records = []
  for job in jobs:
    record = {"name": job.name, "run_dir": job.run_dir, "settings": dict(job.settings),
              "command": shlex.join(job.command(executor))}
    if job.name in outcome:
      record.update(ok=outcome[job.name].ok, minutes=outcome[job.name].seconds / 60,
                    error=outcome[job.name].error)
    records.append(record)
  tmp_path = f"{path}.tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    json.dump({"sweep": sweep_name, "executor": executor, "argv": sys.argv, "jobs": records}, f,
              indent=2)
    f.write("\n")
  os.replace(tmp_path, path)


def launch(jobs: Sequence[JobSpec], *, sweep_name: str, experiment_dir: str, executor: str,
           max_parallel: int) -> list[JobResult]:
  """Launches the jobs through XManager and waits for them; writes EXP/sweep_NAME.json."""
  experiment_dir = os.path.abspath(experiment_dir)
  if executor == "local":
    os.makedirs(experiment_dir, exist_ok=True)
  # With a cloud executor the experiment directory may not be visible here; then no manifest.
  manifest = None
  if os.path.isdir(experiment_dir):
    manifest = os.path.join(experiment_dir, f"sweep_{sweep_name}.json")
    _write_manifest(manifest, sweep_name, jobs, executor)
  logging.getLogger("alembic").setLevel(logging.WARNING)  # XManager's database set-up chatter.
  title = f"{sweep_name}:{os.path.basename(experiment_dir)}"
  start = time.time()
  results = asyncio.run(_launch(jobs, executor=executor, max_parallel=max_parallel, title=title))
  if manifest:
    _write_manifest(manifest, sweep_name, jobs, executor, results)
  failed = [r for r in results if not r.ok]
  print(f"\n{len(results) - len(failed)}/{len(results)} job(s) succeeded in "
        f"{(time.time() - start) / 60:.1f} min; runs in {experiment_dir}")
  for r in failed:
    print(f"  FAILED {r.job.name}: {r.error}\n    command: {shlex.join(r.job.command(executor))}")
  return results


def jobs_from_flags(variants: Iterable[Mapping[str, Any]], *, module: str, config_file: str,
                    sweep_name: str, name: str = DEFAULT_NAME) -> tuple[list[JobSpec], str]:
  """`make_jobs` with --experiment_dir (default runs/SWEEP_NAME) and --override.

  Returns:
    (jobs, absolute experiment directory).
  Raises:
    app.UsageError: the flags make a bad sweep.
  """
  experiment_dir = os.path.abspath(_EXPERIMENT_DIR.value or os.path.join("runs", sweep_name))
  try:
    jobs = make_jobs(variants, module=module, config_file=config_file,
                     experiment_dir=experiment_dir, name=name,
                     overrides=parse_overrides(_OVERRIDES.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return jobs, experiment_dir


def int_list(values: Sequence[str], flag: str) -> list[int]:
  """Parses a list flag of integers (e.g. --seeds=0,1,2)."""
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{flag} must be integers, got {list(values)}") from None


def check_choices(values: Sequence[str], choices: Sequence[str], flag: str) -> list[str]:
  """Returns `values` if each is one of `choices`; raises a flag error otherwise."""
  unknown = [v for v in values if v not in choices]
  if unknown or not values:
    raise app.UsageError(f"--{flag}: {unknown or 'empty'}; choose from {list(choices)}")
  return list(values)


def check_precision(name: str) -> str:
  """Returns `name` if it is a precision ("bf16", "e8") or a TRAINER-SAMPLER pair ("fp32-e6")."""
  try:
    names.precision_pair_parts(name)
  except ValueError as e:
    raise app.UsageError(f"precision {name!r}: {e}") from None
  return name


def main(jobs: Sequence[JobSpec], *, sweep_name: str, experiment_dir: str) -> int:
  """Prints the jobs (--dry_run) or launches them; returns the process exit code."""
  executor, max_parallel = _EXECUTOR.value, _MAX_PARALLEL.value
  if executor != "local":
    cloud_requirements()  # Fails early on a bad --cloud_accelerator.
  if _DRY_RUN.value:
    print(describe(jobs, executor=executor, max_parallel=max_parallel))
    return 0
  results = launch(jobs, sweep_name=sweep_name, experiment_dir=experiment_dir,
                   executor=executor, max_parallel=max_parallel)
  return 0 if all(r.ok for r in results) else 1
