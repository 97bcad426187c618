r"""The generic sweep launcher: a config file's `sweep()` -> one XManager job per config variant.

    python -m launch.sweep --config=experiments/configs/sanity.py --dry_run
    python -m launch.sweep --config=experiments/configs/sanity.py --max_parallel=2 \
        --sweep_arg=algorithms=grpo,gspo --sweep_arg=seeds=0,1 --override=steps=10
    python -m launch.sweep --config=experiments/dose_response/config.py:grpo --dry_run

An experiment is a config file (big_vision style): `get_config(arg)` makes the base config and
`sweep(...)` yields the variants, dicts of config overrides (nested dicts allowed). The launcher
imports the config file by path (`FILE.py[:ARG]`, as ml_collections' config_flags does; ARG goes to
`get_config`, and to `sweep` when it has a parameter named `arg`), turns each variant into
`--config.KEY=VALUE` flags (nested keys joined with dots, tuples and lists as Python literals, the
form ml_collections parses), names each job's run directory from its settings with the config
file's `NAME` template (default "{algorithm}_{precision}_seed{seed}"), and runs
`python -m MODULE --config=FILE.py[:ARG] --config.KEY=VALUE ... --config.output_dir=EXP/NAME`,
MODULE being --module, else the config file's `MODULE`, else experiments.rl. `--sweep_arg=KEY=V1,V2`
passes a keyword argument to `sweep()` (a list of literals when the parameter's default is a
tuple or list). `main` prints the jobs (`--dry_run`) or launches them through XManager with at most
`--max_parallel` running at a time.

This module imports rl_fp16.names and rl_fp16.run_lock only (no JAX); a config file is imported
only when it is used.

How the jobs run (xmanager 0.8.1):
- `--executor=local` (the default): each job is `xm.binary(path=sys.executable,
  args=["-m", MODULE])` on the `xm_local.Local` executor. The local packager turns an `xm.Binary`
  into an `xm_local` `LocalBinary` after checking that the path exists, with no Docker and no Bazel,
  and the local executor starts `PYTHON -m MODULE --config=... --config.KEY=VALUE ...` in a shell
  in a new session, with the launcher's environment and working directory (plus PYTHONPATH naming
  this repository). Each job's output reaches the launcher's terminal with a `[job name]` prefix.
  Ctrl-C or SIGTERM to the launcher stops its running jobs too (`stop_local_jobs`: each job runs
  in a session of its own, which xm_local's exit handler does not reach); rerun to resume.
  A job whose run directory another process holds (`rl_fp16.run_lock`: e.g. the same sweep
  launched twice) is reported as REFUSED, not run (or, if taken while it started, not counted as
  a crash).
  Packaging `xm.python_container` for the local executor would build a Docker image; that is not
  needed here and is not used.
- `--executor=vertex` or `--executor=kubernetes`: the same jobs, packaged as
  `xm.python_container` (a Docker image of this repository, installed from
  requirements/lock.txt) on `xm_local.Vertex` / `xm_local.Kubernetes`. Not runnable on this
  machine (it needs Docker or Cloud Build, Google Cloud credentials, and an experiment directory
  the containers can write, e.g. a Cloud Storage FUSE path such as /gcs/BUCKET/runs).

XManager keeps its own record of experiments in ~/.xmanager/experiments.sqlite3 (change it with
--xm_db_yaml_config_path). The launcher also writes EXP/sweep_NAME.json (NAME: the config file's
name): the jobs, their command lines and, when they end, their outcome.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from xmanager import xm
from xmanager import xm_local  # Also defines XManager's --xm_* flags.
from xmanager.xm_local import execution

from rl_fp16 import names, run_lock

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
    "Defaults to runs/<sweep name> under the current directory (the config file's name, or its "
    "study folder's for a study's config.py).")
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
_SKIP_KEPT = flags.DEFINE_string(
    "skip_kept", None, "Directory of kept runs (rl_fp16.results.keep_run, e.g. "
    "docs/dose_response/data): jobs whose run has a kept copy there, DIR/<job name>/, are not "
    "run again (a finished run's data outlasts the session; its run directory may not).")
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
  """A config value as written after `--config.KEY=`: tuples and lists as Python literals
  (`('q_proj', 'k_proj')`), which ml_collections' config flags parse; anything else as str()."""
  if isinstance(value, list):
    return repr(list(value))
  if isinstance(value, tuple):
    return repr(tuple(value))
  return str(value)


def flatten(variant: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"loss": {"token_is_cap": 2.0}, "seed": 0} -> {"loss.token_is_cap": 2.0, "seed": 0}."""
  flat = {}
  for key, value in variant.items():
    if hasattr(value, "to_dict"):  # A ConfigDict.
      value = value.to_dict()
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _keys_clash(a: str, b: str) -> bool:
  """True when setting config key `a` and `b` touches the same field ("loss" and "loss.x")."""
  return a == b or a.startswith(b + ".") or b.startswith(a + ".")


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
    variants: config settings per job, e.g. {"algorithm": "grpo", "precision": "fp16", "seed": 0};
      nested dicts set nested keys ({"loss": {"token_is_cap": 2.0}} -> loss.token_is_cap).
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
    flat = flatten(variant)
    clash = sorted(o for o in overrides if any(_keys_clash(o, k) for k in flat))
    if clash:
      raise ValueError(f"--override sets {clash}, which this sweep varies; choose its values with "
                       "the sweep's own arguments (--sweep_arg) instead")
    job_name = run_name(name, variant)
    if job_name in seen:
      raise ValueError(f"variants {seen[job_name]} and {dict(variant)} both get run name "
                       f"{job_name!r}")
    seen[job_name] = dict(variant)
    settings = tuple((key, format_value(value)) for key, value in
                     [*flat.items(), *overrides.items()])
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
  refused: bool = False  # its run directory is held by another process (`rl_fp16.run_lock`)


def refusal(job: JobSpec, executor: str) -> str | None:
  """Why a local job's run directory cannot be its own now (another process holds it), or None.
  Cloud run directories are not visible here: None."""
  holder = run_lock.holder(job.run_dir) if executor == "local" else None
  return None if holder is None else f"run directory {job.run_dir} is in use by {holder}"


class _JobsFailed(Exception):
  """Some jobs failed (each is reported in its JobResult)."""


async def _run_job(experiment, job: JobSpec, executable, executor: str, slots: asyncio.Semaphore,
                   counts: collections.Counter, total: int) -> JobResult:
  """Adds one job as a work unit once a slot is free, and waits for it to end."""
  async with slots:
    start = time.time()
    busy = refusal(job, executor)
    if busy:  # not launched: it would exit 2 without writing anything
      result = JobResult(job, ok=False, seconds=0.0, error=busy, refused=True)
    else:
      if executor == "local":
        os.makedirs(job.run_dir, exist_ok=True)
      print(f"launching {job.name} -> {job.run_dir}", flush=True)
      try:
        work_unit = await experiment.add(make_xm_job(job, executable, executor))
        await work_unit.wait_until_complete()
        result = JobResult(job, ok=True, seconds=time.time() - start)
      except xm.ExperimentUnitError as e:
        busy = refusal(job, executor)  # another process took the directory first
        result = JobResult(job, ok=False, seconds=time.time() - start, error=busy or str(e),
                           refused=bool(busy))
    outcome = "ok" if result.ok else "refused" if result.refused else "failed"
    counts[outcome] += 1
    verb = {"ok": "finished", "refused": "REFUSED", "failed": "FAILED"}[outcome]
    print(f"{verb} {job.name} after {result.seconds / 60:.1f} min ({counts.total()}/{total} done, "
          f"{counts['failed']} failed, {counts['refused']} refused)"
          + (f": {result.error}" if result.refused else ""), flush=True)
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
                    error=outcome[job.name].error, refused=outcome[job.name].refused)
    records.append(record)
  tmp_path = f"{path}.tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    json.dump({"sweep": sweep_name, "executor": executor, "argv": sys.argv, "jobs": records}, f,
              indent=2)
    f.write("\n")
  os.replace(tmp_path, path)


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def stop_local_jobs() -> int:
  """SIGTERM to the process group of every local job this process launched; returns how many.

  xm_local starts each job as `sh -c COMMAND` in a new session and, at exit, signals only that
  shell, so the job itself (the shell's child) would outlive a stopped launcher. The handles are
  xm_local's own list (xmanager 0.8.1, `execution._local_jobs`).
  """
  stopped = 0
  for handle in list(getattr(execution, "_local_jobs", ())):
    process = getattr(handle, "process", None)
    if process is None:
      continue
    try:
      os.killpg(process.pid, signal.SIGTERM)
      stopped += 1
    except (ProcessLookupError, PermissionError):
      pass
  return stopped


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
  # Ctrl-C or SIGTERM stops the running jobs too (they run in sessions of their own).
  previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    results = asyncio.run(_launch(jobs, executor=executor, max_parallel=max_parallel, title=title))
  except KeyboardInterrupt:
    print(f"\ninterrupted: stopped {stop_local_jobs()} job(s); rerun the same command to resume "
          "them from their checkpoints", flush=True)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous_sigterm)
  if manifest:
    _write_manifest(manifest, sweep_name, jobs, executor, results)
  failed = [r for r in results if not r.ok]
  refused = sum(r.refused for r in failed)
  print(f"\n{len(results) - len(failed)}/{len(results)} job(s) succeeded"
        + (f", {refused} refused (run directory in use)" if refused else "")
        + f" in {(time.time() - start) / 60:.1f} min; runs in {experiment_dir}")
  for r in failed:
    print(f"  {'REFUSED' if r.refused else 'FAILED'} {r.job.name}: {r.error}\n    command: "
          f"{shlex.join(r.job.command(executor))}")
  return results


# ------------------------------------------------------------------------------------------------
# Config files with a sweep().


def split_config_arg(value: str) -> tuple[str, str | None]:
  """"experiments/configs/paper.py:grpo" -> ("experiments/configs/paper.py", "grpo")."""
  path, sep, arg = value.partition(":")
  return path, (arg if sep else None)


def load_config_module(path: str):
  """Imports a config file by path, as ml_collections' config_flags does (REPO_ROOT on sys.path,
  so that it may import `experiments.configs.OTHER`)."""
  if not os.path.isfile(path):
    raise ValueError(f"--config: no config file {path!r}")
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_sweep_args(items: Iterable[str], sweep_fn) -> dict[str, Any]:
  """--sweep_arg=KEY=VALUE items -> keyword arguments of `sweep_fn`.

  VALUE is split on commas into a list when the parameter's default is a tuple or list (or it has
  no default); each item (or the whole VALUE) is a Python literal when it parses as one
  ("0" -> 0), else a string ("grpo").
  """
  def literal(text):
    try:
      return ast.literal_eval(text)
    except (SyntaxError, ValueError):
      return text

  parameters = inspect.signature(sweep_fn).parameters
  kwargs = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--sweep_arg={item!r}: expected KEY=VALUE, e.g. --sweep_arg=seeds=0,1")
    if key not in parameters or key == "arg":
      raise ValueError(f"--sweep_arg={item!r}: sweep() takes "
                       f"{[p for p in parameters if p != 'arg']}")
    default = parameters[key].default
    if default is inspect.Parameter.empty or isinstance(default, (list, tuple)):
      kwargs[key] = [literal(v) for v in value.split(",")] if value else []
    else:
      kwargs[key] = literal(value)
  return kwargs


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:  # A leaf reached before the last part.
      return False
  return True


@dataclasses.dataclass(frozen=True)
class ConfigSweep:
  """The jobs of one config file's sweep, and where they go."""

  name: str  # `sweep_name` of the config file, e.g. "sanity": EXP/sweep_sanity.json.
  experiment_dir: str
  jobs: list[JobSpec]


def sweep_name(path: str) -> str:
  """A config file's name, or its folder's for a study's `config.py`
  ("experiments/configs/sanity.py" -> "sanity", "experiments/dose_response/config.py" ->
  "dose_response")."""
  name = os.path.splitext(os.path.basename(path))[0]
  if name == "config":
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  return name


def config_sweep(config: str, *, module: str | None = None, experiment_dir: str | None = None,
                 overrides: Iterable[str] = (), sweep_args: Iterable[str] = ()) -> ConfigSweep:
  """The jobs of `config` ("FILE.py[:ARG]")'s `sweep()`.

  Args:
    config: the config file (absolute, or relative to the current directory), with an optional
      `:ARG` for `get_config(ARG)` (and `sweep(arg=ARG)` when sweep has an `arg` parameter).
    module: experiment module; None: the config file's MODULE, else experiments.rl.
    experiment_dir: None: runs/<sweep_name(config file)>.
    overrides: KEY=VALUE settings for every job (--override).
    sweep_args: KEY=VALUE keyword arguments of `sweep()` (--sweep_arg).
  Raises:
    ValueError: a bad config file, sweep, setting or run name.
  """
  path, arg = split_config_arg(config)
  config_module = load_config_module(path)
  sweep_fn = getattr(config_module, "sweep", None)
  if not callable(sweep_fn):
    raise ValueError(f"{path} has no sweep(); a config file to sweep defines sweep() yielding "
                     "dicts of config overrides (see experiments/configs/sanity.py)")
  base = config_module.get_config() if arg is None else config_module.get_config(arg)
  kwargs = parse_sweep_args(sweep_args, sweep_fn)
  if arg is not None and "arg" in inspect.signature(sweep_fn).parameters:
    kwargs["arg"] = arg
  variants = list(sweep_fn(**kwargs))
  parsed_overrides = parse_overrides(overrides)
  for key in [*parsed_overrides, *(k for v in variants for k in flatten(v))]:
    if key != "output_dir" and not _has_key(base, key):
      raise ValueError(f"config key {key!r} (set by the sweep or --override) is not in "
                       f"{os.path.basename(path)}'s get_config()")
  name = sweep_name(path)
  experiment_dir = os.path.abspath(experiment_dir or os.path.join("runs", name))
  config_file = os.path.relpath(os.path.abspath(path), REPO_ROOT)
  if config_file.startswith(".."):
    config_file = os.path.abspath(path)  # Outside the repository: by absolute path.
  if arg is not None:
    config_file += f":{arg}"
  jobs = make_jobs(variants, module=module or getattr(config_module, "MODULE", RL_MODULE),
                   config_file=config_file, experiment_dir=experiment_dir,
                   name=getattr(config_module, "NAME", DEFAULT_NAME), overrides=parsed_overrides)
  return ConfigSweep(name=name, experiment_dir=experiment_dir, jobs=jobs)


def drop_kept(jobs: Sequence[JobSpec], kept_dir: str) -> tuple[list[JobSpec], list[JobSpec]]:
  """(jobs to run, jobs skipped): a job is skipped when `kept_dir/<job name>/` holds a kept run
  (`rl_fp16.results.keep_run` writes it only for a finished run).

  Raises:
    ValueError: `kept_dir` is not a directory.
  """
  from rl_fp16.results import KEPT_METRICS_FILE  # pandas; only when --skip_kept is given.
  if not os.path.isdir(kept_dir):
    raise ValueError(f"--skip_kept={kept_dir}: not a directory (a directory of kept runs, "
                     "DIR/<job name>/" + KEPT_METRICS_FILE + ")")
  kept = [j for j in jobs if os.path.exists(os.path.join(kept_dir, j.name, KEPT_METRICS_FILE))]
  return [j for j in jobs if j not in kept], kept


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


def _define_main_flags():
  """The flags of `python -m launch.sweep`, defined only when it runs as a program: experiment
  modules define their own --config flag when they run, and may share a process with this one."""
  config = flags.DEFINE_string(
      "config", None, "Config file to sweep, FILE.py[:ARG]; it defines sweep() (and get_config).")
  module = flags.DEFINE_string(
      "module", None, "Experiment module the jobs run (python -m MODULE); default: the config "
      f"file's MODULE, else {RL_MODULE}.")
  sweep_args = flags.DEFINE_multi_string(
      "sweep_arg", [], "KEY=VALUE keyword argument of the config file's sweep(), e.g. "
      "--sweep_arg=algorithms=grpo,gspo --sweep_arg=seeds=0,1. Repeat the flag for several.")
  flags.mark_flag_as_required("config")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
      found = config_sweep(config.value, module=module.value,
                           experiment_dir=_EXPERIMENT_DIR.value, overrides=_OVERRIDES.value,
                           sweep_args=sweep_args.value)
      jobs = found.jobs
      if _SKIP_KEPT.value:
        jobs, kept = drop_kept(jobs, _SKIP_KEPT.value)
        print(f"{len(kept)} of {len(found.jobs)} job(s) already kept in {_SKIP_KEPT.value}, not "
              f"run: {', '.join(j.name for j in kept) or 'none'}", flush=True)
        if not jobs:
          print("every job is kept: nothing to run")
          return 0
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    return main(jobs, sweep_name=found.name, experiment_dir=found.experiment_dir)

  return run


if __name__ == "__main__":
  app.run(_define_main_flags())
