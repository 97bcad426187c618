r"""Runs one command as N cooperating JAX processes on this machine (a multi-host job, locally).

    python -m launch.local_processes --num_processes=2 --devices_per_process=2 -- \
        python -m experiments.rl --config=experiments/configs/sharded.py --config.engine=jax

Each process gets the environment `rl_fp16.distributed.initialize_distributed` reads:
JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or --coordinator_port), JAX_NUM_PROCESSES=N
and JAX_PROCESS_ID=i; with --devices_per_process=D (CPU) also
XLA_FLAGS=--xla_force_host_platform_device_count=D, so that the N processes form one mesh of N * D
CPU devices (cross-process collectives over gloo). Their output is streamed here, each line
prefixed with `[process i]`.

The job succeeds when every process exits with status 0. When one process fails (a non-zero exit,
a signal such as `kill -9`, or --timeout_s passing), the launcher stops the others (SIGTERM, then
SIGKILL after --grace_s), names the process that failed and exits with status 1: the survivors
would otherwise wait in a collective for a peer that is gone. (JAX's distributed runtime catches
SIGTERM as a preemption notice, so the survivors usually end at the SIGKILL.) Re-running the same command resumes
`experiments.rl` from its last complete checkpoint.

On real hosts there is no launcher: run the same command on each host with the three variables
set by hand or by the cluster (docs/sharding.md).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from absl import app
from absl import flags

LOOPBACK = "127.0.0.1"
PREFIX = "[launcher]"

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "How many processes to start.",
                                      lower_bound=1)
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", 0, "CPU devices per process (XLA_FLAGS="
    "--xla_force_host_platform_device_count); 0 leaves XLA_FLAGS as it is (e.g. on GPUs).",
    lower_bound=0)
_COORDINATOR_PORT = flags.DEFINE_integer(
    "coordinator_port", 0, "Port of the coordinator (process 0) on 127.0.0.1; 0 picks a free one.",
    lower_bound=0)
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 0, "Stop every process and fail after this many "
                                "seconds (0: no limit).", lower_bound=0)
_GRACE_S = flags.DEFINE_float("grace_s", 5, "After a failure, seconds between SIGTERM and SIGKILL "
                              "of the remaining processes.", lower_bound=0)


def free_port(host: str = LOOPBACK) -> int:
  """A TCP port on `host` that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], *, coordinator_address: str, num_processes: int,
                process_id: int, devices_per_process: int = 0) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus the JAX_* variables of
  `rl_fp16.distributed.initialize_distributed`, unbuffered Python output and, with
  `devices_per_process` > 0, that many forced CPU devices (appended to XLA_FLAGS)."""
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  env = dict(base)
  env.update(JAX_COORDINATOR_ADDRESS=coordinator_address, JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if devices_per_process:
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count="
                                        f"{devices_per_process}"])
  return env


def describe_exit(returncode: int) -> str:
  """'exited with status 3' / 'was killed by SIGKILL' for a `Popen.returncode`."""
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


@dataclasses.dataclass
class JobResult:
  """How a job ended: its exit status, and the process that failed first (None: all exited 0)."""

  returncode: int
  failed_process: int | None = None
  message: str = ""
  seconds: float = 0.0


def _stream(index: int, pipe, out) -> None:
  for line in iter(pipe.readline, ""):
    out.write(f"[process {index}] {line if line.endswith(chr(10)) else line + chr(10)}")
    out.flush()
  pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # the process and whatever it started (its own session)
  except (ProcessLookupError, PermissionError):
    pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in running:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def run_processes(command: Sequence[str], num_processes: int, *, devices_per_process: int = 0,
                  coordinator_port: int = 0, timeout_s: float = 0, grace_s: float = 5,
                  env: Mapping[str, str] | None = None, out=None) -> JobResult:
  """Starts `command` as `num_processes` JAX processes and supervises them (see the module doc).

  Returns a `JobResult`: returncode 0 when every process exited 0, else 1 and the first process
  that failed. Lines of every process go to `out` (default stdout) prefixed `[process i]`.
  """
  if not command:
    raise ValueError("No command given: put it after --, e.g. -- python -m experiments.rl ...")
  out = sys.stdout if out is None else out
  base = dict(os.environ if env is None else env)
  address = f"{LOOPBACK}:{coordinator_port or free_port()}"
  started = time.monotonic()
  procs: list[subprocess.Popen] = []
  threads = []
  say = lambda text: (out.write(f"{PREFIX} {text}\n"), out.flush())
  say(f"{num_processes} processes, coordinator {address}: {' '.join(command)}")
  try:
    for i in range(num_processes):
      proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, start_new_session=True,
                              env=process_env(base, coordinator_address=address,
                                              num_processes=num_processes, process_id=i,
                                              devices_per_process=devices_per_process))
      procs.append(proc)
      say(f"process {i}: pid {proc.pid}")
      thread = threading.Thread(target=_stream, args=(i, proc.stdout, out), daemon=True)
      thread.start()
      threads.append(thread)
    result = None
    while result is None:
      codes = [p.poll() for p in procs]
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      elapsed = time.monotonic() - started
      if failed:
        i = failed[0]
        result = JobResult(1, i, f"process {i} (pid {procs[i].pid}) {describe_exit(codes[i])}")
      elif all(code == 0 for code in codes):
        result = JobResult(0, None, f"all {num_processes} processes exited with status 0")
      elif timeout_s and elapsed > timeout_s:
        waiting = [i for i, code in enumerate(codes) if code is None]
        result = JobResult(1, waiting[0], f"timed out after {timeout_s:.0f} s; processes "
                           f"{waiting} still running")
      else:
        time.sleep(0.1)
    if result.returncode:
      others = [i for i, p in enumerate(procs) if p.poll() is None]
      say(f"FAILED: {result.message}; stopping the other processes {others}")
      _stop(procs, grace_s)
  except BaseException:  # KeyboardInterrupt, SIGTERM via SystemExit: take the children along
    _stop(procs, 0)
    raise
  for thread in threads:
    thread.join(timeout=5)
  result.seconds = time.monotonic() - started
  say(f"{'done' if result.returncode == 0 else 'job failed'}: {result.message} "
      f"({result.seconds:.1f} s)")
  return result


def main(argv: Sequence[str]) -> None:
  command = list(argv[1:])
  if command and command[0] == "--":
    command = command[1:]
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    result = run_processes(command, _NUM_PROCESSES.value,
                           devices_per_process=_DEVICES_PER_PROCESS.value,
                           coordinator_port=_COORDINATOR_PORT.value, timeout_s=_TIMEOUT_S.value,
                           grace_s=_GRACE_S.value)
  except ValueError as e:
    print(f"{PREFIX} error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(result.returncode)


if __name__ == "__main__":
  app.run(main)
