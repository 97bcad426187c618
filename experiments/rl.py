r"""RL fine-tuning with a chosen algorithm, precision pair and engine.

    python -m experiments.rl --config=experiments/configs/sanity.py \
        --config.algorithm=grpo_token_tis --config.precision=fp16

Each step: sample with the engine in the sampler's precision -> rewards -> advantages -> trainer
logp_old -> minibatch updates -> weight sync. Writes one run directory (config.json,
metrics.jsonl, TensorBoard events, orbax checkpoints, plots/). Re-running the same command
resumes from the last checkpoint.

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
from rl_fp16 import objectives, results, sharding
from rl_fp16.checkpoints.train_state import Checkpointer, TrainState
from rl_fp16.data import perfectible
from rl_fp16.data import math_data
from rl_fp16.data.tasks import MathTask, SyntheticTask, problem_from_record
from rl_fp16.models import lora as lora_lib
from rl_fp16.models import moe
from rl_fp16.precision import (cast_floating, default_loss_scale_config, get_policy,
                               get_precision_pair, init_loss_scale)
from rl_fp16.sampling.engines import JaxEngine, make_engine
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer, rl_iteration

PERFECTIBLE_FILE = "perfectible.jsonl"


def run_dir_for(config) -> str:
  return os.path.abspath(config.output_dir.format(**{k: config[k] for k in (
      "algorithm", "precision", "seed", "engine", "advantage")}))


def load_task(model, config=None):
  """The task to train on: the synthetic task of the model directory (default), or MATH problems
  from `config.data_path` when `config.task == "math"`."""
  if config is not None and config.get("task", "synthetic") == "math":
    import transformers  # pylint: disable=g-import-not-at-top
    if model.tokenizer_dir is None:
      raise ValueError(f"The MATH task needs a model directory with a tokenizer; got "
                       f"{model.description}")
    return MathTask(transformers.AutoTokenizer.from_pretrained(model.tokenizer_dir),
                    template=config.template, max_prompt_tokens=config.max_prompt_tokens)
  if config is not None and config.get("task", "synthetic") != "synthetic":
    raise ValueError(f"Unknown --config.task={config.task!r}; allowed: synthetic, math")
  if model.tokenizer_dir is None:
    raise ValueError(f"RL needs a model with a tokenizer and task_config.json; got "
                     f"{model.description}. Train one with experiments.pretrain_base.")
  from rl_fp16.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  return SyntheticTask(synthetic.load_task_config(model.tokenizer_dir),
                       tokenizer.load_tokenizer(model.tokenizer_dir))


def build_subset(model, task: SyntheticTask, *, pool: int, k: int, low: float, high: float,
                 max_new_tokens: int, seed: int):
  """The perfectible subset of `pool` fresh problems: pass rate over k samples in [low, high].

  Sampled with the fp32 JAX engine at temperature 1, so the subset does not depend on the
  precision under study.
  """
  engine = JaxEngine(model.config, model.params, get_policy("fp32", "sampler"),
                     eos_token_ids=model.eos_token_ids, batch_bucket=64)
  return task.pass_rates_subset(engine, task.problems(pool, seed=seed + 77), k=k, low=low,
                                high=high, max_new_tokens=max_new_tokens, seed=seed)


def load_or_build_subset(config, model, task, run_dir: str):
  """The problems to train on.

  MATH: the problems of `config.data_path` (JSONL / parquet / tfds directory; e.g. a perfectible
  subset written by `rl_fp16.data.perfectible.write_subset`). Synthetic: the perfectible subset
  shipped with the model, cached in the run dir, or built now.
  """
  if isinstance(task, MathTask):
    problems = math_data.load_math_problems(config.data_path)
    rates = [float(p.metadata.get("pass_rate", float("nan"))) for p in problems]
    return problems, rates, config.data_path
  for path in (os.path.join(model.tokenizer_dir, PERFECTIBLE_FILE),
               os.path.join(run_dir, PERFECTIBLE_FILE)):
    if os.path.exists(path):
      records, rates = perfectible.read_subset(path)
      return [problem_from_record(r) for r in records], rates, path
  pc = config.perfectible
  print(f"building the perfectible subset: {pc.pool} problems x {pc.k} samples (fp32 JAX engine)")
  subset, rates = build_subset(model, task, pool=pc.pool, k=pc.k, low=pc.low, high=pc.high,
                               max_new_tokens=config.max_new_tokens, seed=config.seed)
  path = os.path.join(run_dir, PERFECTIBLE_FILE)
  perfectible.write_subset(path, subset, rates)
  return subset, rates, path


def make_lora_config(config) -> lora_lib.LoraConfig | None:
  """`config.lora` as a `LoraConfig`, or None when absent or not enabled."""
  lora = config.get("lora")
  if lora is None or not lora.enabled:
    return None
  return lora_lib.LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))


def make_rl_config(config) -> RLConfig:
  loss = objectives.LossConfig(max_response_len=config.max_new_tokens, **config.loss.to_dict())
  return RLConfig(algorithm=config.algorithm, advantage=config.advantage, loss=loss,
                  samples_per_prompt=config.samples_per_prompt,
                  num_minibatches=config.num_minibatches, epochs=config.epochs,
                  temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                  lora=make_lora_config(config))


def step_problems(subset, step: int, prompts_per_step: int, seed: int):
  """The problems of a step: epochs over the subset, each in a seeded random order."""
  per_epoch = max(len(subset) // prompts_per_step, 1)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng(seed * 7919 + epoch).permutation(len(subset))
  chosen = order[index * prompts_per_step:(index + 1) * prompts_per_step]
  if len(chosen) < prompts_per_step:  # tiny subsets: wrap around
    chosen = np.resize(order, prompts_per_step)
  return [subset[i] for i in chosen]


def run(config) -> dict:
  rl_config = make_rl_config(config)
  pair = get_precision_pair(config.precision)
  run_dir = run_dir_for(config)
  os.makedirs(run_dir, exist_ok=True)
  model = common.load_policy_model(config.model, seed=config.seed)
  task = load_task(model, config)
  subset, rates, subset_path = load_or_build_subset(config, model, task, run_dir)
  if len(subset) < 1:
    raise ValueError(f"The perfectible subset is empty ({subset_path}); widen "
                     "--config.perfectible.low/high or use a stronger base model")

  optimizer = make_optimizer(OptimizerConfig(learning_rate=config.learning_rate,
                                             grad_clip=config.grad_clip))
  base_params, trainable = None, model.params
  if rl_config.lora is not None:
    # The frozen base, held like full fine-tuning's master weights (the trainer's param dtype);
    # the train state (and so every checkpoint) holds only the adapters.
    base_params = cast_floating(model.params, pair.trainer.param_dtype)
    trainable = lora_lib.init_lora(rl_config.lora, base_params,
                                   jax.random.key(config.seed + 1_000_033))
  state = TrainState.create(trainable, optimizer, seed=config.seed,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=2)
  updates_per_step = rl_config.num_minibatches * rl_config.epochs
  start_step = 0
  train_step = None
  if "mesh" in config:  # sharded trainer (experiments/configs/sharded.py)
    if rl_config.lora is not None:
      raise ValueError("Sharded LoRA RL is not supported yet; drop --config.mesh or LoRA")
    mesh = sharding.mesh_from_config(config.mesh)
    state = sharding.shard_state(state, mesh)  # restore() below keeps these shardings
    sharded_step = sharding.make_sharded_rl_train_step(
        model.config, pair.trainer, optimizer, mesh, algorithm=rl_config.algorithm,
        loss_config=rl_config.loss, temperature=rl_config.temperature, state=state)
    train_step = lambda s, b: sharded_step(s, sharding.shard_batch(b, mesh))
    print(f"sharded trainer on mesh {dict(mesh.shape)}")
  if checkpointer.latest_step() is not None:
    try:
      state, _ = checkpointer.restore(state)
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"The checkpoint in {checkpointer.directory} does not fit this run's train state "
          f"(LoRA {'on' if rl_config.lora else 'off'}: {rl_config.lora}); was it written with "
          "another --config.lora? Use another --config.output_dir.") from e
    start_step = int(state.step) // updates_per_step
    print(f"resuming {run_dir} from the checkpoint after RL step {start_step}")
  # Metrics are logged at steps 1..steps; a checkpoint after step k keeps lines 1..k.
  writer = results.RunWriter(run_dir, config.to_dict(), resume=True, resume_step=start_step + 1)

  print(f"model: {model.description}")
  if rl_config.lora is not None:
    lc = rl_config.lora
    print(f"LoRA: rank {lc.rank}, alpha {lc.alpha}, targets {list(lc.targets)}; "
          f"{lora_lib.num_params(state.params):,} trainable params (base frozen)")
  print(f"run: {config.algorithm} / {config.precision} / engine {config.engine} / seed "
        f"{config.seed}; {len(subset)} problems (mean base pass rate "
        f"{np.nanmean(rates) if np.isfinite(rates).any() else float('nan'):.2f}) from "
        f"{subset_path}")
  policy_params = (state.params if base_params is None
                   else lora_lib.merge_lora(base_params, state.params, rl_config.lora))
  engine = make_engine(config.engine, model.config, policy_params, pair.sampler,
                       workdir=run_dir, tokenizer_dir=model.tokenizer_dir,
                       eos_token_ids=model.eos_token_ids,
                       max_model_len=task.max_sequence_len() + config.max_new_tokens,
                       seed=config.seed)
  every = config.get("expert_mismatch", {}).get("every", 1) if model.config.is_moe else 0

  def expert_metrics(rollout, params):
    return moe.rollout_expert_mismatch(model.config, params, rollout,
                                       trainer_policy=pair.trainer, sampler_policy=pair.sampler)

  history = []
  started = time.time()
  try:
    bar = common.progress(range(start_step, config.steps), desc=f"{config.algorithm}/"
                          f"{config.precision}", initial=start_step, total=config.steps)
    for step in bar:
      problems = step_problems(subset, step, config.prompts_per_step, config.seed)
      extra_metrics = expert_metrics if every and step % every == 0 else None
      state, metrics = rl_iteration(
          state, model_config=model.config, trainer_policy=pair.trainer, optimizer=optimizer,
          engine=engine, prompts=task.prompt_ids(problems),
          reward_fn=lambda rollout, problems=problems: task.rewards(problems, rollout),
          rl_config=rl_config, seed=config.seed * 1_000_003 + step, train_step=train_step,
          base_params=base_params, extra_metrics=extra_metrics)
      metrics["train/updates"] = float(state.step)
      writer.write(step + 1, metrics)
      history.append(metrics)
      bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                      mismatch=f"{metrics['mismatch/prob_diff_mean']:.1e}",
                      len=f"{metrics['response/length_mean']:.0f}")
      if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
        checkpointer.save(state, extra={"rl_step": step + 1})
  finally:
    engine.close()
    writer.close()
    checkpointer.close()
  frame = results.read_metrics(run_dir)
  summary = {
      "run_dir": run_dir,
      "final_reward": float(frame["reward/mean"].iloc[-1]),
      "best_reward": float(frame["reward/mean"].max()),
      "mean_prob_diff": float(frame["mismatch/prob_diff_mean"].mean()),
      "minutes": (time.time() - started) / 60,
  }
  results.plot_curves(frame.assign(precision=config.precision, algorithm=config.algorithm),
                      "reward/mean", path=os.path.join(run_dir, "plots", "reward.png"))
  print(f"done: final reward {summary['final_reward']:.3f}, best {summary['best_reward']:.3f}, "
        f"mean |pi-mu| {summary['mean_prob_diff']:.2e} ({summary['minutes']:.1f} min) -> "
        f"{run_dir}")
  return summary


def main(config) -> dict:
  """`run`, after `jax.distributed` set-up when the config has a `distributed` block."""
  if "distributed" in config:
    sharding.initialize_distributed(**config.distributed)
  return run(config)


if __name__ == "__main__":
  common.run_main(main)
