"""Group-relative advantages against a float64 NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16 import advantages

jax.config.update("jax_enable_x64", False)


def _reference(rewards, group_size, normalise_std, eps=1e-6):
  grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = grouped - grouped.mean(axis=1, keepdims=True)
  if normalise_std:
    centred = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + eps)
  return centred.reshape(-1)


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_grpo_matches_sample_std_reference(group_size):
  rewards = np.random.default_rng(group_size).normal(size=6 * group_size).astype(np.float32)
  got = advantages.grpo_advantages(rewards, group_size)
  assert got.shape == rewards.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference(rewards, group_size, True), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.compute_advantages("grpo", rewards, group_size), got)


@pytest.mark.parametrize("group_size", [1, 3, 5])
def test_drgrpo_matches_reference(group_size):
  rewards = np.random.default_rng(group_size).integers(0, 2, size=4 * group_size)
  got = advantages.drgrpo_advantages(rewards, group_size)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference(rewards, group_size, False), atol=1e-6)
  np.testing.assert_allclose(advantages.compute_advantages("drgrpo", rewards, group_size), got)


def test_groups_are_consecutive_rows():
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0], np.float32)
  grpo = advantages.grpo_advantages(rewards, 4)
  drgrpo = advantages.drgrpo_advantages(rewards, 4)
  np.testing.assert_allclose(drgrpo, [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0], atol=1e-7)
  # Sample std of (1, 0, 0, 0) is 0.5; the second group has equal rewards and gets 0.
  np.testing.assert_allclose(grpo, [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0], rtol=1e-5)


def test_degenerate_groups_give_zero_not_nan():
  np.testing.assert_array_equal(advantages.grpo_advantages(np.ones(6, np.float32), 3), 0.0)
  np.testing.assert_array_equal(advantages.grpo_advantages(np.arange(4.0), 1), 0.0)


def test_jittable_with_static_group_size():
  rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
  jitted = jax.jit(advantages.compute_advantages, static_argnames=("name", "group_size"))
  np.testing.assert_allclose(jitted("grpo", rewards, group_size=4),
                             advantages.grpo_advantages(rewards, 4), rtol=1e-6)


def test_errors_name_the_values():
  with pytest.raises(ValueError, match=r"B=10 is not divisible by group_size=4"):
    advantages.compute_advantages("grpo", np.zeros(10), 4)
  with pytest.raises(ValueError,
                     match=r"Unknown advantage estimator 'rloo'; allowed: grpo, drgrpo"):
    advantages.compute_advantages("rloo", np.zeros(8), 4)
  with pytest.raises(ValueError, match=r"group_size must be a positive int, got 0"):
    advantages.drgrpo_advantages(np.zeros(8), 0)
  with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\], got shape \(2, 4\)"):
    advantages.grpo_advantages(np.zeros((2, 4)), 4)
