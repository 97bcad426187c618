"""Training-inference mismatch metrics: how far the trainer's pi is from the sampler's mu.

Host-side NumPy, computed in float64. Every function takes per-token arrays of shape [B, T]:
``logp_old`` (log pi of each sampled token, recomputed by the trainer under the parameters that
sampled it: the RL batch's logp_old), ``logp_sampler`` (log mu, recorded by the inference engine
at sampling time) and ``mask`` (0/1, 1 on response tokens).

A token is *valid* when it is masked in and both log-probabilities are finite. Non-finite values
at masked positions are counted (``mismatch/nonfinite_*``) and the token is left out of every other
statistic; a row's sequence statistics use its valid tokens only, and rows without a valid token
are left out of sequence statistics.
"""

from __future__ import annotations

import numpy as np

# Log-weights are clipped here before exponentiating, so that exp() stays finite in float64.
MAX_LOG_WEIGHT_F64 = 700.0

_PERCENTILES = (1, 50, 99)

METRIC_NAMES = (
    "mismatch/prob_diff_mean",
    "mismatch/prob_diff_max",
    "mismatch/sampler_minus_trainer_max",
    "mismatch/sampler_minus_trainer_min",
    "mismatch/logp_diff_mean",
    "mismatch/logp_diff_max",
    "mismatch/equal_frac",
    "mismatch/kl_k1",
    "mismatch/kl_k2",
    "mismatch/kl_k3",
    "mismatch/seq_log_ratio_mean",
    "mismatch/seq_log_ratio_abs_mean",
    "mismatch/seq_log_ratio_p1",
    "mismatch/seq_log_ratio_p50",
    "mismatch/seq_log_ratio_p99",
    "mismatch/seq_log_ratio_slope_per_1k",
    "is/token_weight_p1",
    "is/token_weight_p50",
    "is/token_weight_p99",
    "is/token_weight_max",
    "is/token_weight_min",
    "is/seq_weight_p1",
    "is/seq_weight_p50",
    "is/seq_weight_p99",
    "is/seq_weight_max",
    "mismatch/prob_pearson",
    "mismatch/nonfinite_trainer",
    "mismatch/nonfinite_sampler",
    "mismatch/num_tokens",
    "mismatch/num_sequences",
)


def _validated(logp_old, logp_sampler, mask):
  """Checks shapes and returns (logp_old, logp_sampler) float64 [B, T] and mask bool [B, T]."""
  arrays = {"logp_old": np.asarray(logp_old), "logp_sampler": np.asarray(logp_sampler),
            "mask": np.asarray(mask)}
  for name, array in arrays.items():
    if array.ndim != 2:
      raise ValueError(f"{name} must be 2-D [B, T], got shape {array.shape}")
  expected = arrays["logp_old"].shape
  for name in ("logp_sampler", "mask"):
    if arrays[name].shape != expected:
      raise ValueError(f"{name} has shape {arrays[name].shape}, but logp_old has shape "
                       f"{expected}; they must agree")
  mask_values = arrays["mask"].astype(np.float64)
  if not np.all((mask_values == 0.0) | (mask_values == 1.0)):
    raise ValueError("mask must hold only 0 and 1")
  return (arrays["logp_old"].astype(np.float64), arrays["logp_sampler"].astype(np.float64),
          mask_values == 1.0)


def _valid_and_sanitized(logp_old, logp_sampler, mask):
  """Validates the inputs and keeps the valid tokens.

  Returns:
    trainer, sampler: float64 [B, T], the log-probabilities with 0.0 outside ``valid``.
    valid: bool [B, T], masked in and both log-probabilities finite.
    nonfinite_trainer, nonfinite_sampler: int, non-finite values at masked positions.
  """
  logp_old, logp_sampler, mask = _validated(logp_old, logp_sampler, mask)
  trainer_finite = np.isfinite(logp_old)
  sampler_finite = np.isfinite(logp_sampler)
  valid = mask & trainer_finite & sampler_finite
  return (np.where(valid, logp_old, 0.0), np.where(valid, logp_sampler, 0.0), valid,
          int(np.sum(mask & ~trainer_finite)), int(np.sum(mask & ~sampler_finite)))


def _clipped_exp(log_values: np.ndarray) -> np.ndarray:
  """exp() of float64 values clipped above at MAX_LOG_WEIGHT_F64, so the result is finite."""
  return np.exp(np.minimum(log_values, MAX_LOG_WEIGHT_F64))


def sequence_log_ratios(logp_old, logp_sampler, mask) -> tuple[np.ndarray, np.ndarray]:
  """Per-sequence log(pi / mu) and length, for rows with at least one valid token.

  Args:
    logp_old: float [B, T], log pi of each sampled token.
    logp_sampler: float [B, T], log mu of each sampled token.
    mask: 0/1 [B, T], 1 on response tokens.

  Returns:
    log_ratio: float64 [B'], sum over the row's valid tokens of (logp_old - logp_sampler).
    length: int64 [B'], number of valid tokens in the row. B' counts rows with a valid token.
  """
  trainer, sampler, valid, _, _ = _valid_and_sanitized(logp_old, logp_sampler, mask)
  length = valid.sum(axis=1).astype(np.int64)
  log_ratio = (trainer - sampler).sum(axis=1)
  has_tokens = length > 0
  return log_ratio[has_tokens], length[has_tokens]


def log_ratio_by_position(logp_old, logp_sampler, mask) -> tuple[np.ndarray, np.ndarray]:
  """Mean |logp_old - logp_sampler| at each response position, over rows valid there.

  Args:
    logp_old: float [B, T], log pi of each sampled token.
    logp_sampler: float [B, T], log mu of each sampled token.
    mask: 0/1 [B, T], 1 on response tokens.

  Returns:
    mean_abs_delta: float64 [T], 0.0 at positions without a valid token.
    count: int64 [T], number of valid tokens at each position.
  """
  trainer, sampler, valid, _, _ = _valid_and_sanitized(logp_old, logp_sampler, mask)
  count = valid.sum(axis=0).astype(np.int64)
  abs_delta_sum = np.abs(trainer - sampler).sum(axis=0)
  mean_abs_delta = abs_delta_sum / np.maximum(count, 1)
  return mean_abs_delta, count


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation of float64 [N] vectors; 1.0 / 0.0 when one is constant (equal / not)."""
  x_constant = x.max() == x.min()
  y_constant = y.max() == y.min()
  if x_constant or y_constant:
    return 1.0 if np.array_equal(x, y) else 0.0
  x_centered = x - x.mean()
  y_centered = y - y.mean()
  denominator = np.sqrt(np.sum(x_centered**2) * np.sum(y_centered**2))
  if denominator == 0.0:  # Variance underflowed although the values differ.
    return 0.0
  return float(np.clip(np.sum(x_centered * y_centered) / denominator, -1.0, 1.0))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
  """Least-squares slope of float64 [N] y against x; 0.0 with fewer than 2 distinct x."""
  if np.unique(x).size < 2:
    return 0.0
  x_centered = x - x.mean()
  return float(np.sum(x_centered * (y - y.mean())) / np.sum(x_centered**2))


def mismatch_metrics(logp_old, logp_sampler, mask) -> dict[str, float]:
  """Mismatch statistics between trainer (pi) and sampler (mu) on the sampled tokens.

  With log_r = logp_old - logp_sampler and p = exp(logp), per valid token (masked in, both
  log-probabilities finite): |p_trainer - p_sampler| mean/max; (p_sampler - p_trainer) max/min;
  |log_r| mean/max; the fraction of tokens whose two log-probabilities are equal bit for bit;
  the KL(mu || pi) estimators k1 = mean(-log_r), k2 = mean(log_r^2 / 2),
  k3 = mean(exp(log_r) - 1 - log_r); token IS weights exp(log_r) quantiles/max/min; the Pearson
  correlation of p_trainer and p_sampler. Per sequence (rows with a valid token), the log ratio
  sum(log_r): mean, mean |.|, quantiles and least-squares slope against length per 1K tokens, and
  sequence IS weights exp(sum(log_r)) quantiles/max.

  Non-finite log-probabilities at masked positions are counted in ``mismatch/nonfinite_trainer``
  and ``mismatch/nonfinite_sampler`` and excluded from every other statistic (the token counts in
  neither ``mismatch/num_tokens`` nor its row's length). Log-weights are clipped above at
  ``MAX_LOG_WEIGHT_F64`` before exponentiating, so weights stay finite. Quantiles use NumPy's linear
  interpolation. With no valid token every statistic is 0.0.

  Args:
    logp_old: float [B, T], log pi of each sampled token.
    logp_sampler: float [B, T], log mu of each sampled token.
    mask: 0/1 [B, T], 1 on response tokens.

  Returns:
    A flat dict from each name in ``METRIC_NAMES`` to a Python float.

  Raises:
    ValueError: if an argument is not 2-D, the shapes differ, or mask holds values other than 0/1.
  """
  trainer, sampler, valid, nonfinite_trainer, nonfinite_sampler = _valid_and_sanitized(
      logp_old, logp_sampler, mask)
  metrics = {name: 0.0 for name in METRIC_NAMES}
  metrics["mismatch/nonfinite_trainer"] = float(nonfinite_trainer)
  metrics["mismatch/nonfinite_sampler"] = float(nonfinite_sampler)
  num_tokens = int(valid.sum())
  if num_tokens == 0:
    return metrics

  token_logp_old = trainer[valid]
  token_logp_sampler = sampler[valid]
  token_log_ratio = token_logp_old - token_logp_sampler
  prob_trainer = _clipped_exp(token_logp_old)
  prob_sampler = _clipped_exp(token_logp_sampler)
  sampler_minus_trainer = prob_sampler - prob_trainer
  abs_prob_diff = np.abs(sampler_minus_trainer)
  abs_log_ratio = np.abs(token_log_ratio)
  token_weight = _clipped_exp(token_log_ratio)

  metrics.update({
      "mismatch/prob_diff_mean": abs_prob_diff.mean(),
      "mismatch/prob_diff_max": abs_prob_diff.max(),
      "mismatch/sampler_minus_trainer_max": sampler_minus_trainer.max(),
      "mismatch/sampler_minus_trainer_min": sampler_minus_trainer.min(),
      "mismatch/logp_diff_mean": abs_log_ratio.mean(),
      "mismatch/logp_diff_max": abs_log_ratio.max(),
      "mismatch/equal_frac": np.mean(token_logp_old == token_logp_sampler),
      "mismatch/kl_k1": np.mean(-token_log_ratio),
      "mismatch/kl_k2": np.mean(0.5 * token_log_ratio**2),
      "mismatch/kl_k3": np.mean(token_weight - 1.0 - token_log_ratio),
      "is/token_weight_max": token_weight.max(),
      "is/token_weight_min": token_weight.min(),
      "mismatch/prob_pearson": _pearson(prob_trainer, prob_sampler),
      "mismatch/num_tokens": num_tokens,
  })
  for q, value in zip(_PERCENTILES, np.percentile(token_weight, _PERCENTILES)):
    metrics[f"is/token_weight_p{q}"] = value

  length = valid.sum(axis=1)
  has_tokens = length > 0
  seq_log_ratio = (trainer - sampler).sum(axis=1)[has_tokens]
  seq_length = length[has_tokens].astype(np.float64)
  seq_weight = _clipped_exp(seq_log_ratio)
  metrics.update({
      "mismatch/seq_log_ratio_mean": seq_log_ratio.mean(),
      "mismatch/seq_log_ratio_abs_mean": np.abs(seq_log_ratio).mean(),
      "mismatch/seq_log_ratio_slope_per_1k": 1000.0 * _slope(seq_length, seq_log_ratio),
      "is/seq_weight_max": seq_weight.max(),
      "mismatch/num_sequences": seq_log_ratio.size,
  })
  for q, value in zip(_PERCENTILES, np.percentile(seq_log_ratio, _PERCENTILES)):
    metrics[f"mismatch/seq_log_ratio_p{q}"] = value
  for q, value in zip(_PERCENTILES, np.percentile(seq_weight, _PERCENTILES)):
    metrics[f"is/seq_weight_p{q}"] = value
  return {name: float(value) for name, value in metrics.items()}
