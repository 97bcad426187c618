"""The long runs' registered outcomes (rl_fp16/outcomes.py) on metrics with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from rl_fp16 import outcomes


def run_frame(reward, *, steps=None, skipped=None, updates_per_step=4, loss=None, mismatch=None,
              kl=None, eval_every=None):
  """A metrics frame as `results.read_metrics` returns it, for a run with these per-step values."""
  n = len(reward)
  step = np.arange(1, n + 1) if steps is None else np.asarray(steps)
  skipped = np.zeros(n) if skipped is None else np.asarray(skipped, float)
  frame = pd.DataFrame({
      "step": step,
      "reward/mean": np.asarray(reward, float),
      "train/skipped_steps": skipped,
      "train/updates": np.cumsum(np.full(n, updates_per_step, float)),
      "train/loss": np.zeros(n) if loss is None else np.asarray(loss, float),
      "mismatch/prob_diff_mean": np.full(n, 1e-4) if mismatch is None else np.asarray(mismatch),
      "mismatch/kl_k3": np.full(n, 1e-6) if kl is None else np.asarray(kl),
  })
  if eval_every:
    acc = np.full(n, np.nan)
    acc[eval_every - 1::eval_every] = np.linspace(0.5, 0.8, len(acc[eval_every - 1::eval_every]))
    frame["eval/accuracy"] = acc
  return frame


def test_a_run_that_climbs_and_holds_is_solved_and_not_collapsed():
  reward = np.concatenate([np.linspace(0.4, 1.0, 100), np.ones(200)])
  out = outcomes.run_outcomes(run_frame(reward, eval_every=25))
  assert out["steps"] == 300
  assert out["P"] == pytest.approx(1.0) and out["F"] == pytest.approx(1.0)
  assert not out["collapse"] and out["collapse_reasons"] == []
  # R(t) is the trailing 20-step mean: it first reaches 0.95 a few steps after the raw reward does.
  raw_first = int(np.argmax(reward >= 0.95)) + 1
  assert raw_first < out["time_to_solve"] <= 110
  assert out["eval_accuracy_first"] == pytest.approx(0.5)
  assert out["eval_accuracy_final"] == pytest.approx(0.8)


def test_a_drop_of_more_than_point_two_from_the_peak_is_a_collapse_and_less_is_not():
  rise = np.linspace(0.4, 0.9, 100)
  collapsed = outcomes.run_outcomes(run_frame(np.concatenate([rise, np.full(200, 0.65)])))
  held = outcomes.run_outcomes(run_frame(np.concatenate([rise, np.full(200, 0.75)])))
  assert collapsed["collapse"] and "F 0.650" in collapsed["collapse_reasons"][0]
  assert not held["collapse"]
  assert collapsed["time_to_solve"] is None


def test_smoothing_needs_a_full_window():
  reward = outcomes.smoothed_reward(run_frame(np.arange(30, dtype=float)))
  assert reward.loc[:19].isna().all()
  assert reward.loc[20] == pytest.approx(np.mean(np.arange(20)))
  assert reward.loc[30] == pytest.approx(np.mean(np.arange(10, 30)))


def test_a_non_finite_loss_is_a_collapse_that_names_its_step():
  loss = np.zeros(40)
  loss[33] = np.nan
  out = outcomes.run_outcomes(run_frame(np.full(40, 0.8), loss=loss))
  assert out["collapse"] and out["collapse_reasons"] == ["non-finite loss at step 34"]


def test_twenty_consecutive_skipped_updates_are_a_collapse_across_steps():
  skipped = np.zeros(60)
  skipped[10:15] = 4  # 5 fully skipped steps x 4 updates = 20 in a row
  out = outcomes.run_outcomes(run_frame(np.full(60, 0.8), skipped=skipped))
  assert out["longest_skipped_run"] == 20 and out["collapse"]
  skipped[12] = 3  # one update in the middle went through: at most 2 x 4 + 3 + ... < 20
  out = outcomes.run_outcomes(run_frame(np.full(60, 0.8), skipped=skipped))
  assert out["longest_skipped_run"] < 20 and not out["collapse"]


def test_growth_is_the_last_window_over_the_first():
  mismatch = np.concatenate([np.full(20, 1e-4), np.full(60, 2e-4), np.full(20, 5e-4)])
  out = outcomes.run_outcomes(run_frame(np.full(100, 0.8), mismatch=mismatch))
  assert out["G[mismatch/prob_diff_mean]"] == pytest.approx(5.0)
  assert out["G[mismatch/kl_k3]"] == pytest.approx(1.0)
  assert math.isnan(outcomes.growth(run_frame(np.full(30, 0.8)), "mismatch/kl_k3"))


def test_the_arm_verdicts_follow_the_registered_rules():
  def o(final, collapse=False):
    return {"F": final, "collapse": collapse}
  control = [o(0.90), o(0.92), o(0.95)]
  assert outcomes.arm_verdict([o(0.5, True), o(0.6, True), o(0.93)], control) == "collapses"
  # A control seed collapsing too means no "collapses" verdict; F still separates completely.
  assert outcomes.arm_verdict([o(0.5, True), o(0.6, True), o(0.8)],
                              [o(0.90, True), o(0.92), o(0.95)]) == "degrades"
  assert outcomes.arm_verdict([o(0.80), o(0.84), o(0.86)], control) == "degrades"
  # Complete separation but a median gap under 0.05: not a degradation.
  assert outcomes.arm_verdict([o(0.88), o(0.89), o(0.895)], control) == "no detectable effect"
  # Overlapping seeds: no effect whatever the medians.
  assert outcomes.arm_verdict([o(0.70), o(0.75), o(0.91)], control) == "no detectable effect"
  with pytest.raises(ValueError, match="need seeds in both arms"):
    outcomes.arm_verdict([], control)


def test_growth_direction_needs_every_seed():
  assert outcomes.growth_direction([2.5, 3.0, 2.1]) == "grows"
  assert outcomes.growth_direction([0.3, 0.4, 0.2]) == "shrinks"
  assert outcomes.growth_direction([2.5, 3.0, 1.9]) == "flat"


def test_window_ratios_take_the_seed_median_per_window():
  bf16 = [run_frame(np.full(40, 0.8), mismatch=np.r_[np.full(20, m), np.full(20, 2 * m)])
          for m in (1e-4, 2e-4, 9e-4)]
  fp16 = [run_frame(np.full(40, 0.8), mismatch=np.full(40, 1e-5)) for _ in range(3)]
  ratios = outcomes.window_ratios(bf16, fp16, "mismatch/prob_diff_mean")
  assert list(ratios.index) == [20, 40]
  assert ratios.loc[20] == pytest.approx(20.0) and ratios.loc[40] == pytest.approx(40.0)


def test_a_missing_metric_is_named():
  with pytest.raises(KeyError, match="train/loss"):
    outcomes.run_outcomes(run_frame(np.full(30, 0.8)).drop(columns=["train/loss"]))


def test_metric_over_run_leaves_out_non_finite_values():
  frame = pd.DataFrame({"step": [1, 2, 3, 4], "m": [1.0, np.inf, 3.0, np.nan],
                        "empty": [np.nan, -np.inf, np.nan, np.nan]})
  assert outcomes.metric_over_run(frame, "m") == 2.0
  assert outcomes.metric_over_run(frame, "m", "max") == 3.0
  assert math.isnan(outcomes.metric_over_run(frame, "empty"))
  assert math.isnan(outcomes.metric_over_run(frame, "absent"))
