"""`python -m experiments.rl` with a test reward, for the multi-process tests.

A random tiny model never solves the synthetic task, so every reward (and advantage, and
gradient) would be 0 and two runs would trivially agree. This entry point replaces the synthetic
task's reward with one that varies within every group (a function of the sampled tokens), then
runs the experiment unchanged:

    python tests/mp_rl_main.py --config=experiments/configs/sharded.py ...
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, rl  # noqa: E402
from rl_fp16 import cli  # noqa: E402
from rl_fp16.data.tasks import SyntheticTask  # noqa: E402


def token_sum_reward(self, problems, rollout) -> np.ndarray:
  """float32 [B] in [0, 1]: (sum of the response's token ids mod 5) / 4."""
  del self, problems
  return ((rollout.response_tokens.sum(axis=1) % 5) / 4).astype(np.float32)


if __name__ == "__main__":
  SyntheticTask.rewards = token_sum_reward
  cli.run_main(rl.main, validate=common.validate_rl_config)
