"""Policy losses against an independent float64 NumPy implementation of each formula.

The reference below computes every loss and its analytic gradient with respect to ``logp`` in
float64, from the formulas in docs/design.md ("Algorithms"), and the code under test runs in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16 import objectives
from rl_fp16.config_checks import FieldProblems

jax.config.update("jax_enable_x64", False)

B, T = 16, 8
MAX_RESPONSE_LEN = 9
PPO_NAMES = ("grpo", "grpo_token_tis", "grpo_token_mis", "grpo_seq_mis")
PG_NAMES = ("pg", "pg_seq_is", "pg_seq_tis", "pg_seq_mis")


# ------------------------------------------------------------------------------------------------
# float64 NumPy reference.


def _aggregation_weights(mask, aggregation, max_response_len):
  """float64 [B, T] coefficients a with loss = sum(a * L) for per-token loss L."""
  tokens_per_seq = mask.sum(axis=1)
  num_nonempty = max((tokens_per_seq > 0).sum(), 1)
  if aggregation == "token_mean":
    weights = np.full(mask.shape, 1.0 / max(mask.sum(), 1))
  elif aggregation == "seq_mean_token_sum":
    weights = np.full(mask.shape, 1.0 / num_nonempty)
  elif aggregation == "seq_mean_token_mean":
    weights = np.repeat((1.0 / (np.maximum(tokens_per_seq, 1) * num_nonempty))[:, None],
                        mask.shape[1], axis=1)
  else:
    weights = np.full(mask.shape, 1.0 / (mask.shape[0] * max_response_len))
  return weights * mask


def _exp_clamped(log_value):
  return np.exp(np.minimum(log_value, 80.0))


def _clipped_surrogate(ratio, ratio_grad, advantages, eps_low, eps_high):
  """Returns f = min(r A, clip(r) A), df/dlogp, and the clip-active indicator."""
  unclipped = ratio * advantages
  clipped = np.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
  clip_active = clipped < unclipped
  # Where the clipped branch is smaller, r lies outside the clip range and clip(r) is flat.
  surrogate_grad = np.where(clip_active, 0.0, advantages * ratio_grad)
  return np.minimum(unclipped, clipped), surrogate_grad, clip_active


def reference_loss(name, logp, logp_old, logp_sampler, advantages, mask, config):
  """float64 (loss, d loss / d logp [B, T], metrics) for one of objectives.ALGORITHMS."""
  mask = np.asarray(mask) > 0
  logp, logp_old, logp_sampler = (np.where(mask, np.asarray(x, np.float64), 0.0)
                                  for x in (logp, logp_old, logp_sampler))
  advantages = np.asarray(advantages, np.float64)
  if advantages.ndim == 1:
    advantages = np.repeat(advantages[:, None], mask.shape[1], axis=1)
  advantages = np.where(mask, advantages, 0.0)
  nonempty = mask.sum(axis=1) > 0
  mean_tokens = lambda x: x[mask].mean() if mask.any() else 0.0
  mean_seqs = lambda x: x[nonempty].mean() if nonempty.any() else 0.0

  log_ratio = logp - logp_old
  ratio = _exp_clamped(log_ratio)
  metrics = dict.fromkeys(objectives.METRIC_NAMES, 0.0)
  metrics["train/ratio_mean"] = mean_tokens(ratio)
  if name in PPO_NAMES:
    ratio_grad = np.where(log_ratio < 80.0, ratio, 0.0)
    surrogate, surrogate_grad, clip_active = _clipped_surrogate(
        ratio, ratio_grad, advantages, config.clip_eps_low, config.clip_eps_high)
    metrics["train/clip_frac"] = mean_tokens(clip_active)
    token_rho = _exp_clamped(logp_old - logp_sampler)
    seq_rho = _exp_clamped((logp_old - logp_sampler).sum(axis=1))
    cap = config.token_is_cap
    if name == "grpo":
      weight = np.ones_like(ratio)
    elif name == "grpo_token_tis":
      weight = np.minimum(token_rho, cap)
      metrics["is/frac_truncated"] = mean_tokens(token_rho > cap)
      metrics["is/token_weight_mean"] = mean_tokens(weight)
    elif name == "grpo_token_mis":
      weight = token_rho * (token_rho <= cap)
      metrics["is/frac_masked"] = mean_tokens(token_rho > cap)
      metrics["is/token_weight_mean"] = mean_tokens(weight)
    else:
      seq_weight = seq_rho * (seq_rho <= config.seq_is_cap)
      metrics["is/frac_masked"] = mean_seqs(seq_rho > config.seq_is_cap)
      metrics["is/seq_weight_mean"] = mean_seqs(seq_weight)
      weight = np.repeat(seq_weight[:, None], mask.shape[1], axis=1)
    per_token_loss = -weight * surrogate
    per_token_grad = -weight * surrogate_grad
  elif name == "gspo":
    # Sequence ratio over the masked tokens; each token's term has d s_t / d logp_t = s.
    seq_ratio = _exp_clamped(log_ratio.sum(axis=1) / np.maximum(mask.sum(axis=1), 1))
    token_seq_ratio = np.repeat(seq_ratio[:, None], mask.shape[1], axis=1)
    surrogate, surrogate_grad, clip_active = _clipped_surrogate(
        token_seq_ratio, token_seq_ratio, advantages, config.gspo_eps_low, config.gspo_eps_high)
    metrics["train/clip_frac"] = mean_tokens(clip_active)
    per_token_loss = -surrogate
    per_token_grad = -surrogate_grad
  else:
    seq_w = _exp_clamped((logp - logp_sampler).sum(axis=1))
    cap = config.seq_is_cap
    if name == "pg":
      seq_weight = np.ones(mask.shape[0])
    elif name == "pg_seq_is":
      seq_weight = seq_w
    elif name == "pg_seq_tis":
      seq_weight = np.minimum(seq_w, cap)
      metrics["is/frac_truncated"] = mean_seqs(seq_w > cap)
    else:
      seq_weight = seq_w * (seq_w <= cap)
      metrics["is/frac_masked"] = mean_seqs(seq_w > cap)
    if name != "pg":
      metrics["is/seq_weight_mean"] = mean_seqs(seq_weight)
    # w is a constant: d(-w A logp)/d logp = -w A.
    per_token_loss = -seq_weight[:, None] * advantages * logp
    per_token_grad = -seq_weight[:, None] * advantages
  coefficients = _aggregation_weights(mask, config.aggregation, config.max_response_len)
  loss_terms = coefficients * per_token_loss
  return loss_terms.sum(), coefficients * per_token_grad, np.abs(loss_terms).sum(), metrics


# ------------------------------------------------------------------------------------------------
# Inputs.


def make_inputs(seed, *, name="grpo", extreme=False, token_advantages=False, pad_value=np.nan):
  """Random float32 inputs with a fully masked row, a length-1 row and garbage in the padding.

  logp_sampler differs from logp_old by a per-row offset plus per-token noise, so token and
  sequence IS weights fall on both sides of their caps; with ``extreme`` the difference is
  uniform in [-50, 50] per token.
  """
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0], lengths[1], lengths[-1] = 0, 1, T
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  logp = rng.uniform(-4.0, -0.5, size=(B, T))
  # Close to on-policy for GSPO, so both sides of its narrow clip range occur.
  logp_old = logp + rng.normal(0.0, 1e-3 if name == "gspo" else 0.3, size=(B, T))
  if extreme:
    logp_sampler = logp_old + rng.uniform(-50.0, 50.0, size=(B, T))
  else:
    row_offset = rng.uniform(-1.0, 1.0, size=(B, 1))
    logp_sampler = logp_old + row_offset + rng.normal(0.0, 0.5, size=(B, T))
  advantages = rng.normal(size=(B, T) if token_advantages else (B,))
  arrays = [np.where(mask > 0, x, pad_value).astype(np.float32)
            for x in (logp, logp_old, logp_sampler)]
  return dict(logp=arrays[0], logp_old=arrays[1], logp_sampler=arrays[2],
              advantages=advantages.astype(np.float32), mask=mask)


def make_config(aggregation, **kwargs):
  max_len = MAX_RESPONSE_LEN if aggregation == "token_sum_norm" else None
  return objectives.LossConfig(aggregation=aggregation, max_response_len=max_len, **kwargs)


def loss_and_grads(name, config, logp, logp_old, logp_sampler, advantages, mask):
  """(loss, metrics), (d/d logp, d/d logp_old, d/d logp_sampler), run eagerly (no compiles)."""

  def loss_fn(logp, logp_old, logp_sampler):
    return objectives.policy_loss(name, logp=logp, logp_old=logp_old, logp_sampler=logp_sampler,
                                  advantages=advantages, mask=mask, config=config)

  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
      logp, logp_old, logp_sampler)


def _assert_matches_reference(name, config, inputs, rtol=1e-5):
  (loss, metrics), (grad_logp, grad_old, grad_sampler) = loss_and_grads(name, config, **inputs)
  expected_loss, expected_grad, loss_scale, expected_metrics = reference_loss(
      name, config=config, **inputs)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, expected_loss, rtol=rtol, atol=rtol * loss_scale)
  assert np.all(np.isfinite(grad_logp))
  np.testing.assert_allclose(grad_logp, expected_grad, rtol=rtol,
                             atol=rtol * np.abs(expected_grad).max() + 1e-30)
  assert set(metrics) == set(objectives.METRIC_NAMES)
  for key, expected in expected_metrics.items():
    assert metrics[key].shape == () and metrics[key].dtype == jnp.float32, key
    np.testing.assert_allclose(metrics[key], expected, rtol=rtol, atol=1e-7, err_msg=key)
  return grad_logp, grad_old, grad_sampler


# ------------------------------------------------------------------------------------------------
# Values and gradients against the reference.


@pytest.mark.parametrize("aggregation", objectives.AGGREGATIONS)
@pytest.mark.parametrize("name", objectives.ALGORITHMS)
def test_matches_reference(name, aggregation):
  config = make_config(aggregation)
  for seed, token_advantages in ((0, False), (1, True), (2, False)):
    _assert_matches_reference(name, config,
                              make_inputs(seed, name=name, token_advantages=token_advantages))


@pytest.mark.parametrize("aggregation", objectives.AGGREGATIONS)
@pytest.mark.parametrize("name", objectives.ALGORITHMS)
def test_matches_reference_with_extreme_ratios(name, aggregation):
  config = make_config(aggregation)
  inputs = make_inputs(3, name=name, extreme=True, pad_value=-np.inf)
  _assert_matches_reference(name, config, inputs)


def test_reference_inputs_exercise_each_branch():
  """The random inputs hit both sides of every clip and cap, so the comparisons mean something."""
  config = make_config("token_mean")
  for name, key in (("grpo", "train/clip_frac"), ("gspo", "train/clip_frac"),
                    ("grpo_token_tis", "is/frac_truncated"), ("pg_seq_mis", "is/frac_masked")):
    fractions = [reference_loss(name, config=config, **make_inputs(seed, name=name))[3][key]
                 for seed in range(3)]
    assert 0.05 < np.mean(fractions) < 0.95, (name, fractions)
  extreme = make_inputs(3, name="grpo_seq_mis", extreme=True)
  assert 0.0 < reference_loss("grpo_seq_mis", config=config, **extreme)[3]["is/frac_masked"] < 1.0


# ------------------------------------------------------------------------------------------------
# Stop-gradient.


@pytest.mark.parametrize("name", objectives.ALGORITHMS)
def test_is_weights_carry_no_gradient(name):
  config = make_config("seq_mean_token_mean")
  inputs = make_inputs(4, name=name)
  grad_logp, grad_old, grad_sampler = _assert_matches_reference(name, config, inputs)
  np.testing.assert_array_equal(grad_sampler, 0.0)
  if name in PPO_NAMES:
    # logp_old enters only through r_t = exp(logp - logp_old) once rho_t / rho are stopped.
    np.testing.assert_allclose(grad_old, -grad_logp, rtol=1e-6, atol=1e-9)
  else:
    np.testing.assert_array_equal(grad_old, 0.0)
  assert np.abs(grad_logp).max() > 0.0


def test_pg_seq_gradient_treats_weight_as_constant():
  config = make_config("token_mean")
  inputs = make_inputs(5, name="pg_seq_is")
  (_, _), (grad_logp, _, _) = loss_and_grads("pg_seq_is", config, **inputs)
  mask = inputs["mask"].astype(np.float64)
  logp = np.where(mask > 0, inputs["logp"], 0.0).astype(np.float64)
  logp_sampler = np.where(mask > 0, inputs["logp_sampler"], 0.0).astype(np.float64)
  seq_weight = np.exp((logp - logp_sampler).sum(axis=1))
  expected = -seq_weight[:, None] * inputs["advantages"][:, None] * mask / mask.sum()
  np.testing.assert_allclose(grad_logp, expected, rtol=2e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# GSPO token form vs sequence form.


def _gspo_sequence_form(logp, logp_old, advantages, mask, eps_low, eps_high):
  """GSPO's sequence-level loss mean_i -min(s_i A_i, clip(s_i) A_i), differentiated through s_i."""
  valid = mask > 0
  tokens = valid.sum(axis=1)
  log_seq_ratio = jnp.where(valid, logp - logp_old, 0.0).sum(axis=1) / jnp.maximum(tokens, 1)
  seq_ratio = jnp.exp(log_seq_ratio)
  term = jnp.minimum(seq_ratio * advantages,
                     jnp.clip(seq_ratio, 1 - eps_low, 1 + eps_high) * advantages)
  nonempty = tokens > 0
  return -jnp.where(nonempty, term, 0.0).sum() / nonempty.sum()


def test_gspo_token_form_equals_sequence_form():
  config = make_config("seq_mean_token_mean")
  for seed in range(3):
    inputs = make_inputs(10 + seed, name="gspo", pad_value=0.0)
    (loss, metrics), (grad_logp, _, _) = loss_and_grads("gspo", config, **inputs)
    seq_loss, seq_grad = jax.value_and_grad(_gspo_sequence_form)(
        inputs["logp"], inputs["logp_old"], inputs["advantages"], inputs["mask"],
        config.gspo_eps_low, config.gspo_eps_high)
    np.testing.assert_allclose(loss, seq_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_logp, seq_grad, rtol=1e-5, atol=1e-7)
    assert 0.0 < metrics["train/clip_frac"] < 1.0


# ------------------------------------------------------------------------------------------------
# Numerical robustness.


@pytest.mark.parametrize("name", ["grpo_token_mis", "grpo_seq_mis", "pg_seq_mis", "pg_seq_tis"])
def test_huge_weights_are_masked_to_exact_zero(name):
  inputs = make_inputs(6, name=name)
  # Every IS weight astronomically large: exp(1e4) overflows float32 without the clamp.
  inputs["logp_sampler"] = np.where(inputs["mask"] > 0, -1e4, np.nan).astype(np.float32)
  if name.startswith("pg"):
    inputs["logp"] = np.where(inputs["mask"] > 0, 0.0, np.nan).astype(np.float32)
  config = make_config("token_mean")
  (loss, metrics), grads = loss_and_grads(name, config, **inputs)
  assert np.isfinite(loss)
  for grad in grads:
    assert np.all(np.isfinite(grad))
  if name == "pg_seq_tis":
    assert metrics["is/frac_truncated"] == 1.0
  else:
    assert loss == 0.0
    np.testing.assert_array_equal(grads[0], 0.0)
    assert metrics["is/frac_masked"] == 1.0


@pytest.mark.parametrize("aggregation", objectives.AGGREGATIONS)
@pytest.mark.parametrize("name", objectives.ALGORITHMS)
def test_all_masked_batch_gives_zero_without_nan(name, aggregation):
  inputs = make_inputs(7, name=name)
  inputs["mask"] = np.zeros_like(inputs["mask"])
  inputs["logp"] = np.full((B, T), np.nan, np.float32)
  (loss, metrics), grads = loss_and_grads(name, make_config(aggregation), **inputs)
  assert loss == 0.0
  for grad in grads:
    np.testing.assert_array_equal(grad, 0.0)
  for key, value in metrics.items():
    assert np.isfinite(value), key


def test_jit_with_static_name_and_config_matches_eager():
  config = make_config("token_sum_norm")
  inputs = make_inputs(12, name="grpo_token_tis")
  jitted = jax.jit(objectives.policy_loss, static_argnames=("name", "config"))
  loss, metrics = jitted("grpo_token_tis", config=config, **inputs)
  eager_loss, eager_metrics = objectives.policy_loss("grpo_token_tis", config=config, **inputs)
  np.testing.assert_allclose(loss, eager_loss, rtol=1e-6)
  for key, value in eager_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)


def test_low_precision_inputs_give_float32_loss():
  inputs = make_inputs(8)
  config = make_config("token_mean")
  bf16_inputs = dict(inputs, **{k: jnp.asarray(inputs[k], jnp.bfloat16)
                                for k in ("logp", "logp_old", "logp_sampler")})
  loss, metrics = objectives.policy_loss("grpo_token_tis", config=config, **bf16_inputs)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(value.dtype == jnp.float32 for value in metrics.values())


def test_bool_and_float_masks_agree():
  inputs = make_inputs(9)
  config = make_config("seq_mean_token_sum")
  losses = [objectives.policy_loss("grpo_seq_mis", config=config, **dict(inputs, mask=mask))[0]
            for mask in (inputs["mask"], inputs["mask"] > 0, inputs["mask"].astype(np.float32))]
  assert losses[0] == losses[1] == losses[2]


def test_aggregate_matches_reference():
  rng = np.random.default_rng(11)
  per_token = rng.normal(size=(B, T)).astype(np.float32)
  mask = make_inputs(11)["mask"]
  for aggregation in objectives.AGGREGATIONS:
    coefficients = _aggregation_weights(mask, aggregation, MAX_RESPONSE_LEN)
    got = objectives.aggregate(per_token, mask, aggregation, max_response_len=MAX_RESPONSE_LEN)
    np.testing.assert_allclose(got, (coefficients * per_token).sum(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Configuration and errors.


def test_config_is_hashable_and_defaults():
  config = objectives.LossConfig()
  assert hash(config) == hash(objectives.LossConfig())
  assert (config.clip_eps_low, config.clip_eps_high, config.token_is_cap, config.seq_is_cap,
          config.gspo_eps_low, config.gspo_eps_high, config.aggregation,
          config.max_response_len) == (0.2, 0.2, 2.0, 10.0, 3e-4, 4e-4, "token_mean", None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(aggregation="mean"), r"aggregation='mean': allowed: token_mean, "
                               r"seq_mean_token_sum, seq_mean_token_mean, token_sum_norm"),
    (dict(aggregation="token_sum_norm"), r"max_response_len=None: aggregation 'token_sum_norm' "
                                         r"\(Dr.GRPO\) needs it"),
    (dict(max_response_len=0), r"max_response_len=0: must be an integer >= 1"),
    (dict(token_is_cap=0.0), r"token_is_cap=0.0: must be a finite number > 0"),
    (dict(seq_is_cap=-1.0), r"seq_is_cap=-1.0: must be a finite number > 0"),
    (dict(clip_eps_low=-0.1), r"clip_eps_low=-0.1: must be a finite number >= 0"),
    (dict(gspo_eps_high=-1e-4), r"gspo_eps_high=-0.0001: must be a finite number >= 0"),
])
def test_config_errors(kwargs, message):
  with pytest.raises(FieldProblems, match=message):
    objectives.LossConfig(**kwargs)


def test_config_lists_every_bad_field():
  with pytest.raises(FieldProblems) as error:
    objectives.LossConfig(token_is_cap=0.0, clip_eps_low=-0.1)
  assert [p.field for p in error.value.problems] == ["token_is_cap", "clip_eps_low"]


def test_unknown_algorithm_lists_allowed():
  with pytest.raises(ValueError, match=r"Unknown policy loss 'ppo'; allowed: grpo, .*pg_seq_mis"):
    objectives.policy_loss("ppo", **make_inputs(0))


def test_shape_errors():
  inputs = make_inputs(0)
  message = r"logp_old has shape \(16, 5\), but mask has shape \(16, 8\)"
  with pytest.raises(ValueError, match=message):
    objectives.policy_loss("grpo", **dict(inputs, logp_old=inputs["logp_old"][:, :5]))
  with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
    objectives.policy_loss("grpo", **dict(inputs, advantages=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"Unknown aggregation 'sum'"):
    objectives.aggregate(inputs["logp"], inputs["mask"], "sum")
