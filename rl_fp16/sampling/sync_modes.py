"""The RL loop's engine, by weight-sync mode and colocation settings.

    "memory"     the engine runs in the trainer's process and takes `to_hf_state_dict` tensors in
                 memory at each sync (`rl_fp16.sampling.engines.make_engine`).
    "directory"  the engine runs in a separate worker process and reloads versioned HF
                 directories the trainer writes under `weights_dir`
                 (`rl_fp16.sampling.directory_sync.DirectorySyncEngine`).

Colocation (`rl_fp16.colocation.ColocationConfig`) adds vLLM's memory share and, in memory mode,
sleep mode between rollouts (`rl_fp16.sampling.wrappers.SleepBetweenRollouts`). A multi-process run
puts the result in `wrappers.ProcessShareEngine`; every layer is an `Engine`.
"""

from __future__ import annotations

import os
from typing import Any

from rl_fp16.colocation import ColocationConfig, sampler_engine_options
from rl_fp16.models import ModelConfig
from rl_fp16.precision import DtypePolicy
from rl_fp16.sampling.directory_sync import (WEIGHT_SYNC_MODES, DirectorySyncEngine,
                                             check_weight_sync)
from rl_fp16.sampling.engines import Engine, make_engine
from rl_fp16.sampling.wrappers import SleepBetweenRollouts

__all__ = ["WEIGHT_SYNC_MODES", "make_synced_engine"]


def make_synced_engine(weight_sync: str, name: str, model_config: ModelConfig, params: Any,
                       policy: DtypePolicy, *, weights_dir: str | os.PathLike | None = None,
                       first_step: int = 0,
                       colocation: ColocationConfig = ColocationConfig(), **kwargs) -> Engine:
  """An engine for `rl_iteration`.

  Args:
    weight_sync: "memory" or "directory".
    name: "jax" or "vllm".
    weights_dir: the versions' root (directory mode; e.g. `<run_dir>/weights`).
    first_step: the RL step the initial params belong to (directory mode: the version written
      first; a resumed run passes the step it resumes from).
    colocation: vLLM's memory share and sleep level (sleep needs vLLM in memory mode).
    kwargs: `make_engine`'s keywords (`workdir`, `tokenizer_dir`, `eos_token_ids`, vLLM options).
  """
  check_weight_sync(weight_sync)
  if colocation.sleep_level and (name != "vllm" or weight_sync != "memory"):
    raise ValueError(f"sleep_level={colocation.sleep_level} needs engine 'vllm' with weight_sync "
                     f"'memory' (the sampler in this process); got engine {name!r}, weight_sync "
                     f"{weight_sync!r}")
  if name == "vllm":
    kwargs.update(sampler_engine_options(colocation))
  if weight_sync == "directory":
    if weights_dir is None:
      raise ValueError("weight_sync 'directory' needs weights_dir")
    return DirectorySyncEngine(name, model_config, params, policy, weights_dir=weights_dir,
                               first_step=first_step, **kwargs)
  engine = make_engine(name, model_config, params, policy, **kwargs)
  if colocation.sleep_level:
    engine = SleepBetweenRollouts(engine, colocation.sleep_level)
  return engine
