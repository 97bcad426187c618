"""The dose-response study (experiments/dose_response/: analysis.py, report.py) on synthetic arms
written with RunWriter, whose answers are known by construction."""

import math
import os
import re

import pytest

from experiments.dose_response import analysis
from experiments.dose_response import config
from experiments.dose_response import report
from launch import sweep
from rl_fp16 import outcomes
from rl_fp16 import results

STEPS = 40  # each synthetic arm's config `steps`
COLLAPSING_BITS = (4, 5)
UNFINISHED_BITS = 9  # logs 30 of 40 steps, collapsing within them
PROB_DIFF = "mean[mismatch/prob_diff_mean]"


def mismatch_of(bits: float) -> float:
  """The synthetic mean |pi - mu| of a K-bit sampler: 2^-K (log-linear in K)."""
  return 2.0 ** -bits


def write_arm(root, precision, *, mismatch, collapse=False, steps=STEPS, algorithm="grpo",
              seed=0):
  """An arm whose reward climbs 0.51 -> 0.5 + 0.01 * steps (F = P), or, with `collapse`, holds
  0.9 for 20 steps then 0.3 (P = 0.9, F = 0.3); its mismatch alternates 0.5x and 1.5x `mismatch`
  (mean `mismatch`) and KL k3 is mismatch^2 at each step."""
  run_dir = root / f"{algorithm}_{precision}_seed{seed}"
  settings = {"algorithm": algorithm, "precision": precision, "seed": seed, "steps": STEPS,
              "prompts_per_step": 8}
  with results.RunWriter(run_dir, settings) as writer:
    for step in range(1, steps + 1):
      reward = (0.9 if step <= 20 else 0.3) if collapse else 0.5 + 0.01 * step
      value = mismatch * (0.5 if step % 2 else 1.5)
      writer.write(step, {"reward/mean": reward, "train/loss": 0.1, "train/skipped_steps": 0.0,
                          "train/updates": 4.0 * step, "mismatch/prob_diff_mean": value,
                          "mismatch/kl_k3": value ** 2})
  return run_dir


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """GRPO's 10 arms: K = 4 and 5 collapse, K = 9 is unfinished (and collapses in its 30 steps,
  so analysing it would move "breaks at K" to 9), the rest climb; real bf16 has the mismatch of
  K = 7.5 on the 2^-K curve, real fp16 that of K = 11."""
  root = tmp_path_factory.mktemp("runs") / "dose_response_p8"
  for bits in (4, 5, 6, 7, 8, 9, 11, 24):
    write_arm(root, f"fp32-e{bits}", mismatch=mismatch_of(bits),
              collapse=bits in COLLAPSING_BITS or bits == UNFINISHED_BITS,
              steps=30 if bits == UNFINISHED_BITS else STEPS)
  write_arm(root, "fp32-bf16", mismatch=mismatch_of(7.5))
  write_arm(root, "fp32-fp16", mismatch=mismatch_of(11))
  return root


def grpo_rows(sweep_dir):
  found, ignored = analysis.read_arms([str(sweep_dir)])
  assert not ignored
  expected = [arm for arm in report.expected_arms(follow_ups=False) if arm.algorithm == "grpo"]
  return analysis.place_real(analysis.arm_rows(expected, found, default_steps=150))


def by_precision(rows):
  return {row["precision"]: row for row in rows}


def test_sampler_bits_and_nominal_bits():
  assert analysis.sampler_bits("fp32-e6") == 6 and analysis.sampler_bits("fp32-e24") == 24
  assert analysis.sampler_bits("fp32-bf16") is None and analysis.sampler_bits("fp32-e11x5") is None
  assert analysis.nominal_bits("fp32-bf16") == 8 and analysis.nominal_bits("fp32-fp16") == 11
  assert analysis.nominal_bits("fp32-e6") == 6


def test_expected_arms_are_the_sweeps_30_in_order():
  arms = report.expected_arms(follow_ups=False)
  assert len(arms) == 30 and len(set(arms)) == 30
  assert arms[0] == analysis.Arm("grpo", "fp32-e4", 0)
  assert [a.precision for a in arms[:10]][-3:] == ["fp32-e24", "fp32-bf16", "fp32-fp16"]
  assert {a.algorithm for a in arms} == {"grpo", "grpo_token_tis", "grpo_seq_mis"}


def test_the_seed_1_follow_up_adds_K_4_and_24_per_algorithm_after_the_registered_arms():
  arms = report.expected_arms()
  assert arms[:30] == report.expected_arms(follow_ups=False) and len(set(arms)) == 36
  assert arms[30:] == [analysis.Arm(algorithm, f"fp32-e{k}", 1)
                       for algorithm in ("grpo", "grpo_token_tis", "grpo_seq_mis")
                       for k in (4, 24)]


def test_the_documented_follow_up_command_runs_the_arms_the_report_expects():
  # docs/dose_response.md's seed-1 command passes FOLLOW_UPS as --sweep_arg items; they must not
  # drift.
  docs = os.path.join(os.path.dirname(__file__), "..", "docs", "dose_response.md")
  with open(docs) as f:
    items = re.findall(r"--sweep_arg=(\S+)", f.read())
  assert items, "docs/dose_response.md lists no --sweep_arg command"
  documented = list(config.sweep(**sweep.parse_sweep_args(items, config.sweep)))
  assert documented == [v for kwargs in config.FOLLOW_UPS for v in config.sweep(**kwargs)]


def test_report_lists_a_follow_up_seed_with_its_own_verdict(tmp_path):
  root = tmp_path / "runs"
  write_arm(root, "fp32-e4", mismatch=mismatch_of(4), collapse=True, seed=1)
  write_arm(root, "fp32-e24", mismatch=mismatch_of(24), seed=1)
  out = tmp_path / "report" / "results.md"
  text = report.report(str(root), str(tmp_path / "report" / "data"), str(out),
                         str(tmp_path / "report" / "figures"), default_steps=STEPS)
  assert "Arms: 2 finished, 0 unfinished, 34 missing, of 36." in text
  grpo = text.split("## grpo\n")[1].split("## grpo_token_tis")[0]
  assert "- seed 0: breaks at K not decided: no emulated arm finished yet." in grpo
  assert "- seed 1: **breaks at K = 4** (collapsed: K = 4; 2 of 2 emulated arms finished)." in grpo
  seed_1 = [line for line in grpo.splitlines() if line.startswith("| 4 | `fp32-e4` | 1 |")]
  assert len(seed_1) == 1 and "**yes**: F 0.300 <= P 0.900 - 0.2" in seed_1[0]


def test_arms_collapsing_at_4_and_5_only_break_at_5(sweep_dir):
  rows = by_precision(grpo_rows(sweep_dir))
  assert [k for k in (4, 5, 6, 7, 8, 11, 24) if rows[f"fp32-e{k}"]["collapse"]] == [4, 5]
  assert rows["fp32-e4"]["P"] == pytest.approx(0.9) and rows["fp32-e4"]["F"] == pytest.approx(0.3)
  # A climbing arm: R(40) = mean of 0.5 + 0.01 t over t = 21..40.
  assert rows["fp32-e6"]["F"] == pytest.approx(0.805) == rows["fp32-e6"]["P"]
  verdict = analysis.breaks_at(list(rows.values()))[("grpo", 0)]
  assert verdict["breaks_at"] == 5
  assert verdict["collapsed_bits"] == [4, 5]
  assert verdict["not_finished_bits"] == [UNFINISHED_BITS]


def test_breaks_at_is_the_largest_collapsing_K_and_None_when_none_collapses():
  def row(bits, collapse, status=analysis.FINISHED):
    return {"algorithm": "grpo", "seed": 0, "bits": bits, "status": status, "collapse": collapse}
  assert analysis.breaks_at([row(4, True), row(6, False), row(9, True), row(24, False)])[
      ("grpo", 0)]["breaks_at"] == 9
  assert analysis.breaks_at([row(4, False), row(8, False), row(None, True)])[
      ("grpo", 0)]["breaks_at"] is None  # a real sampler's collapse has no K
  assert analysis.breaks_at([row(4, True), row(11, None, analysis.MISSING)])[("grpo", 0)] == {
      "breaks_at": 4, "collapsed_bits": [4], "finished_bits": [4], "not_finished_bits": [11]}


def test_an_unfinished_arm_is_listed_as_unfinished_and_not_analysed(sweep_dir):
  rows = grpo_rows(sweep_dir)
  row = by_precision(rows)[f"fp32-e{UNFINISHED_BITS}"]
  assert row["status"] == analysis.UNFINISHED and row["steps_done"] == 30
  assert "collapse" not in row and "F" not in row and PROB_DIFF not in row
  frame = analysis.curve_frame(rows)
  assert UNFINISHED_BITS not in set(frame["bits"].dropna())
  assert len(frame) == 9  # 7 finished emulated arms + bf16 + fp16
  # Its 30 logged steps do collapse (R(30) = 0.6 <= 0.9 - 0.2): were it analysed as finished,
  # GRPO would break at K = 9, not 5.
  arm = analysis.Arm("grpo", f"fp32-e{UNFINISHED_BITS}", 0)
  data = analysis.read_arms([str(sweep_dir)])[0][arm]
  assert outcomes.run_outcomes(data.frame)["collapse"]
  assert analysis.breaks_at(rows)[("grpo", 0)]["breaks_at"] == 5


def test_the_real_samplers_land_at_the_K_of_their_mismatch(sweep_dir):
  rows = by_precision(grpo_rows(sweep_dir))
  assert rows["fp32-bf16"][PROB_DIFF] == pytest.approx(mismatch_of(7.5))  # mean of the steps
  assert rows["fp32-bf16"]["placed_bits"] == [pytest.approx(7.5)]
  assert rows["fp32-fp16"]["placed_bits"] == [pytest.approx(11.0)]
  assert "placed_bits" not in rows["fp32-e8"]
  frame = analysis.curve_frame(list(rows.values()))
  fig = report.plot_against_bits(frame, [PROB_DIFF], logy=True)
  placed = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[0].get_lines()}
  xs, ys = placed[f"fp32-bf16 ({PROB_DIFF})"]
  assert xs == [pytest.approx(7.5)] and ys == [pytest.approx(mismatch_of(7.5))]
  xs, _ = placed[f"fp32-fp16 ({PROB_DIFF})"]
  assert xs == [pytest.approx(11.0)]
  curve_x, _ = placed[PROB_DIFF]
  assert curve_x == [4, 5, 6, 7, 8, 11, 24]  # the finished emulated arms only


def test_equivalent_bits_interpolates_log_mismatch_and_keeps_every_crossing():
  curve = [(4, 1e-2), (6, 1e-4), (8, 1e-6)]
  assert analysis.equivalent_bits(curve, 1e-3) == [pytest.approx(5.0)]
  assert analysis.equivalent_bits(curve, 1e-4) == [6.0]
  assert analysis.equivalent_bits(curve, 1e-1) == [] and analysis.equivalent_bits(curve, 1e-7) == []
  assert analysis.equivalent_bits(curve, math.nan) == []
  bumpy = [(7, 1e-4), (8, 2e-4), (9, 1e-5)]  # not monotone: 1.5e-4 is crossed twice
  assert len(analysis.equivalent_bits(bumpy, 1.5e-4)) == 2


def test_report_writes_the_tables_and_the_figures(sweep_dir, tmp_path):
  out = tmp_path / "dose_response" / "results.md"
  text = report.report(str(sweep_dir), str(tmp_path / "dose_response" / "data"), str(out),
                         str(tmp_path / "dose_response" / "figures"),
                         expected=report.expected_arms(follow_ups=False))
  assert out.read_text() == text
  assert "Arms: 9 finished, 1 unfinished, 20 missing, of 30." in text
  assert "- seed 0: **breaks at K = 5** (collapsed: K = 4, 5; 7 of 8 emulated arms finished); " \
         "provisional: K = 9 not finished." in text
  assert "## grpo_token_tis" in text and "## grpo_seq_mis" in text
  assert text.count("- seed 0: breaks at K not decided: no emulated arm finished yet.") == 2
  grpo = text.split("## grpo\n")[1].split("## grpo_token_tis")[0]
  row = {line.split(" | ")[1]: line for line in grpo.splitlines() if line.startswith("| ")}
  assert "**unfinished** (30 of 40 steps; not analysed)" in row["`fp32-e9`"]
  assert row["`fp32-e9`"].split(" | ")[5:8] == ["-", "-", "-"]
  assert row["`fp32-e4`"].split(" | ")[5:7] == ["0.300", "0.900"]
  assert "**yes**: F 0.300 <= P 0.900 - 0.2" in row["`fp32-e4`"]
  assert row["`fp32-bf16`"].startswith("| real (nominal 8) |")
  assert row["`fp32-bf16`"].split(" | ")[10] == "7.5"
  assert row["`fp32-fp16`"].split(" | ")[10] == "11.0"
  assert row["`fp32-e8`"].split(" | ")[8] == f"{mismatch_of(8):.2e}"
  assert text.count("**missing**") == 20
  figures = tmp_path / "dose_response" / "figures"
  for name, _, _, _ in report.FIGURES:
    assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"](figures/{name})" in text


def test_keep_stores_finished_arms_and_the_report_reads_them_alone(sweep_dir, tmp_path):
  data = tmp_path / "data"
  written = report.keep(str(sweep_dir), str(data))
  assert len(written) == 9 and f"grpo_fp32-e{UNFINISHED_BITS}_seed0" not in written
  assert sorted(os.listdir(data / "grpo_fp32-bf16_seed0")) == ["config.json", "metrics.jsonl.gz"]
  assert report.keep(str(sweep_dir), str(data)) == []  # already kept, unchanged
  live = report.report(str(sweep_dir), str(data), str(tmp_path / "a.md"), str(tmp_path / "fa"))
  fresh = report.report(str(tmp_path / "no_such_runs"), str(data), str(tmp_path / "b.md"),
                          str(tmp_path / "fb"))
  assert "Arms: 9 finished, 0 unfinished, 27 missing, of 36." in fresh  # 6 of the follow-up
  assert "**breaks at K = 5** (collapsed: K = 4, 5; 7 of 8 emulated arms finished)" in fresh
  # With the live runs too, the finished arms come from the kept copies (a tie goes to them).
  assert "live, not kept" in live.split("`fp32-e9`")[1].split("\n")[0]
  assert live.count("| kept |") == 9
