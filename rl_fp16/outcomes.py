r"""The long runs' registered outcomes, computed from a run's metrics (docs/long_runs_preregistration.md,
"Outcomes and their definitions"; nothing here was chosen after seeing a long-run result).

Per run (`run_outcomes`), with R(t) the mean of `reward/mean` over steps t-19..t (t >= 20):
peak P = max R(t), final F = R(last step), time to solve = first t with R(t) >= 0.95, collapse =
F <= P - 0.2 or a non-finite loss or 20 consecutive skipped optimizer updates, and the mismatch
growth G = mean over the last 20 steps / mean over the first 20 (`mismatch/prob_diff_mean`,
`mismatch/kl_k3`). Per arm against a control arm (`arm_verdict`): "collapses", "degrades" or "no
detectable effect". Across arms (`window_ratios`): the per-20-step-window ratio of two arms'
seed-median metric (hypotheses H3, H4).

Every function takes pandas DataFrames as `rl_fp16.results.read_metrics` returns them (a `step`
column, one float column per metric) and returns plain Python values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

WINDOW = 20  # steps per smoothing window and per growth window
SOLVED_REWARD = 0.95  # the paper's "sound algorithm" level
COLLAPSE_DROP = 0.2  # F <= P - COLLAPSE_DROP is a collapse
SKIPPED_RUN = 20  # this many consecutive skipped optimizer updates is a collapse
DEGRADE_GAP = 0.05  # the smallest median gap in F that counts as a degradation
GROWTH_METRICS = ("mismatch/prob_diff_mean", "mismatch/kl_k3")


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
  if name not in frame:
    raise KeyError(f"metric {name!r} not in the run's metrics (have {len(frame.columns)} columns, "
                   f"e.g. {sorted(frame.columns)[:5]})")
  return frame.sort_values("step")[name].to_numpy(np.float64)


def fmt(value, spec: str = ".3f") -> str:
  """`value` formatted with `spec` for a report table; "-" for None or NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return format(value, spec)


def smoothed_reward(frame: pd.DataFrame, window: int = WINDOW) -> pd.Series:
  """R(t): trailing mean of `reward/mean` over `window` steps, indexed by step; NaN before the
  window is full (t < window, counting the run's first logged step as 1)."""
  frame = frame.sort_values("step")
  values = frame["reward/mean"].rolling(window, min_periods=window).mean()
  return pd.Series(values.to_numpy(), index=frame["step"].to_numpy(), name="R")


def longest_skipped_run(frame: pd.DataFrame) -> int:
  """Upper bound on the longest run of consecutive skipped optimizer updates.

  The metrics give, per RL step, the number of skipped updates (`train/skipped_steps`) and the
  cumulative number of updates (`train/updates`), not their order within the step, so a step's
  skips are counted as adjacent to its neighbours' (an upper bound, i.e. collapse by skipping is
  flagged liberally).
  """
  skipped = np.nan_to_num(_column(frame, "train/skipped_steps"))
  updates = np.diff(_column(frame, "train/updates"), prepend=0.0)
  longest = current = 0
  for skips, total in zip(skipped, updates):
    if total > 0 and skips >= total:  # every update of this step skipped: the run goes on
      current += int(skips)
    else:
      longest = max(longest, current + int(skips))
      current = int(skips)  # a partly skipped step may start a run with its trailing skips
    longest = max(longest, current)
  return longest


def growth(frame: pd.DataFrame, metric: str, window: int = WINDOW) -> float:
  """G: mean of `metric` over the last `window` steps / its mean over the first `window`."""
  values = _column(frame, metric)
  if len(values) < 2 * window:
    return math.nan
  first, last = np.nanmean(values[:window]), np.nanmean(values[-window:])
  return float(last / first) if first > 0 else math.nan


def metric_over_run(frame: pd.DataFrame, metric: str, how: str = "mean") -> float:
  """`how` ("mean", "max": a pandas Series reduction) of `metric` over the run's steps, its
  non-finite values left out; NaN when the run does not log it or logs no finite value."""
  if metric not in frame:
    return math.nan
  values = pd.to_numeric(frame[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
  return float(getattr(values, how)()) if values.notna().any() else math.nan


def run_outcomes(frame: pd.DataFrame, *, window: int = WINDOW) -> dict[str, Any]:
  """The registered per-run outcomes: P, F, time to solve, collapse (and why), G per metric,
  and the last held-out accuracy if the run evaluated one."""
  reward = smoothed_reward(frame, window)
  peak = float(reward.max()) if reward.notna().any() else math.nan
  final = float(reward.iloc[-1]) if len(reward) else math.nan
  solved = reward.index[reward.to_numpy() >= SOLVED_REWARD]
  steps = frame.sort_values("step")["step"].to_numpy()
  loss = _column(frame, "train/loss")
  reasons = []
  if final <= peak - COLLAPSE_DROP:
    reasons.append(f"F {final:.3f} <= P {peak:.3f} - {COLLAPSE_DROP}")
  if not np.all(np.isfinite(loss)):
    reasons.append(f"non-finite loss at step {int(steps[~np.isfinite(loss)][0])}")
  skipped_run = longest_skipped_run(frame)
  if skipped_run >= SKIPPED_RUN:
    reasons.append(f"{skipped_run} consecutive skipped updates")
  out = {"steps": int(steps[-1]), "P": peak, "F": final,
         "time_to_solve": int(solved[0]) if len(solved) else None,
         "collapse": bool(reasons), "collapse_reasons": reasons,
         "longest_skipped_run": skipped_run}
  for metric in GROWTH_METRICS:
    out[f"G[{metric}]"] = growth(frame, metric, window)
  if "eval/accuracy" in frame:
    evaluated = frame.dropna(subset=["eval/accuracy"]).sort_values("step")
    if len(evaluated):
      out["eval_accuracy_final"] = float(evaluated["eval/accuracy"].iloc[-1])
      out["eval_accuracy_first"] = float(evaluated["eval/accuracy"].iloc[0])
  return out


def arm_verdict(arm: Sequence[dict[str, Any]], control: Sequence[dict[str, Any]]) -> str:
  """The registered comparison of an arm's seeds with a control arm's (each a `run_outcomes`):

  "collapses" if at least 2 of 3 (generally: a majority of) the arm's seeds collapse and no
  control seed does; "degrades" if every arm seed's F is below every control seed's F and the
  median gap is at least `DEGRADE_GAP`; else "no detectable effect".
  """
  if not arm or not control:
    raise ValueError(f"need seeds in both arms, got {len(arm)} and {len(control)}")
  collapsed = sum(o["collapse"] for o in arm)
  if 2 * collapsed > len(arm) and not any(o["collapse"] for o in control):
    return "collapses"
  finals, control_finals = [o["F"] for o in arm], [o["F"] for o in control]
  if (max(finals) < min(control_finals)
      and float(np.median(control_finals) - np.median(finals)) >= DEGRADE_GAP):
    return "degrades"
  return "no detectable effect"


def growth_direction(growths: Sequence[float], *, up: float = 2.0, down: float = 0.5) -> str:
  """H2's reading of G over seeds: "grows" (all > up), "shrinks" (all < down) or "flat"."""
  if growths and all(g > up for g in growths):
    return "grows"
  if growths and all(g < down for g in growths):
    return "shrinks"
  return "flat"


def window_means(frame: pd.DataFrame, metric: str, window: int = WINDOW) -> pd.Series:
  """Mean of `metric` per `window`-step window (steps 1-20, 21-40, ...), indexed by the
  window's last step."""
  frame = frame.sort_values("step")
  index = (frame["step"].to_numpy() - 1) // window
  means = frame[metric].groupby(index).mean()
  return pd.Series(means.to_numpy(), index=(means.index.to_numpy() + 1) * window, name=metric)


def window_ratios(numerator: Sequence[pd.DataFrame], denominator: Sequence[pd.DataFrame],
                  metric: str, window: int = WINDOW) -> pd.Series:
  """Per window: median over the numerator arm's seeds of the window mean of `metric`, divided
  by the same for the denominator arm (H3: bf16 / fp16 mismatch; H4: IS-weight tails)."""
  def seed_median(frames):
    return pd.concat([window_means(f, metric, window) for f in frames], axis=1).median(axis=1)
  return (seed_median(numerator) / seed_median(denominator)).dropna()
