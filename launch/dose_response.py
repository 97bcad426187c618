r"""The mantissa-bits dose-response (docs/dose_response.md): keep its finished arms, and report.

    python -m launch.dose_response --mode=keep --experiment_dir=runs/dose_response_p8
    python -m launch.dose_response --mode=report --experiment_dir=runs/dose_response_p8

The arms are run by `python -m launch.sweep --config=experiments/configs/dose_response.py
--max_parallel=1 --override=prompts_per_step=8 --experiment_dir=runs/dose_response_p8` (the
registered command, docs/long_runs_preregistration.md, addendum of 2026-12-01), with
`--skip_kept=docs/dose_response/data` so that arms kept here are not rerun when `runs/` is gone.

`keep` copies every finished arm under `--experiment_dir` (as many logged steps as its config's
`steps`) to `--data`/<run name>/ (`results.keep_run`: config.json and metrics.jsonl.gz; commit
them), replacing a kept copy whose metrics differ. Unfinished arms are not kept.

`report` reads the arms from `--data` and `--experiment_dir` (either may be absent: on a fresh
clone the kept copies alone suffice), takes the expected arms from
`experiments/configs/dose_response.py`'s `sweep()`, and writes `results.md` beside `--data` (a
table per algorithm: K, precision, steps, final and peak smoothed reward, collapse, mean
|pi - mu| and KL k3, the real samplers' K by mismatch, and "breaks at K") and `figures/` (reward
and mismatch against K per algorithm, the real bf16 / fp16 arms placed by their mean |pi - mu|),
with the registered definitions of `rl_fp16.dose_response` and `rl_fp16.outcomes`. Missing and
unfinished arms are listed as such and enter no outcome, figure or "breaks at K".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app
from absl import flags

from experiments.configs import dose_response as dose_config
from rl_fp16 import dose_response as dose
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


def expected_arms(follow_ups: bool = True) -> list[dose.Arm]:
  """The registered arms, in `sweep()`'s order, then (with `follow_ups`) those of
  `dose_config.FOLLOW_UPS`, in theirs."""
  variants = [*dose_config.sweep(),
              *(v for kwargs in (dose_config.FOLLOW_UPS if follow_ups else ())
                for v in dose_config.sweep(**kwargs))]
  return [dose.Arm(v["algorithm"], v["precision"], int(v["seed"])) for v in variants]


def keep(experiment_dir: str, data_root: str) -> list[str]:
  """Keeps every finished arm under `experiment_dir` in `data_root`/<run name>; returns the
  names of the copies written (those already kept with the same metrics are skipped)."""
  found, _ = dose.read_arms([experiment_dir])
  written = []
  for arm, data in found.items():
    if dose.arm_row(arm, data, dose_config.STEPS)["status"] != dose.FINISHED:
      continue
    name = os.path.basename(os.path.normpath(data.run_dir))
    target = os.path.join(data_root, name)
    if (os.path.exists(os.path.join(target, results.KEPT_METRICS_FILE))
        and results.read_metrics(target).equals(data.frame)):
      continue
    results.keep_run(data.run_dir, target)
    written.append(name)
  return written


def _bits_cell(row: dict) -> str:
  if row["bits"] is not None:
    return str(row["bits"])
  return f"real (nominal {row['nominal_bits']})"


def _status_cell(row: dict) -> str:
  if row["status"] == dose.UNFINISHED:
    return f"**unfinished** ({row['steps_done']} of {row['planned_steps']} steps; not analysed)"
  if row["status"] == dose.MISSING:
    return "**missing**"
  return "finished"


def _placed_cell(row: dict) -> str:
  if row["bits"] is not None or row["status"] != dose.FINISHED:
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
    finished = row["status"] == dose.FINISHED
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
                for m in dose.MISMATCH_METRICS]
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


def write_figures(rows: Sequence[dict], figure_dir: str, out_path: str) -> list[tuple[str, str]]:
  """The figures of the finished arms; returns (title, path relative to `out_path`'s folder)."""
  frame = dose.curve_frame(rows)
  if frame.empty:
    return []
  figures = []
  for name, columns, logy, ylabel in FIGURES:
    path = os.path.join(figure_dir, name)
    plots.plot_against_bits(frame, columns, logy=logy, ylabel=ylabel, path=path,
                            title=f"Dose-response: {ylabel}\nagainst the sampler's significand bits K")
    figures.append((ylabel, os.path.relpath(path, os.path.dirname(out_path) or ".")))
  return figures


def report(experiment_dir: str, data_root: str, out_path: str, figure_dir: str,
           expected: Sequence[dose.Arm] | None = None,
           default_steps: int = dose_config.STEPS) -> str:
  """Writes the dose-response report of the kept and live arms (markdown at `out_path`, figures
  under `figure_dir`) and returns the markdown."""
  expected = expected_arms() if expected is None else expected
  found, ignored = dose.read_arms([data_root, experiment_dir])
  rows = dose.place_real(dose.arm_rows(expected, found, default_steps))
  verdicts = dose.breaks_at(rows)
  counts = {s: sum(r["status"] == s for r in rows)
            for s in (dose.FINISHED, dose.UNFINISHED, dose.MISSING)}
  prompts = sorted({str(found[dose.Arm(r["algorithm"], r["precision"], r["seed"])].config.get(
      "prompts_per_step")) for r in rows if r["status"] == dose.FINISHED})
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
      "Generated by `python -m launch.dose_response --mode=report` from the kept arms in "
      f"`{data_root}/` and the live runs in `{experiment_dir}/`; do not edit by hand. "
      "Exploratory (docs/long_runs_preregistration.md, \"Dose-response\", and its addendum of "
      "2026-12-01): no confirmatory hypothesis. Seed 1 (K = 4 and 24) is a follow-up "
      "added after the seed-0 results (addendum of 2026-12-06).", "",
      "Definitions (`rl_fp16/dose_response.py`, `rl_fp16/outcomes.py`): F and P = final and peak "
      "20-step smoothed `reward/mean`; collapse = the primary block's rule (F <= P - 0.2, a "
      "non-finite loss, or 20 consecutive skipped updates); mean abs(pi - mu) and KL k3 = means "
      f"over the run's steps of `{dose.MISMATCH_METRICS[0]}` and `{dose.MISMATCH_METRICS[1]}`; "
      "the real samplers' K = where the emulated arms' mean abs(pi - mu) curve (log scale, linear "
      "between measured K) takes the real arm's value; \"breaks at K\" = the largest K whose "
      "finished emulated arm collapses (None if none). An arm with fewer steps than its config's "
      "`steps` is unfinished and, like a missing arm, enters no outcome, figure or breaks-at-K.",
      "",
      f"Arms: {counts[dose.FINISHED]} finished, {counts[dose.UNFINISHED]} unfinished, "
      f"{counts[dose.MISSING]} missing, of {len(rows)}. Prompts per step of the finished arms: "
      f"{', '.join(prompts) or '-'}.", "",
      *([f"Ignored (no config.json): {', '.join(ignored)}.", ""] if ignored else []),
      *sections,
      "## Figures (finished arms; the real samplers placed by their mean abs(pi - mu))", "",
      *([f"![{title}]({path})" for title, path in figures] or ["No finished arm yet."]), ""])
  results.write_text_atomic(out_path, text)
  return text


def define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program: `--mode`,
  `--experiment_dir` and `--data` are also flags of other launchers (launch.long_runs,
  launch.sweep) that tests import into the same process."""
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
