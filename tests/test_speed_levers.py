"""The speed levers give the results of the paths they replace.

- Length-bucketed trainer sequences (`RLConfig.sequence_bucket > 0`) vs the unbucketed width
  (`sequence_bucket=0`: every row padded to the prompt width plus max_new_tokens), both through
  the one jitted logp_old pass and the minibatch updates in one jitted `lax.scan`: the same
  rollout, rewards and logp_old up to float32 rounding, params within rounding after several
  iterations, and no compilation after warm-up.
- The segmented decode (KV-cache window growing by `decode_segment` steps) vs one window over the
  whole budget: the same tokens for the same seed, log-probs within float rounding (bit-identical
  on the committed tiny base model; on this test model XLA's reductions over the shorter
  attention window round differently in the last bit).
- One prefill per distinct prompt, copied to its n samples, vs a prefill per row: the same tokens.
- The rows decoded in groups, one group after the other (`decode_row_group`), vs all at once: the
  same tokens, also for one process's share of a batch.
- logp_old of the first minibatch from its own update's forward (no separate pass over its rows)
  vs a logp_old pass over every row: the same updates within float32 rounding, over two epochs.
- A bfloat16 KV cache written as its bit patterns (`decoder.write_cache`): the same slots, and no
  float32 copy of the cache in the compiled program. A float16 cache held in float32 on CPU
  (`decoder.cache_dtype`): the logits and cached values of a float16 cache, bit for bit.
- The attention over a head-major KV cache (`layers.attend`) vs grouped-query attention written
  out in float64 NumPy: equal within float32 rounding, for a decode query and a full sequence.
- The causal attention in query blocks, each against the keys up to its last query
  (`attend(causal=True)`), vs one dense block over all keys: values and gradients within
  rounding, with and without `jax.checkpoint` per block.
- q/k/v and gate/up as one matmul each (`layers.fused_linear`) vs a matmul per projection: the
  same outputs within rounding, and bit for bit under a bitwise policy (which keeps one matmul per
  projection).
- Length-sorted micro-batches, each at its own bucketed width (`RLConfig.micro_batch_rows`), vs
  the whole minibatch at its width: the same losses, metrics and params within rounding (with a
  loss scale too), fewer padded slots, and under a bitwise policy the same forward log-probs bit
  for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_fp16.profiling import CompileCounter
from experiments.benchmark import config as benchmark_config
from experiments.benchmark.report import padding_waste
from rl_fp16 import objectives
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import default_loss_scale_config, get_precision_pair, init_loss_scale
from rl_fp16.sampling import jax_sampler
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.sampling.jax_sampler import SamplingConfig
from rl_fp16.sampling.rollout import Rollout
from rl_fp16.rl_loop import precompile_rl_update, rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer

CONFIG = ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     qkv_bias=True, initializer_range=0.3, eos_token_id=2,
                     max_position_embeddings=128)
PROMPTS = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13, 14], [1, 15]]


def _reward(rollout):
  mask = rollout.response_mask.astype(np.float32)
  even = (rollout.response_tokens % 2 == 0) * mask
  return even.sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def test_packing_round_trip():
  rollout = Rollout(
      prompt_tokens=np.array([[0, 5, 6], [7, 8, 9]], np.int32),
      prompt_mask=np.array([[0, 1, 1], [1, 1, 1]], np.int32),
      response_tokens=np.array([[3, 4, 2, 0], [1, 0, 0, 0]], np.int32),
      response_mask=np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32),
      logp_sampler=np.array([[-1, -2, -3, 0], [-4, 0, 0, 0]], np.float32),
      finish_reasons=("eos", "eos"), prompt_index=np.array([0, 1], np.int32))
  assert rollout.packed_width(4) == 8  # longest prompt + response is 5
  tokens, attention, loss = rollout.packed_sequence(6)
  np.testing.assert_array_equal(tokens, [[5, 6, 3, 4, 2, 0], [7, 8, 9, 1, 0, 0]])
  np.testing.assert_array_equal(attention, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(loss, [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]])
  packed = rollout.pack_response(rollout.logp_sampler, 6)
  np.testing.assert_array_equal(packed, [[0, 0, -1, -2, -3, 0], [0, 0, 0, -4, 0, 0]])
  np.testing.assert_array_equal(rollout.unpack_response(packed), rollout.logp_sampler)
  # The same real tokens, in order, as the unpacked layout.
  full_tokens, full_attention, _ = rollout.full_sequence()
  for row in range(2):
    np.testing.assert_array_equal(tokens[row][attention[row] > 0],
                                  full_tokens[row][full_attention[row] > 0])
  with pytest.raises(ValueError, match="longest"):
    rollout.packed_sequence(4)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_segmented_decode_samples_the_same_tokens(precision, tol):
  params = init_params(CONFIG, jax.random.key(1))
  pair = get_precision_pair(precision)
  sampling = SamplingConfig(max_new_tokens=24)
  out = {}
  for segment in (0, 5):
    out[segment] = jax_sampler.generate(
        CONFIG, params, PROMPTS, policy=pair.sampler, n=2, sampling=sampling,
        rng=jax.random.key(3), eos_token_ids=(2,), decode_segment=segment)
  assert jax_sampler.decode_segments(24, 5) == [5, 10, 15, 20, 24]
  a, b = out[0], out[5]
  assert a.response_lengths.max() > 5  # several segments were decoded
  np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
  np.testing.assert_array_equal(a.response_mask, b.response_mask)
  np.testing.assert_allclose(b.logp_sampler, a.logp_sampler, rtol=tol, atol=tol)
  assert a.finish_reasons == b.finish_reasons


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_shared_prefill_samples_the_tokens_of_a_prefill_per_row(precision, tol):
  """n=3 samples per prompt share one prefill; the reference lists every prompt 3 times with n=1
  (a prefill per row). Row i draws the same noise in both (it depends on the row's index)."""
  params = init_params(CONFIG, jax.random.key(1))
  policy = get_precision_pair(precision).sampler
  kwargs = dict(policy=policy, sampling=SamplingConfig(max_new_tokens=12), rng=jax.random.key(5),
                eos_token_ids=(2,), batch_bucket=8)  # 12 rows padded to 16
  shared = jax_sampler.generate(CONFIG, params, PROMPTS, n=3, **kwargs)
  per_row = jax_sampler.generate(CONFIG, params, [p for p in PROMPTS for _ in range(3)], n=1,
                                 **kwargs)
  assert len(set(map(tuple, shared.response_tokens.tolist()))) > 4  # the rows really differ
  np.testing.assert_array_equal(shared.response_tokens, per_row.response_tokens)
  np.testing.assert_array_equal(shared.response_mask, per_row.response_mask)
  np.testing.assert_allclose(shared.logp_sampler, per_row.logp_sampler, rtol=tol, atol=tol)
  np.testing.assert_array_equal(shared.prompt_tokens, per_row.prompt_tokens)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_row_grouped_decode_samples_the_tokens_of_the_whole_batch(precision, tol):
  """decode_row_group: 4 prompts x 3 samples padded to 12 rows; groups of 4 and 8 (8 pads the
  batch to 16 rows), each group to its own end, vs all rows at once; and one process's share
  (row_offset) decoded in groups vs its rows of the whole batch."""
  params = init_params(CONFIG, jax.random.key(1))
  policy = get_precision_pair(precision).sampler
  kwargs = dict(policy=policy, n=3, sampling=SamplingConfig(max_new_tokens=20),
                rng=jax.random.key(5), eos_token_ids=(2,), decode_segment=8)
  whole = jax_sampler.generate(CONFIG, params, PROMPTS, **kwargs)
  lengths = whole.response_lengths
  assert len(set(lengths.tolist())) > 3 and lengths.min() < 20  # rows end at different steps
  for group in (4, 8):
    grouped = jax_sampler.generate(CONFIG, params, PROMPTS, decode_row_group=group, **kwargs)
    np.testing.assert_array_equal(grouped.response_tokens, whole.response_tokens)
    np.testing.assert_array_equal(grouped.response_mask, whole.response_mask)
    np.testing.assert_allclose(grouped.logp_sampler, whole.logp_sampler, rtol=tol, atol=tol)
    assert grouped.finish_reasons == whole.finish_reasons
  share = jax_sampler.generate(CONFIG, params, PROMPTS[2:], decode_row_group=2, row_offset=6,
                               **kwargs)
  np.testing.assert_array_equal(share.response_tokens, whole.response_tokens[6:])
  with pytest.raises(ValueError, match="decode_row_group must be >= 0"):
    jax_sampler.generate(CONFIG, params, PROMPTS, decode_row_group=-1, **kwargs)


@pytest.mark.parametrize("per_row", [False, True])
def test_a_bf16_cache_write_copies_bits_and_stays_16_bit(per_row):
  """`write_cache` into a bfloat16 KV cache (values computed in the same program, as a decode
  step's keys are): the slots hold exactly the new values, every other slot is unchanged, and the
  compiled program never holds the cache in float32 (XLA:CPU's float32 round trip of a bf16
  dynamic-update-slice, a whole-cache copy per decode step)."""
  from rl_fp16.models.decoder import write_cache
  shape = (4, 2, 32, 40)
  buffer = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), shape[:3] + (3,))
  index = jnp.array([0, 5, 37, 12], jnp.int32) if per_row else jnp.int32(9)

  def step(buffer, x, index):
    return write_cache(buffer, jnp.sin(x).astype(buffer.dtype), index, 3)

  compiled = jax.jit(step).lower(buffer, x, index).compile()
  assert "f32[4,2,32,40]" not in compiled.as_text()
  expected = np.asarray(buffer).copy()
  new = np.asarray(jnp.sin(x).astype(jnp.bfloat16))
  for row, start in enumerate(np.broadcast_to(np.asarray(index), (shape[0],))):
    expected[row, ..., start:start + 3] = new[row]
  out = np.asarray(compiled(buffer, x, index))
  assert out.dtype == expected.dtype
  np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


def test_a_float16_decode_on_cpu_holds_its_cache_in_float32_and_gives_the_same_bits():
  """On CPU a float16 policy's KV cache is float32 (`decoder.cache_dtype`: XLA:CPU runs float16
  dots in float32, so a float16 cache was converted whole at every step); a prefill and three
  decode steps give the logits and cached values of a float16 cache bit for bit."""
  from rl_fp16.models import forward_cached, init_cache
  assert jax.default_backend() == "cpu"
  policy = get_precision_pair("fp16").sampler
  params = init_params(CONFIG, jax.random.key(1))
  cache = init_cache(CONFIG, 3, 16, policy)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(cache)} == {jnp.dtype(jnp.float32)}
  float16_cache = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), cache)
  tokens = jax.random.randint(jax.random.key(2), (3, 8), 3, CONFIG.vocab_size)
  step = jax.jit(lambda c, t, i: forward_cached(
      CONFIG, params, t, i + jnp.arange(t.shape[1])[None], c, i, jnp.ones((3, 16), bool),
      policy=policy))

  def run(cache):
    outputs = []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):
      logits, cache = step(cache, tokens[:, start:stop], jnp.int32(start))
      outputs.append(np.asarray(logits))
    return outputs, cache

  (logits, cache), (logits16, cache16) = run(cache), run(float16_cache)
  for a, b in zip(logits, logits16):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(cache16)):
    assert b.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def _reference_attention(q, k, v, mask):
  """float64 grouped-query attention: q [B, T, H, D], k, v [B, Hkv, S, D], mask [B, T, S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[1]
  k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # [B, H, S, D]
  scores = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bhsd->bthd", probs, v)


@pytest.mark.parametrize("queries", [1, 7])
def test_head_major_attention_matches_a_plain_reference(queries):
  from rl_fp16.models.layers import attend
  b, h, kv, s, d = 3, 4, 2, 9, 8
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (b, queries, h, d))
  k, v = (jax.random.normal(key, (b, kv, s, d)) for key in keys[1:])
  slot = np.arange(s)[None, None, :]
  query_slot = (s - queries + np.arange(queries))[None, :, None]
  mask = (slot <= query_slot) & (slot >= np.array([0, 1, 2])[:, None, None])  # left padding
  out = jax.jit(lambda *a: attend(*a, policy=get_precision_pair("fp32").trainer))(
      q, jnp.swapaxes(k, 2, 3), v, mask)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision,query_block", [("fp32", 512), ("bf16", 512), ("fp32", 32)])
def test_causal_query_blocks_match_one_dense_block(precision, query_block):
  """T = 150: blocks of 64 queries (query_block 512) or of 32 under jax.checkpoint (32)."""
  from rl_fp16.models.layers import _attend_dense, attend, causal_block_size
  policy = get_precision_pair(precision).trainer
  b, t, h, kv, d = 2, 150, 4, 2, 16
  assert causal_block_size(t, query_block) < t
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (b, t, h, d)).astype(policy.compute_dtype)
  k, v = (jax.random.normal(key, shape).astype(policy.compute_dtype)
          for key, shape in zip(keys[1:3], [(b, kv, d, t), (b, kv, t, d)]))
  real = jax.random.bernoulli(keys[3], 0.9, (b, 1, t)).at[:, :, 0].set(True)
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & real

  def total(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * jnp.arange(d))
  blocked = lambda q, k, v: attend(q, k, v, mask, policy, query_block=query_block, causal=True)
  dense = lambda q, k, v: _attend_dense(q, k, v, mask, policy)
  tol = 1e-5 if precision == "fp32" else 2e-2
  np.testing.assert_allclose(np.asarray(jax.jit(blocked)(q, k, v), np.float32),
                             np.asarray(jax.jit(dense)(q, k, v), np.float32), rtol=0, atol=tol)
  grads = jax.jit(jax.grad(lambda *a: total(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(lambda *a: total(dense, *a), argnums=(0, 1, 2)))(q, k, v)
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                               rtol=0, atol=10 * tol * float(jnp.abs(g_ref).max()))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "e11x5", "fp32_bitwise"])
def test_fused_projections_match_a_matmul_each(precision):
  import flax.linen as nn
  from rl_fp16.models.layers import Linear, fused_linear
  bitwise = precision.endswith("_bitwise")
  policy = get_precision_pair(precision.removesuffix("_bitwise"), bitwise=bitwise).trainer

  class Projections(nn.Module):
    fused: bool

    @nn.compact
    def __call__(self, x):
      layers = [Linear(features, True, policy, 0.3, name=f"proj_{i}")
                for i, features in enumerate((24, 8, 8))]
      return fused_linear(x, layers, policy) if self.fused else [layer(x) for layer in layers]

  x = jax.random.normal(jax.random.key(4), (64, 16))
  params = Projections(False).init(jax.random.key(5), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # nonzero biases
  fused = Projections(True).apply(params, x)
  separate = Projections(False).apply(params, x)
  assert [y.shape for y in fused] == [(64, 24), (64, 8), (64, 8)]
  for y, y_ref in zip(fused, separate):
    if bitwise:
      np.testing.assert_array_equal(y, y_ref)
    else:
      np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                                 rtol=1e-2 if precision == "bf16" else 1e-5, atol=1e-5)


def _run(sequence_bucket, precision, iterations, precompile=False):
  params = init_params(CONFIG, jax.random.key(0))
  pair = get_precision_pair(precision)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  state = TrainState.create(params, optimizer,
                            loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  rl_config = RLConfig(samples_per_prompt=4, num_minibatches=2, max_new_tokens=20,
                       prompt_bucket=8, sequence_bucket=sequence_bucket,
                       loss=objectives.LossConfig(max_response_len=20))
  engine = JaxEngine(CONFIG, params, pair.sampler, eos_token_ids=(2,))
  metrics, compiles = [], []
  for i in range(iterations):
    with CompileCounter() as counter:
      state, m = rl_iteration(state, model_config=CONFIG, trainer_policy=pair.trainer,
                              optimizer=optimizer, engine=engine, prompts=PROMPTS,
                              reward_fn=_reward, rl_config=rl_config, seed=i)
    metrics.append(m)
    compiles.append(counter.names)
    if precompile and i == 0:
      precompile_rl_update(state, model_config=CONFIG, trainer_policy=pair.trainer,
                           optimizer=optimizer, rl_config=rl_config, rows=16,
                           widths=range(8, 6 + 20 + 8 + 1, 8))
  return jax.device_get(state.params), metrics, compiles


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5)])
def test_packed_scan_update_matches_the_unbucketed_path(precision, tol):
  old_params, old, _ = _run(0, precision, 3)
  new_params, new, compiles = _run(4, precision, 3, precompile=True)
  # Same rollouts (sampling happens before any difference), same rewards.
  for a, b in zip(old, new):
    assert a["reward/mean"] == b["reward/mean"]
    assert a["response/length_mean"] == b["response/length_mean"]
    for key in ("train/loss", "train/entropy"):
      np.testing.assert_allclose(b[key], a[key], rtol=tol, atol=tol * 1e-2, err_msg=key)
    # The mismatch metrics are means of sampler-minus-trainer differences, ~1e-7 in fp32: pure
    # rounding, which changes with the padded width, so a relative tolerance is meaningless
    # there. Compare them on the scale of a few fp32 ulps of a log-prob (|logp| up to ~10); a
    # misaligned or mis-masked bucketed log-prob would be off by orders of magnitude more.
    for key in ("mismatch/kl_k1", "mismatch/prob_diff_mean"):
      np.testing.assert_allclose(b[key], a[key], rtol=0, atol=2e-6, err_msg=key)
    assert b["train/skipped_steps"] == a["train/skipped_steps"]
  assert new[0]["perf/train_seq_len"] < old[0]["perf/train_seq_len"]  # the bucketing trims
  for x, y in zip(jax.tree_util.tree_leaves(old_params), jax.tree_util.tree_leaves(new_params)):
    np.testing.assert_allclose(y, x, atol=tol)
  # Nothing compiles after the first iteration and the precompiled buckets.
  assert compiles[1:] == [[], []], compiles


def test_first_minibatch_logp_old_from_its_forward_matches_a_full_pass():
  from rl_fp16.batch import batch_width, rollout_batch
  from rl_fp16.rl_loop import minibatch_order, with_logp_old
  from rl_fp16.train import FORWARD_LOGP, make_update, trainer_logprobs
  params = init_params(CONFIG, jax.random.key(0))
  pair = get_precision_pair("fp32")
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
  rl_config = RLConfig(samples_per_prompt=4, num_minibatches=2, epochs=2, max_new_tokens=20,
                       prompt_bucket=8, loss=objectives.LossConfig(max_response_len=20))
  rollout = jax_sampler.generate(CONFIG, params, PROMPTS, policy=pair.sampler, n=4,
                                 sampling=SamplingConfig(max_new_tokens=20),
                                 rng=jax.random.key(4), eos_token_ids=(2,))
  advantages = np.linspace(-1.0, 1.0, rollout.batch_size).astype(np.float32)
  host_batch = rollout_batch(rollout, advantages, batch_width(rollout, 8))
  order = minibatch_order(rollout.batch_size, rl_config, seed=0)
  update = make_update(CONFIG, pair.trainer, optimizer, rl_config=rl_config)
  kwargs = dict(model_config=CONFIG, trainer_policy=pair.trainer, rl_config=rl_config)

  def fresh_state():  # a copy of params: the update donates its state
    return TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer,
                             loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
  batch, known = with_logp_old(fresh_state(), host_batch, order, **kwargs)
  first = np.asarray(order[0])
  assert not known[first].any() and known[np.setdiff1d(np.arange(16), first)].any()
  state, metrics = update(fresh_state(), batch, jnp.asarray(order))
  full = jax.device_put(host_batch)
  full = full.replace(logp_old=trainer_logprobs(CONFIG, pair.trainer, params, full,
                                                rl_config=rl_config))
  ref_state, ref_metrics = update(fresh_state(), full, jnp.asarray(order))
  # The first minibatch's forward is the full pass's logp_old on its rows.
  np.testing.assert_allclose(metrics[FORWARD_LOGP][0], np.asarray(full.logp_old)[first],
                             rtol=0, atol=1e-5)
  assert len(order) == 4 and np.isin(first, np.asarray(order[2:])).any()  # rows seen again
  for key in ("train/loss", "train/clip_frac", "train/grad_norm"):
    if key in metrics:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6,
                                 err_msg=key)
  assert float(np.abs(np.asarray(metrics["train/grad_norm"])).min()) > 0
  for x, y in zip(jax.tree_util.tree_leaves(ref_state.params),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_allclose(y, x, atol=1e-5)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree_util.tree_leaves(state.params),
                              jax.tree_util.tree_leaves(params)))
  assert moved > 1e-3  # the updates did something to agree on


def test_padding_waste_of_the_layouts():
  c = benchmark_config.get_config().compare
  waste = padding_waste(c, steps=20)
  layouts = waste["layouts"]
  assert 0.55 < layouts["pad to budget"]["token_waste"] < 0.7  # mean ~3K of an 8K budget
  assert (layouts["sorted micro-batch buckets"]["token_waste"]
          < layouts["minibatch bucket"]["token_waste"]
          <= layouts["pad to budget"]["token_waste"])
  assert abs(waste["measured_mean_length"] - c.paper_mean_length) < 150


@pytest.mark.parametrize("algorithm,precision,aggregation", [
    ("grpo", "fp32", "token_mean"),
    ("grpo_seq_mis", "fp32", "seq_mean_token_mean"),
    ("grpo_token_tis", "fp16", "token_sum_norm"),
    ("grpo", "bf16_bitwise", "seq_mean_token_sum")])
def test_length_sorted_micro_batches_match_the_whole_minibatch(algorithm, precision,
                                                               aggregation):
  from rl_fp16.batch import batch_width, rollout_batch
  from rl_fp16.rl_loop import minibatch_order, with_logp_old
  from rl_fp16.train import FORWARD_LOGP, PADDING_FRAC, make_update
  name, _, bitwise = precision.partition("_")
  pair = get_precision_pair(name, bitwise=bool(bitwise))
  params = init_params(CONFIG, jax.random.key(0))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
  loss = objectives.LossConfig(aggregation=aggregation, max_response_len=40)
  rollout = jax_sampler.generate(CONFIG, params, PROMPTS, policy=pair.sampler, n=4,
                                 sampling=SamplingConfig(max_new_tokens=40),
                                 rng=jax.random.key(5), eos_token_ids=(2,))
  lengths = rollout.response_lengths
  assert lengths.max() - lengths.min() >= 16, lengths  # rows of several widths
  advantages = np.linspace(-1.0, 1.0, rollout.batch_size).astype(np.float32)
  host_batch = rollout_batch(rollout, advantages, batch_width(rollout, 16))

  def run(micro_batch_rows):
    rl_config = RLConfig(algorithm=algorithm, samples_per_prompt=4, num_minibatches=2, epochs=2,
                         max_new_tokens=40, prompt_bucket=8, sequence_bucket=16, loss=loss,
                         micro_batch_rows=micro_batch_rows)
    state = TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer,
                              loss_scale=init_loss_scale(default_loss_scale_config(pair.trainer)))
    order = minibatch_order(rollout.batch_size, rl_config, seed=0)
    batch, _ = with_logp_old(state, host_batch, order, model_config=CONFIG,
                             trainer_policy=pair.trainer, rl_config=rl_config)
    update = make_update(CONFIG, pair.trainer, optimizer, rl_config=rl_config)
    state, metrics = update(state, batch, jnp.asarray(order))
    return jax.device_get(state.params), jax.device_get(metrics)

  whole_params, whole = run(0)
  micro_params, micro = run(2)
  assert float(np.mean(micro[PADDING_FRAC])) < float(np.mean(whole[PADDING_FRAC])) - 0.05
  # The first update's forward runs at the same params in both: equal bit for bit under a
  # bitwise policy, within rounding otherwise.
  if pair.trainer.bitwise:
    np.testing.assert_array_equal(micro[FORWARD_LOGP][0], whole[FORWARD_LOGP][0])
  else:
    np.testing.assert_allclose(micro[FORWARD_LOGP][0], whole[FORWARD_LOGP][0], rtol=2e-5,
                               atol=2e-2 if name == "fp16" else 1e-5)
  # fp32: every update agrees within rounding. Half precision: the first update (same params)
  # within its rounding; later ones start from params whose rounding differs, and drift more,
  # and there the fractions of a few tokens at a threshold (clipped, truncated, masked) can
  # differ by a token, so only the first update's are compared.
  half = name in ("fp16", "bf16")
  tol, later_tol = (2e-2, 0.2) if half else (1e-4, 1e-4)
  token_counts = ("train/clip_frac", "is/frac_truncated", "is/frac_masked")
  for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_mean",
              "is/token_weight_mean", "is/seq_weight_mean", "train/loss_scale",
              "train/skipped_steps") + token_counts:
    np.testing.assert_allclose(micro[key][0], whole[key][0], rtol=tol, atol=tol * 1e-2,
                               err_msg=key)
    if not (half and key in token_counts):
      np.testing.assert_allclose(micro[key], whole[key], rtol=later_tol, atol=later_tol * 1e-2,
                                 err_msg=key)
  assert float(np.abs(whole["train/grad_norm"]).min()) > 0
  moved = 0.0
  for whole_leaf, micro_leaf, start in zip(*(jax.tree_util.tree_leaves(p) for p in
                                             (whole_params, micro_params, params))):
    np.testing.assert_allclose(micro_leaf, whole_leaf, atol=tol)
    moved = max(moved, float(np.abs(np.asarray(whole_leaf) - np.asarray(start)).max()))
  assert moved > 1e-3  # the updates did something to agree on
