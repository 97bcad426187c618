"""Sampling engines and the Rollout they return."""

from rl_fp16.sampling.rollout import FINISH_EOS, FINISH_LENGTH, Rollout
