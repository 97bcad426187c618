"""colabs/results.ipynb runs top to bottom on a small fake sweep and saves the paper's figures."""

import csv
import math
import os

import nbformat
from nbclient import NotebookClient
import numpy as np
import pytest

from rl_fp16 import offline, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "results.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def _fake_metrics(step: int, mismatch: float, reward: float, rng) -> dict:
  """A well-formed step of RL metrics (the names experiments.rl logs)."""
  spread = 30 * mismatch
  metrics = {
      "reward/mean": reward,
      "reward/accuracy": reward * 0.9,
      "mismatch/prob_diff_mean": mismatch * (1 + 0.1 * rng.random()),
      "mismatch/kl_k3": mismatch**2 * (1 + rng.random()),
      "response/length_mean": 20.0 + step,
  }
  for kind, scale in (("token", 1.0), ("seq", 3.0)):
    metrics[f"is/{kind}_weight_p1"] = 1 - scale * spread
    metrics[f"is/{kind}_weight_p50"] = 1.0
    metrics[f"is/{kind}_weight_p99"] = 1 + scale * spread
  return metrics


def _write_rl_run(experiment_dir, algorithm: str, precision: str, seed: int) -> None:
  rng = np.random.default_rng(seed)
  mismatch = 5e-2 if "bf16" in precision else 5e-4
  run_dir = os.path.join(experiment_dir, f"{algorithm}_{precision}_seed{seed}")
  config = {"algorithm": algorithm, "precision": precision, "seed": seed, "engine": "jax",
            "steps": STEPS, "loss": {"token_is_cap": 2.0}}
  with results.RunWriter(run_dir, config) as writer:
    for step in range(1, STEPS + 1):
      reward = min(1.0, 0.3 + 0.1 * step) if mismatch < 1e-2 else 0.3 + 0.05 * math.sin(step)
      writer.write(step, _fake_metrics(step, mismatch, reward, rng))


def _write_offline_run(run_dir, pairs=("fp32", "bf16", "fp16")) -> None:
  """An offline run directory as experiments.offline_mismatch writes it."""
  rng = np.random.default_rng(0)
  os.makedirs(run_dir)
  metrics = {}
  with open(os.path.join(run_dir, "tokens.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["precision", "row", "position", "token", "logp_old", "logp_sampler"])
    for pair in pairs:
      noise = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-2}[pair]
      logp_sampler = np.log(rng.uniform(0.05, 1.0, size=40))
      logp_old = np.minimum(logp_sampler + rng.normal(0, noise, size=40), 0.0)
      for index, (lo, ls) in enumerate(zip(logp_old, logp_sampler)):
        writer.writerow([pair, index // 8, index % 8, 5, f"{lo:.9g}", f"{ls:.9g}"])
      metrics[pair] = {"mismatch/prob_diff_mean": noise, "mismatch/kl_k3": noise**2,
                       "mismatch/kl_k1": noise / 2, "response/length_mean": 8.0}
  with results.RunWriter(run_dir, {"engine": "jax", "model": "fake"}) as writer:
    writer.write(0, offline.run_metrics({"metrics": metrics, "layer_view": None}))


def _execute(experiment_dir, monkeypatch) -> None:
  monkeypatch.setenv("RL_FP16_EXPERIMENT_DIR", str(experiment_dir))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()


def _pngs(figures_dir) -> set:
  names = set()
  for name in os.listdir(figures_dir):
    if name.endswith(".png"):
      with open(os.path.join(figures_dir, name), "rb") as f:
        assert f.read(8) == PNG_MAGIC, name
      assert os.path.getsize(os.path.join(figures_dir, name)) > 5000, name
      names.add(name)
  return names


@pytest.mark.slow
def test_notebook_draws_every_figure(tmp_path, monkeypatch):
  exp = tmp_path / "exp"
  for algorithm in ("grpo", "gspo"):
    for precision in ("bf16", "fp16"):
      _write_rl_run(exp, algorithm, precision, seed=0)
  _write_rl_run(exp, "grpo", "fp16", seed=1)  # Two seeds: a mean line with a min..max band.
  for precision in ("fp32", "bf16-fp16", "fp16-bf16"):  # The ablation's other cells.
    _write_rl_run(exp, "grpo", precision, seed=0)
  _write_offline_run(exp / "offline_jax_seed0")

  _execute(exp, monkeypatch)

  figures = exp / "figures"
  assert _pngs(figures) == {
      "reward.png", "accuracy.png", "mismatch_prob_diff.png", "mismatch_kl_k3.png",
      "is_token_quantiles.png", "is_seq_quantiles.png", "ablation_grid.png",
      "ablation_reward.png", "ablation_mismatch.png", "offline_jax_seed0_scatter.png"}
  with open(figures / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8
  grpo_fp16 = [r for r in rows if r["algorithm"] == "grpo" and r["precision"] == "fp16"]
  assert sorted(r["seed"] for r in grpo_fp16) == ["0", "1"]
  # The final reward is the mean of the last 20% of steps (here the last 2 of 6).
  assert float(grpo_fp16[0]["final_reward"]) == pytest.approx(0.85)


@pytest.mark.slow
def test_notebook_with_only_an_offline_run(tmp_path, monkeypatch):
  exp = tmp_path / "offline"
  _write_offline_run(exp / "offline_vllm_seed0", pairs=("bf16", "fp16"))
  _execute(exp, monkeypatch)
  assert _pngs(exp / "figures") == {"offline_vllm_seed0_scatter.png"}
  assert not os.path.exists(exp / "figures" / "summary.csv")
