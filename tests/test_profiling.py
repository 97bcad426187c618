"""rl_fp16.profiling: compile counting, timed repetitions, model-FLOPs formulas, op profiles."""

import jax
import numpy as np
import pytest

from rl_fp16 import profiling
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import get_policy
from rl_fp16.sampling.engines import make_engine
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.train import OptimizerConfig, make_optimizer

CONFIG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     qkv_bias=True, initializer_range=0.2)


def test_compile_counter_counts_a_fresh_jit_and_not_a_cached_call():
  f = jax.jit(lambda x: x * 7 - 2)
  with profiling.CompileCounter() as fresh:
    f(np.ones(13)).block_until_ready()
  assert fresh.count == 1 and "lambda" in fresh.names[0], fresh.names
  assert fresh.seconds > 0 and sum(fresh.seconds_by_function.values()) == pytest.approx(
      fresh.seconds)
  with profiling.CompileCounter() as cached:
    f(np.zeros(13)).block_until_ready()
  assert cached.count == 0 and cached.names == [] and cached.seconds == 0.0
  with profiling.CompileCounter() as outside:
    pass
  f(np.ones(14)).block_until_ready()  # compiles after the counter stopped listening
  assert outside.count == 0


def test_jax_sampler_does_not_recompile_on_a_repeated_call():
  engine = make_engine("jax", CONFIG, init_params(CONFIG, jax.random.key(0)),
                       get_policy("fp32", "sampler"), eos_token_ids=[])
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  sampling = SamplingConfig(max_new_tokens=7)  # a shape no other test in this process uses
  with profiling.CompileCounter() as first:
    engine.generate(prompts, n=2, sampling=sampling, seed=0)
  assert first.count >= 1 and any("_decode" in name for name in first.names), first.names
  assert first.seconds > 0
  with profiling.CompileCounter() as again:
    rollout = engine.generate(prompts, n=2, sampling=sampling, seed=1)
  assert again.count == 0, again.names
  assert int(rollout.response_mask.sum()) == 4 * 7  # no EOS: every row runs to the length
  # Other prompts of lengths in the same bucket, same batch: still the same executable.
  with profiling.CompileCounter() as same_bucket:
    engine.generate([[9, 10], [11]], n=2, sampling=sampling, seed=2)
  assert same_bucket.count == 0, same_bucket.names


def test_time_calls_reports_compiles_of_timed_calls_only():
  f = jax.jit(lambda x: x * 3 + 1)
  shapes = [(5,), (5,), (6,)]  # warm-up compiles (5,); the second timed call compiles (6,)
  timing = profiling.time_calls(lambda i: f(np.ones(shapes[i])).block_until_ready(), warmup=1,
                                repetitions=2)
  assert timing.compiles == [0, 1]
  assert timing.recompiled and all("lambda" in name for name in timing.recompiled)
  assert timing.warmup_compile_s > 0
  assert 0 < timing.seconds["min"] <= timing.seconds["median"] <= timing.seconds["max"]
  assert len(timing.seconds["values"]) == 2


def test_train_step_flops_formula():
  flops = profiling.train_step_flops(CONFIG, batch=3, seq_len=10)
  n = CONFIG.num_params(include_embeddings=False) + 64 * 64  # + the output projection
  assert flops["dense"] == 6 * n * 3 * 10
  assert flops["attention"] == 12 * 2 * 2 * 32 * 10**2 * 3  # 12 L H d_head S^2 B
  assert flops["total"] == flops["dense"] + flops["attention"]


def test_xla_op_profile_groups_a_traced_function_by_op_kind(tmp_path):
  @jax.jit
  def two_matmuls_and_a_tanh(a, b):
    return jax.numpy.tanh(a @ b) @ b

  a = jax.numpy.ones((256, 256))
  two_matmuls_and_a_tanh(a, a).block_until_ready()  # compile outside the trace
  with jax.profiler.trace(str(tmp_path)):
    two_matmuls_and_a_tanh(a, a).block_until_ready()
  profile = profiling.xla_op_profile(str(tmp_path), "jit_two_matmuls_and_a_tanh")
  assert profile, "no op events for the traced function"
  assert sum(p["share"] for p in profile) == pytest.approx(1.0)
  assert all(p["ms"] >= 0 and p["count"] >= 1 for p in profile)
  assert all(not p["op"][-1].isdigit() for p in profile)  # ".N" suffixes are grouped away
  assert profiling.xla_op_profile(str(tmp_path), "jit_not_traced") == []
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    profiling.xla_op_profile(str(tmp_path / "missing"), "jit_two_matmuls_and_a_tanh")




def test_decode_flops_formula():
  rows, prompt_len, steps = 3, 5, 4
  n = CONFIG.num_params(include_embeddings=False) + 64 * 64  # + the output projection
  contexts = 5 + 6 + 7 + 8  # the context each of the 4 decode steps attends to
  expected = rows * (2 * n * steps + 4 * 2 * 2 * 32 * contexts)  # 4 L H d_head per position
  assert profiling.decode_flops(CONFIG, rows, prompt_len, steps) == expected


def test_summarize_invert_stat_and_the_section_clock():
  stat = profiling.summarize([4.0, 1.0, 2.0])
  assert (stat["median"], stat["min"], stat["max"], stat["values"]) == (2.0, 1.0, 4.0,
                                                                        [4.0, 1.0, 2.0])
  assert profiling.invert_stat(stat, 8.0)["values"] == [2.0, 8.0, 4.0]
  with pytest.raises(ValueError, match="No repetitions"):
    profiling.summarize([])
  with profiling.SectionClock() as clock:
    sum(i * i for i in range(200_000))
  assert clock.wall > 0 and clock.cpu >= 0
  assert set(clock.to_dict()) == {"wall_s", "cpu_s"}
  assert 0 < profiling.current_rss_mib() <= profiling.peak_rss_mib() + 1.0


def test_matmul_peak_and_train_step_speed_structure():
  peak = profiling.matmul_peak(32, seed=0, warmup=1, repetitions=2)
  assert peak["matmul_size"] == 32
  for dtype in ("float32", "bfloat16", "float16"):
    assert len(peak[dtype]["seconds"]["values"]) == 2
    assert profiling.peak_flops_per_s(peak, dtype) > 0
  params = init_params(CONFIG, jax.random.key(0))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))
  row = profiling.train_step_speed(CONFIG, params, precision="fp32", prompt_len=4,
                                   response_len=12, tokens_per_step=48, optimizer=optimizer,
                                   peak=peak, warmup=1, repetitions=2)
  assert (row["rows"], row["tokens"], row["precision"]) == (3, 48, "fp32")
  assert row["compiles_per_step"] == 0 and row["profile"] is None
  assert row["model_flops"] == profiling.train_step_flops(CONFIG, 3, 16)
  seconds = row["seconds"]["values"]  # rates are per repetition (2 here: medians are means)
  assert row["tokens_per_s"]["values"] == pytest.approx([48 / s for s in seconds])
  fp32_peak = profiling.peak_flops_per_s(peak, "float32")
  assert row["mfu"]["values"] == pytest.approx(
      [row["model_flops"]["total"] / s / fp32_peak for s in seconds])
