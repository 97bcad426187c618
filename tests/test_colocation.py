"""Trainer and vLLM on one GPU, from one config entry; sleep mode's call order.

On CPU vLLM refuses sleep mode (`VllmSampler` raises), so the order sleep -> train -> wake_up ->
sync is checked through the real `rl_iteration` with an engine that records calls.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deps import require

from rl_fp16 import colocation
from rl_fp16.colocation import ColocationConfig
from rl_fp16.sampling.wrappers import SleepBetweenRollouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_entry_sets_the_jax_and_vllm_shares():
  config = ColocationConfig(sampler_memory_fraction=0.4)
  assert colocation.colocation_env(config) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.550"}
  assert colocation.sampler_engine_options(config) == {"gpu_memory_utilization": 0.4}
  assert colocation.colocation_env(ColocationConfig()) == {}
  assert colocation.sampler_engine_options(ColocationConfig()) == {}
  assert colocation.sampler_engine_options(ColocationConfig(sleep_level=2)) == {
      "enable_sleep_mode": True}
  for bad in (0.0, 0.95, -0.1, True):
    with pytest.raises(ValueError, match="sampler_memory_fraction=.*: must be a finite number > 0 "
                       "and <= 0.9"):
      ColocationConfig(sampler_memory_fraction=bad)
  with pytest.raises(ValueError, match="sleep_level=3: allowed: 0, 1, 2"):
    ColocationConfig(sleep_level=3)


def test_apply_refuses_a_conflicting_environment_and_a_started_backend():
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.550"}
  environ = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"}
  with pytest.raises(ValueError, match=r"XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 \(the config needs "
                     r"0.550\)"):
    colocation.apply_colocation_env(env, environ)
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # this process's backend is up
  with pytest.raises(RuntimeError, match="already initialised"):
    colocation.apply_colocation_env(env, {})
  same = dict(env)  # already set to the same value: nothing to do, fine after the start
  assert colocation.apply_colocation_env(env, same) == {} and same == env


_ENTRY_SCRIPT = r"""
import json, os, sys
from jax._src import xla_bridge
from experiments import rl
from experiments.configs import sanity

seen = {}
apply = rl.colocation.apply_colocation_env

def applied_then_stop(env):  # the env is applied by run() before anything starts JAX's backend
  seen["backend_started"] = xla_bridge.backends_are_initialized()
  apply(env)
  seen["env"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  print(json.dumps(seen))
  sys.exit(0)

rl.colocation.apply_colocation_env = applied_then_stop
config = sanity.get_config()
config.colocate.sampler_memory_fraction = 0.4
config.output_dir = sys.argv[1]
rl.main(config)
"""


@pytest.mark.slow
def test_rl_entry_sets_the_memory_fraction_before_jax_starts(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _ENTRY_SCRIPT, str(tmp_path / "run")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  seen = json.loads(out.stdout.strip().splitlines()[-1])
  assert seen == {"env": "0.550", "backend_started": False}


def test_config_checker_names_bad_sync_and_colocation_values(tmp_path):
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  config = sanity.get_config()
  config.update(dict(model=str(tmp_path / "none"), engine="jax", weight_sync="disk",
                     output_dir=str(tmp_path / "run")))
  config.colocate.sampler_memory_fraction = 1.5
  config.colocate.sleep_level = 1
  with pytest.raises(common.ConfigError) as error:
    common.validate_rl_config(config)
  message = str(error.value)
  assert "--config.weight_sync='disk': allowed: memory, directory" in message
  assert "--config.colocate.sampler_memory_fraction=1.5: must be a finite number > 0" in message
  assert ("--config.colocate.sleep_level=1: sleep mode needs --config.engine=vllm with "
          "--config.weight_sync=memory") in message
  config.colocate.sleep_level = 5
  with pytest.raises(common.ConfigError, match=r"sleep_level=5: allowed: 0, 1, 2"):
    common.validate_rl_config(config)
  config.update(dict(weight_sync="directory"))
  config.colocate.sleep_level = 0
  config.colocate.sampler_memory_fraction = 0.5
  common.validate_rl_config(config)


class _Recorder:
  """A JAX engine that records sleep / wake_up / sync calls (vLLM refuses sleep mode on CPU)."""

  name = "recording"

  def __init__(self, engine, calls):
    self.engine, self.calls = engine, calls
    self.policy = engine.policy

  def generate(self, *args, **kwargs):
    self.calls.append("generate")
    return self.engine.generate(*args, **kwargs)

  def sleep(self, level):
    self.calls.append(f"sleep({level})")

  def wake_up(self, tags=None):
    self.calls.append(f"wake_up({','.join(tags) if tags else 'all'})")

  def sync_weights(self, params):
    self.calls.append("sync")
    return self.engine.sync_weights(params)

  def close(self):
    self.engine.close()


@pytest.mark.slow
def test_sleep_mode_call_order_in_an_rl_iteration(tiny_task_model_dir, monkeypatch):
  from rl_fp16 import objectives, rl_loop, train  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints import load_hf  # pylint: disable=g-import-not-at-top
  from rl_fp16.checkpoints.train_state import TrainState  # pylint: disable=g-import-not-at-top
  from rl_fp16.precision import (default_loss_scale_config, get_precision_pair,  # pylint: disable=g-import-not-at-top
                                 init_loss_scale)
  from rl_fp16.sampling.engines import JaxEngine  # pylint: disable=g-import-not-at-top

  config, params = load_hf(tiny_task_model_dir)
  pair = get_precision_pair("fp32")
  optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-3))
  state = TrainState.create(params, optimizer, loss_scale=init_loss_scale(
      default_loss_scale_config(pair.trainer)))
  rl_config = train.RLConfig(samples_per_prompt=2, num_minibatches=1, max_new_tokens=8,
                             loss=objectives.LossConfig(max_response_len=8))

  make_update = rl_loop.make_update

  def recording_update(*args, **kwargs):
    update = make_update(*args, **kwargs)

    def run(state, batch, order):
      calls.append("train")  # the list of the level being run
      return update(state, batch, order)
    return run

  monkeypatch.setattr(rl_loop, "make_update", recording_update)

  for level, wakes in ((1, ["wake_up(all)", "sync"]),
                       (2, ["wake_up(weights)", "sync", "wake_up(kv_cache)"])):
    calls = []
    engine = SleepBetweenRollouts(_Recorder(JaxEngine(config, params, pair.sampler), calls),
                                  level)
    for step in range(2):
      state, metrics = rl_loop.rl_iteration(
          state, model_config=config, trainer_policy=pair.trainer, optimizer=optimizer,
          engine=engine, prompts=[[1, 5, 6], [1, 7]], rl_config=rl_config, seed=step,
          reward_fn=lambda r: (r.response_lengths % 2).astype(np.float32))
      assert metrics["time/sync_s"] >= engine.last_wake_s
    one = ["generate", f"sleep({level})", "train"] + wakes
    assert calls == one + one, level
    assert not engine.asleep
  with pytest.raises(ValueError, match="has no sleep"):
    SleepBetweenRollouts(JaxEngine(config, params, pair.sampler), 1)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_refuses_sleep_mode_on_cpu(tmp_path):
  require("vllm")
  from rl_fp16.sampling import vllm_sampler  # pylint: disable=g-import-not-at-top
  from vllm import platforms  # pylint: disable=g-import-not-at-top
  if not platforms.current_platform.is_cpu():
    pytest.skip("sleep mode exists on this platform")
  with pytest.raises(ValueError, match="enable_sleep_mode needs a CUDA, ROCm or XPU device"):
    vllm_sampler.VllmSampler(os.path.join(REPO, "experiments", "assets", "tiny_base"),
                             vllm_sampler.VllmConfig(dtype="float32", enable_sleep_mode=True))
