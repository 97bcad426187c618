"""Tests for rl_fp16.mismatch against values worked out by hand."""

import math

import numpy as np
import pytest

from rl_fp16 import mismatch

# Any warning (overflow, invalid value, empty mean) fails a test.
pytestmark = pytest.mark.filterwarnings("error")

LN2 = math.log(2.0)

# Two rows; the last token of row 1 is padding holding garbage that must be ignored.
# Per-token ratios p_trainer / p_sampler on the 5 masked tokens: 1, 1/2, 2 | 2, 1, so
# log_r = [0, -ln2, ln2 | ln2, 0] and the token weights are [1, 0.5, 2 | 2, 1].
PROB_TRAINER = np.array([[0.5, 0.25, 0.8], [0.2, 0.9, 1.0]])
PROB_SAMPLER = np.array([[0.5, 0.5, 0.4], [0.1, 0.9, 1.0]])
MASK = np.array([[1, 1, 1], [1, 1, 0]])


def _case():
  logp_old = np.log(PROB_TRAINER)
  logp_sampler = np.log(PROB_SAMPLER)
  logp_old[1, 2] = -50.0  # Padding.
  return logp_old, logp_sampler, MASK.copy()


def _expected_case_metrics():
  """Every metric of _case(), each from a line of arithmetic on the numbers above."""
  # Pearson by hand: means 2.65 / 5 = 0.53 and 2.4 / 5 = 0.48;
  # trainer deviations [-0.03, -0.28, 0.27, -0.33, 0.37], sampler [0.02, 0.02, -0.08, -0.38, 0.42].
  covariance_sum = -0.0006 - 0.0056 - 0.0216 + 0.1254 + 0.1554
  trainer_ss = 0.0009 + 0.0784 + 0.0729 + 0.1089 + 0.1369
  sampler_ss = 0.0004 + 0.0004 + 0.0064 + 0.1444 + 0.1764
  return {
      # |p_t - p_s| = [0, 0.25, 0.4, 0.1, 0].
      "mismatch/prob_diff_mean": (0.25 + 0.4 + 0.1) / 5,
      "mismatch/prob_diff_max": 0.4,
      # p_s - p_t = [0, 0.25, -0.4, -0.1, 0].
      "mismatch/sampler_minus_trainer_max": 0.25,
      "mismatch/sampler_minus_trainer_min": -0.4,
      "mismatch/logp_diff_mean": 3 * LN2 / 5,
      "mismatch/logp_diff_max": LN2,
      "mismatch/equal_frac": 2 / 5,  # tokens 0 and 4: log_r == 0
      # sum(log_r) = ln2.
      "mismatch/kl_k1": -LN2 / 5,
      "mismatch/kl_k2": 0.5 * 3 * LN2**2 / 5,
      # w - 1 - log_r = [0, 0.5 - 1 + ln2, 2 - 1 - ln2, 2 - 1 - ln2, 0].
      "mismatch/kl_k3": ((0.5 - 1 + LN2) + 2 * (2 - 1 - LN2)) / 5,
      # Sequence log ratios [0, ln2] with lengths [3, 2].
      "mismatch/seq_log_ratio_mean": LN2 / 2,
      "mismatch/seq_log_ratio_abs_mean": LN2 / 2,
      "mismatch/seq_log_ratio_p1": 0.01 * LN2,
      "mismatch/seq_log_ratio_p50": 0.5 * LN2,
      "mismatch/seq_log_ratio_p99": 0.99 * LN2,
      "mismatch/seq_log_ratio_slope_per_1k": 1000 * (0.0 - LN2) / (3 - 2),
      # Sorted token weights [0.5, 1, 1, 2, 2]; p1 sits at 0.04 of the way from index 0 to 1.
      "is/token_weight_p1": 0.5 + 0.04 * (1 - 0.5),
      "is/token_weight_p50": 1.0,
      "is/token_weight_p99": 2.0,
      "is/token_weight_max": 2.0,
      "is/token_weight_min": 0.5,
      # Sequence weights [1, 2].
      "is/seq_weight_p1": 1.01,
      "is/seq_weight_p50": 1.5,
      "is/seq_weight_p99": 1.99,
      "is/seq_weight_max": 2.0,
      "mismatch/prob_pearson": covariance_sum / math.sqrt(trainer_ss * sampler_ss),
      "mismatch/nonfinite_trainer": 0.0,
      "mismatch/nonfinite_sampler": 0.0,
      "mismatch/num_tokens": 5.0,
      "mismatch/num_sequences": 2.0,
  }


def _assert_metrics(actual, expected):
  assert set(actual) == set(expected)
  for name, value in expected.items():
    assert type(actual[name]) is float, name  # pylint: disable=unidiomatic-typecheck
    assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_metric_names_are_the_documented_ones():
  assert set(mismatch.METRIC_NAMES) == set(_expected_case_metrics())
  assert len(mismatch.METRIC_NAMES) == len(set(mismatch.METRIC_NAMES))


def test_hand_computed_case():
  _assert_metrics(mismatch.mismatch_metrics(*_case()), _expected_case_metrics())


def test_float32_and_bool_mask_inputs():
  logp_old, logp_sampler, mask = _case()
  metrics = mismatch.mismatch_metrics(logp_old.astype(np.float32),
                                      logp_sampler.astype(np.float32), mask.astype(bool))
  for name, value in _expected_case_metrics().items():
    assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_identical_inputs():
  rng = np.random.default_rng(0)
  logp = rng.uniform(-5.0, 0.0, size=(4, 6))
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 2 + [0] * 4])
  metrics = mismatch.mismatch_metrics(logp, logp.copy(), mask)
  ones = {"is/token_weight_p1", "is/token_weight_p50", "is/token_weight_p99", "is/token_weight_max",
          "is/token_weight_min", "is/seq_weight_p1", "is/seq_weight_p50", "is/seq_weight_p99",
          "is/seq_weight_max", "mismatch/prob_pearson", "mismatch/equal_frac"}
  counts = {"mismatch/num_tokens": 17.0, "mismatch/num_sequences": 4.0}
  for name in mismatch.METRIC_NAMES:
    expected = 1.0 if name in ones else counts.get(name, 0.0)
    assert metrics[name] == pytest.approx(expected, abs=1e-12), name


def test_fully_masked_row_is_ignored():
  logp_old, logp_sampler, mask = _case()
  logp_old = np.concatenate([logp_old, [[np.nan, -3.0, 7.0]]])
  logp_sampler = np.concatenate([logp_sampler, [[-np.inf, -1.0, 0.0]]])
  mask = np.concatenate([mask, [[0, 0, 0]]])
  _assert_metrics(mismatch.mismatch_metrics(logp_old, logp_sampler, mask),
                  _expected_case_metrics())


def test_nonfinite_values_are_counted_and_excluded():
  logp_old, logp_sampler, mask = _case()
  # Row 2: every masked token has a non-finite value, so the row drops out entirely.
  logp_old = np.concatenate([logp_old, [[np.nan, math.log(0.5), -np.inf]]])
  logp_sampler = np.concatenate([logp_sampler, [[math.log(0.5), np.inf, math.log(0.5)]]])
  mask = np.concatenate([mask, [[1, 1, 1]]])
  # Column 3: NaN at a masked position of row 0 (its length stays 3), inf in padding elsewhere.
  logp_old = np.concatenate([logp_old, [[np.nan], [np.inf], [0.0]]], axis=1)
  logp_sampler = np.concatenate([logp_sampler, [[0.0], [0.0], [-np.inf]]], axis=1)
  mask = np.concatenate([mask, [[1], [0], [0]]], axis=1)
  expected = _expected_case_metrics()
  expected["mismatch/nonfinite_trainer"] = 3.0  # nan, -inf in row 2; nan in row 0.
  expected["mismatch/nonfinite_sampler"] = 1.0  # inf in row 2.
  _assert_metrics(mismatch.mismatch_metrics(logp_old, logp_sampler, mask), expected)


@pytest.mark.parametrize("shape", [(2, 3), (0, 3), (2, 0)])
def test_no_valid_token_gives_zeros(shape):
  logp = np.full(shape, np.nan)
  metrics = mismatch.mismatch_metrics(logp, logp, np.zeros(shape))
  assert metrics == {name: 0.0 for name in mismatch.METRIC_NAMES}


def test_only_nonfinite_tokens_are_counted_and_the_rest_is_zero():
  metrics = mismatch.mismatch_metrics([[np.nan, 0.0]], [[-1.0, np.inf]], [[1, 1]])
  expected = {name: 0.0 for name in mismatch.METRIC_NAMES}
  expected["mismatch/nonfinite_trainer"] = 1.0
  expected["mismatch/nonfinite_sampler"] = 1.0
  assert metrics == expected


def test_slope_is_zero_with_one_distinct_length():
  logp_old = np.log([[0.5, 0.5], [0.5, 0.5]])
  logp_sampler = np.log([[0.25, 0.5], [0.5, 0.5]])
  metrics = mismatch.mismatch_metrics(logp_old, logp_sampler, np.ones((2, 2)))
  assert metrics["mismatch/seq_log_ratio_slope_per_1k"] == 0.0
  assert metrics["mismatch/seq_log_ratio_mean"] == pytest.approx(LN2 / 2)


def test_pearson_with_constant_probabilities():
  constant = np.log([[0.5, 0.5, 0.5]])
  varying = np.log([[0.25, 0.5, 0.75]])
  ones = np.ones((1, 3))
  assert mismatch.mismatch_metrics(constant, constant, ones)["mismatch/prob_pearson"] == 1.0
  assert mismatch.mismatch_metrics(constant, varying, ones)["mismatch/prob_pearson"] == 0.0
  assert mismatch.mismatch_metrics(varying, constant, ones)["mismatch/prob_pearson"] == 0.0
  other_constant = np.log([[0.25, 0.25, 0.25]])
  assert mismatch.mismatch_metrics(constant, other_constant, ones)["mismatch/prob_pearson"] == 0.0


def test_huge_log_ratios_stay_finite():
  logp_old = np.array([[0.0, 0.0, -1.0]])
  logp_sampler = np.array([[-1000.0, -800.0, -1.0]])
  metrics = mismatch.mismatch_metrics(logp_old, logp_sampler, np.ones((1, 3)))
  assert all(math.isfinite(value) for value in metrics.values())
  assert metrics["is/token_weight_max"] == pytest.approx(math.exp(700.0))
  assert metrics["is/seq_weight_max"] == pytest.approx(math.exp(700.0))
  assert metrics["mismatch/logp_diff_max"] == 1000.0


def test_sequence_log_ratios():
  log_ratio, length = mismatch.sequence_log_ratios(*_case())
  np.testing.assert_allclose(log_ratio, [0.0, LN2], atol=1e-12)
  np.testing.assert_array_equal(length, [3, 2])
  assert length.dtype == np.int64


def test_sequence_log_ratios_skips_empty_rows():
  log_ratio, length = mismatch.sequence_log_ratios(
      [[-1.0, -2.0], [-1.0, np.nan], [0.0, 0.0]], [[-1.5, -2.0], [-1.0, -1.0], [0.0, 0.0]],
      [[1, 1], [0, 1], [0, 0]])
  np.testing.assert_allclose(log_ratio, [0.5])
  np.testing.assert_array_equal(length, [2])


def test_log_ratio_by_position():
  mean_abs_delta, count = mismatch.log_ratio_by_position(*_case())
  # |log_r| by position: [0, ln2], [ln2, 0], [ln2].
  np.testing.assert_allclose(mean_abs_delta, [LN2 / 2, LN2 / 2, LN2], atol=1e-12)
  np.testing.assert_array_equal(count, [2, 2, 1])


def test_log_ratio_by_position_empty_position_is_zero():
  mean_abs_delta, count = mismatch.log_ratio_by_position(
      [[-1.0, np.nan, 0.0]], [[-3.0, -1.0, 0.0]], [[1, 1, 0]])
  np.testing.assert_allclose(mean_abs_delta, [2.0, 0.0, 0.0])
  np.testing.assert_array_equal(count, [1, 0, 0])


@pytest.mark.parametrize("function", [mismatch.mismatch_metrics, mismatch.sequence_log_ratios,
                                      mismatch.log_ratio_by_position])
def test_bad_shapes_raise(function):
  good = np.zeros((2, 3))
  with pytest.raises(ValueError, match=r"logp_old must be 2-D.*\(3,\)"):
    function(np.zeros(3), good, good)
  with pytest.raises(ValueError, match=r"mask must be 2-D.*\(2, 3, 1\)"):
    function(good, good, np.zeros((2, 3, 1)))
  with pytest.raises(ValueError, match=r"logp_sampler has shape \(2, 4\).*\(2, 3\)"):
    function(good, np.zeros((2, 4)), good)
  with pytest.raises(ValueError, match=r"mask has shape \(3, 2\).*\(2, 3\)"):
    function(good, good, np.zeros((3, 2)))


def test_mask_must_be_zero_or_one():
  good = np.zeros((1, 2))
  with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
    mismatch.mismatch_metrics(good, good, [[1, 2]])
