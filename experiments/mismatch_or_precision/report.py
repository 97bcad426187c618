r"""The mismatch-or-precision study's registered analysis and report (docs/mismatch_or_precision.md).

    python -m experiments.mismatch_or_precision.report --mode=keep
    python -m experiments.mismatch_or_precision.report --mode=report

`keep` copies every finished arm under `--experiment_dir` to `--data`/<run name>/ (config.json and
metrics.jsonl.gz; commit them). `report` reads the arms from `--data`, the dose-response's kept
arms (`--dose_response_data`: seeds 0 and 1 of M and C) and `--experiment_dir` (any may be
absent), and writes `results.md` and `figures/` beside `--data`.

An arm is (algorithm, label, seed); the label names the (precision, bitwise) pair (`LABELS`). Per
finished arm: F, P and collapse (`rl_fp16.outcomes.run_outcomes`), the mean over steps of
`MISMATCH_METRICS` and the maximum of `mismatch/prob_diff_max`. The readings (`readings`) apply the
registered rules to the seed means and to each seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import numpy as np

from experiments.mismatch_or_precision import config as study
from rl_fp16 import outcomes
from rl_fp16 import results

MARGIN = outcomes.COLLAPSE_DROP
# (precision, bitwise) -> the registration's arm label, in the order of the tables and figures.
LABELS = {(study.CONTROL, False): "C", ("fp32-e4", False): "M", ("e4", False): "B",
          ("e4", True): "Z", ("bf16", False): "Bb", ("bf16", True): "Zb"}
BITWISE_LABELS = ("Z", "Zb")
MISMATCH_METRICS = ("mismatch/prob_diff_mean", "mismatch/kl_k3")
MAX_METRIC = "mismatch/prob_diff_max"
FINISHED, UNFINISHED, MISSING, FAILS_MODE = "finished", "unfinished", "missing", "fails the mode"



@dataclasses.dataclass(frozen=True)
class Arm:
  algorithm: str
  label: str
  seed: int


def arm_of(config: Mapping[str, Any]) -> Arm | None:
  """The study arm a run's config.json describes; None for a run outside the study."""
  label = LABELS.get((str(config["precision"]), bool(config.get("bitwise", False))))
  if label is None or config["algorithm"] not in study.ALGORITHMS:
    return None
  if int(config.get("prompts_per_step", 0)) != study.PROMPTS_PER_STEP:
    return None
  return Arm(str(config["algorithm"]), label, int(config["seed"]))


def expected_arms() -> list[Arm]:
  """Every registered arm, new or kept from the dose-response."""
  return [Arm(name, label, seed) for name in study.ALGORITHMS for label in LABELS.values()
          for seed in study.SEEDS]


def read_arms(roots: Sequence[str]) -> dict[Arm, results.RunData]:
  """The run of each study arm found under the existing `roots` (`results.read_runs_by`: an arm
  found more than once keeps the copy with the most logged steps, on a tie the earlier root's)."""
  return results.read_runs_by(roots, arm_of)[0]


def arm_row(arm: Arm, data: results.RunData | None) -> dict[str, Any]:
  """One arm's row: identity, status and, when finished, F, P, collapse and its mismatch."""
  row = {"arm": arm, "run_dir": None, "steps_done": 0, "planned_steps": study.STEPS}
  if data is None:
    return dict(row, status=MISSING)
  row.update(run_dir=data.run_dir, steps_done=data.steps_done,
             planned_steps=int(data.config.get("steps", study.STEPS)))
  if row["steps_done"] < row["planned_steps"]:
    return dict(row, status=UNFINISHED)
  frame = data.frame[data.frame["step"] <= row["planned_steps"]]
  row.update(outcomes.run_outcomes(frame), status=FINISHED)
  for metric in MISMATCH_METRICS:
    row[f"mean[{metric}]"] = outcomes.metric_over_run(frame, metric, "mean")
  row[f"max[{MAX_METRIC}]"] = outcomes.metric_over_run(frame, MAX_METRIC, "max")
  if arm.label in BITWISE_LABELS and row[f"max[{MAX_METRIC}]"] != 0:
    row["status"] = FAILS_MODE
  return row


def final_rewards(rows: Iterable[Mapping[str, Any]], algorithm: str,
                  seeds: Sequence[int] = study.SEEDS) -> dict[str, float | None]:
  """Per label, the mean F over `seeds` of `algorithm`'s finished arms; None if any is not."""
  by_arm = {row["arm"]: row for row in rows}
  out = {}
  for label in LABELS.values():
    values = [by_arm.get(Arm(algorithm, label, s), {}) for s in seeds]
    ok = all(v.get("status") == FINISHED for v in values)
    out[label] = float(np.mean([v["F"] for v in values])) if ok else None
  return out


def readings(F: Mapping[str, float | None], margin: float = MARGIN) -> dict[str, Any]:
  """The registered rules 1-4 on final rewards F per label (seed means, or one seed's)."""
  def diff(a, b):
    return None if F.get(a) is None or F.get(b) is None else F[a] - F[b]

  d_m, d_z = diff("M", "C"), diff("Z", "C")
  out = {"D(M)": d_m, "D(Z)": d_z, "F(Z) - F(B)": diff("Z", "B"),
         "F(Zb) - F(Bb)": diff("Zb", "Bb")}
  out["harm"] = ("undecided" if d_m is None else
                 "no harm to attribute" if d_m > -margin else "harm")
  if d_m is None or d_z is None:
    out["attribution"] = "undecided"
  elif d_z > -margin:
    out["attribution"] = "the mismatch is the harm"
  elif d_z - d_m < margin:
    out["attribution"] = "low precision is the harm"
  else:
    out["attribution"] = "both"
  natural = out["F(Z) - F(B)"]
  out["natural"] = ("undecided" if natural is None else
                    "the 4-bit paths' own mismatch hurts" if natural >= margin else
                    "no effect of the natural mismatch at 4 bits")
  bf16 = out["F(Zb) - F(Bb)"]
  out["bf16"] = ("undecided" if bf16 is None else
                 "the mode buys nothing at bf16 at this scale" if abs(bf16) < margin else
                 "bf16 bitwise is better" if bf16 > 0 else "bf16 normal is better")
  out["reading"] = (out["harm"] if out["harm"] != "harm" else out["attribution"])
  return out


# ----------------------------------------------------------------------------------- report ----

def _fmt(value, spec=".3f") -> str:
  return outcomes.fmt(value, spec)


def arm_table(rows: Sequence[Mapping[str, Any]], data_roots: Sequence[str]) -> list[str]:
  controls = {(r["arm"].algorithm, r["arm"].seed): r.get("F") for r in rows
              if r["arm"].label == "C" and r["status"] == FINISHED}
  header = ("arm", "precision", "bitwise", "seed", "status", "steps", "F", "P", "D vs C",
            "collapse", "mean abs(pi - mu)", "mean KL k3", "max abs(pi - mu)", "data")
  precision = {label: key for key, label in LABELS.items()}
  cells = []
  for row in rows:
    arm, done = row["arm"], row["status"] in (FINISHED, FAILS_MODE)
    control = controls.get((arm.algorithm, arm.seed))
    d = row["F"] - control if done and control is not None else None
    source = "-" if row["run_dir"] is None else (
        "kept" if any(os.path.abspath(row["run_dir"]).startswith(os.path.abspath(r) + os.sep)
                      for r in data_roots) else "live, not kept")
    cells.append((arm.label, f"`{precision[arm.label][0]}`", str(precision[arm.label][1]),
                  arm.seed, row["status"], f"{row['steps_done']} / {row['planned_steps']}",
                  *(_fmt(row.get(k)) if done else "-" for k in ("F", "P")),
                  _fmt(d, "+.3f") if d is not None else "-",
                  ("yes: " + "; ".join(row["collapse_reasons"]) if row["collapse"] else "no")
                  if done else "-",
                  *(_fmt(row.get(f"mean[{m}]"), ".2e") if done else "-"
                    for m in MISMATCH_METRICS),
                  _fmt(row.get(f"max[{MAX_METRIC}]"), ".2e") if done else "-", source))
  return [results.markdown_table(header, cells)]


def readings_text(rows: Sequence[Mapping[str, Any]], algorithm: str) -> list[str]:
  mean = readings(final_rewards(rows, algorithm))
  per_seed = {s: readings(final_rewards(rows, algorithm, (s,))) for s in study.SEEDS}
  agree = sum(r["reading"] == mean["reading"] for r in per_seed.values())
  agreement = ("" if mean["reading"] == "undecided" else
               f" ({agree} of {len(per_seed)} seeds read the same)")
  lines = [f"- **Reading (seed means): {mean['reading']}**{agreement}. "
           f"D(M) = {_fmt(mean['D(M)'], '+.3f')}, D(Z) = "
           f"{_fmt(mean['D(Z)'], '+.3f')}; rule 2 alone: {mean['attribution']}."]
  lines.append(f"- Rule 3: {mean['natural']} (F(Z) - F(B) = "
               f"{_fmt(mean['F(Z) - F(B)'], '+.3f')}).")
  lines.append(f"- Rule 4: {mean['bf16']} (F(Zb) - F(Bb) = "
               f"{_fmt(mean['F(Zb) - F(Bb)'], '+.3f')}).")
  for seed, r in per_seed.items():
    lines.append(f"- seed {seed}: {r['reading']} (D(M) {_fmt(r['D(M)'], '+.3f')}, D(Z) "
                 f"{_fmt(r['D(Z)'], '+.3f')}; rule 3: {r['natural']}; rule 4: {r['bf16']})")
  return lines


def plot_arms(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Final reward F and mean abs(pi - mu) per arm, one dot per seed, a bar at the mean;
  a panel per algorithm. Bit-for-bit arms (mismatch 0) sit on the axis floor, marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = list(LABELS.values())
  fig, axes = plt.subplots(2, len(study.ALGORITHMS), figsize=(5 * len(study.ALGORITHMS), 7),
                           squeeze=False)
  for col, algorithm in enumerate(study.ALGORITHMS):
    done = [r for r in rows if r["arm"].algorithm == algorithm
            and r["status"] in (FINISHED, FAILS_MODE)]
    for ax, key, log in ((axes[0][col], "F", False),
                         (axes[1][col], f"mean[{MISMATCH_METRICS[0]}]", True)):
      floor = 1e-9
      for x, label in enumerate(labels):
        values = [r[key] for r in done if r["arm"].label == label]
        seeds = [r["arm"].seed for r in done if r["arm"].label == label]
        shown = [max(v, floor) if log else v for v in values]
        for v, s in zip(shown, seeds):
          ax.plot(x + 0.08 * (s - 1), v, "o", color=f"C{s}", label=f"seed {s}" if x == 0 else None)
        if values:
          ax.hlines(np.mean(shown), x - 0.25, x + 0.25, color="k")
        if log and values and max(values) == 0:
          ax.annotate("0 (bit for bit)", (x, floor), textcoords="offset points", xytext=(0, 8),
                      ha="center", fontsize=8)
      control = [r["F"] for r in done if r["arm"].label == "C"]
      if key == "F" and control:
        ax.axhline(np.mean(control), ls=":", color="gray")
        ax.axhline(np.mean(control) - MARGIN, ls="--", color="gray", lw=0.8)
      ax.set_xticks(range(len(labels)), labels)
      ax.set_yscale("log" if log else "linear")
      ax.set_ylabel("final smoothed reward F" if key == "F" else "mean abs(pi - mu) over the run")
      ax.set_title(algorithm if key == "F" else "")
    axes[0][col].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str,
                 data_roots: Sequence[str]) -> str:
  """Writes `out_dir`/results.md and `out_dir`/figures/arms.png; returns the markdown path."""
  counts = {s: sum(r["status"] == s for r in rows) for s in (FINISHED, UNFINISHED, MISSING,
                                                            FAILS_MODE)}
  lines = ["# Is it the mismatch or the precision? Results (generated)", "",
           "Generated by `python -m experiments.mismatch_or_precision.report --mode=report` from "
           "the kept arms; do not edit by hand. Registration, arms and rules: "
           "docs/mismatch_or_precision.md. Arms: C control `fp32-e24`, M `fp32-e4`, B `e4`, "
           "Z `e4` bitwise, Bb `bf16`, Zb `bf16` bitwise. D = F(arm) - F(C), same seed; margin "
           f"{MARGIN}.", "",
           "Arms: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)}.", ""]
  for algorithm in study.ALGORITHMS:
    mine = [r for r in rows if r["arm"].algorithm == algorithm]
    lines += [f"## {algorithm}", "", *readings_text(mine, algorithm), "",
              *arm_table(mine, data_roots), ""]
  lines += ["![final reward and mismatch per arm](figures/arms.png)", ""]
  plot_arms(rows, os.path.join(out_dir, "figures", "arms.png"))
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def keep(experiment_dir: str, data_root: str) -> list[str]:
  """Keeps each finished arm under `experiment_dir` in `data_root`/<run name>; returns the names
  written (a copy already kept with the same metrics is skipped)."""
  done = [data for arm, data in read_arms([experiment_dir]).items()
          if arm_row(arm, data)["status"] in (FINISHED, FAILS_MODE)]
  return results.keep_runs(done, data_root)


def define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program (other modules
  that tests import into the same process define `--mode`, `--experiment_dir` and `--data`)."""
  flags.DEFINE_enum("mode", "report", ["keep", "report"], "Keep finished arms, or report.")
  flags.DEFINE_string("experiment_dir", "runs/mismatch_or_precision", "The sweep's live runs.")
  flags.DEFINE_string("data", "docs/mismatch_or_precision/data", "Kept arms of this study.")
  flags.DEFINE_string("dose_response_data", "docs/dose_response/data",
                      "Kept dose-response arms (seeds 0 and 1 of M and C).")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.mode == "keep":
    written = keep(f.experiment_dir, f.data)
    print(f"kept {len(written)} arm(s) in {f.data}: {', '.join(written) or 'none'}")
    return
  roots = [f.data, f.dose_response_data, f.experiment_dir]
  found = read_arms(roots)
  expected = expected_arms()
  rows = [arm_row(arm, found.get(arm)) for arm in expected]
  path = write_report(rows, os.path.dirname(os.path.normpath(f.data)), roots[:2])
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
