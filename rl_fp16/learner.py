"""The RL learner: the trainer's model, policies, optimizer, train state and engine in one object.

`setup` builds a `Learner` from typed configs (`RLConfig`, `OptimizerConfig`, a `PrecisionPair`):
the train state (full params, or LoRA adapters on a frozen base), placed on a mesh when one is
given, restored by the caller's `restore`, then the engine made by the caller's `make_engine`
from the policy's full params. `Learner.step` is one `rl_loop.rl_iteration`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from rl_fp16 import seeds, sharding
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig
from rl_fp16.models.lora import init_lora, merge_lora
from rl_fp16.precision import (PrecisionPair, cast_floating, default_loss_scale_config,
                               init_loss_scale)
from rl_fp16.rl_loop import rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer


@dataclasses.dataclass
class Learner:
  """What an RL run trains and samples with; `state` is replaced by every `step`.

  `base_params` is the frozen base under LoRA (then `state.params` holds only the adapters), else
  None; `mesh` is the trainer's mesh or None; `start_step` the RL step `setup` resumed after.
  """

  model_config: ModelConfig
  pair: PrecisionPair
  rl_config: RLConfig
  optimizer: optax.GradientTransformation
  state: TrainState
  engine: Any = None
  base_params: Any = None
  mesh: Any = None
  start_step: int = 0

  @property
  def updates_per_step(self) -> int:
    return self.rl_config.num_minibatches * self.rl_config.epochs

  def policy_params(self):
    """The current policy's full params (the adapters merged into the base under LoRA)."""
    if self.base_params is None:
      return self.state.params
    return merge_lora(self.base_params, self.state.params, self.rl_config.lora)

  def step(self, prompts: list[list[int]], reward_fn, seed: int,
           extra_metrics: Callable[[Any, Any], dict[str, float]] | None = None
           ) -> dict[str, float]:
    """One RL iteration (`rl_loop.rl_iteration`) on `prompts`; updates `state`, returns the
    step's flat metrics."""
    self.state, metrics = rl_iteration(
        self.state, model_config=self.model_config, trainer_policy=self.pair.trainer,
        optimizer=self.optimizer, engine=self.engine, prompts=prompts, reward_fn=reward_fn,
        rl_config=self.rl_config, seed=seed, mesh=self.mesh, base_params=self.base_params,
        extra_metrics=extra_metrics)
    return metrics


def init_state(params, *, pair: PrecisionPair, rl_config: RLConfig,
               optimizer: optax.GradientTransformation, seed: int, mesh=None
               ) -> tuple[TrainState, Any]:
  """The step-0 train state and the frozen base params (None without `rl_config.lora`).

  Under LoRA the base is held in the trainer's param dtype and the state holds only adapters
  initialised from `seeds.lora_init(seed)`. With `mesh`, both are placed on it.
  """
  base_params, trainable = None, params
  if rl_config.lora is not None:
    base_params = cast_floating(params, pair.trainer.param_dtype)
    trainable = init_lora(rl_config.lora, base_params, jax.random.key(seeds.lora_init(seed)))
  state = TrainState.create(trainable, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  if mesh is not None:
    state = sharding.shard_state(state, mesh)  # a restore keeps these shardings
    if base_params is not None:
      base_params = jax.device_put(base_params, sharding.param_shardings(base_params, mesh))
  return state, base_params


def setup(model_config: ModelConfig, params, *, pair: PrecisionPair, rl_config: RLConfig,
          optimizer_config: OptimizerConfig, seed: int, mesh=None,
          restore: Callable[[TrainState], TrainState] | None = None,
          make_engine: Callable[[Any, int], Any] | None = None) -> Learner:
  """A `Learner` for `params` of `model_config`.

  Args:
    restore: (step-0 state) -> the state to start from (e.g. the newest checkpoint's); its
      `step` (optimizer updates) sets `start_step`.
    make_engine: (the policy's full params, start_step) -> the sampling engine; None leaves
      `engine` unset.
  """
  optimizer = make_optimizer(optimizer_config)
  state, base_params = init_state(params, pair=pair, rl_config=rl_config, optimizer=optimizer,
                                  seed=seed, mesh=mesh)
  learner = Learner(model_config=model_config, pair=pair, rl_config=rl_config,
                    optimizer=optimizer, state=state, base_params=base_params, mesh=mesh)
  if restore is not None:
    learner.state = restore(state)
    learner.start_step = int(learner.state.step) // learner.updates_per_step
  if make_engine is not None:
    learner.engine = make_engine(learner.policy_params(), learner.start_step)
  return learner
