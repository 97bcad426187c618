"""The mismatch-or-precision study's registered readings and report
(experiments/mismatch_or_precision/report.py), on synthetic arms with known answers."""

import os

import pytest

from experiments.mismatch_or_precision import config as study
from experiments.mismatch_or_precision import report
from rl_fp16 import results

STEPS = 20
# Final reward per (algorithm, label). Token TIS: M drops 0.3, Z recovers (the mismatch is the
# harm). GRPO: M drops only 0.05 (no harm to attribute), and Z drops 0.3.
F = {"grpo_token_tis": {"C": 0.9, "M": 0.6, "B": 0.85, "Z": 0.85, "Bb": 0.9, "Zb": 0.9},
     "grpo": {"C": 0.9, "M": 0.85, "B": 0.6, "Z": 0.6, "Bb": 0.9, "Zb": 0.5}}
PRECISION = {label: key for key, label in report.LABELS.items()}


def write_arm(root, algorithm, label, seed, *, reward, max_mismatch=None, steps=STEPS,
              legacy=False, prompts=study.PROMPTS_PER_STEP):
  """An arm with a constant reward (F = P = `reward`). A bitwise arm logs zero mismatch unless
  `max_mismatch`; `legacy` writes a dose-response config.json (no `bitwise` key)."""
  precision, bitwise = PRECISION[label]
  config = {"algorithm": algorithm, "precision": precision, "seed": seed, "steps": STEPS,
            "prompts_per_step": prompts}
  name = f"{algorithm}_{precision}_seed{seed}"
  if not legacy:
    config["bitwise"] = bitwise
    name = f"{algorithm}_{precision}_bitwise{bitwise}_seed{seed}"
  mismatch = 0.0 if bitwise else 1e-3
  if max_mismatch is not None:
    mismatch = max_mismatch
  with results.RunWriter(root / name, config) as writer:
    for step in range(1, steps + 1):
      writer.write(step, {"reward/mean": reward, "train/loss": 0.1, "train/skipped_steps": 0.0,
                          "train/updates": 4.0 * step, "mismatch/prob_diff_mean": mismatch / 2,
                          "mismatch/prob_diff_max": mismatch, "mismatch/kl_k3": mismatch ** 2})


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """The study's live runs and the dose-response's kept M and C arms of seeds 0 and 1. GRPO's
  Z seed 2 logs a non-zero mismatch (fails the mode); its Bb seed 1 stops at step 10."""
  live = tmp_path_factory.mktemp("runs") / "mismatch_or_precision"
  kept = tmp_path_factory.mktemp("dose") / "data"
  for algorithm, rewards in F.items():
    for label, reward in rewards.items():
      for seed in study.SEEDS:
        legacy = label in ("M", "C") and seed < 2
        write_arm(kept if legacy else live, algorithm, label, seed, reward=reward, legacy=legacy,
                  max_mismatch=1e-6 if (algorithm, label, seed) == ("grpo", "Z", 2) else None,
                  steps=10 if (algorithm, label, seed) == ("grpo", "Bb", 1) else STEPS)
  write_arm(live, "grpo", "C", 0, reward=0.1, prompts=32)  # not this study's settings
  return live, kept


def test_readings_follow_the_registered_rules():
  base = {"C": 0.9, "B": 0.9, "Bb": 0.9, "Zb": 0.9}
  cases = [({"M": 0.6, "Z": 0.8}, "the mismatch is the harm"),
           ({"M": 0.6, "Z": 0.65}, "low precision is the harm"),
           ({"M": 0.3, "Z": 0.6}, "both"),
           ({"M": 0.75, "Z": 0.2}, "no harm to attribute"),
           ({"M": 0.6, "Z": None}, "undecided")]
  for values, expected in cases:
    assert report.readings({**base, **values})["reading"] == expected, values
  assert report.readings({**base, "M": 0.75, "Z": 0.2})["attribution"] == (
      "low precision is the harm")
  natural = report.readings({**base, "M": 0.6, "Z": 0.8, "B": 0.6})
  assert natural["natural"] == "the 4-bit paths' own mismatch hurts"
  assert report.readings({**base, "Zb": 0.65})["bf16"] == "bf16 normal is better"
  assert report.readings({**base, "Zb": 0.75})["bf16"] == (
      "the mode buys nothing at bf16 at this scale")


def test_arms_are_read_from_live_and_kept_runs(roots):
  live, kept = roots
  found = report.read_arms([str(kept), str(live)])
  assert set(found) == set(report.expected_arms())
  rows = {r["arm"]: r for r in (report.arm_row(a, found.get(a)) for a in report.expected_arms())}
  assert rows[report.Arm("grpo", "C", 0)]["F"] == pytest.approx(0.9)  # not the 32-prompt run
  assert rows[report.Arm("grpo", "Z", 2)]["status"] == report.FAILS_MODE
  assert rows[report.Arm("grpo", "Bb", 1)]["status"] == report.UNFINISHED
  assert rows[report.Arm("grpo_token_tis", "M", 0)]["run_dir"].startswith(str(kept))


def test_report_gives_each_algorithms_reading(roots, tmp_path):
  live, kept = roots
  rows = [report.arm_row(a, report.read_arms([str(kept), str(live)]).get(a))
          for a in report.expected_arms()]
  tis = report.readings(report.final_rewards(rows, "grpo_token_tis"))
  assert tis["reading"] == "the mismatch is the harm"
  assert tis["D(M)"] == pytest.approx(-0.3) and tis["D(Z)"] == pytest.approx(-0.05)
  grpo = report.readings(report.final_rewards(rows, "grpo"))
  assert grpo["reading"] == "no harm to attribute" and grpo["attribution"] == "undecided"
  assert grpo["bf16"] == "undecided"
  path = report.write_report(rows, str(tmp_path), [str(kept)])
  text = open(path).read()
  assert "**Reading (seed means): the mismatch is the harm** (3 of 3 seeds" in text
  assert "**Reading (seed means): no harm to attribute** (3 of 3 seeds" in text
  assert "fails the mode" in text and "unfinished" in text
  assert os.path.getsize(tmp_path / "figures" / "arms.png") > 0


def test_keep_copies_finished_arms_only(roots, tmp_path):
  live, _ = roots
  written = report.keep(str(live), str(tmp_path / "data"))
  assert "grpo_bf16_bitwiseFalse_seed1" not in written  # unfinished
  assert "grpo_e4_bitwiseTrue_seed2" in written  # finished, reported as failing the mode
  assert report.keep(str(live), str(tmp_path / "data")) == []
  kept = results.read_metrics(tmp_path / "data" / "grpo_token_tis_e4_bitwiseTrue_seed0")
  assert len(kept) == STEPS
