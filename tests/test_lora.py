"""LoRA: adapters, merge, export parity with transformers, LoRA RL (iteration, experiment)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rl_fp16 import objectives
from rl_fp16.checkpoints import load_hf, save_hf
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.data import synthetic, tokenizer
from rl_fp16.data.tasks import SyntheticTask
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models import lora as lora_lib
from rl_fp16.precision import get_policy, get_precision_pair
from rl_fp16.sampling.engines import JaxEngine
from rl_fp16.rl_loop import rl_iteration
from rl_fp16.train import OptimizerConfig, RLConfig, make_optimizer, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = get_policy("fp32")
CONFIG = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=128,
                     initializer_range=0.2)


def _perturbed(lora_params, scale=0.3, seed=3):
  """Adapters with non-zero B (and A), so the adapted model differs from the base."""
  leaves, treedef = jax.tree_util.tree_flatten(lora_params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _leaves_by_path(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_config_errors():
  with pytest.raises(ValueError, match=r"rank=0: must be an integer >= 1"):
    lora_lib.LoraConfig(rank=0, alpha=1.0)
  with pytest.raises(ValueError, match=r"rank=2.0: must be an integer >= 1"):
    lora_lib.LoraConfig(rank=2.0, alpha=1.0)
  with pytest.raises(ValueError, match=r"alpha=-1: must be a finite number > 0"):
    lora_lib.LoraConfig(rank=1, alpha=-1)
  with pytest.raises(ValueError, match=r"unknown \['qkv'\].*'q_proj'.*'down_proj'"):
    lora_lib.LoraConfig(rank=1, alpha=2.0, targets=("q_proj", "qkv"))
  with pytest.raises(ValueError, match=r"targets='q_proj': must be a sequence of names, not a str"):
    lora_lib.LoraConfig(rank=1, alpha=2.0, targets="q_proj")
  with pytest.raises(ValueError, match=r"duplicate names"):
    lora_lib.LoraConfig(rank=1, alpha=2.0, targets=("q_proj", "q_proj"))
  base = init_params(CONFIG, jax.random.key(0))
  with pytest.raises(ValueError, match=r"rank 33 exceeds min\(in, out\) = \d+ of "
                     r"layers_0/[a-z_]+/[a-z]+_proj/kernel .*allowed ranks: 1..\d+"):
    lora_lib.init_lora(lora_lib.LoraConfig(rank=33, alpha=1.0), base, jax.random.key(1))
  no_mlp = {k: ({kk: vv for kk, vv in v.items() if kk != "mlp"} if k.startswith("layers_") else v)
            for k, v in base.items()}
  with pytest.raises(ValueError, match=r"\['up_proj'\] match no kernel.*'q_proj'"):
    lora_lib.init_lora(lora_lib.LoraConfig(rank=1, alpha=1.0, targets=("q_proj", "up_proj")),
                       no_mlp, jax.random.key(1))
  # LoraConfig is hashable (a static jit argument) and lists become tuples.
  assert hash(lora_lib.LoraConfig(rank=1, alpha=2.0, targets=["v_proj"])) == hash(
      lora_lib.LoraConfig(rank=1, alpha=2.0, targets=("v_proj",)))


def test_init_lora_layout_and_identity_at_start():
  base = init_params(CONFIG, jax.random.key(0))
  config = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "down_proj"))
  lora = lora_lib.init_lora(config, base, jax.random.key(1))
  paths = sorted(_leaves_by_path(lora))
  assert len(paths) == 2 * 3 * CONFIG.num_hidden_layers
  adapter = lora["layers_1"]["self_attn"]["q_proj"]
  assert adapter["lora_a"].shape == (32, 2) and adapter["lora_b"].shape == (2, 32)
  assert lora["layers_0"]["mlp"]["down_proj"]["lora_a"].shape == (48, 2)
  assert not np.any(np.asarray(adapter["lora_b"])) and np.std(adapter["lora_a"]) > 0.05
  assert lora_lib.num_params(lora) == 2 * (2 * (32 * 2 + 2 * 32) + (48 * 2 + 2 * 32))
  merged = lora_lib.merge_lora(base, lora, config)
  for path, value in _leaves_by_path(base).items():
    np.testing.assert_array_equal(_leaves_by_path(merged)[path], value, err_msg=path)
  # dtype casts every floating leaf.
  half = lora_lib.merge_lora(base, lora, config, dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_merge_is_w_plus_scaled_low_rank_and_differentiable():
  base = init_params(CONFIG, jax.random.key(0))
  config = lora_lib.LoraConfig(rank=2, alpha=3.0, targets=("v_proj", "gate_proj"))
  lora = _perturbed(lora_lib.init_lora(config, base, jax.random.key(1)))
  merged = jax.jit(lora_lib.merge_lora, static_argnames=("lora_config", "dtype"))(
      base, lora, lora_config=config)
  w = np.asarray(base["layers_1"]["mlp"]["gate_proj"]["kernel"], np.float64)
  ad = lora["layers_1"]["mlp"]["gate_proj"]
  expected = w + 1.5 * np.asarray(ad["lora_a"], np.float64) @ np.asarray(ad["lora_b"], np.float64)
  np.testing.assert_allclose(merged["layers_1"]["mlp"]["gate_proj"]["kernel"], expected,
                             rtol=1e-6, atol=1e-6)
  # Untouched kernels are the base's.
  np.testing.assert_array_equal(merged["layers_1"]["self_attn"]["q_proj"]["kernel"],
                                base["layers_1"]["self_attn"]["q_proj"]["kernel"])
  # Gradients flow to the adapters: at B = 0 only B gets a gradient.
  fresh = lora_lib.init_lora(config, base, jax.random.key(1))
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  grads = jax.grad(lambda lp: lora_lib.forward(CONFIG, base, lp, config, tokens,
                                               policy=FP32).astype(jnp.float32).std())(fresh)
  for path, g in _leaves_by_path(grads).items():
    assert (np.abs(g).max() > 0) == path.endswith("['lora_b']"), path


def test_merged_export_matches_transformers_logits(tmp_path):
  base = init_params(CONFIG, jax.random.key(0))
  config = lora_lib.LoraConfig(rank=1, alpha=2.0)
  lora = _perturbed(lora_lib.init_lora(config, base, jax.random.key(1)))
  assert np.abs(np.asarray(lora["layers_0"]["mlp"]["up_proj"]["lora_b"])).max() > 0.1
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 10))
  ours = np.asarray(lora_lib.forward(CONFIG, base, lora, config, tokens, policy=FP32))
  base_logits = np.asarray(lora_lib.forward(CONFIG, base, lora_lib.init_lora(
      config, base, jax.random.key(1)), config, tokens, policy=FP32))
  assert np.abs(ours - base_logits).max() > 0.1  # the adapters matter
  save_hf(tmp_path / "merged", CONFIG, lora_lib.merge_lora(base, lora, config))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  # And the round trip back into our layout is the merged model.
  _, reloaded = load_hf(tmp_path / "merged")
  np.testing.assert_allclose(
      reloaded["layers_1"]["self_attn"]["o_proj"]["kernel"],
      lora_lib.merge_lora(base, lora, config)["layers_1"]["self_attn"]["o_proj"]["kernel"],
      atol=0)


def test_rl_train_step_needs_base_and_config_together():
  base = init_params(CONFIG, jax.random.key(0))
  config = lora_lib.LoraConfig(rank=1, alpha=2.0)
  with pytest.raises(ValueError, match="both base_params and lora_config"):
    make_train_step(CONFIG, FP32, make_optimizer(OptimizerConfig()),
                    rl_config=RLConfig(loss=objectives.LossConfig(), lora=config))
  with pytest.raises(ValueError, match="both base_params and lora_config"):
    make_train_step(CONFIG, FP32, make_optimizer(OptimizerConfig()), rl_config=RLConfig(),
                    base_params=base)
  with pytest.raises(ValueError, match="needs base_params"):
    rl_iteration(None, model_config=CONFIG, trainer_policy=FP32, optimizer=None, engine=None,
                 prompts=[], reward_fn=None, rl_config=RLConfig(lora=config), seed=0)
  with pytest.raises(ValueError, match="needs base_params"):
    rl_iteration(None, model_config=CONFIG, trainer_policy=FP32, optimizer=None, engine=None,
                 prompts=[], reward_fn=None, rl_config=RLConfig(), seed=0, base_params=base)


def test_lora_rl_iterations_update_only_the_adapters(tiny_task_model_dir):
  model_config, base = load_hf(tiny_task_model_dir)
  task = SyntheticTask(synthetic.load_task_config(tiny_task_model_dir),
                       tokenizer.load_tokenizer(tiny_task_model_dir))
  pair = get_precision_pair("fp32")
  lora_config = lora_lib.LoraConfig(rank=1, alpha=2.0)
  lora = lora_lib.init_lora(lora_config, base, jax.random.key(0))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
  state = TrainState.create(lora, optimizer, loss_scale=None)
  engine = JaxEngine(model_config, lora_lib.merge_lora(base, lora, lora_config), pair.sampler,
                     eos_token_ids=[task.tokenizer.eos_id])
  rl_config = RLConfig(samples_per_prompt=4, num_minibatches=2, max_new_tokens=24,
                       loss=objectives.LossConfig(max_response_len=24), lora=lora_config)
  base_before = _leaves_by_path(base)
  lora_before = _leaves_by_path(state.params)
  reward_fn = lambda rollout: (rollout.response_lengths % 2).astype(np.float32)
  for step in range(2):
    problems = task.problems(2, seed=step)
    state, metrics = rl_iteration(state, model_config=model_config, trainer_policy=pair.trainer,
                                  optimizer=optimizer, engine=engine,
                                  prompts=task.prompt_ids(problems), reward_fn=reward_fn,
                                  rl_config=rl_config, seed=step, base_params=base)
    assert metrics["train/skipped_steps"] == 0 and metrics["train/grad_norm"] > 0
    # fp32 trainer vs the fp32 engine holding merged weights: the engine was synced with the
    # merged model (at step 1 the adapters are non-zero).
    assert metrics["mismatch/logp_diff_max"] < 1e-4
  assert int(state.step) == 4
  # The base is untouched.
  for path, value in _leaves_by_path(base).items():
    np.testing.assert_array_equal(value, base_before[path], err_msg=path)
  # The state holds the adapters only, and they moved (B away from zero).
  lora_after = _leaves_by_path(state.params)
  assert set(lora_after) == set(lora_before)
  assert all(not np.array_equal(lora_after[p], lora_before[p]) for p in lora_after)
  # The optimizer state spans the adapters only: Adam's mu and nu, one entry per adapter element.
  opt_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)]
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * lora_lib.num_params(state.params)
  assert {x.shape for x in opt_leaves if x.ndim} <= {x.shape for x in lora_after.values()}
  # The engine holds the merged params.
  merged = lora_lib.merge_lora(base, state.params, lora_config)
  np.testing.assert_array_equal(np.asarray(engine.params["layers_1"]["mlp"]["down_proj"]["kernel"]),
                                np.asarray(merged["layers_1"]["mlp"]["down_proj"]["kernel"]))


def _lora_command(model_dir, out_dir, steps):
  return [sys.executable, "-m", "experiments.rl", "--config=experiments/configs/lora.py",
          f"--config.model={model_dir}", "--config.engine=jax", "--config.precision=fp16",
          f"--config.steps={steps}", "--config.prompts_per_step=2",
          "--config.samples_per_prompt=4", "--config.max_new_tokens=24",
          "--config.checkpoint_every=1", f"--config.output_dir={out_dir}"]


@pytest.mark.slow
def test_lora_experiment_runs_and_resumes(tiny_task_model_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "lora_run"
  done = subprocess.run(_lora_command(tiny_task_model_dir, out, 2), cwd=REPO, env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "LoRA: rank 1, alpha 2.0" in done.stdout
  with open(out / "config.json") as f:
    assert json.load(f)["lora"]["enabled"] is True
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["train/skipped_steps"] == 0 and r["train/loss_scale"] == 2.0**15 for r in rows)
  # Resume from the adapter-only checkpoint (the base comes from the model directory again).
  resumed = subprocess.run(_lora_command(tiny_task_model_dir, out, 3), cwd=REPO, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming" in resumed.stdout
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/updates"] == 6
