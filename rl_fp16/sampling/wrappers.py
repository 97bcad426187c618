"""Engine wrappers that any engine can be put in (`rl_fp16.sampling.engines.EngineWrapper`):
sleep between rollouts (vLLM on a shared GPU) and one engine per process (multi-process runs).
`sync_modes.make_synced_engine` composes the sync wrappers for a run.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from rl_fp16 import distributed
from rl_fp16.sampling.engines import EngineWrapper
from rl_fp16.sampling.rollout import Rollout


class SleepBetweenRollouts(EngineWrapper):
  """Wraps an engine with `sleep(level)` / `wake_up(tags)` (the vLLM engine): sleeps after every
  `generate`, wakes before every `sync_weights`.

  Call order in an RL iteration: generate -> sleep -> (trainer: logp, update) -> wake_up -> sync.
  Level 2 drops the weights, so it wakes the weights, syncs, then wakes the KV cache. The wake-up
  is counted in the sync's seconds (`last_wake_s` holds it alone).
  """

  def __init__(self, engine, level: int):
    if level not in (1, 2):
      raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
    for method in ("sleep", "wake_up"):
      if not callable(getattr(engine, method, None)):
        raise ValueError(f"engine {getattr(engine, 'name', engine)!r} has no {method}(); sleep "
                         "mode needs the vLLM engine")
    super().__init__(engine)
    self.level = level
    self.asleep = False
    self.last_wake_s = 0.0

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, sampling,
               seed: int, first_row: int = 0):
    if self.asleep:  # two rollouts without a sync in between
      self._wake(None)
    rollout = self.engine.generate(prompt_token_ids, n=n, sampling=sampling, seed=seed,
                                   first_row=first_row)
    self.engine.sleep(self.level)
    self.asleep = True
    return rollout

  def _wake(self, tags: list[str] | None) -> None:
    start = time.perf_counter()
    self.engine.wake_up(tags)
    self.last_wake_s += time.perf_counter() - start
    if tags is None or "kv_cache" in tags:
      self.asleep = False

  def sync_weights(self, params: Any) -> float:
    start = time.perf_counter()
    self.last_wake_s = 0.0
    if self.asleep and self.level == 2:
      self._wake(["weights"])
      self.engine.sync_weights(params)
      self._wake(["kv_cache"])
    else:
      if self.asleep:
        self._wake(None)
      self.engine.sync_weights(params)
    self.last_sync_s = time.perf_counter() - start
    return self.last_sync_s


class ProcessShareEngine(EngineWrapper):
  """An engine per process behind the one-engine interface (an `EngineWrapper`).

  `generate` takes the step's whole prompt list, samples this process's share with the local
  engine and returns the whole rollout (every process gets the same one); `sync_weights` takes
  the trainer's (sharded) params, gathers them and pushes them into the local engine. Both are
  collective: every process calls them in the same order.
  """

  def generate(self, prompt_token_ids, *, n: int, sampling, seed: int,
               first_row: int = 0) -> Rollout:
    start, stop = distributed.process_share(len(prompt_token_ids))
    local = self.engine.generate(list(prompt_token_ids[start:stop]), n=n, sampling=sampling,
                                 seed=seed, first_row=first_row + start * n)
    return distributed.allgather_rollout(local, first_prompt=start)

  def sync_weights(self, params: Any) -> float:
    """Gathers `params` and syncs the local engine; returns seconds (gather included)."""
    started = time.perf_counter()
    self.engine.sync_weights(distributed.gather_to_host(params))
    return time.perf_counter() - started
