"""Multi-process RL on this machine: `launch.local_processes` + `rl_fp16.distributed`.

The slow tests start real JAX processes (2 processes x 2 CPU devices, gloo collectives on
127.0.0.1) running `experiments.rl` through `tests/mp_rl_main.py` (the experiment with a reward
that varies within groups, so that a random tiny model gets non-zero gradients), and compare them
with one process of 4 devices. The rest are fast, in the pytest process (one process, one device).
"""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from deps import bitwise_equality
from launch import local_processes
from rl_fp16 import distributed
from rl_fp16.checkpoints.train_state import read_state_numpy
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import get_policy
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.sampling.jax_sampler import SamplingConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Low XLA CPU optimisation roughly halves compile time; both sides of a comparison use it.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ----------------------------------------------------------------------------------- fast ----


def test_process_share():
  assert distributed.process_share(8, 0, 2) == (0, 4)
  assert distributed.process_share(8, 1, 2) == (4, 8)
  assert distributed.process_share(3) == (0, 3)  # this (single) process: everything
  with pytest.raises(ValueError, match="7 prompts per step do not split evenly over 2"):
    distributed.process_share(7, 0, 2)


def test_process_env():
  env = local_processes.process_env(
      {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8", "KEEP": "1"},
      coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1, devices_per_process=2)
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["KEEP"]) == ("2", "1", "1")
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
  assert "XLA_FLAGS" not in local_processes.process_env(
      {}, coordinator_address="h:1", num_processes=1, process_id=0)
  with pytest.raises(ValueError, match="process_id must be in"):
    local_processes.process_env({}, coordinator_address="h:1", num_processes=2, process_id=2)
  assert local_processes.describe_exit(-9) == "was killed by SIGKILL"
  assert local_processes.describe_exit(3) == "exited with status 3"


def test_initialize_distributed_is_noop_without_env(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize_distributed() is False
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "localhost:1234")
  with pytest.raises(ValueError, match="num_processes"):
    distributed.initialize_distributed()
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize_distributed(num_processes=2, process_id=2)


def _child_command(code: str) -> list[str]:
  return [sys.executable, "-c", code]


def test_launcher_stops_the_others_when_one_fails():
  # Process 1 fails after 0.5 s; process 0 would sleep for a minute (and ignores SIGTERM, as
  # JAX processes do): the launcher must SIGKILL it after the grace period and name process 1.
  code = ("import os, signal, sys, time\n"
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "print('hello from', os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'])\n"
          "if os.environ['JAX_PROCESS_ID'] == '1':\n"
          "  time.sleep(0.5); sys.exit(3)\n"
          "time.sleep(60)\n")
  out = io.StringIO()
  start = time.monotonic()
  result = local_processes.run_processes(_child_command(code), 2, grace_s=1, out=out)
  assert time.monotonic() - start < 20
  assert result.returncode == 1 and result.failed_process == 1
  text = out.getvalue()
  assert "[process 0] hello from 0 2" in text and "[process 1] hello from 1 2" in text
  assert "FAILED: process 1 (pid" in text and "exited with status 3" in text


def test_launcher_succeeds_and_times_out():
  out = io.StringIO()
  ok = local_processes.run_processes(_child_command("print('ok')"), 3, out=out)
  assert ok.returncode == 0 and ok.failed_process is None
  assert out.getvalue().count("ok\n") == 3
  slow = local_processes.run_processes(_child_command("import time; time.sleep(60)"), 2,
                                       timeout_s=1, grace_s=1, out=io.StringIO())
  assert slow.returncode == 1 and "timed out" in slow.message


def test_rollout_helpers_on_one_process():
  tiny = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=128, initializer_range=0.5)
  engine = JaxEngine(tiny, init_params(tiny, jax.random.key(0)), get_policy("fp32", "sampler"),
                     eos_token_ids=[1])
  prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
  sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
  whole = engine.generate(prompts, n=3, sampling=sampling, seed=7)
  # Each half sampled alone, told where its rows sit in the whole batch, gets the same tokens.
  first = engine.generate(prompts[:2], n=3, sampling=sampling, seed=7)
  second = engine.generate(prompts[2:], n=3, sampling=sampling, seed=7, first_row=6)
  np.testing.assert_array_equal(first.response_tokens, whole.response_tokens[:6])
  np.testing.assert_array_equal(second.response_tokens, whole.response_tokens[6:])
  np.testing.assert_allclose(second.logp_sampler, whole.logp_sampler[6:], atol=1e-5)
  unshifted = engine.generate(prompts[2:], n=3, sampling=sampling, seed=7)
  assert not np.array_equal(unshifted.response_tokens, whole.response_tokens[6:])
  # Slicing / padding / gathering (one process: the gather is the identity).
  share = distributed.slice_rollout(whole, 6, 12)
  assert share.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
  wide = distributed.pad_prompt_width(share, share.prompt_tokens.shape[1] + 4)
  np.testing.assert_array_equal(wide.prompt_tokens[:, 4:], share.prompt_tokens)
  assert wide.prompt_mask[:, :4].sum() == 0
  gathered = distributed.allgather_rollout(share, first_prompt=2)
  assert gathered.prompt_index.tolist() == [2, 2, 2, 3, 3, 3]
  assert gathered.finish_reasons == share.finish_reasons
  calls = []
  rewards = distributed.rewards_by_share(
      lambda prompts, rows: calls.append(prompts) or rows.response_lengths.astype(np.float32),
      whole, 3)
  assert calls == [slice(0, 4)] and rewards.tolist() == whole.response_lengths.tolist()


# ----------------------------------------------------------------------------------- slow ----


def _rl_args(model_dir, out_dir, steps):
  return ["tests/mp_rl_main.py", "--config=experiments/configs/sharded.py",
          f"--config.model={model_dir}", "--config.engine=jax", "--config.precision=fp32",
          f"--config.steps={steps}", "--config.prompts_per_step=2",
          "--config.samples_per_prompt=4", "--config.max_new_tokens=24",
          "--config.checkpoint_every=1", "--config.learning_rate=1e-3",
          f"--config.output_dir={out_dir}"]


def _launch_command(model_dir, out_dir, steps):
  return [sys.executable, "-m", "launch.local_processes", "--num_processes=2",
          "--devices_per_process=2", "--timeout_s=400", "--", sys.executable,
          *_rl_args(model_dir, out_dir, steps)]


def _env(xla_flags=FAST_XLA):
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
              PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _max_param_diff(a, b):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def one_and_two_process_runs(tiny_task_model_dir, tmp_path_factory):
  """Two RL steps in one process of 4 CPU devices, and in 2 processes x 2 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  single, multi = root / "single", root / "multi"
  start = time.perf_counter()
  one = subprocess.run([sys.executable, *_rl_args(tiny_task_model_dir, single, 2)], cwd=REPO,
                       env=_env(f"--xla_force_host_platform_device_count=4 {FAST_XLA}"),
                       capture_output=True, text=True, timeout=400, check=False)
  single_s = time.perf_counter() - start
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  start = time.perf_counter()
  two = subprocess.run(_launch_command(tiny_task_model_dir, multi, 2), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=450, check=False)
  multi_s = time.perf_counter() - start
  assert two.returncode == 0, two.stdout[-6000:] + two.stderr[-3000:]
  print(f"one process x 4 devices: {single_s:.1f} s; 2 processes x 2 devices: {multi_s:.1f} s")
  return single, multi, two.stdout


@pytest.mark.slow
def test_two_processes_train_like_one(one_and_two_process_runs, tiny_task_model_dir):
  single, multi, _ = one_and_two_process_runs
  (one, one_step), (two, two_step) = (read_state_numpy(single / "checkpoints"),
                                      read_state_numpy(multi / "checkpoints"))
  assert one_step == two_step == 4  # 2 RL steps x 2 minibatch updates
  from rl_fp16.checkpoints import load_hf  # pylint: disable=g-import-not-at-top
  start = jax.tree_util.tree_map(np.asarray, load_hf(tiny_task_model_dir)[1])
  assert _max_param_diff(one["params"], start) > 1e-3  # it really trained
  assert _max_param_diff(one["params"], two["params"]) <= 1e-5
  # The same tokens were sampled and scored (each process sampled its own half of the prompts).
  for a, b in zip(_metrics(single), _metrics(multi), strict=True):
    for key in ("reward/mean", "response/length_mean", "is/frac_truncated"):
      assert a[key] == b[key], key
    for key in ("train/loss", "train/grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_only_process_zero_writes_the_run_directory(one_and_two_process_runs):
  _, multi, output = one_and_two_process_runs
  assert [row["step"] for row in _metrics(multi)] == [1, 2]  # one writer, no duplicate lines
  assert len(os.listdir(multi / "tb")) == 1  # one TensorBoard events file: process 0's
  assert (multi / "config.json").exists() and (multi / "plots" / "reward.png").exists()
  assert not list(multi.glob("engine_process*"))  # the JAX engine writes no files
  assert "[process 1] process 1: done (process 0 writes the run directory)" in output
  assert "[process 0] done: final reward" in output
  assert "[process 1] done: final reward" not in output
  assert "samples prompts (1, 2) of each step" in output  # process 1's share of 2 prompts


@pytest.mark.slow
def test_killed_process_fails_the_job_and_rerun_resumes(tiny_task_model_dir, tmp_path):
  run_dir = tmp_path / "killed"
  steps = 4
  proc = subprocess.Popen(_launch_command(tiny_task_model_dir, run_dir, steps), cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  deadline = time.time() + 300
  committed = []
  while time.time() < deadline and not committed and proc.poll() is None:
    committed = list((run_dir / "checkpoints").glob("*/commit_success.txt"))
    time.sleep(0.1)
  assert committed, "".join(lines)[-4000:]
  pid = next(int(line.split()[-1]) for line in lines if "[launcher] process 1: pid" in line)
  os.kill(pid, signal.SIGKILL)
  killed_at = time.time()
  proc.wait(timeout=120)
  reader.join(timeout=10)
  output = "".join(lines)
  assert proc.returncode == 1, output[-4000:]
  assert time.time() - killed_at < 60  # the survivor was stopped, not left waiting
  assert f"FAILED: process 1 (pid {pid}) was killed by SIGKILL" in output
  done_steps = len(_metrics(run_dir))
  assert done_steps < steps  # it died mid-run
  last = read_state_numpy(run_dir / "checkpoints")[1] // 2  # updates -> RL steps
  # The same command again: every process restores the last complete checkpoint and finishes.
  rerun = subprocess.run(_launch_command(tiny_task_model_dir, run_dir, steps), cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=450, check=False)
  assert rerun.returncode == 0, rerun.stdout[-6000:]
  for process in (0, 1):
    assert (f"[process {process}] resuming {run_dir} from the checkpoint after RL step {last}"
            in rerun.stdout), rerun.stdout[-6000:]
  assert [row["step"] for row in _metrics(run_dir)] == list(range(1, steps + 1))
  assert read_state_numpy(run_dir / "checkpoints")[1] == 2 * steps


@pytest.mark.slow
@bitwise_equality
def test_two_processes_in_bitwise_mode_log_zero_mismatch(tiny_task_model_dir, tmp_path):
  """Each process samples its share with the JAX engine; the trainer's forward over the global
  batch (data parallel across the processes) gives the sampler's log-probs bit for bit."""
  run_dir = tmp_path / "bitwise"
  command = _launch_command(tiny_task_model_dir, run_dir, 2) + [
      "--config.bitwise=True", "--config.precision=bf16"]
  done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=450, check=False)
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
  rows = _metrics(run_dir)
  assert [row["step"] for row in rows] == [1, 2]
  for row in rows:
    assert row["mismatch/prob_diff_max"] == 0.0 and row["mismatch/logp_diff_max"] == 0.0, row
  params, _ = read_state_numpy(run_dir / "checkpoints")
  from rl_fp16.checkpoints import load_hf  # pylint: disable=g-import-not-at-top
  start = jax.tree_util.tree_map(np.asarray, load_hf(tiny_task_model_dir)[1])
  assert _max_param_diff(params["params"], start) > 1e-3  # it trained between the two steps
