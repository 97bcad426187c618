r"""Offline training-inference mismatch: sample with an engine, re-score with the trainer.

For each precision pair (trainer-sampler), the engine samples responses in the sampler's dtype and
the trainer recomputes their log-probabilities in its dtype (the measurement: `rl_fp16.offline`).
Writes the run directory through `rl_fp16.results.RunWriter`: config.json, metrics.jsonl (one
row at step 0: "{pair}/{metric}", `rl_fp16.offline.run_metrics`), TensorBoard events, and
`tokens.csv` (per-token values), `plots/` (pi vs mu scatter, per-sequence log(pi/mu) against
length with the fitted slope, mean |delta log p| by position, the per-layer view); prints a
summary table. A rerun in the same directory (same config) replaces the measurement.

    python -m experiments.offline_mismatch --config=experiments/configs/offline_mismatch.py
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from experiments import common
from rl_fp16 import cli, fileio, mismatch, offline
from rl_fp16.names import config_list
from rl_fp16.results import RunWriter, markdown_table
from rl_fp16.precision import get_precision_pair


SUMMARY_COLUMNS = (
    ("logp_diff_mean", "mismatch/logp_diff_mean"),
    ("logp_diff_max", "mismatch/logp_diff_max"),
    ("equal_frac", "mismatch/equal_frac"),
    ("prob_diff_mean", "mismatch/prob_diff_mean"),
    ("prob_diff_max", "mismatch/prob_diff_max"),
    ("kl_k1", "mismatch/kl_k1"),
    ("kl_k3", "mismatch/kl_k3"),
    ("seq_abs_log_ratio", "mismatch/seq_log_ratio_abs_mean"),
    ("slope_per_1k", "mismatch/seq_log_ratio_slope_per_1k"),
)


def measure_pair(config, model, pair_name: str, prompts, workdir: str) -> dict:
  """`rl_fp16.offline.measure_pair` with the config's engine, sampling settings and seed."""
  return offline.measure_pair(
      model, pair_name, prompts, engine=config.engine, bitwise=config.get("bitwise", False),
      samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
      temperature=config.temperature, seed=config.seed, workdir=workdir,
      max_model_len=common.max_model_len(prompts, config.max_new_tokens))


def write_tokens_csv(path: str, results: dict[str, dict]) -> None:
  """One row per response token: pair, row, position, token, logp_old, logp_sampler."""
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["precision", "row", "position", "token", "logp_old", "logp_sampler"])
  for name, result in results.items():
    rollout, logp_old = result["rollout"], result["logp_old"]
    rows, positions = np.nonzero(rollout.response_mask)
    for r, t in zip(rows, positions):
      writer.writerow([name, int(r), int(t), int(rollout.response_tokens[r, t]),
                       f"{logp_old[r, t]:.9g}", f"{rollout.logp_sampler[r, t]:.9g}"])
  fileio.write_text_atomic(path, text.getvalue())


def make_plots(plots_dir: str, results: dict[str, dict], view: dict | None) -> list[str]:
  """Scatter, sequence log-ratio vs length, |delta log p| by position, and the layer view."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(plots_dir, exist_ok=True)
  names = list(results)
  written = []

  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    r = results[name]
    mask = r["rollout"].response_mask > 0
    p_sampler = np.exp(r["rollout"].logp_sampler[mask])
    p_trainer = np.exp(r["logp_old"][mask])
    ax.scatter(p_sampler, p_trainer, s=2, alpha=0.3)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"{name}: mean|pi-mu|={np.abs(p_trainer - p_sampler).mean():.2e}")
    ax.set_xlabel("mu (sampler probability)")
    ax.set_ylabel("pi (trainer probability)")
  fig.tight_layout()
  written.append(_save(fig, os.path.join(plots_dir, "scatter_pi_vs_mu.png")))

  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False,
                           sharey=True)
  for ax, name in zip(axes[0], names):
    r = results[name]
    log_ratio, length = mismatch.sequence_log_ratios(r["logp_old"], r["rollout"].logp_sampler,
                                                     r["rollout"].response_mask)
    slope = r["metrics"]["mismatch/seq_log_ratio_slope_per_1k"]
    ax.scatter(length, log_ratio, s=6, alpha=0.6)
    if len(set(length.tolist())) > 1:
      fit = np.polyfit(length, log_ratio, 1)
      xs = np.array([length.min(), length.max()])
      ax.plot(xs, np.polyval(fit, xs), "r-", lw=1)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"{name}: slope {slope:+.3f} per 1K tokens")
    ax.set_xlabel("response length (tokens)")
  axes[0][0].set_ylabel("sum_t log(pi/mu)")
  fig.tight_layout()
  written.append(_save(fig, os.path.join(plots_dir, "seq_log_ratio_vs_length.png")))

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for name in names:
    r = results[name]
    by_pos, count = mismatch.log_ratio_by_position(r["logp_old"], r["rollout"].logp_sampler,
                                                   r["rollout"].response_mask)
    keep = count > 0
    ax.plot(np.nonzero(keep)[0], by_pos[keep], label=name, lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("response position")
  ax.set_ylabel("mean |log pi - log mu|")
  ax.legend()
  fig.tight_layout()
  written.append(_save(fig, os.path.join(plots_dir, "delta_logp_by_position.png")))

  if view:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, errors in view.items():
      ax.plot(range(len(errors)), errors, marker="o", ms=3, label=key,
              ls="-" if key.endswith("full") else "--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(errors)))
    ax.set_xticklabels(["emb"] + [f"L{i}" for i in range(1, len(errors) - 1)] + ["logits"])
    ax.set_ylabel("relative error vs fp32")
    ax.set_title("Where the disagreement enters (our decoder)")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, os.path.join(plots_dir, "layer_view.png")))
  return written


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def format_table(results: dict[str, dict]) -> str:
  return markdown_table(
      ["precision"] + [name for name, _ in SUMMARY_COLUMNS],
      [[name] + [f"{r['metrics'][key]:.3g}" for _, key in SUMMARY_COLUMNS]
       for name, r in results.items()])


def run(config) -> dict:
  """Runs the measurement; returns {"metrics": {pair: dict}, "layer_view": ..., "run_dir": ...}."""
  model = common.load_policy_model(config.model, seed=config.seed)
  prompts = model.make_prompts(config.num_prompts, seed=config.seed)
  run_dir = os.path.abspath(config.output_dir)
  print(f"model: {model.description}")
  print(f"engine: {config.engine}; {len(prompts)} prompts x {config.samples_per_prompt} samples, "
        f"up to {config.max_new_tokens} new tokens, T={config.temperature}")
  pairs = config_list(config.precisions, "precisions")
  for p in pairs:
    get_precision_pair(p)  # fail before any work on a bad name
  # resume_step=0: a rerun with the same config replaces the earlier measurement.
  # config.json records the pairs as a list, however the command line spelled them.
  writer = RunWriter(run_dir, {**config.to_dict(), "precisions": pairs}, resume=True,
                     resume_step=0)
  results = {}
  for pair in common.progress(pairs, desc="precision pairs"):
    results[pair] = measure_pair(config, model, pair, prompts, workdir=run_dir)
    m = results[pair]["metrics"]
    print(f"  {pair}: mean|dlogp|={m['mismatch/logp_diff_mean']:.3g} "
          f"k1={m['mismatch/kl_k1']:.3g} sample {m['time/sample_s']:.1f}s")
  view = (offline.layer_view(model, results, config.layer_view_sequences) if config.layer_view
          else None)
  summary = {"model": model.description, "engine": config.engine,
             **offline.summarize_pairs(results, view)}
  with writer:
    writer.write(0, offline.run_metrics(summary))
  write_tokens_csv(os.path.join(run_dir, "tokens.csv"), results)
  plots = make_plots(writer.plots_dir, results, view)
  table = format_table(results)
  print("\n" + table)
  if "fp16_over_bf16_reduction" in summary:
    red = summary["fp16_over_bf16_reduction"]
    if np.isnan(red["mismatch/logp_diff_mean"]):
      print("\nFP16 over BF16: no mismatch in either")
    else:
      print(f"\nFP16 over BF16: mean|dlogp| {red['mismatch/logp_diff_mean']:.1f}x smaller, "
            f"KL k3 {red['mismatch/kl_k3']:.1f}x smaller")
  if view:
    print("\nper-layer relative error vs fp32 (embedding, layers..., logits):")
    for key, errors in view.items():
      print(f"  {key:>14}: " + " ".join(f"{e:.1e}" for e in errors))
  print(f"\nwrote {run_dir}: config.json, metrics.jsonl, tokens.csv, " + ", ".join(
      os.path.relpath(p, run_dir) for p in plots))
  summary["run_dir"] = run_dir
  summary["table"] = table
  return summary


if __name__ == "__main__":
  cli.run_main(run, validate=common.check_config)
