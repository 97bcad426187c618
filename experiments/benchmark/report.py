"""The benchmark suite's analysis and report: pure functions from measured figures to summaries,
targets, a metrics row and markdown tables (no engines, no timing, no files).

benchmark.py runs the sections and times them; what it measured goes through here:
- `summarize_rl_case`: one compare case's raw iterations -> medians, compilations, memory growth.
- `parse_trl_output`: the figures `peers/trl_grpo.py` prints.
- `physical_floor`: a compare case's FLOPs and the seconds they take at the measured matmul peak.
- `padding_waste`: padding of the trainer's batches at paper scale (Monte Carlo, stated
  assumption).
- `evaluate_targets`: the suite's targets (`TARGET_*`) against the measured ratios.
- `run_metrics`: every measured number as one metrics.jsonl row, named by section and case.
- `format_report`, `format_compare`: the markdown tables (cells: median [min, max]).
The FLOPs formulas and `summarize` are rl_fp16/profiling.py's.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rl_fp16.precision import dtype_name, get_policy
from rl_fp16.profiling import decode_flops, peak_flops_per_s, summarize, train_step_flops
from rl_fp16.results import flatten_metrics, markdown_table


# The suite's targets (docs/performance.md): ratios, as absolute times drift on a shared machine.
TARGET_MFU = 0.40
TARGET_LOW_PRECISION_SPEEDUP = 1.0
TARGET_JAX_OVER_VLLM = 0.5
TARGET_SYNC_SPEEDUP = 5.0
TARGET_OTHER_FRACTION = 0.15
TARGET_JAX_OVER_TRL = 1.5  # seconds per RL iteration, TRL / rl_fp16
TARGET_VLLM_OVER_TRL = 1.2
TARGET_DECODE_OVER_FLOOR = 3.0  # JAX engine: a decode step's ms / its FLOP floor at the peak
TARGET_RSS_GROWTH_MIB = 64.0  # resident memory after the last vs the first timed iteration


# ------------------------------------------------------------------------------ compare ----


def summarize_rl_case(case: dict[str, Any], warmup: int, repetitions: int) -> dict[str, Any]:
  """Medians over the timed iterations [warmup, warmup + repetitions); compilations and memory
  over every iteration after warm-up."""
  rows = case["iterations"]
  timed = rows[warmup:warmup + repetitions]
  after = rows[warmup:]
  if not timed:
    raise ValueError(f"{len(rows)} iterations leave none after {warmup} warm-up ones")
  out = {k: case[k] for k in ("engine", "precision", "engine_start_s")}
  out["iteration_s"] = summarize([r["seconds"] for r in timed])
  for part in ("sample", "score", "logp", "update", "sync"):
    out[f"{part}_s"] = summarize([r[f"time/{part}_s"] for r in timed])
  out["max_response_length"] = summarize([r["response/length_max"] for r in timed])
  out["response_length_mean"] = summarize([r["response/length_mean"] for r in timed])
  out["train_seq_len"] = summarize([r.get("perf/train_seq_len", np.nan) for r in timed])
  out["reward_mean"] = summarize([r["reward/mean"] for r in timed])
  out["compiles_after_warmup"] = int(sum(r["compiles"] for r in after))
  out["recompiled"] = sorted({n for r in after for n in r["recompiled"]})
  out["warmup_s"] = [r["seconds"] for r in rows[:warmup]]
  out["warmup_compile_s"] = float(sum(r["compile_s"] for r in rows[:warmup]))
  out["precompiled_widths"] = [w for r in rows[:warmup] for w in r.get("precompiled_widths", [])]
  out["precompile_s"] = float(sum(r.get("precompile_s", 0.0) for r in rows[:warmup]))
  out["rss_mib"] = [r["rss_mib"] for r in rows]
  out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rows)
  out["iterations_run"] = len(rows)
  if len(after) >= 2:
    # Single iterations can lift the RSS and drop back (the allocator); growth is the median RSS
    # of the second half of the iterations after warm-up minus that of the first, so a spike does
    # not read as growth and a leak of L MiB per iteration over N iterations reads as ~L * N / 2.
    half = len(after) // 2
    out["rss_growth_mib"] = float(np.median([r["rss_mib"] for r in after[half:]])
                                  - np.median([r["rss_mib"] for r in after[:half]]))
    out["rss_spike_mib"] = float(max(r["rss_mib"] for r in after)
                                 - np.median([r["rss_mib"] for r in after]))
    out["rss_growth_iterations"] = len(after)
  return out

def parse_trl_output(text: str) -> dict[str, Any]:
  """The figures `peers/trl_grpo.py` prints (ITER_S, PARTS_S, MEAN_...)."""
  found = {}
  for line in text.splitlines():
    key, _, value = line.strip().partition(" ")
    if key in ("ITER_S", "PARTS_S", "MEAN_COMPLETION_TOKENS", "ITER_S_MEDIAN"):
      found[key] = json.loads(value)
  if "ITER_S" not in found:
    raise ValueError("TRL's output has no ITER_S line; its last lines:\n" +
                     "\n".join(text.splitlines()[-15:]))
  return found

def physical_floor(model: Any, case: dict[str, Any], c, peak: dict[str, Any] | None
                   ) -> dict[str, Any]:
  """FLOPs of the update, of logp_old and of decoding at the measured shapes, and the seconds
  they would take at the measured matmul peak of the compute dtype.

  `model`: anything with a `config` (a ModelConfig), e.g. benchmark.py's BenchModel."""
  rows = c.prompts_per_step * c.samples_per_prompt
  seq = case["train_seq_len"]["median"]
  steps = int(round(case["max_response_length"]["median"]))
  if not np.isfinite(seq):
    seq = 64 + c.max_new_tokens
  seq = int(seq)
  update = c.num_minibatches * train_step_flops(model.config, rows // c.num_minibatches,
                                                seq)["total"]
  logp = train_step_flops(model.config, rows, seq)["total"] / 3.0
  decode = decode_flops(model.config, rows, 40, steps)
  out = {"train_seq_len": seq, "decode_steps": steps, "update_flops": update,
         "logp_flops": logp, "decode_flops": decode,
         "decode_step_ms": 1e3 * case["sample_s"]["median"] / max(steps, 1)}
  dtype = dtype_name(get_policy(case["precision"], "trainer").compute_dtype)
  if peak and dtype in peak:
    rate = peak_flops_per_s(peak, dtype)
    out.update({"peak_dtype": dtype, "peak_flops_per_s": rate,
                "update_floor_s": update / rate, "logp_floor_s": logp / rate,
                "decode_floor_s": decode / rate,
                "decode_step_floor_ms": 1e3 * decode / rate / max(steps, 1)})
    for part, floor in (("update", update), ("logp", logp), ("sample", decode)):
      out[f"{part}_fraction_of_peak"] = floor / rate / max(case[f"{part}_s"]["median"], 1e-12)
  return out


def padding_waste(c, seed: int = 0, steps: int = 200) -> dict[str, Any]:
  """Padding of the trainer's batches at paper scale, by Monte Carlo over `steps` minibatches.

  Assumption (stated in the report): response lengths ~ lognormal with mean
  `paper_mean_length` and log-space sigma `paper_sigma`, clipped at `paper_budget` (clipped
  rows are truncated responses). Layouts: every row padded to the budget; the minibatch padded
  to its longest row rounded up to `paper_bucket` (this change's bucketing); micro-batches of
  `paper_microbatch` rows sorted by length within the minibatch, each padded to its own bucket
  (gradient accumulation over them sums the same rows: the same update up to rounding).
  Returns the fraction of padded token slots (linear cost) and of attention-square cells
  (quadratic cost) that hold no real token, per layout.
  """
  rng = np.random.default_rng(seed)
  mu = np.log(c.paper_mean_length) - c.paper_sigma**2 / 2
  budget, bucket, mb, micro = c.paper_budget, c.paper_bucket, c.paper_minibatch, c.paper_microbatch
  lengths = np.minimum(rng.lognormal(mu, c.paper_sigma, (steps, mb)), budget).round()
  real = lengths.sum()
  real_sq = (lengths**2).sum()
  up = lambda x: np.minimum(np.ceil(x / bucket) * bucket, budget)
  batch_width = up(lengths.max(axis=1))
  ordered = np.sort(lengths, axis=1).reshape(steps, mb // micro, micro)
  micro_width = up(ordered.max(axis=2))
  layouts = {
      "pad to budget": (steps * mb * budget, steps * mb * budget**2),
      "minibatch bucket": ((batch_width * mb).sum(), (batch_width**2 * mb).sum()),
      "sorted micro-batch buckets": ((micro_width * micro).sum(), (micro_width**2 * micro).sum()),
  }
  return {"assumption": {"distribution": "lognormal, clipped at the budget",
                         "mean": float(c.paper_mean_length), "sigma": float(c.paper_sigma),
                         "budget": int(budget), "bucket": int(bucket), "minibatch": int(mb),
                         "microbatch": int(micro)},
          "measured_mean_length": float(lengths.mean()),
          "truncated_fraction": float((lengths >= budget).mean()),
          "minibatches_with_a_truncated_row": float((lengths.max(axis=1) >= budget).mean()),
          "layouts": {name: {"token_waste": 1 - real / slots, "attention_waste": 1 - real_sq / sq}
                      for name, (slots, sq) in layouts.items()}}

# --------------------------------------------------------------------------------- targets ----


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The suite's targets against the measured ratios; `passed` is None when not measured."""
  targets = []

  def add(name, target, measured, passed, note=""):
    targets.append({"name": name, "target": target, "measured": measured, "passed": passed,
                    "note": note})

  trainer = results.get("trainer") or []
  for length in sorted({r["response_len"] for r in trainer if r["model"] == "medium"}):
    rows = {r["precision"]: r for r in trainer
            if r["model"] == "medium" and r["response_len"] == length}
    if "fp32" in rows:
      mfu = rows["fp32"]["mfu"]["median"]
      add(f"trainer MFU, medium fp32, response {length}", f">= {TARGET_MFU:.0%}", f"{mfu:.1%}",
          mfu >= TARGET_MFU)
      base = rows["fp32"]["tokens_per_s"]["median"]
      for precision in ("bf16", "fp16"):
        if precision in rows:
          ratio = rows[precision]["tokens_per_s"]["median"] / base
          add(f"trainer {precision}/fp32 tokens/s, medium, response {length}",
              f">= {TARGET_LOW_PRECISION_SPEEDUP:.2f}x", f"{ratio:.2f}x",
              ratio >= TARGET_LOW_PRECISION_SPEEDUP)
  if trainer:
    worst = max(r["compiles_per_step"] for r in trainer)
    add("trainer compilations per step after warm-up", "0", str(worst), worst == 0)

  samplers = results.get("samplers") or []
  vllm_rows = {(r["model"], r["precision"], r["new_tokens"]): r for r in samplers
               if r["engine"] == "vllm"}
  for r in samplers:
    key = (r["model"], r["precision"], r["new_tokens"])
    if r["engine"] == "jax" and key in vllm_rows:
      ratio = r["tokens_per_s"]["median"] / vllm_rows[key]["tokens_per_s"]["median"]
      add(f"JAX/vLLM sampler tokens/s, {key[0]} {key[1]}, {key[2]} tokens",
          f">= {TARGET_JAX_OVER_VLLM:.2f}x", f"{ratio:.2f}x", ratio >= TARGET_JAX_OVER_VLLM)
  jax_rows = [r for r in samplers if r["engine"] == "jax"]
  if jax_rows:
    worst = max(r["compiles_per_call"] for r in jax_rows)
    add("JAX sampler compilations per repeated call", "0", str(worst), worst == 0)

  for r in results.get("sync") or []:
    ratio = r["directory_over_memory"]
    add(f"sync directory/in-memory seconds, {r['model']} {r['precision']}",
        f">= {TARGET_SYNC_SPEEDUP:.0f}x", f"{ratio:.1f}x", ratio >= TARGET_SYNC_SPEEDUP)

  compare = results.get("compare")
  if compare:
    for row in compare["cases"]:
      name = f"{row['engine']} {row['precision']}"
      wanted = TARGET_JAX_OVER_TRL if row["engine"] == "jax" else TARGET_VLLM_OVER_TRL
      ratio = row["speedup_vs_trl"]
      if ratio is not None:  # TRL skipped: the compare table says why
        add(f"RL iteration TRL/rl_fp16 seconds, {name}", f">= {wanted:.1f}x", f"{ratio:.2f}x",
            ratio >= wanted)
      floor = row.get("floor") or {}
      if row["engine"] == "jax" and floor.get("decode_step_floor_ms"):
        times_floor = floor["decode_step_ms"] / floor["decode_step_floor_ms"]
        add(f"decode step / its FLOP floor, {name}", f"<= {TARGET_DECODE_OVER_FLOOR:.0f}x",
            f"{times_floor:.1f}x", times_floor <= TARGET_DECODE_OVER_FLOOR)
      add(f"compilations after warm-up, {name}", "0", str(row["compiles_after_warmup"]),
          row["compiles_after_warmup"] == 0)
      if "rss_growth_mib" in row:
        growth = row["rss_growth_mib"]
        add(f"resident memory growth over {row['rss_growth_iterations']} iterations, {name}",
            f"< {TARGET_RSS_GROWTH_MIB:.0f} MiB", f"{growth:+.1f} MiB",
            growth < TARGET_RSS_GROWTH_MIB)

  e2e = results.get("e2e")
  if e2e:
    frac = e2e["other_fraction"]["median"]
    add(f"score+logp+sync share of an RL iteration ({e2e['engine']} {e2e['precision']})",
        f"< {TARGET_OTHER_FRACTION:.0%}", f"{frac:.1%}", frac < TARGET_OTHER_FRACTION)
  return targets


def run_metrics(results: dict[str, Any]) -> dict[str, float]:
  """The measured numbers as one metrics row, named by section and case: "peak/float32/...",
  "trainer/{model}/{precision}/resp{n}/tokens_per_s/median", "samplers/{model}/{engine}/
  {precision}/new{n}/...", "sync/{model}/{precision}/...", "e2e/...", "bitwise/{model}/{normal,
  bitwise}/...", "compare/{engine}/{precision}/...", "compare/trl/...". Repetitions and targets
  stay in benchmark.json."""
  record = {k: results[k] for k in ("peak", "e2e", "peak_rss_mib", "seconds", "section_seconds")
            if k in results}
  labels = {"trainer": lambda r: f"{r['model']}/{r['precision']}/resp{r['response_len']}",
            "samplers": lambda r: (f"{r['model']}/{r['engine']}/{r['precision']}/"
                                   f"new{r['new_tokens']}"),
            "sync": lambda r: f"{r['model']}/{r['precision']}"}
  for section, label in labels.items():
    if section in results:
      record[section] = {label(r): r for r in results[section]}
  if "bitwise" in results:
    record["bitwise"] = {case["model"]: {"normal": case["normal"], "bitwise": case["bitwise"]}
                         for case in results["bitwise"]}
  if "compare" in results:
    compare = results["compare"]
    record["compare"] = {"trl": compare["trl"], "padding": compare["padding"],
                         **{f"{r['engine']}/{r['precision']}": r for r in compare["cases"]}}
  return flatten_metrics(record)

# ---------------------------------------------------------------------------------- tables ----


def _stat(stat: dict[str, Any], fmt: str = "{:.3g}", factor: float = 1.0) -> str:
  return (f"{fmt.format(stat['median'] * factor)} [{fmt.format(stat['min'] * factor)}, "
          f"{fmt.format(stat['max'] * factor)}]")


def format_report(results: dict[str, Any]) -> str:
  """Markdown tables of every measured section, then the targets. Cells: median [min, max]."""
  out = (_peak_section(results) + _trainer_section(results) + _profile_section(results)
         + _samplers_section(results) + _sync_section(results) + _worker_sync_section(results)
         + _e2e_section(results))
  if results.get("bitwise"):
    out.append(format_bitwise(results["bitwise"]))
  compare = results.get("compare")
  if compare:
    out.append(format_compare(compare))
  out += _targets_section(results)
  return "\n\n".join(out)


def _peak_section(results: dict[str, Any]) -> list[str]:
  """The matmul peak per dtype (no parts without a peak)."""
  peak = results.get("peak")
  if not peak:
    return []
  return [f"### Peak: jitted {peak['matmul_size']}^2 matmul",
          markdown_table(["dtype", "GFLOP/s", "seconds"], [
              [d, _stat(peak[d]["flops_per_s"], "{:.1f}", 1e-9), _stat(peak[d]["seconds"])]
              for d in ("float32", "bfloat16", "float16")])]


def _trainer_section(results: dict[str, Any]) -> list[str]:
  """The train step per (model, response length, precision)."""
  if not results.get("trainer"):
    return []
  return ["### Trainer: train step (MFU against the float32 matmul peak; MFU* against "
          "the peak of the step's compute dtype)",
          markdown_table(
              ["model", "params", "resp len", "rows x seq", "precision", "step s", "tokens/s",
               "MFU", "MFU*", "compiles/step", "warm-up compile s"],
              [[r["model"], f"{r['params'] / 1e6:.2f}M", r["response_len"],
                f"{r['rows']}x{r['prompt_len'] + r['response_len']}", r["precision"],
                _stat(r["seconds"]), _stat(r["tokens_per_s"], "{:.0f}"),
                _stat(r["mfu"], "{:.1f}", 100.0) + "%",
                _stat(r["mfu_compute_dtype"], "{:.1f}", 100.0) + "%", r["compiles_per_step"],
                f"{r['warmup_compile_s']:.1f}"]
               for r in results["trainer"]])]


def _profile_section(results: dict[str, Any]) -> list[str]:
  """The op time by kind of each profiled trainer case."""
  profiled = [r for r in results.get("trainer") or [] if r.get("profile")]
  if not profiled:
    return []
  return ["### Trainer profiles: op time by kind (share of the step's XLA op time)",
          "\n".join(
              f"- {r['model']} resp {r['response_len']} {r['precision']}: " + ", ".join(
                  f"{p['op']} {p['share']:.0%}" for p in r["profile"][:6])
              for r in profiled)]


def _samplers_section(results: dict[str, Any]) -> list[str]:
  """Generated tokens/s per (model, engine, precision)."""
  if not results.get("samplers"):
    return []
  return ["### Samplers: generated tokens/s (no EOS)",
          markdown_table(
              ["model", "engine", "precision", "rows", "new tokens", "seconds", "tokens/s",
               "compiles/call"],
              [[r["model"], r["engine"], r["precision"], r["rows"], r["new_tokens"],
                _stat(r["seconds"]), _stat(r["tokens_per_s"], "{:.0f}"),
                r["compiles_per_call"] if r["engine"] == "jax" else "-"]
               for r in results["samplers"]])]


def _sync_section(results: dict[str, Any]) -> list[str]:
  """The in-memory and directory weight syncs into vLLM."""
  if not results.get("sync"):
    return []
  return ["### Weight sync into vLLM",
          markdown_table(
              ["model", "dtype", "MiB", "in-memory s", "of it: convert s",
               "of it: vLLM reload s", "directory s", "in-memory MiB/s", "directory MiB/s",
               "dir/mem"],
              [[r["model"], r["precision"], f"{r['param_mib']:.1f}", _stat(r["memory_s"]),
                _stat(r["memory_convert_s"]), _stat(r["memory_reload_s"]),
                _stat(r["directory_s"]), _stat(r["memory_mib_per_s"], "{:.0f}"),
                _stat(r["directory_mib_per_s"], "{:.0f}"),
                f"{r['directory_over_memory']:.1f}x"]
               for r in results["sync"]])]


def _worker_sync_section(results: dict[str, Any]) -> list[str]:
  """The directory-mode sync to a sampler worker process, where measured."""
  worker_rows = [r for r in results.get("sync") or [] if "worker_s" in r]
  if not worker_rows:
    return []
  return ["### Weight sync to a sampler in another process (weight_sync=directory)",
          markdown_table(
              ["model", "dtype", "MiB", "in-memory s", "versioned write s", "worker reload s",
               "directory mode s", "directory mode/in-memory", "worker start s"],
              [[r["model"], r["precision"], f"{r['param_mib']:.1f}", _stat(r["memory_s"]),
                _stat(r["worker_write_s"]), _stat(r["worker_reload_s"]), _stat(r["worker_s"]),
                f"{r['worker_over_memory']:.1f}x", f"{r['worker_start_s']:.1f}"]
               for r in worker_rows])]


def _e2e_section(results: dict[str, Any]) -> list[str]:
  """One RL iteration's parts and their shares, then its compile and memory notes."""
  e2e = results.get("e2e")
  if not e2e:
    return []
  parts = ("sample", "score", "logp", "update", "sync", "step")
  step = e2e["step_s"]["median"]
  return [f"### End to end: one RL iteration ({e2e['engine']} {e2e['precision']}, "
          f"{e2e['rows']} rows, up to {e2e['max_new_tokens']} new tokens; "
          f"reward: {e2e['reward']})",
          markdown_table(["part", "seconds", "share"], [
              [p if p != "step" else "total", _stat(e2e[f"{p}_s"]),
               f"{e2e[f'{p}_s']['median'] / step:.1%}"] for p in parts]),
          f"score+logp+sync share: {_stat(e2e['other_fraction'], '{:.1f}', 100.0)}%; "
          f"mean response length {e2e['response_length_mean']['median']:.0f}; "
          f"compilations per iteration after warm-up: {e2e['compiles_per_iteration']}; "
          f"warm-up iteration {sum(e2e['warmup_iteration_s']):.1f} s (XLA compiling "
          f"{e2e['warmup_compile_s']:.1f} s: " + ", ".join(
              f"{k} {v:.1f}" for k, v in list(
                  e2e["warmup_compile_s_by_function"].items())[:4])
          + f"); peak RSS {e2e['peak_rss_mib']:.0f} MiB"]


def _targets_section(results: dict[str, Any]) -> list[str]:
  """Each target: wanted, measured, PASS / FAIL / n/a."""
  if not results.get("targets"):
    return []
  return ["### Targets",
          markdown_table(["target", "wanted", "measured", "result"], [
              [t["name"], t["target"], t["measured"],
               "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")]
              for t in results["targets"]])]


def format_bitwise(cases: list[dict[str, Any]]) -> str:
  """One table per model: each part of the RL iteration, normal vs bitwise mode, and the ratio."""
  out = []
  for case in cases:
    normal, bitwise = case["normal"], case["bitwise"]
    out.append(f"### Bitwise mode vs normal: one RL iteration ({case['model']} model, JAX engine "
               f"{normal['precision']}, {normal['rows']} rows, up to {normal['max_new_tokens']} "
               f"new tokens; max |pi - mu| normal {normal['mismatch_max']:.3g}, bitwise "
               f"{bitwise['mismatch_max']:.3g})")
    rows = []
    for part in ("sample", "logp", "update", "sync", "step"):
      ratio = bitwise[f"{part}_s"]["median"] / max(normal[f"{part}_s"]["median"], 1e-9)
      rows.append([part if part != "step" else "total", _stat(normal[f"{part}_s"]),
                   _stat(bitwise[f"{part}_s"]), f"{ratio:.2f}x"])
    out.append(markdown_table(["part", "normal s", "bitwise s", "bitwise/normal"], rows))
  return "\n\n".join(out)


def format_compare(compare: dict[str, Any]) -> str:
  """The side-by-side table (TRL and rl_fp16), then memory, the physical floor and padding."""
  out = [_compare_title(compare["settings"]), _compare_table(compare),
         _compare_notes(compare)]
  out += _memory_lines(compare) + _floor_section(compare) + _padding_section(compare)
  return "\n\n".join(out)


def _compare_title(st: dict[str, Any]) -> str:
  """The side-by-side table's heading with the settings it ran at."""
  return (f"### RL iteration side by side: TRL vs rl_fp16 ({st['prompts_per_step']} prompts x "
          f"{st['samples_per_prompt']} samples, up to {st['max_new_tokens']} new tokens, "
          f"{st['num_minibatches']} optimizer steps per batch, lr {st['learning_rate']:g}"
          + (f", JAX decode in groups of {st['jax_decode_row_group']} rows"
             if st.get("jax_decode_row_group") else "")
          + (f", micro-batches of {st['micro_batch_rows']} rows"
             if st.get("micro_batch_rows") else "")
          + f"; median [min, max] of {st['repetitions']} iterations after {st['warmup']} warm-up;"
          " seconds)")


def _trl_row(trl: dict[str, Any]) -> list[Any]:
  """TRL's row of the side-by-side table ("skipped" when it did not run)."""
  if "skipped" in trl:
    return ["TRL 1.16 GRPOTrainer (HF generate), fp32", "skipped", "-", "-", "-", "-",
            "1.00x", "-", "-", "-"]
  return ["TRL 1.16 GRPOTrainer (HF generate), fp32", _stat(trl["iteration_s"]),
          *[(_stat(trl[f"{p}_s"]) if f"{p}_s" in trl else "-")
            for p in ("sample", "logp", "update")], "-", "1.00x", "-",
          f"{trl['mean_completion_tokens']}", "-"]


def _compare_table(compare: dict[str, Any]) -> str:
  """TRL's row, then one per rl_fp16 case."""
  header = ["system", "s / iteration", "sample", "logp", "update", "sync", "TRL / this",
            "compiles after warm-up", "mean resp len", "train seq len"]
  rows = [_trl_row(compare["trl"])]
  for r in compare["cases"]:
    ratio = r["speedup_vs_trl"]
    rows.append([f"rl_fp16, {r['engine']} engine, {r['precision']}", _stat(r["iteration_s"]),
                 *[_stat(r[f"{p}_s"]) for p in ("sample", "logp", "update", "sync")],
                 "-" if ratio is None else f"{ratio:.2f}x", r["compiles_after_warmup"],
                 f"{r['response_length_mean']['median']:.0f}",
                 f"{r['train_seq_len']['median']:.0f}"])
  return markdown_table(header, rows)


def _compare_notes(compare: dict[str, Any]) -> str:
  """Bullets: what TRL's and rl_fp16's columns hold, warm-up and precompiled widths."""
  trl = compare["trl"]
  notes = []
  if "skipped" in trl:
    notes.append(f"TRL skipped: {trl['skipped']}.")
  else:
    notes.append(f"TRL per iteration (first is warm-up): {trl['iterations']}; its 'logp' is "
                 "the rest of its generate-and-score (rewards, advantages, old log-probs), "
                 "'update' the rest of its two optimizer steps.")
  notes.append("rl_fp16 'sample' is the engine's generate alone; the rest of an iteration is "
               "score + logp + update + sync. Warm-up iterations (compiling): " + "; ".join(
                   f"{r['engine']} {r['precision']} " + ", ".join(f"{x:.1f}" for x in
                                                                 r["warmup_s"]) + " s"
                   for r in compare["cases"]) + "; then the trainer was compiled for the packed "
               "widths " + "; ".join(f"{r['engine']} {r['precision']} {r['precompiled_widths']} "
                                     f"({r['precompile_s']:.1f} s)" for r in compare["cases"])
               + " (every bucket from the smallest seen to the longest possible).")
  return "\n".join(f"- {n}" for n in notes)


def _memory_lines(compare: dict[str, Any]) -> list[str]:
  """Resident memory over the iterations of the cases that tracked it."""
  mem = [r for r in compare["cases"] if "rss_growth_mib" in r]
  if not mem:
    return []
  return ["Resident memory (RSS, MiB) after each iteration: " + "; ".join(
      f"{r['engine']} {r['precision']}: first {r['rss_mib'][0]:.0f}, after warm-up "
      f"{r['rss_mib'][len(r['warmup_s'])]:.0f}, last ({r['iterations_run']} iterations) "
      f"{r['rss_mib'][-1]:.0f}, growth (median of the second half of the "
      f"{r['rss_growth_iterations']} iterations after warm-up minus median of the first half)"
      f" {r['rss_growth_mib']:+.1f}, largest one-iteration spike above the median "
      f"{r.get('rss_spike_mib', float('nan')):+.0f}; process peak {r['peak_rss_mib']:.0f}"
      for r in mem)]


def _floor_section(compare: dict[str, Any]) -> list[str]:
  """The physical floor (FLOPs / measured peak) of each case's update, logp and decode."""
  floors = [(r, r["floor"]) for r in compare["cases"] if "update_floor_s" in r["floor"]]
  if not floors:
    return []
  return ["Physical floor at the measured matmul peak of the compute dtype (FLOPs / peak; "
          "the share of the measured time that is at peak):",
          markdown_table(
              ["case", "peak GFLOP/s", "train seq", "update GFLOP", "update floor s (share)",
               "logp GFLOP", "logp floor s (share)", "decode GFLOP", "decode floor s (share)",
               "decode step ms (floor)"],
              [[f"{r['engine']} {r['precision']}", f"{f['peak_flops_per_s'] / 1e9:.0f}",
                f["train_seq_len"], f"{f['update_flops'] / 1e9:.1f}",
                f"{f['update_floor_s']:.3f} ({f['update_fraction_of_peak']:.0%})",
                f"{f['logp_flops'] / 1e9:.1f}",
                f"{f['logp_floor_s']:.3f} ({f['logp_fraction_of_peak']:.0%})",
                f"{f['decode_flops'] / 1e9:.1f}",
                f"{f['decode_floor_s']:.3f} ({f['sample_fraction_of_peak']:.0%})",
                f"{f['decode_step_ms']:.1f} ({f['decode_step_floor_ms']:.2f})"]
               for r, f in floors])]


def _padding_section(compare: dict[str, Any]) -> list[str]:
  """Padding waste per layout at paper scale, under the assumed length distribution."""
  pad = compare.get("padding")
  if not pad:
    return []
  a = pad["assumption"]
  return [f"Padding at paper scale (assumed: response lengths lognormal, mean {a['mean']:.0f}"
          f", sigma {a['sigma']}, clipped at the {a['budget']} budget: sampled mean "
          f"{pad['measured_mean_length']:.0f}, {pad['truncated_fraction']:.1%} truncated, "
          f"{pad['minibatches_with_a_truncated_row']:.0%} of {a['minibatch']}-row "
          f"minibatches hold a truncated row; buckets of {a['bucket']} tokens):",
          markdown_table(
              ["layout", "padded token slots", "padded attention cells"],
              [[name, f"{v['token_waste']:.1%}", f"{v['attention_waste']:.1%}"]
               for name, v in pad["layouts"].items()])]
