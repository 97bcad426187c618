"""The paper's model configs: built abstractly, parameter counts match the published sizes."""

import math

import jax
import numpy as np
import pytest

from rl_fp16.checkpoints import save_hf
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models import paper_configs as pc

ALL = list(pc.PAPER_CONFIGS)
DENSE = [name for name, cfg in pc.PAPER_CONFIGS.items() if not cfg.is_moe]


def test_every_paper_model_is_present():
  assert set(pc.PAPER_CONFIGS) == {
      "DeepSeek-R1-Distill-Qwen-1.5B", "Qwen2.5-Math-1.5B", "OctoThinker-3B-Hybrid-Base",
      "Qwen2.5-14B", "DeepSeek-R1-Distill-Qwen-14B", "Qwen3-30B-A3B"}
  assert set(pc.HF_REPOS) == set(pc.PAPER_CONFIGS) == set(pc.PUBLISHED_PARAMS)
  assert all(isinstance(cfg, ModelConfig) for cfg in pc.PAPER_CONFIGS.values())
  assert pc.PAPER_CONFIGS["Qwen3-30B-A3B"].is_moe
  assert [name for name, cfg in pc.PAPER_CONFIGS.items() if cfg.is_moe] == ["Qwen3-30B-A3B"]


@pytest.mark.parametrize("name", ALL)
def test_abstract_build_matches_num_params_and_published_size(name):
  cfg = pc.PAPER_CONFIGS[name]
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # no weights allocated
  leaves = jax.tree_util.tree_leaves(shapes)
  assert all(x.dtype == np.float32 for x in leaves)
  count = sum(math.prod(x.shape) for x in leaves)
  assert count == cfg.num_params()
  assert count == pytest.approx(pc.PUBLISHED_PARAMS[name], rel=0.01)
  if name in pc.PUBLISHED_EXACT_PARAMS:
    assert count == pc.PUBLISHED_EXACT_PARAMS[name]
  if name in pc.PUBLISHED_NON_EMBEDDING_PARAMS:
    assert cfg.num_params(include_embeddings=False) == pytest.approx(
        pc.PUBLISHED_NON_EMBEDDING_PARAMS[name], rel=0.01)
  assert "lm_head" in shapes or cfg.tie_word_embeddings


@pytest.mark.parametrize("name", ALL)
def test_hf_round_trip(name):
  cfg = pc.PAPER_CONFIGS[name]
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  hf = pc.PAPER_HF_CONFIGS[name]
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "tie_word_embeddings", "rms_norm_eps"):
    assert getattr(cfg, key) == hf[key], key
  assert cfg.rope_theta == hf["rope_theta"]


def test_published_architecture_details():
  r1, math15 = pc.PAPER_CONFIGS["DeepSeek-R1-Distill-Qwen-1.5B"], pc.PAPER_CONFIGS[
      "Qwen2.5-Math-1.5B"]
  assert (r1.vocab_size, r1.intermediate_size, r1.head_dim) == (151936, 8960, 128)
  assert not r1.tie_word_embeddings and math15.tie_word_embeddings
  assert r1.qkv_bias and not r1.o_bias  # qwen2: q/k/v bias only
  assert (r1.max_position_embeddings, math15.max_position_embeddings) == (131072, 4096)
  assert r1.rope_theta == math15.rope_theta == 10000.0
  octo = pc.PAPER_CONFIGS["OctoThinker-3B-Hybrid-Base"]
  assert octo.model_type == "llama" and octo.tie_word_embeddings and not octo.qkv_bias
  assert octo.rope_theta == 500000.0
  assert octo.rope_dict == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  big = pc.PAPER_CONFIGS["Qwen2.5-14B"]
  assert (big.vocab_size, big.rope_theta, big.rms_norm_eps) == (152064, 1e6, 1e-5)
  assert pc.get_paper_config("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B").bos_token_id == 151646


def test_qwen3_moe_hf_fields_and_hand_computed_count():
  # The published HF fields and a count computed by hand from them (the abstract build is in
  # test_abstract_build_matches_num_params_and_published_size).
  hf = pc.PAPER_HF_CONFIGS["Qwen3-30B-A3B"]
  assert hf["model_type"] == "qwen3_moe" and hf["architectures"] == ["Qwen3MoeForCausalLM"]
  assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
          hf["num_key_value_heads"], hf["head_dim"]) == (2048, 48, 32, 4, 128)
  assert (hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]) == (128, 8,
                                                                                         768)
  assert hf["norm_topk_prob"] and hf["decoder_sparse_step"] == 1 and hf["mlp_only_layers"] == []
  assert (hf["vocab_size"], hf["max_position_embeddings"], hf["rope_theta"]) == (151936, 40960,
                                                                                 1e6)
  assert not hf["tie_word_embeddings"] and not hf["attention_bias"]
  d, layers, vocab = 2048, 48, 151936
  attention = d * 32 * 128 + 2 * d * 4 * 128 + 32 * 128 * d + 2 * 128  # q, k, v, o, q/k norms
  experts = 128 * 3 * d * 768  # gate, up, down of every expert
  router = d * 128
  total = layers * (attention + experts + router + 2 * d) + d + 2 * vocab * d
  assert total == 30_532_122_624 == pc.PUBLISHED_EXACT_PARAMS["Qwen3-30B-A3B"]
  moe = pc.PAPER_CONFIGS["Qwen3-30B-A3B"]
  assert total == moe.num_params()
  assert total == pytest.approx(pc.PUBLISHED_PARAMS["Qwen3-30B-A3B"], rel=0.01)
  assert total - 2 * vocab * d == pytest.approx(29.9e9, rel=0.01)  # card: non-embedding 29.9B
  active = moe.num_params(active_only=True)
  assert active == total - 120 * layers * 3 * d * 768  # 8 of 128 experts run per token
  assert active == pytest.approx(pc.PUBLISHED_ACTIVE_PARAMS["Qwen3-30B-A3B"], rel=0.02)  # "3.3B"


# ------------------------------------------------------------------------------- loading ----


@pytest.fixture
def no_local_models(tmp_path, monkeypatch):
  monkeypatch.setenv(pc.MODELS_DIR_ENV, str(tmp_path / "models"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  return tmp_path


def _tiny_qwen2(**overrides):
  return ModelConfig(**dict(dict(model_type="qwen2", vocab_size=32, hidden_size=16,
                                 intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, qkv_bias=True),
                            **overrides))


def test_load_paper_model_from_a_local_directory(no_local_models):
  cfg = _tiny_qwen2()
  params = init_params(cfg, jax.random.key(0))
  path = str(no_local_models / "ckpt")
  save_hf(path, cfg, params)
  loaded_cfg, loaded = pc.load_paper_model(path)
  assert loaded_cfg == cfg
  np.testing.assert_array_equal(loaded["layers_0"]["mlp"]["up_proj"]["kernel"],
                                params["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_load_paper_model_without_a_checkpoint_says_how_to_get_one(no_local_models):
  with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-Math-1.5B"):
    pc.load_paper_model("Qwen2.5-Math-1.5B")
  with pytest.raises(FileNotFoundError, match="neither a local"):
    pc.load_paper_model(str(no_local_models / "missing"))


def test_load_paper_model_finds_models_dir_and_checks_architecture(no_local_models):
  path = str(no_local_models / "models" / "Qwen2.5-Math-1.5B")  # a stand-in, not the real model
  save_hf(path, _tiny_qwen2(), init_params(_tiny_qwen2(), jax.random.key(0)))
  assert pc.local_checkpoint_dir("Qwen/Qwen2.5-Math-1.5B") == path
  with pytest.raises(ValueError, match="hidden_size: expected 1536, found 16"):
    pc.load_paper_model("Qwen2.5-Math-1.5B")


def test_unknown_name():
  with pytest.raises(KeyError, match="Unknown paper model"):
    pc.get_paper_config("Qwen2.5-72B")
