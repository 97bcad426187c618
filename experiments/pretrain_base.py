r"""Trains the tiny base model: a small Qwen2 that is partly competent at the synthetic task.

Supervised training (`make_train_step(..., loss="sft")`) on freshly generated problems until
held-out pass@1 (sampled at temperature 1 with the JAX engine) reaches `target_pass_rate`, then
writes a Hugging Face directory (safetensors, config.json, tokenizer, task_config.json,
pretrain_log.json) that transformers and vLLM load as is.

    python -m experiments.pretrain_base --config=experiments/configs/pretrain_base.py
"""

from __future__ import annotations

import os
import time

import jax

from experiments import common
from rl_fp16 import fileio
from rl_fp16.checkpoints import load_hf, save_hf
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.data import synthetic, tokenizer as tokenizer_lib
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import default_loss_scale_config, get_policy, init_loss_scale
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import OptimizerConfig, make_optimizer, make_train_step



def make_task(config) -> SyntheticTask:
  task_config = synthetic.SyntheticTaskConfig(min_terms=config.task_min_terms,
                                              max_terms=config.task_max_terms)
  return SyntheticTask(task_config, tokenizer_lib.build_tokenizer())


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
                            loss_scale=init_loss_scale(default_loss_scale_config(policy)),
                            seed=config.seed)
  sft_step = make_train_step(model_config, policy, optimizer, loss="sft")
  seq_len = int(-(-task.max_sequence_len() // 32) * 32)
  eval_problems = task.problems(config.eval_problems, seed=config.seed + 999_999)
  max_new_tokens = seq_len
  print(f"model: {model_config.num_params() / 1e6:.2f}M params; seq_len {seq_len}; "
        f"target pass@1 {config.target_pass_rate}")
  log = []
  if config.init_from:
    previous = os.path.join(config.init_from, "pretrain_log.json")
    if os.path.exists(previous):
      log = list(fileio.read_json(previous)["log"])
  step_offset = log[-1]["step"] if log else 0
  start = time.time()
  rate = 0.0
  bar = common.progress(range(1, config.max_steps + 1), desc="pretrain")
  for step in bar:
    problems = task.problems(config.batch_size, seed=config.seed * 1_000_003 + step)
    state, metrics = sft_step(state, task.sft_batch(problems, seq_len))
    if step % 20 == 0:
      bar.set_postfix(loss=f"{float(metrics['train/loss']):.3f}",
                      tok_acc=f"{float(metrics['sft/token_accuracy']):.3f}", pass1=f"{rate:.2f}")
    if step % config.eval_every == 0 or step == config.max_steps:
      rate = pass_rate(task, model_config, state.params, eval_problems, seed=step,
                       max_new_tokens=max_new_tokens)
      entry = {"step": step_offset + step, "loss": float(metrics["train/loss"]),
               "token_accuracy": float(metrics["sft/token_accuracy"]), "pass_at_1": rate,
               "minutes": (time.time() - start) / 60, "init_from": config.init_from or None}
      log.append(entry)
      print(f"\nstep {step_offset + step}: loss {entry['loss']:.4f} "
            f"token acc {entry['token_accuracy']:.4f} "
            f"held-out pass@1 {rate:.3f} ({entry['minutes']:.1f} min)")
      if rate >= config.target_pass_rate or entry["minutes"] > config.max_minutes:
        break
  out = save_hf(config.output_dir, model_config, state.params, dtype="float32")
  tok.save(out)
  synthetic.save_task_config(out, task.config)
  fileio.write_json_atomic(os.path.join(out, "pretrain_log.json"),
                           {"config": config.to_dict(), "log": log,
                            "made_by": "python -m experiments.pretrain_base "
                                       "--config=experiments/configs/pretrain_base.py"})
  print(f"wrote {out} (held-out pass@1 {rate:.3f} after {log[-1]['step']} steps)")
  return {"output_dir": out, "pass_at_1": rate, "log": log}


if __name__ == "__main__":
  common.run_main(train)
