r"""The pre-registered long runs' report: the registered outcomes of the kept runs.

    python -m experiments.long_runs.report

Reads every kept run under `--data` (docs/long_runs/data/, where `python -m launch.long_runs
--mode=run` keeps each finished run) and writes `results.md` beside it (per-run outcomes, per-arm
verdicts once an arm and its control have all their seeds, the H3/H4 window ratios) and
`figures/` (each seed and the seed median per precision), with the registered definitions of
`rl_fp16.outcomes` (docs/long_runs_preregistration.md).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
import pandas as pd

from experiments.long_runs import config
from rl_fp16 import outcomes
from rl_fp16 import plots
from rl_fp16 import results

# One figure per metric (name, log scale, trailing mean over this many steps; the
# reward's is the registered R(t)), and the registered comparisons.
FIGURE_METRICS = (("reward/mean", False, 20), ("eval/accuracy", False, 1),
                  ("mismatch/prob_diff_mean", True, 10), ("mismatch/kl_k3", True, 10),
                  ("is/token_weight_max", True, 10), ("is/seq_weight_p99", True, 10),
                  ("response/length_mean", False, 10), ("train/entropy", True, 10))
CONTROL = "fp32"
H3_MIN_RATIO = 8.0
_fmt = outcomes.fmt


def run_rows(frames: dict[str, pd.DataFrame]) -> list[dict]:
  """One row of registered outcomes and summary figures per kept run (`frames` by run name)."""
  rows = []
  for name, precision, seed in config.ARMS:
    if name not in frames:
      continue
    frame = frames[name]
    first, last = frame.head(outcomes.WINDOW), frame.tail(outcomes.WINDOW)
    rows.append(dict(outcomes.run_outcomes(frame), run=name, precision=precision, seed=seed,
                     mismatch_first=first["mismatch/prob_diff_mean"].mean(),
                     mismatch_last=last["mismatch/prob_diff_mean"].mean(),
                     token_weight_max=frame["is/token_weight_max"].max(),
                     seq_weight_p99_max=frame["is/seq_weight_p99"].max(),
                     length_last=last["response/length_mean"].mean(),
                     skipped_total=frame["train/skipped_steps"].sum()))
  return rows


def run_table(rows: Sequence[dict]) -> list[str]:
  header = ("run", "steps", "P", "F", "time to solve", "collapse", "G (prob diff)", "G (KL k3)",
            "held-out acc. first -> last", "mean abs dp, steps 1-20 -> last 20", "max token IS w",
            "max seq IS w p99", "length, last 20", "skipped updates")
  cells = []
  for r in rows:
    collapse = "yes: " + "; ".join(r["collapse_reasons"]) if r["collapse"] else "no"
    cells.append((
        r["run"], r["steps"], _fmt(r["P"]), _fmt(r["F"]), r["time_to_solve"] or "never", collapse,
        _fmt(r["G[mismatch/prob_diff_mean]"], ".2f"), _fmt(r["G[mismatch/kl_k3]"], ".2f"),
        f"{_fmt(r.get('eval_accuracy_first'))} -> {_fmt(r.get('eval_accuracy_final'))}",
        f"{_fmt(r['mismatch_first'], '.2e')} -> {_fmt(r['mismatch_last'], '.2e')}",
        _fmt(r["token_weight_max"], ".3g"), _fmt(r["seq_weight_p99_max"], ".4g"),
        _fmt(r["length_last"], ".0f"), int(r["skipped_total"])))
  return results.markdown_table(header, cells).splitlines()


def comparisons(rows: Sequence[dict], frames: dict[str, pd.DataFrame]) -> list[str]:
  """The registered per-arm verdicts and hypotheses H2-H4, or what is still missing for each."""
  by_precision = {p: [r for r in rows if r["precision"] == p] for p in config.PRECISIONS}
  frames_of = {p: [frames[r["run"]] for r in by_precision[p]] for p in config.PRECISIONS}
  full = {p: len(by_precision[p]) == len(config.SEEDS) for p in config.PRECISIONS}
  lines = []
  for precision in ("bf16", "fp16"):
    if full[precision] and full[CONTROL]:
      verdict = outcomes.arm_verdict(by_precision[precision], by_precision[CONTROL])
      lines.append(f"- {precision} vs {CONTROL} (H1): **{verdict}**.")
    else:
      lines.append(f"- {precision} vs {CONTROL} (H1): not decided: {len(by_precision[precision])}"
                   f" of {len(config.SEEDS)} {precision} seeds and {len(by_precision[CONTROL])} of "
                   f"{len(config.SEEDS)} {CONTROL} seeds are finished.")
  growths = [r["G[mismatch/prob_diff_mean]"] for r in by_precision["bf16"]]
  shown = ", ".join(_fmt(g, ".2f") for g in growths) or "none yet"
  h2 = outcomes.growth_direction(growths) if full["bf16"] else "not decided"
  lines.append(f"- H2 (bf16 mismatch grows, G > 2 on every seed): {h2} (G per seed: {shown}).")
  if frames_of["bf16"] and frames_of["fp16"]:
    ratio = outcomes.window_ratios(frames_of["bf16"], frames_of["fp16"], "mismatch/prob_diff_mean")
    held = "holds" if (ratio >= H3_MIN_RATIO).all() else "fails"
    partial = "" if full["bf16"] and full["fp16"] else " (on the seeds finished so far)"
    lines.append(f"- H3 (fp16's mismatch >= {H3_MIN_RATIO:g}x below bf16's in every 20-step "
                 f"window): {held}{partial}: bf16/fp16 ratio of seed medians "
                 f"{ratio.min():.1f}-{ratio.max():.1f}x over {len(ratio)} windows.")
    for metric in ("is/seq_weight_p99", "is/token_weight_max"):
      ratio = outcomes.window_ratios(frames_of["bf16"], frames_of["fp16"], metric)
      held = "holds" if (ratio > 1).all() else f"fails in {int((ratio <= 1).sum())} windows"
      lines.append(f"- H4 (bf16's `{metric}` above fp16's in every window): {held}{partial}.")
  else:
    lines.append("- H3, H4: need finished bf16 and fp16 runs.")
  return lines


def report(data_root: str, out_path: str, figure_dir: str) -> str:
  """Writes the registered outcomes of every kept run (markdown at `out_path`, figures under
  `figure_dir`) and returns the markdown."""
  frames = {name: results.read_metrics(os.path.join(data_root, name))
            for name, _, _ in config.ARMS if os.path.exists(os.path.join(data_root, name))}
  if not frames:
    raise SystemExit(f"no kept runs under {data_root}: run `python -m launch.long_runs "
                     "--mode=run` first")
  rows = run_rows(frames)
  long_frame = pd.concat([frames[r["run"]].assign(precision=r["precision"], seed=r["seed"])
                          for r in rows], ignore_index=True)
  os.makedirs(figure_dir, exist_ok=True)
  figures = []
  for metric, logy, smooth in FIGURE_METRICS:
    if metric in long_frame:
      path = os.path.join(figure_dir, metric.replace("/", "_") + ".png")
      plots.plot_seed_curves(long_frame, metric, panel="precision", logy=logy, smooth=smooth,
                             path=path)
      figures.append((metric, os.path.relpath(path, os.path.dirname(out_path))))
  text = "\n".join([
      "# Long runs: the registered outcomes (generated)", "",
      "Generated by `python -m experiments.long_runs.report` from the kept runs in "
      f"`{data_root}/` with the definitions of docs/long_runs_preregistration.md "
      "(`rl_fp16/outcomes.py`); do not edit by hand. "
      f"{len(rows)} of {len(config.ARMS)} primary runs are finished.", "",
      "## Per run", "", *run_table(rows), "",
      "## Registered comparisons", "", *comparisons(rows, frames), "",
      "## Curves (each seed thin, the seed median thick)", "",
      *[f"![{metric}]({path})" for metric, path in figures], ""])
  results.write_text_atomic(out_path, text)
  return text


def main(argv):
  del argv
  data = flags.FLAGS.data
  folder = os.path.dirname(data)
  print(report(data, os.path.join(folder, "results.md"), os.path.join(folder, "figures")))


if __name__ == "__main__":
  # Defined only when this module runs as a program: launch.long_runs, which tests import into
  # the same process, has a --data flag too.
  flags.DEFINE_string("data", "docs/long_runs/data", "Where the finished runs' data is kept.")
  app.run(main)
