r"""The significand-bits dose-response's registered analysis (docs/long_runs_preregistration.md,
"Dose-response"; docs/dose_response.md), computed from the arms' run directories.

An arm is (algorithm, sampler precision, seed): an fp32 trainer against an emulated `fp32-eK`
sampler (K significand bits, float32's exponent range) or a real one (`fp32-bf16`,
`fp32-fp16`). Per finished arm (`arm_row`): final and peak smoothed reward F and P and collapse,
with the primary block's definitions (`rl_fp16.outcomes.run_outcomes`, 20-step smoothing), and the
mean over the run's steps of the trainer-vs-sampler mismatch (`MISMATCH_METRICS`: mean |pi - mu|
and KL k3). An arm with fewer logged steps than its config's `steps` is "unfinished", one with no
run directory "missing"; neither gets outcomes, so neither enters any figure or "breaks at K".

Per algorithm and seed: "breaks at K" (`breaks_at`) = the largest K whose finished emulated arm
collapses (None if none does); the real samplers are placed on the emulated curve at the K whose
mismatch equals theirs (`equivalent_bits`: linear interpolation of log mismatch between the
measured K, `PLACEMENT_METRIC` by default; every crossing is kept when the curve is not monotone).

Pure functions on pandas DataFrames as `rl_fp16.results.read_metrics` returns them, except
`read_arms`, which reads run directories. No JAX.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from rl_fp16 import names
from rl_fp16 import outcomes
from rl_fp16 import results

MISMATCH_METRICS = ("mismatch/prob_diff_mean", "mismatch/kl_k3")  # mean |pi - mu|, KL k3
PLACEMENT_METRIC = "mismatch/prob_diff_mean"  # places the real samplers on the K curve
NOMINAL_BITS = {"fp32": names.FLOAT32_SIGNIFICAND_BITS, "bf16": 8, "fp16": 11}
FINISHED, UNFINISHED, MISSING = "finished", "unfinished", "missing"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of the sweep: its algorithm, precision pair (e.g. "fp32-e6") and seed."""

  algorithm: str
  precision: str
  seed: int


def sampler_bits(precision: str) -> int | None:
  """K of an emulated sampler with float32's exponent range ("fp32-e6" -> 6); None otherwise
  (a real sampler such as "fp32-bf16", or an "eKxE" format)."""
  _, sampler = names.precision_pair_parts(precision)
  emulated = names.parse_emulated(sampler)
  if emulated is None or emulated[1] != names.FLOAT32_EXPONENT_BITS:
    return None
  return emulated[0]


def nominal_bits(precision: str) -> int | None:
  """The sampler's significand bits by name: K for "fp32-eK", 8 for bf16, 11 for fp16."""
  _, sampler = names.precision_pair_parts(precision)
  return NOMINAL_BITS.get(sampler, sampler_bits(precision))


def arm_of(config: Mapping[str, Any]) -> Arm:
  """The arm a run's config.json describes."""
  return Arm(str(config["algorithm"]), str(config["precision"]), int(config["seed"]))


def read_arms(roots: Sequence[str]) -> tuple[dict[Arm, results.RunData], list[str]]:
  """Every run directory under each existing directory of `roots` (live runs, kept copies),
  by the arm its config.json names (`results.read_runs_by`: an arm found more than once keeps
  the copy with the most logged steps, on a tie the one from the earlier root). Returns (arms,
  run directories without a config.json, which are ignored)."""
  return results.read_runs_by(roots, arm_of)


def arm_row(arm: Arm, data: results.RunData | None, default_steps: int) -> dict[str, Any]:
  """One arm's row: identity, status and, for a finished arm only, its outcomes (over its first
  `steps` steps) and mean mismatch. `steps` is the arm's config's, else `default_steps`."""
  planned = int(data.config.get("steps", default_steps)) if data is not None else default_steps
  row = {"algorithm": arm.algorithm, "precision": arm.precision, "seed": arm.seed,
         "bits": sampler_bits(arm.precision), "nominal_bits": nominal_bits(arm.precision),
         "planned_steps": planned, "steps_done": data.steps_done if data is not None else 0,
         "run_dir": data.run_dir if data is not None else None}
  if data is None:
    return dict(row, status=MISSING)
  if row["steps_done"] < planned:
    return dict(row, status=UNFINISHED)
  frame = data.frame[data.frame["step"] <= planned]
  row.update(outcomes.run_outcomes(frame), status=FINISHED)
  for metric in MISMATCH_METRICS:
    row[f"mean[{metric}]"] = outcomes.metric_over_run(frame, metric)
  return row


def arm_rows(expected: Iterable[Arm], found: Mapping[Arm, results.RunData],
             default_steps: int) -> list[dict[str, Any]]:
  """A row per expected arm, in order, then one per found arm that is not expected."""
  expected = list(dict.fromkeys(expected))
  known = set(expected)
  extra = [arm for arm in found if arm not in known]
  return [arm_row(arm, found.get(arm), default_steps) for arm in expected + extra]


def equivalent_bits(curve: Iterable[tuple[float, float]], value: float) -> list[float]:
  """The K at which the curve of (K, mismatch) points takes `value`: linear interpolation of
  log(mismatch) between consecutive measured K, every crossing (sorted; several when the curve is
  not monotone), [] when `value` is outside the curve's range or not positive."""
  points = sorted((float(k), float(m)) for k, m in curve
                  if math.isfinite(m) and m > 0)
  if not (math.isfinite(value) and value > 0) or not points:
    return []
  if len(points) == 1:
    return [points[0][0]] if math.isclose(points[0][1], value) else []
  target = math.log(value)
  crossings = []
  for (k0, m0), (k1, m1) in zip(points, points[1:]):
    y0, y1 = math.log(m0), math.log(m1)
    if min(y0, y1) <= target <= max(y0, y1):
      if y0 == y1:
        crossings.extend((k0, k1))
      else:
        crossings.append(k0 + (target - y0) / (y1 - y0) * (k1 - k0))
  return sorted(set(round(k, 9) for k in crossings))


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
  groups: dict[tuple[str, int], list] = {}
  for row in rows:
    groups.setdefault((row["algorithm"], row["seed"]), []).append(row)
  return groups


def place_real(rows: Sequence[Mapping[str, Any]],
               metric: str = PLACEMENT_METRIC) -> list[dict[str, Any]]:
  """The rows, each finished real-sampler row with "placed_bits": its `equivalent_bits` on the
  curve of the finished emulated arms of the same algorithm and seed (by mean `metric`)."""
  key = f"mean[{metric}]"
  out = [dict(row) for row in rows]
  for group in _groups(out).values():
    curve = [(r["bits"], r[key]) for r in group
             if r["status"] == FINISHED and r["bits"] is not None]
    for row in group:
      if row["status"] == FINISHED and row["bits"] is None:
        row["placed_bits"] = equivalent_bits(curve, row[key])
  return out


def breaks_at(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
  """Per (algorithm, seed): "breaks_at" = the largest K whose finished emulated arm collapses
  (None if none), with the K of the collapsed, finished and not finished (missing or unfinished)
  emulated arms."""
  out = {}
  for key, group in _groups(rows).items():
    emulated = [r for r in group if r["bits"] is not None]
    finished = [r for r in emulated if r["status"] == FINISHED]
    collapsed = sorted(r["bits"] for r in finished if r["collapse"])
    out[key] = {"breaks_at": max(collapsed) if collapsed else None, "collapsed_bits": collapsed,
                "finished_bits": sorted(r["bits"] for r in finished),
                "not_finished_bits": sorted(r["bits"] for r in emulated
                                            if r["status"] != FINISHED)}
  return out


def curve_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
  """The finished arms as a DataFrame for `report.plot_against_bits`: columns algorithm,
  seed, precision, bits (NaN for a real sampler), placed_bits (a real sampler's equivalent K,
  one row per crossing; NaN otherwise), collapse, F, P and the mean mismatch columns. Run the
  rows through `place_real` first."""
  records = []
  for row in rows:
    if row["status"] != FINISHED:
      continue
    record = {"algorithm": row["algorithm"], "seed": row["seed"],
              "precision": row["precision"], "collapse": row["collapse"], "F": row["F"],
              "P": row["P"], **{f"mean[{m}]": row[f"mean[{m}]"] for m in MISMATCH_METRICS}}
    if row["bits"] is not None:
      records.append(dict(record, bits=float(row["bits"]), placed_bits=math.nan))
    else:
      records.extend(dict(record, bits=math.nan, placed_bits=k)
                     for k in row.get("placed_bits", []))
  columns = ["algorithm", "seed", "precision", "bits", "placed_bits", "collapse", "F", "P",
             *(f"mean[{m}]" for m in MISMATCH_METRICS)]
  return pd.DataFrame.from_records(records, columns=columns)
