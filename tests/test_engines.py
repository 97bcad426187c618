"""Engine wrappers compose: each is an Engine around an Engine, forwarding what it leaves alone."""

import pytest

from rl_fp16.sampling.engines import EngineWrapper
from rl_fp16.sampling.wrappers import SleepBetweenRollouts


class _Fake:
  """An engine with sleep mode that records its calls."""

  name, policy = "fake", "policy"

  def __init__(self):
    self.calls = []

  def generate(self, prompt_token_ids, *, n, sampling, seed, first_row=0):
    self.calls.append(("generate", len(prompt_token_ids), n, seed, first_row))
    return "rollout"

  def sync_weights(self, params):
    self.calls.append(("sync", params))
    return 1.5

  def sleep(self, level):
    self.calls.append(("sleep", level))

  def wake_up(self, tags=None):
    self.calls.append(("wake_up", tags))

  def close(self):
    self.calls.append(("close",))


def test_wrappers_compose_and_forward():
  fake = _Fake()
  engine = SleepBetweenRollouts(EngineWrapper(EngineWrapper(fake)), 2)
  assert (engine.name, engine.policy) == ("fake", "policy")  # forwarded through every layer
  assert engine.generate([[1, 2]], n=3, sampling=None, seed=7, first_row=6) == "rollout"
  assert engine.asleep
  assert engine.sync_weights({"w": 1}) >= 0.0
  engine.close()
  assert fake.calls == [("generate", 1, 3, 7, 6), ("sleep", 2), ("wake_up", ["weights"]),
                        ("sync", {"w": 1}), ("wake_up", ["kv_cache"]), ("close",)]
  assert not engine.asleep


def test_sleep_needs_a_sleeping_engine_under_any_number_of_layers():
  class _NoSleep(_Fake):
    sleep = None

  with pytest.raises(ValueError, match="has no sleep"):
    SleepBetweenRollouts(EngineWrapper(_NoSleep()), 1)
