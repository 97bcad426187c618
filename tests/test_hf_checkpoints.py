"""Hugging Face interop: our decoder and conversion against real transformers models."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from rl_fp16.checkpoints import from_hf_state_dict, load_hf, save_hf, to_hf_state_dict
from rl_fp16.models import ModelConfig, forward, init_params
from rl_fp16.precision import get_policy

FP32 = get_policy("fp32")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2, rms_norm_eps=1e-6)

FAMILIES = {
    "qwen2_tied": (transformers.Qwen2Config, dict(BASE, tie_word_embeddings=True,
                                                   rope_theta=10000.0)),
    "qwen2_untied_mqa": (transformers.Qwen2Config, dict(BASE, num_key_value_heads=1,
                                                         tie_word_embeddings=False)),
    "llama3_rope_bias": (transformers.LlamaConfig, dict(
        BASE, num_key_value_heads=4, attention_bias=True, mlp_bias=True, rope_theta=500000.0,
        tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3_headdim": (transformers.Qwen3Config, dict(BASE, head_dim=16, tie_word_embeddings=True,
                                                      rope_theta=1000000.0)),
}


def _hf_model(family, seed=0):
  config_cls, kwargs = FAMILIES[family]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs),
                                                        dtype=torch.float32)
  # Random norms and biases too, so that their conversion is exercised.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def _hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(tokens)),
                attention_mask=None if attention_mask is None else torch.tensor(
                    np.asarray(attention_mask)))
  return out.logits.float().numpy()


def _tokens(vocab, shape, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_hf_matches_transformers_logits(family, tmp_path):
  model = _hf_model(family)
  model.save_pretrained(tmp_path / "hf")
  config, params = load_hf(tmp_path / "hf")
  tokens = _tokens(config.vocab_size, (2, 11))
  ours = np.asarray(forward(config, params, tokens, policy=FP32))
  theirs = _hf_logits(model, tokens)
  assert np.abs(ours - theirs).max() <= 1e-4
  assert np.abs(theirs).max() > 1.0  # not a degenerate comparison


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_hf_loads_in_transformers(family, tmp_path):
  config = ModelConfig.from_hf(FAMILIES[family][0](**FAMILIES[family][1]).to_dict())
  params = init_params(config, jax.random.key(3))
  save_hf(tmp_path / "ours", config, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours",
                                                            dtype=torch.float32).eval()
  tokens = _tokens(config.vocab_size, (3, 9), seed=2)
  ours = np.asarray(forward(config, params, tokens, policy=FP32))
  assert np.abs(ours - _hf_logits(model, tokens)).max() <= 1e-4
  # Round trip is exact, and so is the config.
  config2, params2 = load_hf(tmp_path / "ours")
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_padding_left_and_right_matches_transformers(tmp_path):
  model = _hf_model("qwen2_tied")
  model.save_pretrained(tmp_path / "hf")
  config, params = load_hf(tmp_path / "hf")
  tokens = _tokens(config.vocab_size, (2, 8))
  left = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], np.int32)
  right = left[:, ::-1].copy()
  for mask in (left, right):
    ours = np.asarray(forward(config, params, tokens, policy=FP32, attention_mask=mask))
    # transformers derives positions from the mask only for left padding; give them explicitly.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
  config = ModelConfig.from_hf(FAMILIES["qwen2_untied_mqa"][0](
      **FAMILIES["qwen2_untied_mqa"][1]).to_dict())
  params = init_params(config, jax.random.key(0))
  save_hf(tmp_path / "sharded", config, params, max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.startswith("model-0") for f in files) > 1
  _, loaded = load_hf(tmp_path / "sharded")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
  # transformers reads the sharded directory too.
  transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")

  save_hf(tmp_path / "bf16", config, params, dtype="bfloat16")
  assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
  _, loaded = load_hf(tmp_path / "bf16")
  leaf = loaded["embed_tokens"]["embedding"]
  assert leaf.dtype == np.float32
  expected = np.asarray(params["embed_tokens"]["embedding"]).astype(jax.numpy.bfloat16)
  np.testing.assert_array_equal(leaf, expected.astype(np.float32))


def test_config_reads_transformers4_and_5_rope_keys():
  v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1234.0,
        "rope_scaling": {"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
  v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 1234.0, "factor": 2.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}
  a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
  assert a == b and a.rope_theta == 1234.0 and a.rope_dict["rope_type"] == "llama3"
  assert a.num_key_value_heads == 2
  assert ModelConfig.from_hf(a.to_hf()) == a


@pytest.mark.parametrize("change,field", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_config_names_the_field(change, field):
  config = dict(FAMILIES["qwen2_tied"][1], model_type="qwen2")
  config.update(change)
  with pytest.raises(ValueError, match=field):
    ModelConfig.from_hf(config)


def test_conversion_errors_name_the_tensor(tmp_path):
  config = ModelConfig.from_hf(dict(FAMILIES["qwen2_tied"][1], model_type="qwen2"))
  params = init_params(config, jax.random.key(0))
  state = to_hf_state_dict(config, params)
  missing = dict(state)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    from_hf_state_dict(config, missing)
  extra = dict(state, **{"model.layers.9.foo.weight": np.zeros(3)})
  with pytest.raises(ValueError, match=r"model\.layers\.9\.foo\.weight"):
    from_hf_state_dict(config, extra)
  bad_shape = dict(state)
  bad_shape["model.embed_tokens.weight"] = np.zeros((95, 32), np.float32)
  with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\(95, 32\)"):
    from_hf_state_dict(config, bad_shape)
  # A corrupt file is named.
  save_hf(tmp_path / "m", config, params)
  with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
    f.write(b"\xff" * 16)
  with pytest.raises(ValueError, match="model.safetensors"):
    load_hf(tmp_path / "m")


def test_save_hf_is_atomic(tmp_path):
  config = ModelConfig.from_hf(dict(FAMILIES["qwen2_tied"][1], model_type="qwen2"))
  params = init_params(config, jax.random.key(0))
  save_hf(tmp_path / "m", config, params)
  bad = dict(params)
  bad["embed_tokens"] = {"embedding": np.zeros((3, 3), np.float32)}
  with pytest.raises(ValueError, match="embed_tokens"):
    save_hf(tmp_path / "m", config, bad)
  # The old directory is intact and no temporary directory is left behind.
  assert sorted(os.listdir(tmp_path)) == ["m"]
  load_hf(tmp_path / "m")
