"""Dtype policies, loss scaling and the skip-on-overflow update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16 import precision
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params, token_logprobs
from rl_fp16.precision import (DtypePolicy, LossScaleConfig, get_policy, get_precision_pair,
                               init_loss_scale)
from rl_fp16.train import OptimizerConfig, apply_gradients, make_optimizer, make_train_step

CONFIG = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True)


def test_presets_and_pairs():
  bf16 = get_policy("bf16")
  assert bf16.param_dtype == jnp.float32 and bf16.compute_dtype == jnp.bfloat16
  assert bf16.norm_dtype == bf16.softmax_dtype == bf16.logsoftmax_dtype == jnp.float32
  assert get_policy("bf16", "sampler").param_dtype == jnp.bfloat16
  assert get_policy("fp16").needs_loss_scaling and not bf16.needs_loss_scaling
  pair = get_precision_pair("bf16-fp16")
  assert pair.trainer.compute_dtype == jnp.bfloat16 and pair.sampler.compute_dtype == jnp.float16
  assert get_precision_pair("fp32").sampler == get_policy("fp32", "sampler")
  custom = get_policy("bf16", softmax_dtype="bf16", logsoftmax_dtype="bfloat16")
  assert custom.softmax_dtype == jnp.bfloat16 and custom.logsoftmax_dtype == jnp.bfloat16
  assert DtypePolicy(compute_dtype="fp16").to_dict()["compute_dtype"] == "float16"


@pytest.mark.parametrize("call,match", [
    (lambda: get_policy("fp8"), r"'fp8'.*fp32.*bf16.*fp16"),
    (lambda: get_policy("bf16", role="critic"), r"'critic'.*trainer.*sampler"),
    (lambda: get_precision_pair("bf16-int8"), r"'bf16-int8'"),
    (lambda: DtypePolicy(compute_dtype="int8"), r"'int8'"),
    (lambda: LossScaleConfig(kind="adaptive"), r"'adaptive'.*none.*static.*dynamic"),
    (lambda: LossScaleConfig(backoff_factor=2.0), r"backoff_factor"),
    (lambda: get_policy("e0"), r"'e0'.*significand_bits.*\[1, 24\]"),
    (lambda: get_policy("e25"), r"'e25'.*significand_bits"),
    (lambda: get_policy("e8x9"), r"'e8x9'.*exponent_bits.*\[2, 8\]"),
    (lambda: get_precision_pair("fp32-e8x1"), r"'fp32-e8x1'"),
    (lambda: get_precision_pair("e8-e"), r"'e8-e'"),
    (lambda: DtypePolicy(significand_bits=8, compute_dtype="bf16"), r"computes in float32"),
    (lambda: DtypePolicy(exponent_bits=5), r"needs significand_bits"),
])
def test_bad_names_are_listed(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_emulated_presets_and_pairs():
  pair = get_precision_pair("fp32-e8")
  assert not pair.trainer.is_emulated and pair.trainer == get_policy("fp32")
  assert pair.sampler.significand_bits == 8 and pair.sampler.exponent_bits == 8
  assert pair.sampler.param_dtype == pair.sampler.compute_dtype == jnp.float32
  both = get_precision_pair("e11x5")
  assert both.trainer == both.sampler == get_policy("e11x5", "sampler")
  assert both.trainer.needs_loss_scaling and not get_policy("e11").needs_loss_scaling
  assert get_policy("e6").to_dict() == {**get_policy("fp32").to_dict(), "significand_bits": 6,
                                        "exponent_bits": 8}
  assert "significand_bits" not in get_policy("bf16").to_dict()
  # Policies are static jit arguments: equal presets hash alike, different bits do not compare equal.
  assert hash(get_policy("e8")) == hash(get_policy("e8")) and get_policy("e8") != get_policy("e9")
  x = jnp.float32([1 + 2**-8])
  assert get_policy("bf16").round(x) is x and float(get_policy("e8").round(x)[0]) == 1.0


def test_bitwise_dots_are_invariant_on_this_cpu():
  """The bitwise mode's probe finds options and a column quantum under which this CPU's dots give
  a row and a column the same bits at every count the mode uses (else its equality tests would
  only xfail here: tests/deps.py)."""
  dots = precision.bitwise_dots()
  assert dots.invariant, dots
  assert dict(dots.compiler_options) in [options for options, _ in
                                         precision.BITWISE_DOT_CANDIDATES]
  assert precision.compiler_options(get_policy("bf16", bitwise=True)) == dict(
      dots.compiler_options)


def test_bitwise_dots_probe_runs_inside_a_jit_trace():
  """The probe runs at the first bitwise program, which may be while another jit traces: it must
  give the same answer there (a `jax.jit` with compiler options is refused when nested)."""
  seen = []

  @jax.jit
  def traced(x):
    seen.append(precision.bitwise_dots.__wrapped__())
    return x + 1

  traced(1.0)
  assert seen == [precision.bitwise_dots()]


def test_per_op_dtypes_change_the_numbers():
  params = init_params(CONFIG.replace(initializer_range=0.3), jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 48, (2, 16))
  config = CONFIG.replace(initializer_range=0.3)
  base = np.asarray(token_logprobs(config, params, tokens, policy=get_policy("bf16")))
  for field in ("norm_dtype", "softmax_dtype", "logsoftmax_dtype", "output_dtype"):
    changed = np.asarray(token_logprobs(config, params, tokens,
                                        policy=get_policy("bf16", **{field: "bf16"})))
    assert np.abs(changed - base).max() > 0, field


def _quadratic_state(loss_scale):
  params = {"w": jnp.ones((4,), jnp.float32)}
  return TrainState.create(params, make_optimizer(OptimizerConfig(learning_rate=0.1)),
                           loss_scale=loss_scale)


def _fp16_loss(params, factor):
  # Computed in fp16: with a large factor the scaled loss (and its gradient) overflow.
  w = params["w"].astype(jnp.float16)
  return jnp.sum(w * w).astype(jnp.float32) * factor, {}


def test_overflow_skips_step_and_backs_off():
  optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1))
  state = _quadratic_state(init_loss_scale(LossScaleConfig(initial_scale=2.0**15)))
  step = jax.jit(lambda s, f: apply_gradients(s, optimizer, _fp16_loss, f))
  new_state, metrics = step(state, jnp.asarray(1e3, jnp.float16))  # 2^15 * 1e3 * 2 > fp16 max
  assert float(metrics["train/skipped_steps"]) == 1.0
  np.testing.assert_array_equal(new_state.params["w"], state.params["w"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)
  assert float(new_state.loss_scale.scale) == 2.0**14
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(new_state))
  # A clean step then updates the params.
  clean_state, metrics = step(new_state, jnp.asarray(1.0, jnp.float16))
  assert float(metrics["train/skipped_steps"]) == 0.0
  assert not np.array_equal(clean_state.params["w"], state.params["w"])


def test_dynamic_scale_grows_after_interval_and_static_never_moves():
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  state = _quadratic_state(init_loss_scale(LossScaleConfig(initial_scale=4.0,
                                                           growth_interval=2)))
  step = jax.jit(lambda s: apply_gradients(s, optimizer, _fp16_loss, jnp.asarray(1.0)))
  scales = []
  for _ in range(6):
    state, metrics = step(state)
    scales.append(float(metrics["train/loss_scale"]))
  assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0]
  static = _quadratic_state(init_loss_scale(LossScaleConfig(kind="static", initial_scale=2.0**15)))
  static_step = jax.jit(lambda s, f: apply_gradients(s, optimizer, _fp16_loss, f))
  static, metrics = static_step(static, jnp.asarray(1e3, jnp.float16))
  assert float(metrics["train/skipped_steps"]) == 1.0 and float(static.loss_scale.scale) == 2.0**15
  assert init_loss_scale(LossScaleConfig(kind="none")) is None


def test_fp16_sft_step_keeps_float32_master_weights():
  policy = get_policy("fp16")
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  params = init_params(CONFIG, jax.random.key(0))
  state = TrainState.create(params, optimizer, loss_scale=init_loss_scale(
      precision.default_loss_scale_config(policy)))
  tokens = np.random.default_rng(1).integers(0, 48, (4, 12)).astype(np.int32)
  batch = dict(tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=np.ones_like(tokens))
  state, metrics = make_train_step(CONFIG, policy, optimizer, loss="sft")(state, batch)
  assert float(metrics["train/skipped_steps"]) == 0.0 and float(metrics["train/loss_scale"]) == 2.0**15
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
