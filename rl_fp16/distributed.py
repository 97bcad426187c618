r"""Multi-process RL: each process samples and scores its share of a step; the trainer is global.

Every process runs the same program (`python -m experiments.rl ...` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, e.g. by `launch.local_processes`), which first calls
`initialize_distributed`. Per RL step:

1. every process knows the step's prompts (same seed, same subset); process p takes the
   contiguous share `process_share(num_prompts)` and samples it with its own engine
   (`sampling.wrappers.ProcessShareEngine`), passing `first_row` so that each row is sampled as
   in the single-process run (the JAX sampler's per-row noise, vLLM's per-row seeds);
2. the shares are concatenated on every process (`allgather_rollout`, an all-gather of a few
   [B, P + T] arrays), so the minibatch shuffle, advantages and metrics are those of the
   single-process run; each process scores only its own rows (`rewards_by_share`);
3. the step's `TrainBatch` is built from the whole rollout on every process, which places the
   rows of its own devices (`rl_fp16.sharding.shard_global_batch`); the trainer's logp_old pass
   and the update (`make_update` on the mesh) run over the global batch;
4. every process gathers the new params to host memory (`gather_to_host`, an all-gather of the
   sharded params) and pushes them into its engine.

Only process 0 writes the run directory's config, metrics, TensorBoard events and plots
(`is_primary`, `NullRunWriter`); every process takes part in orbax checkpoint saves and restores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from rl_fp16.sampling.rollout import FINISH_EOS, FINISH_LENGTH, Rollout

_FINISH_CODES = (FINISH_EOS, FINISH_LENGTH)


ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """`jax.distributed.initialize` from arguments (e.g. config flags) or the environment.

  Arguments left None are read from JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. Without a coordinator address this is a no-op (single
  process). Must run before any other JAX call touches the devices. Returns True when the
  distributed runtime is (now) initialised.

  Raises:
    ValueError: a coordinator address without num_processes and process_id, or a process_id
      outside [0, num_processes).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if coordinator_address is None:
    return False
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if num_processes is None or process_id is None:
    raise ValueError(f"A coordinator address ({coordinator_address}) needs num_processes and "
                     f"process_id too (arguments or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  if not jax.config.jax_cpu_collectives_implementation:
    # Cross-process collectives of the CPU backend (several processes on one machine, and CPU
    # tests); unset in some older JAX versions. GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", process_id,
               num_processes, jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0: the one that writes config, metrics, TensorBoard events and plots."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def engine_workdir(run_dir: str) -> str:
  """Where this process's engine keeps its files (vLLM's start-up HF directory): `run_dir`, or
  with several processes `run_dir/engine_process{k}` so that no two write the same files."""
  if jax.process_count() == 1:
    return run_dir
  return os.path.join(run_dir, f"engine_process{jax.process_index()}")


def process_share(num_items: int, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """[start, stop) of this process's contiguous, equal share of `num_items` (e.g. prompts).

  Raises:
    ValueError: when `num_items` does not split evenly over the processes.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if num_items % count:
    raise ValueError(f"{num_items} prompts per step do not split evenly over {count} processes; "
                     f"choose --config.prompts_per_step as a multiple of {count}")
  size = num_items // count
  return index * size, (index + 1) * size


def concat_across_processes(local: np.ndarray) -> np.ndarray:
  """Every process's `local` [b, ...] (same shape everywhere) stacked in process order,
  [b * process_count, ...], on every process. One process: `local` itself."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def gather_to_host(tree: Any) -> Any:
  """The whole value of every (possibly sharded) leaf as a NumPy array, on every process.

  Collective: every process must call it. One process: `jax.device_get`.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------------------------- rollouts ----


def slice_rollout(rollout: Rollout, start: int, stop: int) -> Rollout:
  """Rows [start, stop) of `rollout`; prompt indices become relative to the share's first prompt."""
  first_prompt = int(rollout.prompt_index[start]) if stop > start else 0
  return Rollout(prompt_tokens=rollout.prompt_tokens[start:stop],
                 prompt_mask=rollout.prompt_mask[start:stop],
                 response_tokens=rollout.response_tokens[start:stop],
                 response_mask=rollout.response_mask[start:stop],
                 logp_sampler=rollout.logp_sampler[start:stop],
                 finish_reasons=tuple(rollout.finish_reasons[start:stop]),
                 prompt_index=np.asarray(rollout.prompt_index[start:stop]) - first_prompt)


def pad_prompt_width(rollout: Rollout, width: int) -> Rollout:
  """`rollout` with its prompts left-padded to exactly `width` columns (>= the current width)."""
  current = rollout.prompt_tokens.shape[1]
  if width < current:
    raise ValueError(f"Cannot pad prompts of width {current} to a smaller width {width}")
  if width == current:
    return rollout
  pad = ((0, 0), (width - current, 0))
  return dataclasses.replace(rollout, prompt_tokens=np.pad(rollout.prompt_tokens, pad),
                             prompt_mask=np.pad(rollout.prompt_mask, pad))


def allgather_rollout(local: Rollout, first_prompt: int) -> Rollout:
  """Every process's share concatenated in process order: the step's whole `Rollout`.

  Prompts are left-padded to the widest share's width; `prompt_index` becomes global
  (`first_prompt` is this share's first prompt). Collective; shares must have equal row counts.
  """
  width = int(concat_across_processes(np.asarray([local.prompt_tokens.shape[1]])).max())
  local = pad_prompt_width(local, width)
  finish = np.asarray([_FINISH_CODES.index(r) for r in local.finish_reasons], np.int32)
  fields = {
      "prompt_tokens": local.prompt_tokens.astype(np.int32),
      "prompt_mask": local.prompt_mask.astype(np.int32),
      "response_tokens": local.response_tokens.astype(np.int32),
      "response_mask": local.response_mask.astype(np.int32),
      "logp_sampler": local.logp_sampler.astype(np.float32),
      "prompt_index": (np.asarray(local.prompt_index) + first_prompt).astype(np.int32),
      "finish": finish,
  }
  whole = {name: concat_across_processes(value) for name, value in fields.items()}
  finish = whole.pop("finish")
  return Rollout(finish_reasons=tuple(_FINISH_CODES[int(c)] for c in finish), **whole)


def rewards_by_share(rewards_of: Callable[[slice, Rollout], np.ndarray], rollout: Rollout,
                     samples_per_prompt: int) -> np.ndarray:
  """float32 [B]: each process scores the rows of its share of the prompts; all get every row's.

  `rewards_of(prompts, share)` scores `share` (rows of the prompts `prompts`, a slice of the
  step's prompt list; `share.prompt_index` counts from the slice's start). One process: the
  whole rollout in one call.
  """
  num_prompts = rollout.batch_size // samples_per_prompt
  start, stop = process_share(num_prompts)
  share = slice_rollout(rollout, start * samples_per_prompt, stop * samples_per_prompt)
  local = np.asarray(rewards_of(slice(start, stop), share), np.float32)
  if local.shape != (share.batch_size,):
    raise ValueError(f"The reward function returned shape {local.shape} for "
                     f"{share.batch_size} rows; expected ({share.batch_size},)")
  return concat_across_processes(local)


# ---------------------------------------------------------------------------------- files ----


class NullRunWriter:
  """Stands in for `rl_fp16.results.RunWriter` on processes other than 0: writes nothing."""

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    del step, metrics

  def close(self) -> None:
    pass
