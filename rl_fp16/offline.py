"""Offline training-inference mismatch: sample with an engine, re-score with the trainer.

For one precision pair (trainer-sampler), `measure_pair` samples responses with an engine in the
sampler's dtype and recomputes their log-probabilities with the trainer's full-sequence forward in
the trainer's dtype (`batched_token_logprobs`); the metrics are `mismatch.mismatch_metrics`
(docs/design.md, "Mismatch metrics"). `layer_view` locates where the disagreement enters our
decoder; `summarize_pairs` is the per-pair summary with FP16's reduction over BF16.

The `model` arguments are any object with `config`, `params`, `tokenizer_dir` and
`eos_token_ids` (e.g. experiments.common.PolicyModel). Used by experiments/offline_mismatch.py
(which adds tokens.csv and the plots) and experiments/gpu_check/; both log `run_metrics` as one
metrics.jsonl row (`rl_fp16.results.RunWriter`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from rl_fp16 import mismatch
from rl_fp16.precision import get_policy, get_precision_pair
from rl_fp16.results import flatten_metrics
from rl_fp16.sampling.engines import make_engine
from rl_fp16.train import batched_token_logprobs
from rl_fp16.sampling.jax_sampler import SamplingConfig

# The metrics whose BF16 / FP16 ratio `summarize_pairs` reports.
REDUCTION_KEYS = ("mismatch/logp_diff_mean", "mismatch/prob_diff_mean", "mismatch/kl_k1",
                  "mismatch/kl_k3", "mismatch/seq_log_ratio_abs_mean")


def measure_pair(model, pair_name: str, prompts: Sequence[Sequence[int]], *, engine: str,
                 samples_per_prompt: int, max_new_tokens: int, temperature: float, seed: int,
                 workdir: str, max_model_len: int, bitwise: bool = False) -> dict[str, Any]:
  """Samples with `engine` ("jax", "vllm") in the pair's sampler dtype, re-scores with the trainer
  (`bitwise`: both policies bitwise, `DtypePolicy.bitwise`; the JAX engine only).

  Returns {"rollout": the engine's Rollout, "logp_old": float32 [B, T] (the trainer's log pi of
  each sampled token, the names of `rl_fp16.mismatch`), "metrics": flat `mismatch/...` dict plus
  "time/sample_s" and "response/length_mean"}.
  """
  pair = get_precision_pair(pair_name, bitwise=bitwise)
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
  start = time.perf_counter()
  sampler = make_engine(engine, model.config, model.params, pair.sampler, workdir=workdir,
                        tokenizer_dir=model.tokenizer_dir, eos_token_ids=model.eos_token_ids,
                        max_model_len=max_model_len, seed=seed)
  try:
    rollout = sampler.generate(prompts, n=samples_per_prompt, sampling=sampling, seed=seed)
  finally:
    sampler.close()
  sample_s = time.perf_counter() - start
  logp_old = batched_token_logprobs(model.config, model.params, rollout,
                                    policy=pair.trainer, temperature=temperature)
  metrics = mismatch.mismatch_metrics(logp_old, rollout.logp_sampler, rollout.response_mask)
  metrics["time/sample_s"] = sample_s
  metrics["response/length_mean"] = float(rollout.response_lengths.mean())
  return {"rollout": rollout, "logp_old": logp_old, "metrics": metrics}


def layer_view(model, results: dict[str, dict], num_sequences: int) -> dict[str, list[float]]:
  """Relative error of each layer's residual stream (and the logits) against fp32.

  Uses the fp32 pair's sampled sequences (or the first pair's), for the full-sequence path and
  the KV-cache path of our decoder in bf16 and fp16. Keys like "bf16/full", "fp16/kv_cache"; each
  value has one entry per layer boundary (embedding, layer 1..L) and the logits last.
  """
  from rl_fp16.models import residual_stream, residual_stream_cached  # pylint: disable=g-import-not-at-top,line-too-long

  source = results.get("fp32") or next(iter(results.values()))
  tokens, attention_mask, _ = source["rollout"].full_sequence()
  tokens, attention_mask = tokens[:num_sequences], attention_mask[:num_sequences]
  valid = attention_mask.astype(bool)
  ref_res, ref_logits = residual_stream(model.config, get_policy("fp32"), model.params, tokens,
                                        attention_mask)
  ref = [np.asarray(r)[valid] for r in ref_res] + [np.asarray(ref_logits)[valid]]

  def rel_errors(layers):
    return [float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            for a, b in zip(layers, ref)]

  view = {}
  for name in ("bf16", "fp16"):
    policy = get_policy(name, "sampler")
    res, logits = residual_stream(model.config, policy, model.params, tokens, attention_mask)
    view[f"{name}/full"] = rel_errors([np.asarray(r, np.float32)[valid] for r in res]
                                      + [np.asarray(logits, np.float32)[valid]])
    res, logits = residual_stream_cached(model.config, policy, model.params, tokens,
                                         attention_mask)
    view[f"{name}/kv_cache"] = rel_errors([np.asarray(r, np.float32)[valid] for r in res]
                                          + [np.asarray(logits, np.float32)[valid]])
  return view


def summarize_pairs(results: dict[str, dict], view: dict | None) -> dict[str, Any]:
  """{"metrics": {pair: metrics}, "layer_view": view} and, when both "bf16" and "fp16" were
  measured, "fp16_over_bf16_reduction": BF16's value / FP16's for each of `REDUCTION_KEYS` (NaN
  when both are 0, as in the bitwise mode)."""
  summary = {"metrics": {k: r["metrics"] for k, r in results.items()}, "layer_view": view}
  if "bf16" in results and "fp16" in results:
    bf16, fp16 = results["bf16"]["metrics"], results["fp16"]["metrics"]
    summary["fp16_over_bf16_reduction"] = {
        key: bf16[key] / fp16[key] if fp16[key] else float("inf") if bf16[key] else float("nan")
        for key in REDUCTION_KEYS}
  return summary


def run_metrics(summary: dict[str, Any]) -> dict[str, float]:
  """`summarize_pairs`' summary as one metrics row: "{pair}/{name}" ("bf16/mismatch/kl_k3"),
  "fp16_over_bf16/{name}" and "layer_view/{path}/{i}" (i: 0 the embedding, 1..L the layers, then
  the logits)."""
  record = dict(summary["metrics"])
  if "fp16_over_bf16_reduction" in summary:
    record["fp16_over_bf16"] = summary["fp16_over_bf16_reduction"]
  if summary.get("layer_view"):
    record["layer_view"] = {path: dict(enumerate(errors))
                            for path, errors in summary["layer_view"].items()}
  return flatten_metrics(record)
