"""Sharded training: rules, placement, and sharded RL step == single-device step (full params and
LoRA).

The 8-device check needs `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts,
so it runs this file as a script in a subprocess (`python tests/test_sharding.py --child`) and
reads back a JSON report. The rest runs in the pytest process on its single CPU device.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rl_fp16 import objectives, sharding
from rl_fp16.batch import make_batch
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params, token_logprobs
from rl_fp16.models import lora as lora_lib
from rl_fp16.precision import get_policy
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   qkv_bias=True, tie_word_embeddings=False, initializer_range=0.1)
MESHES = ((2, 4, 1), (2, 2, 2), (1, 1, 1))  # (data, fsdp, tensor); 1x1x1 on the first device
ALGORITHM = "grpo_token_tis"
LOSS = objectives.LossConfig()
RL_CONFIG = RLConfig(algorithm=ALGORITHM, loss=LOSS)
LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)  # every projection
LORA_MESH = (2, 2, 2)


def _setup(seed=0, batch_size=8, seq_len=16):
  """(policy, optimizer, params, batch) for the tiny model: a left-padded random batch whose
  logp_old is the model's own and whose sampler log-probs are slightly off."""
  policy = get_policy("fp32", "trainer")
  # Adam's eps is 1e-6 (not 1e-8): with eps far below the fp32 rounding noise of a near-zero
  # gradient entry (~1e-9), Adam's near-sign update turns that noise into param differences of
  # ~lr * 0.03 between any two reduction orders (measured 2.6e-5 at lr 1e-3, sharded or not).
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, eps=1e-6))
  params = init_params(TINY, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, TINY.vocab_size, (batch_size, seq_len)).astype(np.int32)
  pad = rng.integers(0, 4, batch_size)
  attention_mask = (np.arange(seq_len)[None] >= pad[:, None]).astype(np.int32)
  loss_mask = attention_mask * (np.arange(seq_len)[None] >= seq_len // 2)
  logp_old = np.asarray(token_logprobs(TINY, params, tokens, policy=policy,
                                       attention_mask=attention_mask))
  noise = rng.normal(0.0, 0.1, logp_old.shape).astype(np.float32)
  batch = make_batch(tokens=tokens, attention_mask=attention_mask,
                     loss_mask=loss_mask.astype(np.int32), logp_old=logp_old.astype(np.float32),
                     logp_sampler=(logp_old + noise * loss_mask).astype(np.float32),
                     advantages=rng.normal(size=batch_size).astype(np.float32))
  return policy, optimizer, params, batch


def _new_state(params, optimizer):
  return TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer, loss_scale=None)


def _reference(steps=2):
  """Params and per-step metrics of the unsharded `make_train_step` step."""
  policy, optimizer, params, batch = _setup()
  state = _new_state(params, optimizer)
  step = make_train_step(TINY, policy, optimizer, rl_config=RL_CONFIG)
  losses, grad_norms = [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
    grad_norms.append(float(metrics["train/grad_norm"]))
  return jax.device_get(state.params), losses, grad_norms


def _max_diff(a, b):
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                 a, b)
  return max(jax.tree_util.tree_leaves(diffs))


# ------------------------------------------------------------------ subprocess (8 devices) ----


def _child() -> dict:
  assert jax.device_count() == 8, jax.devices()
  ref_params, ref_losses, ref_grad_norms = _reference()
  report = {"device_count": jax.device_count(), "meshes": {}}
  for data, fsdp, tensor in MESHES:
    start = time.perf_counter()
    policy, optimizer, params, batch = _setup()
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor,
                              devices=jax.devices()[:data * fsdp * tensor])
    step = make_train_step(TINY, policy, optimizer, rl_config=RL_CONFIG, mesh=mesh)
    state = sharding.shard_state(_new_state(params, optimizer), mesh)
    sharded_batch = sharding.shard_batch(batch, mesh)
    losses, grad_norms = [], []
    for _ in range(2):
      state, metrics = step(state, sharded_batch)
      losses.append(float(metrics["train/loss"]))
      grad_norms.append(float(metrics["train/grad_norm"]))
    layer = state.params["layers_0"]
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw = chain(scale_by_adam, ...)
    report["meshes"][f"{data}x{fsdp}x{tensor}"] = {
        "param_max_abs_diff": _max_diff(state.params, ref_params),
        "loss": losses, "ref_loss": ref_losses, "grad_norm": grad_norms,
        "ref_grad_norm": ref_grad_norms,
        "q_kernel_spec": str(layer["self_attn"]["q_proj"]["kernel"].sharding.spec),
        "q_kernel_shard": list(layer["self_attn"]["q_proj"]["kernel"]
                               .addressable_shards[0].data.shape),
        "k_kernel_shard": list(layer["self_attn"]["k_proj"]["kernel"]
                               .addressable_shards[0].data.shape),
        "down_kernel_spec": str(layer["mlp"]["down_proj"]["kernel"].sharding.spec),
        "embed_shard": list(state.params["embed_tokens"]["embedding"]
                            .addressable_shards[0].data.shape),
        "mu_q_kernel_spec": str(adam.mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
                                .sharding.spec),
        "nu_down_kernel_shard": list(adam.nu["layers_0"]["mlp"]["down_proj"]["kernel"]
                                     .addressable_shards[0].data.shape),
        "norm_spec": str(state.params["norm"]["scale"].sharding.spec),
        "tokens_shard": list(sharded_batch.tokens.addressable_shards[0].data.shape),
        "seconds": time.perf_counter() - start,
    }
  report["lora"] = _lora_report()
  report["micro"] = _micro_report()
  return report


def _micro_report(steps=2) -> dict:
  """Micro-batches of 2 rows (bucket 4) on the 2x2x2 mesh against the whole minibatch on one
  device, both on the batch's rows packed from column 0 (each row's padding moved to its end)
  with rows 4-7 cut to 10 tokens, so that micro-batches run at widths 12 and 16."""
  policy, optimizer, params, batch = _setup()
  shift = -np.argmax(batch.attention_mask > 0, axis=1)
  kept = np.ones(batch.tokens.shape, np.int32)
  kept[4:, 10:] = 0
  batch = jax.tree_util.tree_map(
      lambda x: np.stack([np.roll(row, s) for row, s in zip(x, shift)]) * kept.astype(x.dtype)
      if x.ndim == 2 else x, batch)
  micro_config = dataclasses.replace(RL_CONFIG, micro_batch_rows=2, sequence_bucket=4)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  runs = {}
  for name, rl_config, run_mesh in (("ref", RL_CONFIG, None), ("micro", micro_config, mesh)):
    step = make_train_step(TINY, policy, optimizer, rl_config=rl_config, mesh=run_mesh)
    state = _new_state(params, optimizer)
    run_batch = batch
    if run_mesh is not None:
      state, run_batch = sharding.shard_state(state, mesh), sharding.shard_batch(batch, mesh)
    losses, padding = [], []
    for _ in range(steps):
      state, metrics = step(state, run_batch)
      losses.append(float(metrics["train/loss"]))
      padding.append(float(metrics["train/padding_frac"]))
    runs[name] = (jax.device_get(state.params), losses, padding)
  return {"param_max_abs_diff": _max_diff(runs["micro"][0], runs["ref"][0]),
          "param_moved": _max_diff(runs["ref"][0], params),
          "loss": runs["micro"][1], "ref_loss": runs["ref"][1],
          "padding_frac": runs["micro"][2], "ref_padding_frac": runs["ref"][2]}


def _lora_steps(mesh=None, steps=2):
  """(adapters after `steps` LoRA updates, losses, the step's base params): on one device, or
  on `mesh` with the state, batch and frozen base sharded."""
  policy, optimizer, base, batch = _setup()
  adapters = lora_lib.init_lora(LORA, base, jax.random.key(1))
  step = make_train_step(TINY, policy, optimizer, rl_config=RLConfig(
      algorithm=ALGORITHM, loss=LOSS, lora=LORA), base_params=base, mesh=mesh)
  state = _new_state(adapters, optimizer)
  if mesh is not None:
    state, batch = sharding.shard_state(state, mesh), sharding.shard_batch(batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  return state.params, losses, step.base_params


def _lora_report() -> dict:
  ref_adapters, ref_losses, _ = _lora_steps()
  data, fsdp, tensor = LORA_MESH
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  adapters, losses, base = _lora_steps(mesh)
  fresh = lora_lib.init_lora(LORA, _setup()[2], jax.random.key(1))
  q_base = base["layers_0"]["self_attn"]["q_proj"]["kernel"]
  return {
      "mesh": f"{data}x{fsdp}x{tensor}",
      "adapter_max_abs_diff": _max_diff(adapters, ref_adapters),
      "adapter_moved": _max_diff(ref_adapters, fresh),
      "loss": losses, "ref_loss": ref_losses,
      "base_q_kernel_spec": str(q_base.sharding.spec),
      "base_q_kernel_shard": list(q_base.addressable_shards[0].data.shape),
      "lora_b_devices": len(adapters["layers_0"]["self_attn"]["q_proj"]["lora_b"]
                            .sharding.device_set),
  }


@pytest.fixture(scope="module")
def eight_device_report():
  # Low XLA CPU optimisation halves compile time; the reference and sharded steps share it.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh_name", [f"{d}x{f}x{t}" for d, f, t in MESHES])
def test_sharded_step_matches_single_device(eight_device_report, mesh_name):
  assert eight_device_report["device_count"] == 8
  r = eight_device_report["meshes"][mesh_name]
  assert r["param_max_abs_diff"] <= 1e-5, r
  np.testing.assert_allclose(r["loss"], r["ref_loss"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(r["grad_norm"], r["ref_grad_norm"], rtol=1e-5)
  assert r["ref_loss"][0] != r["ref_loss"][1]  # the second step sees updated params


def test_sharded_lora_step_matches_single_device(eight_device_report):
  r = eight_device_report["lora"]
  assert r["mesh"] == "2x2x2"
  assert r["adapter_moved"] > 1e-3, r  # the adapters trained
  assert r["adapter_max_abs_diff"] <= 1e-5, r
  np.testing.assert_allclose(r["loss"], r["ref_loss"], atol=1e-5, rtol=0)
  # The frozen base is sharded by the rules; the adapter state spans the mesh.
  assert r["base_q_kernel_spec"] == str(P("fsdp", "tensor"))
  assert r["base_q_kernel_shard"] == [32, 32] and r["lora_b_devices"] == 8


def test_sharded_micro_batches_match_the_whole_minibatch(eight_device_report):
  r = eight_device_report["micro"]
  assert r["param_moved"] > 1e-4, r
  assert r["param_max_abs_diff"] <= 1e-5, r
  np.testing.assert_allclose(r["loss"], r["ref_loss"], atol=1e-5, rtol=0)
  assert r["padding_frac"][0] < r["ref_padding_frac"][0]  # shorter widths ran


def test_one_device_mesh_is_replicated(eight_device_report):
  r = eight_device_report["meshes"]["1x1x1"]
  assert r["q_kernel_shard"] == [64, 64] and r["tokens_shard"] == [8, 16]


def test_params_and_opt_state_are_sharded(eight_device_report):
  a, b = eight_device_report["meshes"]["2x4x1"], eight_device_report["meshes"]["2x2x2"]
  # q_proj kernel [64, 64]: fsdp splits rows; tensor splits columns.
  assert a["q_kernel_spec"] == b["q_kernel_spec"] == str(P("fsdp", "tensor"))
  assert a["q_kernel_shard"] == [16, 64] and b["q_kernel_shard"] == [32, 32]
  assert b["k_kernel_shard"] == [32, 16]  # [64, 2 kv heads x 16]
  assert a["down_kernel_spec"] == str(P("tensor", "fsdp"))
  assert a["embed_shard"] == b["embed_shard"] == [16, 64]  # [V=64, D=64]: V over tensor x fsdp
  assert a["mu_q_kernel_spec"] == str(P("fsdp", "tensor"))  # Adam state mirrors the params
  assert a["nu_down_kernel_shard"] == [128, 16] and b["nu_down_kernel_shard"] == [64, 32]
  assert a["norm_spec"] == str(P())
  assert a["tokens_shard"] == [1, 16] and b["tokens_shard"] == [2, 16]  # 8 rows / (data*fsdp)


# ------------------------------------------------------------------ in-process (1 device) ----


def test_rules_and_divisibility_fallback():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  assert sharding.spec_for("layers_3/self_attn/q_proj/kernel", (64, 64), sizes) == P("fsdp",
                                                                                     "tensor")
  assert sharding.spec_for("layers_3/mlp/down_proj/kernel", (128, 64), sizes) == P("tensor",
                                                                                   "fsdp")
  assert sharding.spec_for("layers_0/self_attn/k_proj/bias", (32,), sizes) == P("tensor")
  assert sharding.spec_for("layers_0/input_layernorm/scale", (64,), sizes) == P()
  assert sharding.spec_for("embed_tokens/embedding", (64, 64), sizes) == P(("tensor", "fsdp"))
  # Axes that do not divide a dimension are dropped from the end until the rest do.
  assert sharding.spec_for("embed_tokens/embedding", (6, 64), sizes) == P("tensor")
  assert sharding.spec_for("embed_tokens/embedding", (63, 64), sizes) == P()
  assert sharding.spec_for("lm_head/kernel", (66, 64), sizes) == P(None, "tensor")
  assert sharding.spec_for("lm_head/kernel", (66, 63), sizes) == P()  # neither divides
  # Unknown big leaves: FSDP on their largest divisible dimension; small ones replicated.
  assert sharding.spec_for("experts/w", (8, 64, 30), sizes) == P(None, "fsdp")
  assert sharding.spec_for("router/bias", (8,), sizes) == P()


def test_state_shardings_mirror_params_in_optimizer_state():
  optimizer = make_optimizer(OptimizerConfig())
  abstract = sharding.abstract_train_state(TINY, optimizer, get_policy("fp16"))
  assert abstract.loss_scale is not None  # fp16 carries a loss scale: replicated leaves
  mesh = sharding.make_mesh()  # all (here: 1) devices on fsdp
  specs = sharding.state_shardings(abstract, mesh)
  adam = specs.opt_state[1][0]
  assert adam.mu["lm_head"]["kernel"].spec == specs.params["lm_head"]["kernel"].spec
  assert adam.count.spec == P() and specs.step.spec == P()
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(specs.loss_scale))


def test_make_mesh_and_batch_errors():
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh(data=-1, fsdp=-1)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


if __name__ == "__main__":
  if sys.argv[1:] == ["--child"]:
    print(json.dumps(_child()))
  else:
    sys.exit(pytest.main([__file__, "-q"]))
