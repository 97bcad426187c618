"""Hugging Face interop: our decoder and conversion against real transformers models."""

import json
import os
import re

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


# ------------------------------------------- weights and configs that would run silently wrong ----


def _qwen2_tied():
  config = ModelConfig.from_hf(dict(FAMILIES["qwen2_tied"][1], model_type="qwen2"))
  return config, init_params(config, jax.random.key(0))


def _rewrite(path, change):
  """Applies `change` to the tensors of a single-file model directory, in place."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  file = os.path.join(path, "model.safetensors")
  state = load_file(file)
  change(state)
  save_file(state, file, {"format": "pt"})


def test_load_hf_refuses_non_finite_weights(tmp_path):
  config, params = _qwen2_tied()
  save_hf(tmp_path / "m", config, params)

  def poison(state):
    state["model.layers.1.self_attn.k_proj.weight"][2, 3] = np.nan
  _rewrite(tmp_path / "m", poison)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight holds 1 "
                     r"non-finite"):
    load_hf(tmp_path / "m")


def test_to_hf_state_dict_refuses_non_finite_and_out_of_range_values(tmp_path):
  config, params = _qwen2_tied()
  big = jax.tree_util.tree_map(np.array, params)
  big["layers_0"]["mlp"]["up_proj"]["kernel"][4, 1] = -1e5
  for dtype in ("float32", "bfloat16"):  # 1e5 is in range there
    assert np.isfinite(to_hf_state_dict(config, big, dtype)["model.layers.0.mlp.up_proj.weight"]
                       .astype(np.float32)).all()
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight \(param "
                     r"layers_0/mlp/up_proj/kernel\) has max \|value\| 100000, outside the "
                     r"float16 range \(max \|value\| 65504\)"):
    to_hf_state_dict(config, big, "float16")
  with pytest.raises(ValueError, match="outside the float16 range"):
    save_hf(tmp_path / "m", config, big, dtype="float16")  # nothing written
  assert not os.path.exists(tmp_path / "m")
  nan = jax.tree_util.tree_map(np.array, params)
  nan["norm"]["scale"][0] = np.nan
  with pytest.raises(ValueError, match=r"model\.norm\.weight \(param norm/scale\) has 1 "
                     r"non-finite"):
    to_hf_state_dict(config, nan, "float32")


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
  config, params = _qwen2_tied()
  save_hf(tmp_path / "m", config, params)

  def add_head(offset):
    def change(state):
      state["lm_head.weight"] = state["model.embed_tokens.weight"] + offset
    return change
  _rewrite(tmp_path / "m", add_head(0.0))  # an equal copy is redundant: dropped
  _, loaded = load_hf(tmp_path / "m")
  assert "lm_head" not in loaded
  _rewrite(tmp_path / "m", add_head(0.5))
  with pytest.raises(ValueError, match=r"'lm_head.weight' differs from "
                     r"'model.embed_tokens.weight' \(max \|difference\| 0.5\).*tie_word_embeddings"):
    load_hf(tmp_path / "m")


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  config, params = _qwen2_tied()
  path = tmp_path / "sharded"
  save_hf(path, config, params, max_shard_bytes=20_000)
  shards = sorted(f for f in os.listdir(path) if f.startswith("model-0"))
  first, last = load_file(path / shards[0]), load_file(path / shards[-1])
  name = sorted(first)[0]
  save_file(dict(last, **{name: first[name] + 1.0}), path / shards[-1], {"format": "pt"})
  message = (rf"Tensor {re.escape(name)} is stored twice, in {shards[0]} and in {shards[-1]}")
  with pytest.raises(ValueError, match=message):
    load_hf(path)
  os.rename(path / "model.safetensors.index.json", tmp_path / "index.json")
  with pytest.raises(ValueError, match=message):  # shards found by their names
    load_hf(path)
  # Moved to another shard than the index says: refused too (a loader going by the index
  # would not find it where it looks).
  os.rename(tmp_path / "index.json", path / "model.safetensors.index.json")
  save_file({k: v for k, v in first.items() if k != name}, path / shards[0], {"format": "pt"})
  with pytest.raises(ValueError, match=rf"Tensor {re.escape(name)} is in {shards[-1]} but the "
                     rf"index model.safetensors.index.json maps it to {shards[0]}"):
    load_hf(path)


def test_sliding_window_attention_is_refused(tmp_path):
  kwargs = dict(FAMILIES["qwen2_tied"][1], use_sliding_window=True, sliding_window=4,
                max_window_layers=1)
  transformers.Qwen2Config(**kwargs).save_pretrained(tmp_path / "m")
  with pytest.raises(ValueError, match=r"sliding-window attention \(use_sliding_window=true, "
                     r"sliding_window=4, layer_types: layers \[1\] of 2\)"):
    ModelConfig.from_hf(tmp_path / "m")
  # A window no sequence can exceed is full attention: accepted, and equal to transformers.
  model = _hf_model("qwen2_tied")
  model.config.use_sliding_window, model.config.sliding_window = True, 256
  model.save_pretrained(tmp_path / "wide")
  config, params = load_hf(tmp_path / "wide")
  tokens = _tokens(config.vocab_size, (1, 12))
  ours = np.asarray(forward(config, params, tokens, policy=FP32))
  assert np.abs(ours - _hf_logits(model, tokens)).max() <= 1e-4


def test_conflicting_rope_specs_are_refused():
  base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2}
  llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  with pytest.raises(ValueError, match=r"conflicting RoPE specs.*rope_type: rope_parameters "
                     r"'default' vs rope_scaling 'llama3'"):
    ModelConfig.from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                             rope_scaling=llama3))
  with pytest.raises(ValueError, match=r"rope_theta: rope_parameters 10000.0 vs top-level "
                     r"500000.0"):
    ModelConfig.from_hf(dict(base, rope_theta=5e5,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
  # Both forms saying the same thing (as our own to_hf writes) are fine.
  same = ModelConfig.from_hf(dict(base, rope_theta=1e4, rope_scaling=llama3,
                                  rope_parameters=dict(llama3, rope_theta=1e4)))
  assert same.rope_dict["rope_type"] == "llama3" and same.rope_theta == 1e4


def test_sequences_beyond_max_position_embeddings_are_refused():
  from rl_fp16.models import token_logprobs  # pylint: disable=g-import-not-at-top
  from rl_fp16.sampling import jax_sampler  # pylint: disable=g-import-not-at-top
  config, params = _qwen2_tied()
  config = config.replace(max_position_embeddings=16)
  with pytest.raises(ValueError, match="17 tokens exceeds the model's max_position_embeddings=16"):
    token_logprobs(config, params, _tokens(config.vocab_size, (2, 17)), policy=FP32)
  # Padding does not count: 16 real tokens in a row of 20 are fine.
  mask = np.ones((2, 20), np.int32)
  mask[:, :4] = 0
  assert np.isfinite(np.asarray(token_logprobs(
      config, params, _tokens(config.vocab_size, (2, 20)), policy=FP32,
      attention_mask=mask))).all()
  sampling = jax_sampler.SamplingConfig(max_new_tokens=7, temperature=1.0)
  with pytest.raises(ValueError, match="10 tokens plus max_new_tokens=7 exceeds the model's "
                     "max_position_embeddings=16"):
    jax_sampler.generate(config, params, [[1] * 10, [2] * 3], policy=FP32, n=1,
                         sampling=sampling, rng=jax.random.key(0))
