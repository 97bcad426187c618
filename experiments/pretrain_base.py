r"""Trains the tiny base model: a small Qwen2 that is partly competent at the synthetic task.

Supervised training (`make_train_step(..., loss="sft")`) on freshly generated problems until
held-out pass@1 (sampled at temperature 1 with the JAX engine) reaches `target_pass_rate`, then
writes a Hugging Face directory (safetensors, config.json, tokenizer, task_config.json) that
transformers and vLLM load as is. The training run is the run directory `pretrain/` inside it
(`rl_fp16.results.RunWriter`: this config, one metrics.jsonl row per evaluation with
"train/loss", "sft/token_accuracy", "eval/pass_at_1", "time/minutes"; with `init_from`, the
earlier run's rows come first, so the log covers every stage).

    python -m experiments.pretrain_base --config=experiments/configs/pretrain_base.py
"""

from __future__ import annotations

import os
import time

import jax

from experiments import common
from rl_fp16 import cli, results, seeds
from rl_fp16.checkpoints import load_hf, save_hf
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.data import synthetic
from rl_fp16.data.tokenizer import build_tokenizer
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import default_loss_scale_config, get_policy, init_loss_scale
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import OptimizerConfig, make_optimizer, make_train_step



RUN_DIR = "pretrain"  # the run directory inside the output (Hugging Face) directory


def earlier_log(init_from: str) -> list[dict]:
  """The metrics rows ({"step", ...}) of the run that wrote `init_from`; [] without one."""
  run_dir = os.path.join(init_from, RUN_DIR) if init_from else ""
  if not os.path.exists(os.path.join(run_dir, results.METRICS_FILE)):
    return []
  return results.read_metrics(run_dir).to_dict("records")


def make_task(config) -> SyntheticTask:
  task_config = synthetic.SyntheticTaskConfig(min_terms=config.task_min_terms,
                                              max_terms=config.task_max_terms)
  return SyntheticTask(task_config, build_tokenizer())


def make_model_config(config, tok) -> ModelConfig:
  """A Qwen2 of the config's shape, or a Qwen3-MoE when the config has a `moe_base` block."""
  ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
             pad_token_id=tok.pad_id, max_position_embeddings=config.max_position_embeddings,
             rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=True)
  if config.get("moe_base"):
    moe = dict(config.moe_base.to_dict())
    moe["mlp_only_layers"] = tuple(moe.get("mlp_only_layers", ()))
    return ModelConfig(**moe, **ids)
  return ModelConfig(
      model_type="qwen2", hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
      num_attention_heads=config.num_attention_heads,
      num_key_value_heads=config.num_key_value_heads, qkv_bias=True, **ids)


def pass_rate(task: SyntheticTask, model_config, params, problems, *, seed: int,
              max_new_tokens: int) -> float:
  """Mean reward of one temperature-1 sample per problem (JAX engine, fp32)."""
  engine = JaxEngine(model_config, params, get_policy("fp32", "sampler"),
                     eos_token_ids=[task.tokenizer.eos_id])
  rollout = engine.generate(task.prompt_ids(problems), n=1, seed=seed,
                            sampling=SamplingConfig(max_new_tokens=max_new_tokens))
  return float(task.rewards(problems, rollout).mean())


def train(config) -> dict:
  task = make_task(config)
  tok = task.tokenizer
  model_config = make_model_config(config, tok)
  policy = get_policy(config.precision)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=config.learning_rate,
                                             warmup_steps=config.warmup_steps))
  if config.init_from:  # continue training an earlier run's output
    loaded_config, params = load_hf(config.init_from)
    if loaded_config != model_config:
      raise ValueError(f"--config.init_from={config.init_from} has config {loaded_config}, "
                       f"expected {model_config}")
  else:
    params = init_params(model_config, jax.random.key(config.seed))
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(policy)))
  sft_step = make_train_step(model_config, policy, optimizer, loss="sft")
  seq_len = int(-(-task.max_sequence_len() // 32) * 32)
  eval_problems = task.problems(config.eval_problems, seed=seeds.pretrain_eval(config.seed))
  max_new_tokens = seq_len
  print(f"model: {model_config.num_params() / 1e6:.2f}M params; seq_len {seq_len}; "
        f"target pass@1 {config.target_pass_rate}")
  log = earlier_log(config.init_from)  # read before a rerun in place replaces it
  writer = results.RunWriter(os.path.join(config.output_dir, RUN_DIR), config.to_dict(),
                             resume=True, resume_step=0)  # a rerun replaces the log
  for row in log:
    writer.write(int(row.pop(results.STEP_KEY)), row)
  step_offset = last_step = writer.last_step or 0
  start = time.time()
  rate = 0.0
  bar = common.progress(range(1, config.max_steps + 1), desc="pretrain")
  for step in bar:
    problems = task.problems(config.batch_size, seed=seeds.pretrain_batch(config.seed, step))
    state, metrics = sft_step(state, task.sft_batch(problems, seq_len))
    if step % 20 == 0:
      bar.set_postfix(loss=f"{float(metrics['train/loss']):.3f}",
                      tok_acc=f"{float(metrics['sft/token_accuracy']):.3f}", pass1=f"{rate:.2f}")
    if step % config.eval_every == 0 or step == config.max_steps:
      rate = pass_rate(task, model_config, state.params, eval_problems, seed=step,
                       max_new_tokens=max_new_tokens)
      entry = {"train/loss": float(metrics["train/loss"]),
               "sft/token_accuracy": float(metrics["sft/token_accuracy"]), "eval/pass_at_1": rate,
               "time/minutes": (time.time() - start) / 60}
      writer.write(step_offset + step, entry)
      last_step = step_offset + step
      print(f"\nstep {last_step}: loss {entry['train/loss']:.4f} "
            f"token acc {entry['sft/token_accuracy']:.4f} "
            f"held-out pass@1 {rate:.3f} ({entry['time/minutes']:.1f} min)")
      if rate >= config.target_pass_rate or entry["time/minutes"] > config.max_minutes:
        break
  writer.close()
  # save_hf replaces the whole output directory: the run directory steps aside meanwhile.
  aside = os.path.abspath(config.output_dir) + f".{RUN_DIR}"
  os.rename(writer.run_dir, aside)
  out = save_hf(config.output_dir, model_config, state.params, dtype="float32")
  os.rename(aside, os.path.join(out, RUN_DIR))
  tok.save(out)
  synthetic.save_task_config(out, task.config)
  print(f"wrote {out} (held-out pass@1 {rate:.3f} after {last_step} steps)")
  return {"output_dir": out, "pass_at_1": rate,
          "log": results.read_metrics(os.path.join(out, RUN_DIR)).to_dict("records")}


if __name__ == "__main__":
  cli.run_main(train, validate=common.check_config)
