r"""RL fine-tuning with a chosen algorithm, precision pair and engine.

    python -m experiments.rl --config=experiments/configs/sanity.py \
        --config.algorithm=grpo_token_tis --config.precision=fp16

Each step: sample with the engine in the sampler's precision -> rewards -> advantages -> trainer
logp_old -> minibatch updates -> weight sync. Writes one run directory (config.json,
metrics.jsonl, TensorBoard events, orbax checkpoints, plots/).

Before it loads a model or creates a directory, `run` turns the config into its typed form
(`rl_fp16.rl_experiment.RLExperimentConfig`, which documents every key; every problem is listed,
with the value and what is allowed) and checks the run directory: a directory another process holds (`rl_fp16.run_lock`, taken by process 0) is
refused; re-running into a directory that holds a run resumes it from its last checkpoint only if
the config is the same one, but for the keys of `rl_experiment.RESUME_ALLOWED` (steps, checkpoint_every,
output_dir, vllm_log_level, distributed). Any other difference is refused, key by key (stored ->
new); start a new run with another --config.output_dir. config.json is written by the first start
and never rewritten; allowed changes made on a resume are recorded in resumes.jsonl
(`rl_fp16.results.RunWriter`).

Multi-process (experiments/configs/sharded.py with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set, e.g. by `python -m launch.local_processes`): each process samples and scores
its share of a step's prompts with its own engine, the sharded update trains on the global batch,
and only process 0 writes config.json, metrics, TensorBoard events and plots; checkpoints are
saved and restored by every process (`rl_fp16.distributed`, docs/sharding.md).

LoRA RL (`--config.lora.enabled=True`, or experiments/configs/lora.py): the train state and its
checkpoints hold only the adapters (and their optimizer state); the frozen base is reloaded from
the model directory on every start and the engine gets the merged weights.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments import common
from rl_fp16 import (cli, colocation, distributed, evaluation, plots, results, rl_experiment,
                     run_config, run_lock, seeds, sharding)
from rl_fp16.advantages import check_rewards
from rl_fp16.checkpoints.train_state import Checkpointer, CheckpointsUnreadable, TrainState
from rl_fp16.data.rl_problems import (load_or_build_subset, load_task, problem_text,
                                      step_problems)
from rl_fp16.learner import Learner, setup
from rl_fp16.models.lora import num_params
from rl_fp16.models import probes
from rl_fp16.precision import get_precision_pair
from rl_fp16.rl_experiment import RESUME_ALLOWED, RLExperimentConfig
from rl_fp16.sampling.sync_modes import make_synced_engine
from rl_fp16.sampling.wrappers import ProcessShareEngine


def run(config) -> dict:
  """Runs the RL experiment of the ConfigDict `config` (its config.json is `config` as given)."""
  experiment = common.validate_rl_config(config)
  # JAX's share of a GPU shared with vLLM, before anything starts JAX's backend.
  colocation.apply_colocation_env(colocation.colocation_env(experiment.colocate))
  run_dir = rl_experiment.run_dir(experiment)
  # Refuse a run directory holding another experiment before loading anything.
  run_config.check_run_config(run_dir, config, allowed=RESUME_ALLOWED)
  processes, primary = jax.process_count(), distributed.is_primary()
  if processes > 1:
    check_multiprocess_config(experiment, processes)
  # One owner per run directory: process 0 holds it (the RunWriter below takes it once more).
  lock = run_lock.acquire(run_dir) if primary else None
  try:
    return _run(experiment, config.to_dict(), run_dir, processes, primary)
  finally:
    if lock is not None:
      lock.release()


def _run(config: RLExperimentConfig, config_json: dict, run_dir: str, processes: int,
         primary: bool) -> dict:
  """`run` past its checks, in the run directory this process owns (or, not process 0, shares);
  `config_json` is what config.json holds."""
  model = common.load_policy_model(config.model, seed=config.seed)
  task = load_task(model, config.problems)
  subset, rates, subset_path = _problems(config, config_json, model, task, run_dir, processes,
                                         primary)
  held_out = (evaluation.held_out_problems(task, subset, config.eval) if config.eval.every
              else [])
  if len(subset) < 1:
    raise ValueError(f"The perfectible subset is empty ({subset_path}); widen "
                     "--config.perfectible.low/high or use a stronger base model")
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=2)
  learner, writer = None, None
  started = time.time()
  try:
    learner = _setup(config, model, task, run_dir, checkpointer, processes, primary)
    # Metrics are logged at steps 1..steps; a checkpoint after step k keeps lines 1..k.
    writer = (results.RunWriter(run_dir, config_json, resume=True,
                                resume_step=learner.start_step + 1,
                                allowed_changes=RESUME_ALLOWED)
              if primary else distributed.NullRunWriter())
    print(f"run: {config.rl.algorithm} / {config.precision} / engine {config.engine} / seed "
          f"{config.seed}; {len(subset)} problems (mean base pass rate "
          f"{np.nanmean(rates) if np.isfinite(rates).any() else float('nan'):.2f}) from "
          f"{subset_path}")
    _loop(config, learner, model, task, subset, held_out, writer, checkpointer, primary)
  finally:
    if learner is not None and learner.engine is not None:
      learner.engine.close()
    if writer is not None:
      writer.close()
    checkpointer.close()
  return _summary(config, run_dir, primary, started)


def _problems(config: RLExperimentConfig, config_json: dict, model, task, run_dir: str,
              processes: int, primary: bool):
  """The run's perfectible subset, its base pass rates and its file; process 0 builds it (and
  writes config.json on the first start), the others read it after a barrier."""

  def load():
    return load_or_build_subset(config.problems, model, task, run_dir,
                                max_new_tokens=config.rl.max_new_tokens, seed=config.seed)

  if primary:  # only process 0 writes config.json, metrics, TensorBoard events and plots
    changed = run_config.init_run_dir(run_dir, config_json, allowed=RESUME_ALLOWED)
    if changed:
      print(f"{run_dir}: config.json kept as it is; allowed changes on this start (recorded in "
            f"{run_config.RESUMES_FILE} once steps are logged): " + "; ".join(map(str, changed)))
    found = load()
  if processes > 1:  # the others read the subset process 0 wrote (or build the same one)
    distributed.barrier("subset")
  if not primary:
    found = load()
  return found


def _setup(config: RLExperimentConfig, model, task, run_dir: str, checkpointer: Checkpointer,
           processes: int, primary: bool) -> Learner:
  """The run's `Learner`, restored from the newest checkpoint that restores, with its engine."""
  rl_config = config.rl
  mesh = None
  if config.mesh is not None:  # sharded trainer (experiments/configs/sharded.py)
    mesh = sharding.mesh_from_config(config.mesh)
    print(f"sharded trainer on mesh {dict(mesh.shape)}")

  def make_engine(policy_params, start_step: int):
    if processes > 1:  # one engine per process, fed the gathered params; own vLLM files each
      policy_params = distributed.gather_to_host(policy_params)
    engine = make_synced_engine(
        config.weight_sync, config.engine, model.config, policy_params,
        pair.sampler, weights_dir=os.path.join(run_dir, "weights"),
        first_step=start_step, colocation=config.colocate,
        workdir=distributed.engine_workdir(run_dir), tokenizer_dir=model.tokenizer_dir,
        eos_token_ids=model.eos_token_ids, decode_row_group=config.decode_row_group,
        max_model_len=task.max_prompt_len() + rl_config.max_new_tokens,  # validated to fit
        seed=config.seed, vllm_log_level=config.vllm_log_level)
    if processes > 1:
      engine = ProcessShareEngine(engine)
      print(f"process {jax.process_index()} of {processes}: samples prompts "
            f"{distributed.process_share(config.prompts_per_step)} of each step with its own "
            f"{config.engine} engine; {jax.local_device_count()} of {jax.device_count()} devices")
    return engine

  pair = get_precision_pair(config.precision, bitwise=config.bitwise)
  print(f"model: {model.description}")
  built = setup(model.config, model.params, pair=pair, rl_config=rl_config,
                optimizer_config=config.optimizer, seed=config.seed, mesh=mesh,
                restore=lambda state: _restore(state, checkpointer, run_dir, rl_config, primary),
                make_engine=make_engine)
  if rl_config.lora is not None:
    lc = rl_config.lora
    print(f"LoRA: rank {lc.rank}, alpha {lc.alpha}, targets {list(lc.targets)}; "
          f"{num_params(built.state.params):,} trainable params (base frozen)")
  return built


def _restore(state: TrainState, checkpointer: Checkpointer, run_dir: str, rl_config, primary: bool
             ) -> TrainState:
  """The newest checkpoint that restores completely (damaged newer ones are moved aside by
  process 0), or `state` when there is none."""
  if checkpointer.latest_step() is None:
    return state
  try:
    state, _, skipped = checkpointer.restore_newest(state, move_aside=primary)
  except CheckpointsUnreadable:
    raise
  except (ValueError, KeyError) as e:
    # It reads completely and config.json matched (checked above), so the checkpoint was
    # written by other code or from another model directory's contents.
    raise ValueError(
        f"The checkpoint in {checkpointer.directory} does not fit this run's train state "
        f"although {run_dir}/config.json matches this config ({type(e).__name__}: {e}); was "
        "the model directory or the code changed since it was written? Use another "
        "--config.output_dir.") from e
  for skip in skipped:
    print(f"{skip}; it does not restore")
  start_step = int(state.step) // (rl_config.num_minibatches * rl_config.epochs)
  print(f"resuming {run_dir} from the checkpoint after RL step {start_step}")
  return state


def _loop(config: RLExperimentConfig, learner: Learner, model, task, subset, held_out, writer,
          checkpointer: Checkpointer, primary: bool) -> None:
  """RL steps `learner.start_step`..`config.steps`: metrics written at each, checkpoints at
  `checkpoint_every` and the last."""
  pair = learner.pair
  every = config.expert_mismatch_every if model.config.is_moe else 0

  def expert_metrics(rollout, params):
    return probes.rollout_expert_mismatch(model.config, params, rollout,
                                          trainer_policy=pair.trainer,
                                          sampler_policy=pair.sampler)

  n = config.rl.samples_per_prompt
  bar = common.progress(range(learner.start_step, config.steps), desc=f"{config.rl.algorithm}/"
                        f"{config.precision}", initial=learner.start_step, total=config.steps,
                        disable=not primary)
  for step in bar:
    problems = step_problems(subset, step, config.prompts_per_step, config.seed)
    metrics = learner.step(
        task.prompt_ids(problems),
        lambda rollout, problems=problems: check_rewards(
            distributed.rewards_by_share(  # each process scores its share's rows
                lambda share, rows: task.rewards(problems[share], rows), rollout, n), n,
            prompts=[problem_text(p) for p in problems]),
        seed=seeds.rl_step(config.seed, step),
        extra_metrics=expert_metrics if every and step % every == 0 else None)
    metrics["train/updates"] = float(learner.state.step)
    if config.eval.due(step + 1, config.steps):  # the engine serves the updated weights
      metrics.update(evaluation.evaluate(learner.engine, task, held_out, config=config.eval,
                                         max_new_tokens=config.rl.max_new_tokens))
    writer.write(step + 1, metrics)
    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                    mismatch=f"{metrics['mismatch/prob_diff_mean']:.1e}",
                    len=f"{metrics['response/length_mean']:.0f}")
    if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
      checkpointer.save(learner.state, extra={"rl_step": step + 1})


def _summary(config: RLExperimentConfig, run_dir: str, primary: bool, started: float) -> dict:
  """The run's summary (process 0 reads it back from metrics.jsonl and plots the reward)."""
  if not primary:
    print(f"process {jax.process_index()}: done (process 0 writes the run directory)")
    return {"run_dir": run_dir, "process_index": jax.process_index(),
            "minutes": (time.time() - started) / 60}
  frame = results.read_metrics(run_dir)
  summary = {
      "run_dir": run_dir,
      "final_reward": float(frame["reward/mean"].iloc[-1]),
      "best_reward": float(frame["reward/mean"].max()),
      "mean_prob_diff": float(frame["mismatch/prob_diff_mean"].mean()),
      "minutes": (time.time() - started) / 60,
  }
  plots.plot_curves(frame.assign(precision=config.precision, algorithm=config.rl.algorithm),
                    "reward/mean", path=os.path.join(run_dir, "plots", "reward.png"))
  print(f"done: final reward {summary['final_reward']:.3f}, best {summary['best_reward']:.3f}, "
        f"mean |pi-mu| {summary['mean_prob_diff']:.2e} ({summary['minutes']:.1f} min) -> "
        f"{run_dir}")
  return summary


def check_multiprocess_config(config: RLExperimentConfig, processes: int) -> None:
  """What a run over `processes` processes needs beyond a valid `RLExperimentConfig`."""
  problems = []
  if config.mesh is None:
    problems.append("a multi-process run needs the sharded trainer: use "
                    "--config=experiments/configs/sharded.py (config.mesh)")
  if config.prompts_per_step % processes:
    problems.append(f"--config.prompts_per_step={config.prompts_per_step}: must be a multiple of "
                    f"the {processes} processes (each samples an equal share)")
  if config.eval.every and config.eval.num_problems % processes:
    problems.append(f"--config.eval.num_problems={config.eval.num_problems}: must be a multiple "
                    f"of the {processes} processes (each samples an equal share)")
  if config.weight_sync != "memory":
    problems.append(f"--config.weight_sync={config.weight_sync!r}: a multi-process run syncs each "
                    "process's engine in memory; allowed: 'memory'")
  if problems:
    raise common.ConfigError.listing(problems, f"multi-process RL config ({processes} processes)")


def main(config) -> dict:
  """`run`, after `jax.distributed` set-up when the config has a `distributed` block."""
  if "distributed" in config:
    distributed.initialize_distributed(**config.distributed)
  return run(config)


if __name__ == "__main__":
  cli.run_main(main, validate=common.validate_rl_config)
