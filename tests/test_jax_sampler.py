"""The in-process JAX sampler against the trainer's full-sequence forward."""

import jax
import numpy as np
import pytest

from rl_fp16.models import ModelConfig, init_params, token_logprobs
from rl_fp16.precision import get_policy
from rl_fp16.sampling import Rollout
from rl_fp16.sampling.jax_sampler import SamplingConfig, generate, process_logits

CONFIG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True, eos_token_id=1, initializer_range=0.2)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


def _sample(params, precision, *, n=4, max_new_tokens=24, seed=1, **sampling):
  return generate(CONFIG, params, PROMPTS, policy=get_policy(precision, "sampler"), n=n,
                  sampling=SamplingConfig(max_new_tokens=max_new_tokens, **sampling),
                  rng=jax.random.key(seed))


def _trainer_logp(params, rollout: Rollout, precision, temperature=1.0):
  tokens, attention_mask, _ = rollout.full_sequence()
  logp = token_logprobs(CONFIG, params, tokens, policy=get_policy(precision),
                        attention_mask=attention_mask, temperature=temperature)
  return np.asarray(logp)[:, rollout.prompt_tokens.shape[1]:]


def test_rollout_is_well_formed_and_deterministic(params):
  rollout = _sample(params, "fp32")
  assert rollout.response_tokens.shape == (len(PROMPTS) * 4, 24)
  np.testing.assert_array_equal(rollout.prompt_index, np.repeat(np.arange(3), 4))
  # Masks are a prefix of ones; finish reason eos iff the last kept token is an eos.
  for row in range(rollout.batch_size):
    length = rollout.response_lengths[row]
    assert np.all(rollout.response_mask[row, :length] == 1)
    assert np.all(rollout.response_mask[row, length:] == 0)
    ends_with_eos = length > 0 and rollout.response_tokens[row, length - 1] == 1
    assert (rollout.finish_reasons[row] == "eos") == ends_with_eos
    assert np.all(rollout.logp_sampler[row, length:] == 0)
  assert np.all(rollout.logp_sampler[rollout.response_mask > 0] <= 0)
  again = _sample(params, "fp32")
  np.testing.assert_array_equal(rollout.response_tokens, again.response_tokens)
  other = _sample(params, "fp32", seed=2)
  assert not np.array_equal(rollout.response_tokens, other.response_tokens)


def test_fp32_sampler_matches_trainer(params):
  for temperature in (1.0, 0.7):
    rollout = _sample(params, "fp32", temperature=temperature)
    diff = np.abs(_trainer_logp(params, rollout, "fp32", temperature) - rollout.logp_sampler)
    diff = diff[rollout.response_mask > 0]
    assert diff.mean() <= 1e-5 and diff.max() <= 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_sampler_differs_but_is_bounded(params, precision):
  rollout = _sample(params, precision)
  logp_old = _trainer_logp(params, rollout, precision)
  diff = np.abs(logp_old - rollout.logp_sampler)[rollout.response_mask > 0]
  assert diff.max() > 0  # the mismatch this project studies
  assert diff.mean() < 0.05 and diff.max() < 1.0
  # Both engines in low precision are far from the fp32 reference by more than the fp32 noise.
  reference = _trainer_logp(params, rollout, "fp32")
  assert np.abs(reference - rollout.logp_sampler)[rollout.response_mask > 0].max() > 1e-4


def test_eos_stops_and_length_cap(params):
  policy, sampling = get_policy("fp32", "sampler"), SamplingConfig(max_new_tokens=8)
  # Every token is an eos: every row stops after one token.
  rollout = generate(CONFIG, params, PROMPTS, policy=policy, n=2, sampling=sampling,
                     rng=jax.random.key(0), eos_token_ids=list(range(CONFIG.vocab_size)))
  assert set(rollout.finish_reasons) == {"eos"} and np.all(rollout.response_lengths == 1)
  # No eos: every row runs to the cap.
  rollout = generate(CONFIG, params, PROMPTS, policy=policy, n=2, sampling=sampling,
                     rng=jax.random.key(0), eos_token_ids=[])
  assert set(rollout.finish_reasons) == {"length"} and np.all(rollout.response_lengths == 8)


def test_top_k_and_top_p_restrict_support():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  topk = np.asarray(process_logits(logits, temperature=1.0, top_p=1.0, top_k=2, use_top_p=False))
  assert np.isfinite(topk[0, :2]).all() and np.isneginf(topk[0, 2:]).all()
  topp = np.asarray(process_logits(logits, temperature=1.0, top_p=0.7, top_k=0, use_top_p=True))
  assert np.isfinite(topp[0, :2]).all() and np.isneginf(topp[0, 2:]).all()
  # logp under the renormalised kept set.
  logp = np.asarray(jax.nn.log_softmax(topp))[0, :2]
  np.testing.assert_allclose(np.exp(logp), [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)


def test_top_k_sampling_stays_in_support(params):
  rollout = _sample(params, "fp32", top_k=3, max_new_tokens=8)
  # Every sampled token is among the 3 most likely under the trainer.
  tokens, mask, _ = rollout.full_sequence()
  from rl_fp16.models import forward
  logits = np.asarray(forward(CONFIG, params, tokens, policy=get_policy("fp32"),
                              attention_mask=mask))
  p = rollout.prompt_tokens.shape[1]
  for row in range(rollout.batch_size):
    for t in range(rollout.response_lengths[row]):
      top3 = np.argsort(logits[row, p + t - 1])[-3:]
      assert rollout.response_tokens[row, t] in top3


def test_bad_inputs_are_named(params):
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=1.5)
  with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
    generate(CONFIG, params, [[3, 99]], policy=get_policy("fp32"), n=1,
             sampling=SamplingConfig(max_new_tokens=2), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="empty"):
    generate(CONFIG, params, [[]], policy=get_policy("fp32"), n=1,
             sampling=SamplingConfig(max_new_tokens=2), rng=jax.random.key(0))
