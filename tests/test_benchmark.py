"""The benchmark suite: its targets and report (experiments/benchmark/report.py), its config, and
quick mode end to end with real vLLM (experiments/benchmark/benchmark.py).

Its measuring tools (rl_fp16/profiling.py) are tested in test_profiling.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deps import require

from experiments.benchmark import benchmark
from experiments.benchmark import config as benchmark_config
from experiments.benchmark import report
from rl_fp16 import profiling
from rl_fp16.models import ModelConfig
from rl_fp16.precision import bitwise_dots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     qkv_bias=True, initializer_range=0.2)


def test_summarize_and_targets():
  stat = profiling.summarize([3.0, 1.0, 2.0])
  assert (stat["median"], stat["min"], stat["max"]) == (2.0, 1.0, 3.0)
  rate = profiling.invert_stat(stat, 6.0)
  assert (rate["median"], rate["min"], rate["max"]) == (3.0, 2.0, 6.0)

  def trainer_row(precision, tokens_per_s, mfu):
    return {"model": "medium", "response_len": 256, "precision": precision,
            "tokens_per_s": profiling.summarize([tokens_per_s]),
            "mfu": profiling.summarize([mfu]), "compiles_per_step": 0}

  def sampler_row(engine, tokens_per_s):
    return {"model": "small", "engine": engine, "precision": "fp16", "new_tokens": 256,
            "tokens_per_s": profiling.summarize([tokens_per_s]), "compiles_per_call": 0}

  results = {
      "trainer": [trainer_row("fp32", 100.0, 0.5), trainer_row("bf16", 90.0, 0.45)],
      "samplers": [sampler_row("jax", 40.0), sampler_row("vllm", 100.0)],
      "sync": [{"model": "small", "precision": "float16", "directory_over_memory": 6.0}],
      "e2e": {"engine": "vllm", "precision": "fp16",
              "other_fraction": profiling.summarize([0.2])},
  }
  passed = {t["name"]: t["passed"] for t in report.evaluate_targets(results)}
  assert passed == {
      "trainer MFU, medium fp32, response 256": True,
      "trainer bf16/fp32 tokens/s, medium, response 256": False,
      "trainer compilations per step after warm-up": True,
      "JAX/vLLM sampler tokens/s, small fp16, 256 tokens": False,
      "JAX sampler compilations per repeated call": True,
      "sync directory/in-memory seconds, small float16": True,
      "score+logp+sync share of an RL iteration (vllm fp16)": False,
  }
  text = report.format_report({"targets": report.evaluate_targets(results)})
  assert "| trainer MFU, medium fp32, response 256 | >= 40% | 50.0% | PASS |" in text

  # The metrics.jsonl row: one name per section, case and figure; repetitions stay out.
  row = report.run_metrics(results)
  assert row["trainer/medium/bf16/resp256/tokens_per_s/median"] == 90.0
  assert row["samplers/small/vllm/fp16/new256/tokens_per_s/max"] == 100.0
  assert row["sync/small/float16/directory_over_memory"] == 6.0
  assert row["e2e/other_fraction/median"] == 0.2
  assert not any(name.endswith("/values") or "/values/" in name for name in row)


def _rl_case(rss_mib):
  """A compare case's raw iterations with the given RSS after each (timings irrelevant)."""
  row = {"seconds": 1.0, "compiles": 0, "recompiled": [], "compile_s": 0.0, "peak_rss_mib": 4e3,
         "response/length_max": 10.0, "response/length_mean": 5.0, "reward/mean": 0.5,
         **{f"time/{part}_s": 0.1 for part in ("sample", "score", "logp", "update", "sync")}}
  return {"engine": "vllm", "precision": "fp32", "engine_start_s": 1.0,
          "iterations": [dict(row, rss_mib=float(x)) for x in rss_mib]}


def test_memory_growth_ignores_spikes_and_sees_leaks():
  # The shape of the vLLM compare case (docs/design.md, "Environment notes"): flat, with
  # one-iteration spikes that drop back, which a max-based statistic would read as growth.
  flat = [2630, 2720] + [3017.0] * 50
  flat[40], flat[50] = 3207.0, 3329.0
  case = report.summarize_rl_case(_rl_case(flat), warmup=2, repetitions=5)
  assert abs(case["rss_growth_mib"]) < 1 and case["rss_spike_mib"] == pytest.approx(312, abs=1)
  # A leak of 3 MiB per iteration over 50 iterations reads as ~75 MiB (> the 64 MiB target).
  leak = [2630, 2720] + [3000.0 + 3 * i for i in range(50)]
  case = report.summarize_rl_case(_rl_case(leak), warmup=2, repetitions=5)
  assert case["rss_growth_mib"] == pytest.approx(75, abs=1)
  passed = {t["name"]: t["passed"] for t in report.evaluate_targets(
      {"compare": {"cases": [dict(case, speedup_vs_trl=None)]}})}
  assert passed["resident memory growth over 50 iterations, vllm fp32"] is False


def test_quick_overrides_and_bad_names():
  config = benchmark_config.get_config()
  config.quick = True
  resolved = benchmark.resolve_config(config)
  assert resolved.repetitions == 2 and resolved.e2e.max_new_tokens == 16
  assert resolved.medium.hidden_size // resolved.medium.num_attention_heads == 64
  assert resolved.e2e.engine == "vllm"  # untouched fields keep their values
  assert config.repetitions == 3  # the input is not modified
  config.sections = ("peak", "trainr")
  with pytest.raises(ValueError, match="trainr"):
    benchmark.resolve_config(config)
  config.quick = False  # quick mode would replace the precisions
  config.sections = ("peak",)
  config.precisions = ("fp32", "fp8")
  with pytest.raises(ValueError, match="fp8"):
    benchmark.resolve_config(config)


def _positive_stat(stat):
  return 0 < stat["min"] <= stat["median"] <= stat["max"] and np.isfinite(stat["max"])


@pytest.mark.slow
@pytest.mark.vllm
def test_quick_benchmark_end_to_end(tmp_path):
  require("vllm")
  out = tmp_path / "benchmark"
  env = dict(os.environ, JAX_PLATFORMS="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", "--config=experiments/benchmark/config.py",
       "--config.quick=True", f"--config.output_dir={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  for heading in ("### Peak", "### Trainer", "### Samplers", "### Weight sync",
                  "### End to end", "### Bitwise mode vs normal", "### Targets"):
    assert heading in proc.stdout, proc.stdout[-4000:]
  results = json.loads((out / "benchmark.json").read_text())
  assert results["quick"] and results["sections"] == list(benchmark.SECTIONS)
  (bitwise,) = results["bitwise"]
  assert bitwise["normal"]["mismatch_max"] > 0
  if bitwise_dots().invariant:  # else the mode is not exact on this CPU (docs/bitwise.md)
    assert bitwise["bitwise"]["mismatch_max"] == 0.0
  for mode in ("normal", "bitwise"):
    assert _positive_stat(bitwise[mode]["step_s"]), mode

  for dtype in ("float32", "bfloat16", "float16"):
    assert _positive_stat(results["peak"][dtype]["flops_per_s"])
  assert {(r["model"], r["precision"]) for r in results["trainer"]} == {
      ("medium", "fp32"), ("medium", "fp16")}
  for row in results["trainer"]:
    assert _positive_stat(row["tokens_per_s"]) and _positive_stat(row["mfu"])
    peaks = results["peak"]
    ratio = peaks["float32"]["flops_per_s"]["median"] / peaks[
        {"fp32": "float32", "fp16": "float16"}[row["precision"]]]["flops_per_s"]["median"]
    assert row["mfu_compute_dtype"]["median"] == pytest.approx(row["mfu"]["median"] * ratio)
    assert row["compiles_per_step"] == 0, row["recompiled"]
  assert {(r["engine"], r["precision"]) for r in results["samplers"]} == {
      (e, p) for e in ("jax", "vllm") for p in ("fp32", "fp16")}
  for row in results["samplers"]:
    assert _positive_stat(row["tokens_per_s"])
    assert row["generated_tokens"] == row["rows"] * row["new_tokens"]
    if row["engine"] == "jax":
      assert row["compiles_per_call"] == 0, row["recompiled"]
  assert results["sync"]
  for row in results["sync"]:
    assert row["param_mib"] > 0
    assert _positive_stat(row["memory_s"]) and _positive_stat(row["directory_s"])
    assert _positive_stat(row["memory_convert_s"]) and _positive_stat(row["memory_reload_s"])
    for key in ("worker_s", "worker_write_s", "worker_reload_s"):  # weight_sync=directory
      assert _positive_stat(row[key]), key
  assert "### Weight sync to a sampler in another process" in proc.stdout
  e2e = results["e2e"]
  for part in ("sample", "score", "logp", "update", "sync", "step"):
    assert _positive_stat(e2e[f"{part}_s"]), part
  assert 0 < e2e["other_fraction"]["median"] < 1
  assert e2e["peak_rss_mib"] > 0 and results["peak_rss_mib"] >= e2e["peak_rss_mib"]
  names = {t["name"] for t in results["targets"]}
  assert any(n.startswith("trainer MFU") for n in names)
  assert any(n.startswith("JAX/vLLM sampler") for n in names)
  assert any(n.startswith("sync directory") for n in names)
  assert any(n.startswith("score+logp+sync") for n in names)
  assert all(t["passed"] in (True, False) for t in results["targets"])


def test_trl_peer_output_and_skip_message():
  text = ("noise\nITER_S [9.0, 7.0, 5.0, 6.0]\nPARTS_S " + json.dumps(
      [{"sample": 4.0, "score_logp": 1.0, "update": 2.0}] * 4) +
          "\nMEAN_COMPLETION_TOKENS 131.5\nITER_S_MEDIAN 6.0\n")
  found = report.parse_trl_output(text)
  assert found["ITER_S"] == [9.0, 7.0, 5.0, 6.0] and found["MEAN_COMPLETION_TOKENS"] == 131.5
  with pytest.raises(ValueError, match="ITER_S"):
    report.parse_trl_output("Traceback ...\n")
  config = benchmark.resolve_config(benchmark_config.get_config())
  model = benchmark.BenchModel("small", CONFIG, None, "test model", lambda n, s: [],
                               tokenizer_dir=REPO)
  skipped = benchmark.bench_trl(config, model)  # trl_python unset: skipped, saying how to set up
  assert "setup_trl.sh" in skipped["skipped"]
  config.trl_python = "/nonexistent/python"
  assert "does not exist" in benchmark.bench_trl(config, model)["skipped"]
  assert os.path.exists(benchmark.TRL_SCRIPT)
