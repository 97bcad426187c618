"""Policy-gradient losses with and without training-inference mismatch correction.

Every loss is a pure, jittable function of per-token arrays of shape [B, T] (see docs/design.md,
"Algorithms"):

- ``logp``: log pi of each sampled token under the current parameters (the one differentiated).
- ``logp_old``: log pi under the parameters that generated the batch (trainer recompute).
- ``logp_sampler``: log mu, recorded by the inference engine at sampling time.
- ``mask``: 1 on response tokens, 0 on padding.

Notation: ``r_t = exp(logp - logp_old)``, ``rho_t = exp(logp_old - logp_sampler)``,
``rho = exp(sum_t (logp_old - logp_sampler))`` over a sequence's tokens, ``C`` a cap, ``sg`` stop-
gradient. Every importance-sampling (IS) weight is wrapped in ``sg``.

Numerics: the losses are computed in float32 whatever the input dtype. Values at masked-out
positions are replaced by 0.0 before any arithmetic, so padding may hold anything (even inf/NaN).
Log-ratios are summed in log space and clamped at ``MAX_LOG_WEIGHT_F32`` before exponentiating, so
extreme ratios stay finite; a ratio above the clamp gets no gradient. A masked-out IS weight (MIS)
is an exact 0.0, not a product with a non-finite value.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from rl_fp16.config_checks import FieldChecks
from rl_fp16.names import ALGORITHMS  # pylint: disable=unused-import (re-exported)

AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_mean",
    "token_sum_norm",
)

# Metric keys returned by `policy_loss` for every algorithm (0.0 where one does not apply).
METRIC_NAMES = (
    "train/clip_frac",
    "train/ratio_mean",
    "is/token_weight_mean",
    "is/seq_weight_mean",
    "is/frac_truncated",
    "is/frac_masked",
)

# Log-ratios are clamped here before exponentiating: exp(80) ~ 5.5e34 < float32 max ~ 3.4e38.
MAX_LOG_WEIGHT_F32 = 80.0

SURROGATES = ("ppo_clip", "gspo", "pg")
CORRECTIONS = ("none", "token_tis", "token_mis", "seq_is", "seq_tis", "seq_mis")

# Each algorithm is a surrogate objective times a mismatch correction (docs/design.md,
# "Algorithms"). The correction's weight is computed from the behaviour log-prob against the
# sampler's: logp_old for the clipped surrogates (r_t already corrects pi vs old), sg(logp) for pg.
ALGORITHM_PARTS = {
    "grpo": ("ppo_clip", "none"),
    "grpo_token_tis": ("ppo_clip", "token_tis"),
    "grpo_token_mis": ("ppo_clip", "token_mis"),
    "grpo_seq_mis": ("ppo_clip", "seq_mis"),
    "gspo": ("gspo", "none"),
    "pg": ("pg", "none"),
    "pg_seq_is": ("pg", "seq_is"),
    "pg_seq_tis": ("pg", "seq_tis"),
    "pg_seq_mis": ("pg", "seq_mis"),
}
assert set(ALGORITHM_PARTS) == set(ALGORITHMS), "every algorithm is a (surrogate, correction)"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Hyper-parameters of `policy_loss`; frozen and hashable, so it can be a static jit argument.

  Attributes:
    clip_eps_low: PPO clip, lower side: r_t is clipped to [1 - clip_eps_low, 1 + clip_eps_high].
    clip_eps_high: PPO clip, upper side.
    token_is_cap: C for the token-level IS weights (GRPO-Token-TIS / -MIS).
    seq_is_cap: C for the sequence-level IS weights (GRPO-Seq-MIS, PG-Seq-TIS / -MIS).
    gspo_eps_low: GSPO clip, lower side: s is clipped to [1 - gspo_eps_low, 1 + gspo_eps_high].
    gspo_eps_high: GSPO clip, upper side.
    aggregation: how per-token losses become a scalar; one of `AGGREGATIONS`.
    max_response_len: the constant length of Dr.GRPO's ``token_sum_norm``; required by it only.
  """

  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  token_is_cap: float = 2.0
  seq_is_cap: float = 10.0
  gspo_eps_low: float = 3e-4
  gspo_eps_high: float = 4e-4
  aggregation: str = "token_mean"
  max_response_len: int | None = None

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.choice("aggregation", AGGREGATIONS)
    for name in ("token_is_cap", "seq_is_cap"):
      checks.number(name, above=0)
    for name in ("clip_eps_low", "clip_eps_high", "gspo_eps_low", "gspo_eps_high"):
      checks.number(name, at_least=0)
    if self.max_response_len is not None:
      checks.integer("max_response_len", 1)
    checks.check(self.aggregation != "token_sum_norm" or self.max_response_len is not None,
                 "max_response_len", "aggregation 'token_sum_norm' (Dr.GRPO) needs it")
    checks.done()


def _check_aggregation(aggregation, max_response_len):
  """Raises ValueError for an unknown aggregation or a missing / bad max_response_len."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"Unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
  if max_response_len is not None and (
      isinstance(max_response_len, bool) or not isinstance(max_response_len, numbers.Integral)
      or max_response_len <= 0):
    raise ValueError(f"max_response_len must be a positive int or None, got {max_response_len!r}")
  if aggregation == "token_sum_norm" and max_response_len is None:
    raise ValueError("aggregation 'token_sum_norm' (Dr.GRPO) needs max_response_len, got None")


def _exp_clamped(log_value):
  """exp(min(log_value, MAX_LOG_WEIGHT_F32)): finite in float32 for any finite input."""
  return jnp.exp(jnp.minimum(log_value, MAX_LOG_WEIGHT_F32))


def _masked_mean(values, valid):
  """Mean of ``values`` over ``valid`` entries (0.0 when none); float32 scalar."""
  total = jnp.sum(jnp.where(valid, values, 0.0))
  count = jnp.sum(valid.astype(jnp.float32))
  return (total / jnp.maximum(count, 1.0)).astype(jnp.float32)


def aggregate(per_token_loss, mask, aggregation, *, max_response_len=None):
  """Reduces a per-token loss to a scalar.

  Args:
    per_token_loss: float [B, T].
    mask: [B, T], nonzero on tokens that count. Masked-out entries are ignored (even if non-finite).
    aggregation: one of `AGGREGATIONS`:
      ``token_mean``: sum(L * M) / max(sum(M), 1);
      ``seq_mean_token_sum``: mean over sequences with >= 1 token of sum_t L * M;
      ``seq_mean_token_mean``: mean over those sequences of sum_t L * M / n_tokens;
      ``token_sum_norm`` (Dr.GRPO): sum(L * M) / (B * max_response_len).
    max_response_len: the constant of ``token_sum_norm``.

  Returns:
    float32 scalar. Fully masked rows contribute nothing; an all-masked batch gives 0.0.
  """
  valid = jnp.asarray(mask) > 0
  per_token_loss = jnp.where(valid, jnp.asarray(per_token_loss, jnp.float32), 0.0)
  denominator = aggregation_denominator(mask, aggregation, max_response_len=max_response_len)
  if aggregation == "seq_mean_token_mean":
    tokens_per_seq = jnp.sum(valid.astype(jnp.float32), axis=1)
    seq_means = jnp.sum(per_token_loss, axis=1) / jnp.maximum(tokens_per_seq, 1.0)
    return (jnp.sum(seq_means) / denominator).astype(jnp.float32)
  return (jnp.sum(per_token_loss) / denominator).astype(jnp.float32)


def aggregation_denominator(mask, aggregation, *, max_response_len=None) -> jax.Array:
  """What `aggregate` divides its sum by, float32 scalar (at least 1): the tokens (token_mean),
  the sequences with >= 1 token (seq_mean_*), or B * max_response_len (token_sum_norm).

  Rows split into parts: sum over parts of aggregate(part) * denominator(part) / denominator(all)
  is aggregate(all), up to rounding (an empty part adds 0)."""
  _check_aggregation(aggregation, max_response_len)
  valid = jnp.asarray(mask) > 0
  tokens_per_seq = jnp.sum(valid.astype(jnp.float32), axis=1)
  if aggregation == "token_mean":
    return jnp.maximum(jnp.sum(tokens_per_seq), 1.0)
  if aggregation == "token_sum_norm":
    return jnp.asarray(valid.shape[0] * max_response_len, jnp.float32)
  return jnp.maximum(jnp.sum((tokens_per_seq > 0).astype(jnp.float32)), 1.0)


def metric_counts(name, mask) -> dict[str, jax.Array]:
  """How many entries each of `policy_loss(name, ...)`'s metrics averages over, float32 scalars
  keyed by `METRIC_NAMES`: the valid tokens, or the non-empty sequences for the sequence-level
  IS metrics. Rows split into parts: the count-weighted mean of the parts' metrics is the
  whole's."""
  valid = jnp.asarray(mask) > 0
  tokens = jnp.sum(valid.astype(jnp.float32))
  sequences = jnp.sum((jnp.sum(valid, axis=1) > 0).astype(jnp.float32))
  _, correction = ALGORITHM_PARTS[name]
  per_sequence = {"is/seq_weight_mean"}
  if correction.startswith("seq"):
    per_sequence |= {"is/frac_truncated", "is/frac_masked"}
  return {key: sequences if key in per_sequence else tokens for key in METRIC_NAMES}


def _ppo_term(ratio, advantages, eps_low, eps_high):
  """PPO clipped surrogate f_t = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

  Returns:
    f: float32 [B, T]; clipped: bool [B, T], True where the clipped branch is the smaller one (the
    token gets no gradient).
  """
  clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  unclipped_term = ratio * advantages
  clipped_term = clipped_ratio * advantages
  return jnp.minimum(unclipped_term, clipped_term), clipped_term < unclipped_term


def _correction_weight(correction, behaviour_logp, logp_sampler, valid, config):
  """The applied IS weight sg(w) [B, T] of `correction` and its `is/*` metrics.

  Token corrections weight each token by rho_t = exp(behaviour_t - sampler_t) (cap
  ``token_is_cap``); sequence corrections weight every token of a sequence by
  rho = exp(sum_t (behaviour_t - sampler_t)) (cap ``seq_is_cap``). TIS truncates at the cap, MIS
  zeroes weights above it, IS applies rho as is.
  """
  if correction == "none":
    return jnp.ones(valid.shape, jnp.float32), {}
  metrics = {}
  kind, _, rule = correction.partition("_")
  log_ratio = behaviour_logp - logp_sampler
  if kind == "token":
    raw, cap, counted = (jax.lax.stop_gradient(_exp_clamped(log_ratio)), config.token_is_cap,
                         valid)
  else:
    raw = jax.lax.stop_gradient(_exp_clamped(jnp.sum(log_ratio, axis=1)))
    cap, counted = config.seq_is_cap, jnp.sum(valid, axis=1) > 0
  over_cap = (raw > cap).astype(jnp.float32)
  if rule == "tis":
    weight = jnp.minimum(raw, cap)
    metrics["is/frac_truncated"] = _masked_mean(over_cap, counted)
  elif rule == "mis":
    weight = jnp.where(raw > cap, 0.0, raw)
    metrics["is/frac_masked"] = _masked_mean(over_cap, counted)
  else:  # is
    weight = raw
  metrics[f"is/{kind}_weight_mean"] = _masked_mean(weight, counted)
  if kind == "seq":
    weight = jnp.broadcast_to(weight[:, None], valid.shape)
  return weight, metrics


def _surrogate_term(surrogate, logp, logp_old, ratio, advantages, valid, config):
  """The per-token surrogate f_t [B, T] (loss is -weight * f_t) and where its clip is active
  (bool [B, T], or None for pg)."""
  if surrogate == "ppo_clip":
    return _ppo_term(ratio, advantages, config.clip_eps_low, config.clip_eps_high)
  if surrogate == "gspo":
    tokens_per_seq = jnp.sum(valid.astype(jnp.float32), axis=1)
    log_seq_ratio = jnp.sum(logp - logp_old, axis=1) / jnp.maximum(tokens_per_seq, 1.0)
    seq_ratio = _exp_clamped(jax.lax.stop_gradient(log_seq_ratio))
    token_seq_ratio = seq_ratio[:, None] * jnp.exp(logp - jax.lax.stop_gradient(logp))
    return _ppo_term(token_seq_ratio, advantages, config.gspo_eps_low, config.gspo_eps_high)
  return advantages * logp, None  # pg


def policy_loss(name, *, logp, logp_old, logp_sampler, advantages, mask, config=LossConfig()):
  """Policy loss ``name`` aggregated by ``config.aggregation``.

  Per-token losses (A = advantage, broadcast over tokens when sequence-level):

  - ``grpo``: -f_t, the PPO clipped surrogate without mismatch correction.
  - ``grpo_token_tis``: -min(rho_t, C) f_t, C = ``token_is_cap``.
  - ``grpo_token_mis``: -rho_t 1{rho_t <= C} f_t, C = ``token_is_cap``.
  - ``grpo_seq_mis``: -rho 1{rho <= C} f_t, C = ``seq_is_cap``.
  - ``gspo``: the GSPO-token form. s = exp(mean_t (logp - logp_old)) over the sequence's tokens,
    s_t = sg(s) exp(logp_t - sg(logp_t)) (value s, d s_t / d logp_t = s), and the per-token loss
    is -min(s_t A, clip(s_t, 1 - gspo_eps_low, 1 + gspo_eps_high) A). For sequence-level A every
    token of a sequence holds the sequence-form value -min(s A, clip(s) A), and the mean over its
    tokens has the sequence form's gradient; so under ``seq_mean_token_mean`` value and gradient
    equal GSPO's sequence form exactly (other aggregations weight sequences differently).
  - ``pg``: -A logp (vanilla REINFORCE, no IS).
  - ``pg_seq_is``: -w A logp with w = exp(sum_t (sg(logp) - logp_sampler)).
  - ``pg_seq_tis``: -min(w, C) A logp, C = ``seq_is_cap``.
  - ``pg_seq_mis``: -w 1{w <= C} A logp, C = ``seq_is_cap``.

  Args:
    name: one of `ALGORITHMS` (static under jit).
    logp: float [B, T], differentiated.
    logp_old: float [B, T].
    logp_sampler: float [B, T].
    advantages: float [B] (sequence-level) or [B, T] (token-level).
    mask: [B, T], nonzero on response tokens (bool, int or float 0/1).
    config: a `LossConfig` (static under jit).

  Returns:
    (loss, metrics): loss a float32 scalar; metrics a dict with exactly the keys `METRIC_NAMES`,
    each a float32 scalar: ``train/clip_frac`` (fraction of tokens where the PPO or GSPO clip is
    active), ``train/ratio_mean`` (mean r_t over tokens), ``is/token_weight_mean`` (mean applied
    token IS weight, after truncation / masking), ``is/seq_weight_mean`` (mean applied sequence IS
    weight over non-empty sequences), ``is/frac_truncated`` (TIS: fraction of tokens or sequences
    whose weight exceeds C), ``is/frac_masked`` (MIS: likewise). Keys that do not apply are 0.0.

  Raises:
    ValueError: unknown ``name``, or arrays of the wrong shape.
  """
  if name not in ALGORITHMS:
    raise ValueError(f"Unknown policy loss {name!r}; allowed: {', '.join(ALGORITHMS)}")
  if not isinstance(config, LossConfig):
    raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be 2-D [B, T], got shape {mask.shape}")
  for arg_name, array in (("logp", logp), ("logp_old", logp_old), ("logp_sampler", logp_sampler)):
    if jnp.shape(array) != mask.shape:
      raise ValueError(f"{arg_name} has shape {jnp.shape(array)}, but mask has shape {mask.shape}; "
                       "they must agree")
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.shape == mask.shape[:1]:
    advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
  elif advantages.shape != mask.shape:
    raise ValueError(f"advantages has shape {advantages.shape}; expected [B] = {mask.shape[:1]} or "
                     f"[B, T] = {mask.shape}")

  valid = mask > 0
  # Zero every masked-out value first, so padding (even inf/NaN) never reaches the arithmetic.
  logp = jnp.where(valid, jnp.asarray(logp, jnp.float32), 0.0)
  logp_old = jnp.where(valid, jnp.asarray(logp_old, jnp.float32), 0.0)
  logp_sampler = jnp.where(valid, jnp.asarray(logp_sampler, jnp.float32), 0.0)
  advantages = jnp.where(valid, advantages, 0.0)

  surrogate, correction = ALGORITHM_PARTS[name]
  ratio = _exp_clamped(logp - logp_old)
  metrics = dict.fromkeys(METRIC_NAMES, jnp.zeros((), jnp.float32))
  metrics["train/ratio_mean"] = _masked_mean(ratio, valid)
  behaviour_logp = jax.lax.stop_gradient(logp) if surrogate == "pg" else logp_old
  is_weight, is_metrics = _correction_weight(correction, behaviour_logp, logp_sampler, valid,
                                             config)
  metrics.update(is_metrics)
  term, clipped = _surrogate_term(surrogate, logp, logp_old, ratio, advantages, valid, config)
  if clipped is not None:
    metrics["train/clip_frac"] = _masked_mean(clipped.astype(jnp.float32), valid)
  per_token_loss = -is_weight * term

  loss = aggregate(per_token_loss, valid, config.aggregation,
                   max_response_len=config.max_response_len)
  return loss, metrics
