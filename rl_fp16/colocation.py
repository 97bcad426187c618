"""Trainer (JAX) and sampler (vLLM) sharing one GPU: the memory split and vLLM's sleep mode.

JAX preallocates 75% of a GPU's memory when its backend starts, which leaves vLLM too little on a
shared device. One number, `ColocationConfig.sampler_memory_fraction` (f), sets both sides:
    vLLM:  gpu_memory_utilization = f
    JAX:   XLA_PYTHON_CLIENT_MEM_FRACTION = 1 - f - HEADROOM
HEADROOM (5%) is left to the CUDA contexts and to what neither allocator counts. The variable only
acts if it is set before JAX initialises its backend (its first array or device query), so
`apply_colocation_env` refuses to run after that unless the environment already holds the value.
JAX's allocator never gives memory back, so the split is fixed for the run.

Sleep mode (`sleep_level` 1 or 2; vLLM on CUDA/ROCm/XPU only): the engine wrapper
`rl_fp16.sampling.wrappers.SleepBetweenRollouts` puts the engine to sleep right after each rollout
and wakes it just before the weight sync, so the engine's KV cache (level 1: and its weights,
offloaded to host memory; level 2: discarded, since the sync rewrites them anyway) is released
while the trainer computes. That frees memory for allocations outside JAX's fixed share (e.g.
other processes or torch on the same device); it does not enlarge JAX's own pool.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, MutableMapping

from rl_fp16.config_checks import FieldChecks

HEADROOM = 0.05
MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
SLEEP_LEVELS = (0, 1, 2)
MAX_SAMPLER_FRACTION = 0.9  # JAX keeps at least 1 - 0.9 - HEADROOM = 5%


@dataclasses.dataclass(frozen=True)
class ColocationConfig:
  """How a colocated trainer and sampler share the accelerator.

  Attributes:
    sampler_memory_fraction: fraction f of the GPU's memory for vLLM (its gpu_memory_utilization);
      JAX gets 1 - f - HEADROOM. None leaves both at their defaults (a trainer alone, or CPU).
    sleep_level: 0 (off), 1 or 2: put vLLM to sleep at this level between rollouts.
  """

  sampler_memory_fraction: float | None = None
  sleep_level: int = 0

  def __post_init__(self):
    checks = FieldChecks(self)
    if self.sampler_memory_fraction is not None:
      checks.number("sampler_memory_fraction", above=0, at_most=MAX_SAMPLER_FRACTION)
    checks.choice("sleep_level", SLEEP_LEVELS)
    checks.done()


def colocation_env(config: ColocationConfig) -> dict[str, str]:
  """The environment variables JAX must start with: {} or {XLA_PYTHON_CLIENT_MEM_FRACTION: ...}."""
  f = config.sampler_memory_fraction
  if f is None:
    return {}
  return {MEM_FRACTION_VAR: f"{1.0 - f - HEADROOM:.3f}"}


def sampler_engine_options(config: ColocationConfig) -> dict[str, Any]:
  """vLLM engine keywords (`VllmConfig` fields) for this split and sleep level."""
  options: dict[str, Any] = {}
  if config.sampler_memory_fraction is not None:
    options["gpu_memory_utilization"] = float(config.sampler_memory_fraction)
  if config.sleep_level:
    options["enable_sleep_mode"] = True
  return options


def jax_backend_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def apply_colocation_env(env: Mapping[str, str],
                         environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
  """Sets `env` in the process environment before JAX's backend starts; returns what it set.

  Raises:
    ValueError: a variable is already set to another value (the caller's environment and the
      config disagree).
    RuntimeError: JAX's backend is already initialised, so a variable not yet set would not act.
  """
  environ = os.environ if environ is None else environ
  conflicts = [f"{k}={environ[k]} (the config needs {v})" for k, v in env.items()
               if k in environ and environ[k] != v]
  if conflicts:
    raise ValueError("the environment already sets " + ", ".join(conflicts) + "; unset it or "
                     "change --config.colocate.sampler_memory_fraction")
  missing = {k: v for k, v in env.items() if k not in environ}
  if missing and jax_backend_initialized():
    raise RuntimeError(f"JAX's backend is already initialised, so {missing} would have no "
                       "effect; set it before the first JAX array or device query (experiments."
                       "rl does so at the start of run())")
  environ.update(missing)
  return missing
