r"""The significand-bits dose-response's report (docs/dose_response.md): keep its finished arms,
and report them.

    python -m experiments.dose_response.report --mode=keep --experiment_dir=runs/dose_response_p8
    python -m experiments.dose_response.report --mode=report --experiment_dir=runs/dose_response_p8

The arms are run by `python -m launch.sweep --config=experiments/dose_response/config.py
--max_parallel=1 --override=prompts_per_step=8 --experiment_dir=runs/dose_response_p8` (the
registered command, docs/long_runs_preregistration.md), with
`--skip_kept=docs/dose_response/data` so that arms kept here are not rerun when `runs/` is gone.

`keep` copies every finished arm under `--experiment_dir` (as many logged steps as its config's
`steps`) to `--data`/<run name>/ (`results.keep_runs`: config.json and metrics.jsonl.gz; commit
them), replacing a kept copy whose metrics differ. Unfinished arms are not kept.

`report` reads the arms from `--data` and `--experiment_dir` (either may be absent: on a fresh
clone the kept copies alone suffice), takes the expected arms from `config.sweep()`, and writes
`results.md` beside `--data` (a table per algorithm: K, precision, steps, final and peak smoothed
reward, collapse, mean |pi - mu| and KL k3, the real samplers' K by mismatch, and "breaks at K")
and `figures/` (reward and mismatch against K per algorithm, `plot_against_bits`, the real
bf16 / fp16 arms placed by their mean |pi - mu|), with the registered definitions of
`analysis` and `rl_fp16.outcomes`. Missing and unfinished arms are listed as such and enter no
outcome, figure or "breaks at K".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app
from absl import flags
import matplotlib
from matplotlib.figure import Figure
import pandas as pd

from experiments.dose_response import analysis
from experiments.dose_response import config
from rl_fp16 import outcomes
from rl_fp16 import plots
from rl_fp16 import results

_fmt = outcomes.fmt

# (file name, columns, log scale, y label) of each figure.
FIGURES = (
    ("reward_vs_bits.png", ("F", "P"), False, "smoothed reward (F solid, P dashed)"),
    ("prob_diff_mean_vs_bits.png", ("mean[mismatch/prob_diff_mean]",), True,
     "mean |pi - mu| over the run"),
    ("kl_k3_vs_bits.png", ("mean[mismatch/kl_k3]",), True, "mean KL k3 over the run"),
)


def expected_arms(follow_ups: bool = True) -> list[analysis.Arm]:
  """The registered arms, in `sweep()`'s order, then (with `follow_ups`) those of
  `config.FOLLOW_UPS`, in theirs."""
  variants = [*config.sweep(),
              *(v for kwargs in (config.FOLLOW_UPS if follow_ups else ())
                for v in config.sweep(**kwargs))]
  return [analysis.Arm(v["algorithm"], v["precision"], int(v["seed"])) for v in variants]


def keep(experiment_dir: str, data_root: str) -> list[str]:
  """Keeps every finished arm under `experiment_dir` in `data_root`/<run name>; returns the
  names of the copies written (those already kept with the same metrics are skipped)."""
  found, _ = analysis.read_arms([experiment_dir])
  finished = [data for arm, data in found.items()
              if analysis.arm_row(arm, data, config.STEPS)["status"] == analysis.FINISHED]
  return results.keep_runs(finished, data_root)


def _bits_cell(row: dict) -> str:
  if row["bits"] is not None:
    return str(row["bits"])
  return f"real (nominal {row['nominal_bits']})"


def _status_cell(row: dict) -> str:
  if row["status"] == analysis.UNFINISHED:
    return f"**unfinished** ({row['steps_done']} of {row['planned_steps']} steps; not analysed)"
  if row["status"] == analysis.MISSING:
    return "**missing**"
  return "finished"


def _placed_cell(row: dict) -> str:
  if row["bits"] is not None or row["status"] != analysis.FINISHED:
    return "-"
  placed = row.get("placed_bits", [])
  if not placed:
    return "outside the measured curve"
  text = " or ".join(f"{k:.1f}" for k in placed)
  return text + (" (curve not monotone)" if len(placed) > 1 else "")


def algorithm_table(rows: Sequence[dict], data_root: str) -> list[str]:
  header = ("K", "precision", "seed", "status", "steps", "F", "P", "collapse", "mean abs(pi - mu)",
            "mean KL k3", "K by mean abs(pi - mu)", "data")
  cells = []
  for row in rows:
    finished = row["status"] == analysis.FINISHED
    if not finished:
      collapse = "-"
    elif row["collapse"]:
      collapse = "**yes**: " + "; ".join(row["collapse_reasons"])
    else:
      collapse = "no"
    if row["run_dir"] is None:
      source = "-"
    elif os.path.abspath(row["run_dir"]).startswith(os.path.abspath(data_root) + os.sep):
      source = "kept"
    else:
      source = "live, not kept"
    mismatch = [_fmt(row.get(f"mean[{m}]"), ".2e") if finished else "-"
                for m in analysis.MISMATCH_METRICS]
    cells.append((_bits_cell(row), f"`{row['precision']}`", row["seed"], _status_cell(row),
                  f"{row['steps_done']} / {row['planned_steps']}",
                  _fmt(row.get("F")) if finished else "-", _fmt(row.get("P")) if finished else "-",
                  collapse, mismatch[0], mismatch[1], _placed_cell(row), source))
  return results.markdown_table(header, cells).splitlines()


def breaks_line(seed: int, verdict: dict) -> str:
  ks = lambda bits: ", ".join(str(k) for k in bits)  # noqa: E731
  finished = len(verdict["finished_bits"])
  total = finished + len(verdict["not_finished_bits"])
  if not finished:
    return f"- seed {seed}: breaks at K not decided: no emulated arm finished yet."
  if verdict["breaks_at"] is None:
    line = (f"- seed {seed}: **breaks at K = None** (no finished emulated arm collapses; "
            f"{finished} of {total} emulated arms finished)")
  else:
    line = (f"- seed {seed}: **breaks at K = {verdict['breaks_at']}** (collapsed: K = "
            f"{ks(verdict['collapsed_bits'])}; {finished} of {total} emulated arms finished)")
  if verdict["not_finished_bits"]:
    line += f"; provisional: K = {ks(verdict['not_finished_bits'])} not finished"
  return line + "."


def plot_against_bits(df: pd.DataFrame, ys: Sequence[str], *, panel: str = "algorithm",
                      x: str = "bits", placed_x: str = "placed_bits", label: str = "precision",
                      seed: str = "seed", collapse: str | None = "collapse", logy: bool = False,
                      ylabel: str | None = None, title: str | None = None,
                      path: str | os.PathLike | None = None) -> Figure:
  """Plots columns `ys` against the sampler's significand bits K, one panel per value of `panel`
  (e.g. the dose-response's final and peak reward per algorithm).

  Rows with a finite `x` form the curves: a line with markers per (y column, seed), K ascending,
  a collapsed arm (`collapse` true) circled in red. Rows whose `x` is NaN and `placed_x` finite
  (real samplers placed by their mismatch, `analysis.curve_frame`) are drawn as one
  labelled marker each at (placed_x, y), labelled "<label> (<y>)". All panels share the y scale.

  Args:
    df: one row per arm (or per placement), with columns panel, x, placed_x, label, seed, ys.
    ys: the columns to draw (line styles solid, dashed, dotted, ... in this order).
    logy: log-scale y axis (non-positive values are left out).
    path: if given, the PNG is saved there.
  """
  ys = [ys] if isinstance(ys, str) else list(ys)
  plots.check_columns(df, [panel, x, placed_x, label, seed, collapse, *ys], "plot_against_bits")
  if df.empty:
    raise ValueError("plot_against_bits: no rows")
  panels = plots.sorted_values(df[panel])
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ("-", "--", ":", "-.")
  markers = ("s", "D", "^", "v", "P", "X")
  fig, axes = plots.new_figure(len(panels), panel_size=(5.0, 3.8), sharey=True)
  for ax, value in zip(axes, panels):
    rows = df[plots.matches(df[panel], value)]
    xs = plots.finite(rows[x])
    curve, placed = rows[xs.notna()], rows[xs.isna() & plots.finite(rows[placed_x]).notna()]
    seeds = plots.sorted_values(curve[seed]) if len(curve) else []
    for y_index, y in enumerate(ys):
      for seed_index, seed_value in enumerate(seeds):
        one = curve[plots.matches(curve[seed], seed_value)].sort_values(x)
        values = plots.finite(one[y])
        keep = values.notna() & (values > 0 if logy else True)
        name = y if len(seeds) == 1 else f"{y}, {seed} {seed_value}"
        ax.plot(one[x][keep], values[keep], color=colors[seed_index % len(colors)],
                linestyle=styles[y_index % len(styles)], marker="o", markersize=4, label=name)
        if collapse is not None:
          hit = keep & one[collapse].astype(bool)
          if hit.any():
            ax.scatter(one[x][hit], values[hit], s=110, facecolors="none", edgecolors="red",
                       linewidths=1.5, zorder=3,
                       label="collapsed" if (y_index, seed_index) == (0, 0) else None)
    for index, (label_value, group) in enumerate(placed.groupby(label, sort=True)):
      for y_index, y in enumerate(ys):
        values = plots.finite(group[y])
        keep = values.notna() & (values > 0 if logy else True)
        if not keep.any():
          continue
        ax.plot(plots.finite(group[placed_x])[keep], values[keep], linestyle="none",
                marker=markers[index % len(markers)], markersize=8,
                markerfacecolor="none" if y_index else colors[(index + 3) % len(colors)],
                color=colors[(index + 3) % len(colors)], label=f"{label_value} ({y})")
    ticks = sorted(set(plots.finite(curve[x]).dropna().astype(int))) if len(curve) else []
    if ticks:
      ax.set_xticks(ticks)
    ax.set_title(f"{panel} = {value}")
    ax.set_xlabel("sampler significand bits K")
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize="x-small")
  axes[0].set_ylabel(ylabel if ylabel is not None else ", ".join(ys))
  fig.suptitle(title if title is not None else f"{', '.join(ys)} against K")
  return plots.save_figure(fig, path)


def write_figures(rows: Sequence[dict], figure_dir: str, out_path: str) -> list[tuple[str, str]]:
  """The figures of the finished arms; returns (title, path relative to `out_path`'s folder)."""
  frame = analysis.curve_frame(rows)
  if frame.empty:
    return []
  figures = []
  for name, columns, logy, ylabel in FIGURES:
    path = os.path.join(figure_dir, name)
    plot_against_bits(frame, columns, logy=logy, ylabel=ylabel, path=path,
                      title=f"Dose-response: {ylabel}\nagainst the sampler's significand bits K")
    figures.append((ylabel, os.path.relpath(path, os.path.dirname(out_path) or ".")))
  return figures


def report(experiment_dir: str, data_root: str, out_path: str, figure_dir: str,
           expected: Sequence[analysis.Arm] | None = None,
           default_steps: int = config.STEPS) -> str:
  """Writes the dose-response report of the kept and live arms (markdown at `out_path`, figures
  under `figure_dir`) and returns the markdown."""
  expected = expected_arms() if expected is None else expected
  found, ignored = analysis.read_arms([data_root, experiment_dir])
  rows = analysis.place_real(analysis.arm_rows(expected, found, default_steps))
  verdicts = analysis.breaks_at(rows)
  counts = {s: sum(r["status"] == s for r in rows)
            for s in (analysis.FINISHED, analysis.UNFINISHED, analysis.MISSING)}
  prompts = sorted({str(found[analysis.Arm(r["algorithm"], r["precision"], r["seed"])]
                        .config.get("prompts_per_step"))
                     for r in rows if r["status"] == analysis.FINISHED})
  figures = write_figures(rows, figure_dir, out_path)
  sections = []
  for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
    mine = [r for r in rows if r["algorithm"] == algorithm]
    seeds = sorted({r["seed"] for r in mine})
    sections += [f"## {algorithm}", "",
                 *[breaks_line(s, verdicts[(algorithm, s)]) for s in seeds], "",
                 *algorithm_table(mine, data_root), ""]
  text = "\n".join([
      "# Dose-response: the sampler's significand bits K (generated)", "",
      "Generated by `python -m experiments.dose_response.report --mode=report` from the kept "
      f"arms in `{data_root}/` and the live runs in `{experiment_dir}/`; do not edit by hand. "
      "Exploratory (docs/long_runs_preregistration.md, \"Dose-response\", and its addendum of "
      "2026-12-01): no confirmatory hypothesis. Seed 1 (K = 4 and 24) is a follow-up "
      "added after the seed-0 results (addendum of 2026-12-06).", "",
      "Definitions (`experiments/dose_response/analysis.py`, `rl_fp16/outcomes.py`): F and P = "
      "final and peak 20-step smoothed `reward/mean`; collapse = the primary block's rule "
      "(F <= P - 0.2, a non-finite loss, or 20 consecutive skipped updates); mean abs(pi - mu) "
      "and KL k3 = means "
      f"over the run's steps of `{analysis.MISMATCH_METRICS[0]}` and "
      f"`{analysis.MISMATCH_METRICS[1]}`; "
      "the real samplers' K = where the emulated arms' mean abs(pi - mu) curve (log scale, linear "
      "between measured K) takes the real arm's value; \"breaks at K\" = the largest K whose "
      "finished emulated arm collapses (None if none). An arm with fewer steps than its config's "
      "`steps` is unfinished and, like a missing arm, enters no outcome, figure or breaks-at-K.",
      "",
      f"Arms: {counts[analysis.FINISHED]} finished, {counts[analysis.UNFINISHED]} unfinished, "
      f"{counts[analysis.MISSING]} missing, of {len(rows)}. Prompts per step of the finished arms: "
      f"{', '.join(prompts) or '-'}.", "",
      *([f"Ignored (no config.json): {', '.join(ignored)}.", ""] if ignored else []),
      *sections,
      "## Figures (finished arms; the real samplers placed by their mean abs(pi - mu))", "",
      *([f"![{title}]({path})" for title, path in figures] or ["No finished arm yet."]), ""])
  results.write_text_atomic(out_path, text)
  return text


def define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: `--mode`,
  `--experiment_dir` and `--data` are also flags of other modules (launch.long_runs,
  launch.sweep, experiments.long_runs.report) that tests import into the same process."""
  flags.DEFINE_enum("mode", "report", ["report", "keep"], "What to do (module doc).")
  flags.DEFINE_string("experiment_dir", "runs/dose_response_p8",
                      "The sweep's experiment directory (live runs).")
  flags.DEFINE_string("data", "docs/dose_response/data",
                      "Where finished arms' data is kept; results.md and figures/ go beside.")


def main(argv):
  del argv
  mode, experiment_dir, data = (flags.FLAGS[name].value
                                for name in ("mode", "experiment_dir", "data"))
  folder = os.path.dirname(data)
  if mode == "keep":
    written = keep(experiment_dir, data)
    print(f"kept {len(written)} finished arms in {data}: {', '.join(written) or 'none'}"
          f"{' (commit them)' if written else ''}")
  else:
    print(report(experiment_dir, data, os.path.join(folder, "results.md"),
                 os.path.join(folder, "figures")))


if __name__ == "__main__":
  define_flags()
  app.run(main)
