"""Emulated precision: `round_to_bits`, the `eK` / `eKxE` policies, and their calibration against
the real dtypes on the committed tiny base (docs/dose_response.md)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16.models import ModelConfig, forward, init_params, residual_stream_cached
from rl_fp16.models import token_logprobs
from rl_fp16.precision import get_policy, round_to_bits


def _values(n=100_000, seed=0):
  """Random normal values spread over many binades, plus exact ties and special values."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
  ties = np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11,
                     2 - 2**-9, 0.0, -0.0])
  return np.concatenate([x, ties])


def test_bits_8_is_a_bfloat16_cast():
  x = _values()
  expected = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(round_to_bits(jnp.asarray(x), 8)), expected)


def test_bits_11_is_a_float16_cast():
  x = _values(seed=1)
  in_range = (np.abs(x) >= 2.0**-14) & (np.abs(x) <= 65504)
  # Float32's exponent range: equal to a float16 cast wherever float16 values are normal.
  np.testing.assert_array_equal(np.asarray(round_to_bits(jnp.asarray(x), 11))[in_range],
                                x[in_range].astype(np.float16).astype(np.float32))
  # Float16's range (5 exponent bits): equal everywhere, subnormals and overflow to inf included.
  with np.errstate(over="ignore"):
    expected = x.astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(round_to_bits(jnp.asarray(x), 11, 5)), expected)


def test_ties_to_even_specials_and_identity():
  x = jnp.float32([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20])
  np.testing.assert_array_equal(round_to_bits(x, 8), [1.0, 1 + 2**-6, 1 + 2**-7])
  special = jnp.float32([np.inf, -np.inf, np.nan, 3.4e38])
  out = np.asarray(round_to_bits(special, 8))
  assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == np.inf
  assert np.isnan(np.asarray(round_to_bits(special, 11, 5))[2])
  x = _values(seed=2)
  np.testing.assert_array_equal(np.asarray(round_to_bits(jnp.asarray(x), 24)), x)


@pytest.mark.parametrize("bits", [2, 4, 6, 9, 16, 23])
def test_error_is_at_most_half_an_ulp(bits):
  x = _values(10_000, seed=bits)
  y = np.asarray(round_to_bits(jnp.asarray(x), bits)).astype(np.float64)
  rel = np.abs(y - x) / np.maximum(np.abs(x), 1e-30)
  assert rel.max() <= 2.0**-bits
  # The result has at most `bits` significand bits.
  mantissa, _ = np.frexp(y)
  np.testing.assert_array_equal(mantissa * 2.0**bits, np.round(mantissa * 2.0**bits))


def test_gradient_is_straight_through_with_rounded_cotangent():
  x = jnp.float32([1.0, 2.0, 3.0])
  g = jax.grad(lambda v: jnp.sum(round_to_bits(v, 8) * jnp.float32(1 + 2**-10)))(x)
  # d/dx is 1, and the cotangent (1 + 2^-10) is rounded to 8 bits: 1.
  np.testing.assert_array_equal(g, [1.0, 1.0, 1.0])


def test_presets():
  policy = get_policy("e8")
  assert policy.is_emulated and policy.significand_bits == 8 and policy.exponent_bits == 8
  assert policy.compute_dtype == jnp.float32 and policy.param_dtype == jnp.float32
  assert not policy.needs_loss_scaling and get_policy("e11x5").needs_loss_scaling
  assert get_policy("e8", "sampler") == policy
  assert not get_policy("bf16").is_emulated


CONFIG = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, initializer_range=0.2)
MOE = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                  moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  initializer_range=0.2)


@pytest.mark.parametrize("config", [CONFIG, MOE], ids=["dense", "moe"])
def test_decoder_e24_is_fp32_and_e8_errs_like_bf16(config):
  params = init_params(config, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 24))
  logits = {name: np.asarray(forward(config, params, tokens, policy=get_policy(name)),
                             np.float32) for name in ("fp32", "e24", "e8", "bf16")}
  np.testing.assert_array_equal(logits["e24"], logits["fp32"])
  err = {name: np.abs(logits[name] - logits["fp32"]).mean() for name in ("e8", "bf16")}
  assert 0 < err["e8"] and 1 / 3 < err["e8"] / err["bf16"] < 3, err


def test_trainer_gradient_runs_under_emulation():
  params = init_params(CONFIG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))

  def loss(p, name):
    return -jnp.mean(token_logprobs(CONFIG, p, tokens, policy=get_policy(name)))

  grads = {name: jax.grad(loss)(params, name) for name in ("fp32", "e8")}
  flat = {k: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
          for k, g in grads.items()}
  assert np.all(np.isfinite(flat["e8"]))
  rel = np.linalg.norm(flat["e8"] - flat["fp32"]) / np.linalg.norm(flat["fp32"])
  assert 0 < rel < 0.1, rel



@pytest.mark.parametrize("bitwise", [False, True], ids=["normal", "bitwise"])
def test_e4_trainer_gradient_is_straight_through_with_cotangents_in_the_format(bitwise):
  """How a 4-bit trainer learns: each weight is rounded where it is used, so its gradient is the
  straight-through cotangent rounded to 4 significand bits. It reaches every weight (a rounding
  with derivative 0 would give none) and points as the float32 gradient does."""
  params = init_params(CONFIG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))

  def loss(p, policy):
    return -jnp.mean(token_logprobs(CONFIG, p, tokens, policy=policy))

  grads_e4 = jax.grad(loss)(params, get_policy("e4", bitwise=bitwise))
  grads_fp32 = jax.grad(loss)(params, get_policy("fp32"))
  for (path, g), g_fp32 in zip(jax.tree_util.tree_leaves_with_path(grads_e4),
                               jax.tree_util.tree_leaves(grads_fp32)):
    g, g_fp32 = np.asarray(g), np.asarray(g_fp32)
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
    significand, _ = np.frexp(g)
    np.testing.assert_array_equal(significand * 2**4, np.round(significand * 2**4), err_msg=name)
    cosine = np.sum(g * g_fp32) / (np.linalg.norm(g) * np.linalg.norm(g_fp32))
    assert cosine > 0.5, (name, cosine)

# ------------------------------------------------------------------------------ calibration ----

BASE_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "assets", "tiny_base")


@pytest.fixture(scope="module")
def base_sequences():
  """The committed tiny base and 8 responses it sampled (fp32 JAX engine) to 4 task prompts."""
  if not os.path.isdir(BASE_DIR):
    pytest.skip("the committed tiny base model is missing")
  from experiments import common  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.engines import JaxEngine  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling.jax_sampler import SamplingConfig  # pylint: disable=g-import-not-at-top
  model = common.load_policy_model(BASE_DIR)
  engine = JaxEngine(model.config, model.params, get_policy("fp32", "sampler"),
                     eos_token_ids=model.eos_token_ids)
  rollout = engine.generate(model.make_prompts(4, 0), n=2, seed=0,
                            sampling=SamplingConfig(max_new_tokens=96, temperature=1.0))
  tokens, attention_mask, loss_mask = rollout.full_sequence()
  return model, tokens, attention_mask, loss_mask[:, 1:] > 0


def _engine_path_logp(model, tokens, attention_mask, policy):
  """log p of each next token along the KV-cache path (the JAX engine's), one token at a time."""
  _, logits = residual_stream_cached(model.config, policy, model.params, jnp.asarray(tokens),
                                     jnp.asarray(attention_mask))
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0])


def test_calibration_fp32_trainer_vs_emulated_sampler(base_sequences):
  """Same tokens, fp32 trainer (full sequence) vs each sampler precision (KV-cache path): the mean
  |delta log p| of k = 8 is within 2x of real bf16's, k = 11 of fp16's (measured: 0.92x and 0.90x
  on these 768 tokens). k = 24 is fp32 bit for bit (test_decoder_e24_is_fp32...)."""
  model, tokens, attention_mask, response = base_sequences
  trainer = np.asarray(token_logprobs(model.config, model.params, tokens,
                                      policy=get_policy("fp32"),
                                      attention_mask=attention_mask))[:, 1:]
  mismatch = {}
  for name in ("bf16", "e8", "fp16", "e11"):
    sampler = _engine_path_logp(model, tokens, attention_mask, get_policy(name, "sampler"))
    mismatch[name] = float(np.abs(trainer - sampler)[response].mean())
  assert 0.5 < mismatch["e8"] / mismatch["bf16"] < 2, mismatch
  assert 0.5 < mismatch["e11"] / mismatch["fp16"] < 2, mismatch
  assert mismatch["e11"] < mismatch["e8"] / 4, mismatch


# ------------------------------------------------------------------------ the dose-response ----


def test_dose_response_sweep_lists_every_arm():
  from experiments.dose_response import config  # pylint: disable=g-import-not-at-top
  arms = list(config.sweep(seeds=(0, 1)))
  assert len(arms) == 3 * (8 + 2) * 2
  assert {a["precision"] for a in arms} == {f"fp32-e{k}" for k in (4, 5, 6, 7, 8, 9, 11, 24)} | {
      "fp32-bf16", "fp32-fp16"}
  seq_mis = [a for a in arms if a["algorithm"] == "grpo_seq_mis"]
  assert seq_mis and all(a["loss"]["seq_is_cap"] == 10.0 and a["advantage"] == "drgrpo"
                         for a in seq_mis)


@pytest.mark.slow
def test_dose_response_arm_runs_one_step(tiny_task_model_dir, tmp_path):
  """One RL step of one arm (fp32 trainer, 6-bit sampler, GRPO-Seq-MIS) through experiments.rl."""
  from experiments import common, rl  # pylint: disable=g-import-not-at-top
  from experiments.dose_response import config  # pylint: disable=g-import-not-at-top
  from rl_fp16 import results  # pylint: disable=g-import-not-at-top
  arm = next(a for a in config.sweep(algorithms=("grpo_seq_mis",), bits=(6,)))
  arm_config = config.get_config()
  common.merge_overrides(arm_config, arm)
  arm_config.update(dict(model=tiny_task_model_dir, steps=1, prompts_per_step=2,
                         samples_per_prompt=4, num_minibatches=2, max_new_tokens=16,
                         learning_rate=1e-3,
                         output_dir=str(tmp_path / "{algorithm}_{precision}_seed{seed}")))
  summary = rl.run(arm_config)
  assert summary["run_dir"].endswith("grpo_seq_mis_fp32-e6_seed0")
  frame = results.read_metrics(summary["run_dir"])
  assert list(frame["step"]) == [1]
  assert frame["mismatch/prob_diff_mean"].iloc[0] > 0  # the 6-bit sampler disagrees with fp32
  assert np.isfinite(frame["train/loss"]).all()
