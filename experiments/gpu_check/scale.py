"""The paper-scale pieces of the accelerator check: a wall-clock budget, the device's copy
bandwidth and the decode floor it sets, and one end-to-end RL iteration with the JAX engine.

`gpu_check` runs them (its `paper` and `rl` stages); every function here is small and usable
alone. No vLLM import: the RL iteration samples with `rl_fp16.sampling.engines.JaxEngine`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl_fp16 import learner as learner_lib
from rl_fp16 import objectives, profiling
from rl_fp16.models import ModelConfig
from rl_fp16.precision import get_precision_pair
from rl_fp16.sampling.engines import make_engine
from rl_fp16.train import OptimizerConfig, RLConfig

GIB = 1024**3
# The RL loop's phase seconds (`rl_loop.summarize`), in the loop's order; `time/step_s` is their
# sum.
RL_PHASES = ("time/sample_s", "time/score_s", "time/logp_s", "time/update_s", "time/sync_s")


# --------------------------------------------------------------------------- the budget ----


class Budget:
  """The script's wall-clock budget: `allows(case, estimate_s)` is False (and the case is kept
  in `skipped` with its reason, printed) when the estimate does not fit in what is left.
  `total_s <= 0` means no budget."""

  def __init__(self, total_s: float, clock=time.perf_counter):
    self.total_s, self.clock, self.start = float(total_s), clock, clock()
    self.skipped: list[dict[str, Any]] = []

  def elapsed(self) -> float:
    return self.clock() - self.start

  def left(self) -> float:
    return float("inf") if self.total_s <= 0 else self.total_s - self.elapsed()

  def allows(self, case: str, estimate_s: float) -> bool:
    """Whether `case`, estimated at `estimate_s` seconds, fits in what is left."""
    left = self.left()
    if estimate_s <= left:
      print(f"[{self.elapsed():6.0f} s] {case} (estimated {estimate_s:.0f} s, "
            f"{left:.0f} s left)", flush=True)
      return True
    reason = (f"estimated {estimate_s:.0f} s, only {max(left, 0):.0f} s left of the "
              f"{self.total_s:.0f} s budget")
    self.skipped.append({"case": case, "reason": reason})
    print(f"[{self.elapsed():6.0f} s] SKIPPED {case}: {reason}", flush=True)
    return False


# ------------------------------------------------------------------- bandwidth and floor ----


def copy_bandwidth(nbytes: int, *, repetitions: int) -> dict[str, Any]:
  """The device's memory bandwidth as a jitted `x + 1` over a float32 array of `nbytes` (it reads
  and writes every byte once): {"bytes", "seconds", "bytes_per_s"} (`profiling.summarize`d)."""
  x = jnp.zeros((max(int(nbytes) // 4, 1),), jnp.float32)
  add = jax.jit(lambda v: v + 1)
  seconds = profiling.time_calls(lambda i: add(x).block_until_ready(), warmup=1,
                                 repetitions=max(int(repetitions), 1)).seconds
  moved = 2.0 * x.size * 4
  return {"bytes": x.size * 4, "seconds": seconds,
          "bytes_per_s": profiling.invert_stat(seconds, moved)}


def kv_bytes_per_token(model_config: ModelConfig, itemsize: int) -> float:
  """Bytes of one token's keys and values over all layers."""
  return float(2 * model_config.num_hidden_layers * model_config.num_key_value_heads
               * model_config.head_dim * itemsize)


def decode_floor_s(model_config: ModelConfig, *, rows: int, prompt_len: int, steps: int,
                   itemsize: int, bytes_per_s: float) -> float:
  """The bandwidth floor of a batched decode: every step reads the weights once and every row's
  keys and values so far (prompt + earlier tokens), at `bytes_per_s`. Prefill is not counted."""
  weights = model_config.num_params() * itemsize
  contexts = prompt_len + np.arange(steps)
  kv = rows * kv_bytes_per_token(model_config, itemsize) * contexts.sum()
  return float((weights * steps + kv) / bytes_per_s)


# ------------------------------------------------------------------------ RL iteration ----


def token_reward(rollout) -> np.ndarray:
  """A reward on token ids alone: each row's fraction of even response token ids (float32 [B]);
  rows of a group differ, so advantages are not all zero."""
  mask = np.asarray(rollout.response_mask, np.float32)
  even = (np.asarray(rollout.response_tokens) % 2 == 0).astype(np.float32)
  return ((even * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)).astype(np.float32)


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
  """`count` prompts of `length` uniform random token ids."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab_size, (int(count), int(length))).tolist()


def rl_setup(model_config: ModelConfig, params, rl, seed: int) -> learner_lib.Learner:
  """A `Learner` (GRPO, AdamW) for `rl` (the config's `rl` section) with a JAX engine that never
  stops at EOS, so every row runs to `rl.max_new_tokens`."""
  pair = get_precision_pair(rl.precision)
  rl_config = RLConfig(
      algorithm="grpo", loss=objectives.LossConfig(max_response_len=int(rl.max_new_tokens)),
      samples_per_prompt=int(rl.samples_per_prompt), num_minibatches=int(rl.num_minibatches),
      max_new_tokens=int(rl.max_new_tokens), prompt_bucket=int(rl.prompt_bucket))
  sampler_config = model_config.replace(remat=False)

  def engine(policy_params, _):
    return make_engine("jax", sampler_config, policy_params, pair.sampler, eos_token_ids=[],
                       prompt_bucket=int(rl.prompt_bucket))

  return learner_lib.setup(model_config, params, pair=pair, rl_config=rl_config,
                           optimizer_config=OptimizerConfig(learning_rate=float(rl.learning_rate)),
                           seed=seed, make_engine=engine)


def rl_iteration_row(learner: learner_lib.Learner, prompts: list[list[int]], seed: int,
                     iteration: int) -> dict[str, Any]:
  """One `Learner.step`, timed from outside: its wall seconds, the loop's phase seconds
  (`RL_PHASES`, summed in "step_s"), "other_s" (wall minus that sum), tokens and memory."""
  start = time.perf_counter()
  metrics = learner.step(prompts, token_reward, seed=seed + iteration)
  wall = time.perf_counter() - start
  rows = len(prompts) * learner.rl_config.samples_per_prompt
  tokens = metrics["response/length_mean"] * rows
  return {"iteration": iteration, "first_call_compiles": iteration == 0, "rows": rows,
          "precision": learner.pair.name, "wall_s": wall,
          **{name.split("/")[1]: float(metrics[name]) for name in RL_PHASES},
          "step_s": float(metrics["time/step_s"]), "other_s": wall - float(metrics["time/step_s"]),
          "response_tokens": tokens, "train_seq_len": float(metrics["perf/train_seq_len"]),
          "tokens_per_s": tokens / wall, "reward_mean": float(metrics["reward/mean"]),
          "skipped_updates": float(metrics.get("train/skipped_steps", 0.0)),
          "device_peak_gib_so_far": device_peak_bytes() / GIB,
          "host_peak_rss_gib": profiling.peak_rss_mib() / 1024}


def device_peak_bytes() -> float:
  """The device's peak allocated bytes so far (NaN where the backend does not report it)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))
