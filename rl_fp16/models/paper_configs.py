"""The models of the FP16 paper's experiments, as their published Hugging Face `config.json`s.

Every model is a `ModelConfig` built with `ModelConfig.from_hf` from the published fields, so the
HF mapping is exercised too; Qwen3-30B-A3B is the MoE (`qwen3_moe`: 128 experts, 8 per token).

Nothing here downloads weights: `load_paper_model` reads a local Hugging Face directory.

Sources of the config values (all cross-checked against several mirrors of the same file):
* DeepSeek-R1-Distill-Qwen-1.5B: huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  config.json (mirrors: onnx-community/DeepSeek-R1-Distill-Qwen-1.5B-ONNX, unsloth/...). It is
  Qwen2.5-Math-1.5B's architecture with untied embeddings and a 128K position limit.
* Qwen2.5-Math-1.5B: huggingface.co/Qwen/Qwen2.5-Math-1.5B config.json (mirrors:
  unsloth/Qwen2.5-Math-1.5B, mlx-community/Qwen2.5-Math-1.5B-bf16).
* OctoThinker-3B-Hybrid-Base: its model card names `base_model: meta-llama/Llama-3.2-3B`
  (mid-training keeps the architecture); values are Llama-3.2-3B's config.json (mirrors:
  mlx-community/Llama-3.2-3B-bf16, citsjtu2020/LLM-Prof sglang/Model_Config.md).
* Qwen2.5-14B: huggingface.co/Qwen/Qwen2.5-14B config.json (citsjtu2020/LLM-Prof,
  predibase/Qwen2.5-14B-FP8 mirror). DeepSeek-R1-Distill-Qwen-14B has the same architecture
  (unsloth/DeepSeek-R1-Distill-Qwen-14B mirror), with bos 151646.
* Qwen3-30B-A3B: huggingface.co/Qwen/Qwen3-30B-A3B config.json (citsjtu2020/LLM-Prof).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from rl_fp16.checkpoints import load_hf
from rl_fp16.models.config import ModelConfig

_QWEN2_1P5B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=1536,
    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.02,
    use_sliding_window=False, max_window_layers=21)

_QWEN2_14B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=5120,
    intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    vocab_size=152064, rms_norm_eps=1e-5, rope_theta=1000000.0, initializer_range=0.02,
    max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False,
    max_window_layers=48)

# Published config.json fields (the ones that define the architecture and tokens).
PAPER_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(
        _QWEN2_1P5B, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643),
    "Qwen2.5-Math-1.5B": dict(
        _QWEN2_1P5B, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    "OctoThinker-3B-Hybrid-Base": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001),
    "Qwen2.5-14B": dict(_QWEN2_14B, bos_token_id=151643, eos_token_id=151643),
    "DeepSeek-R1-Distill-Qwen-14B": dict(_QWEN2_14B, bos_token_id=151646, eos_token_id=151643),
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_act="silu",
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
        max_window_layers=48, initializer_range=0.02, bos_token_id=151643,
        eos_token_id=151645),
}

HF_REPOS: dict[str, str] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B",
    "OctoThinker-3B-Hybrid-Base": "OctoThinker/OctoThinker-3B-Hybrid-Base",
    "Qwen2.5-14B": "Qwen/Qwen2.5-14B",
    "DeepSeek-R1-Distill-Qwen-14B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
}

# Published parameter counts as model cards / the Hub round them.
PUBLISHED_PARAMS: dict[str, float] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9,  # Hub: "1.78B params" (untied: 2 x 233M embedding)
    "Qwen2.5-Math-1.5B": 1.54e9,  # Qwen2.5 card: 1.54B, 1.31B non-embedding
    "OctoThinker-3B-Hybrid-Base": 3.21e9,  # Llama 3.2 card: 3.21B
    "Qwen2.5-14B": 14.7e9,  # Qwen2.5 card: 14.7B, 13.1B non-embedding
    "DeepSeek-R1-Distill-Qwen-14B": 14.8e9,  # Hub: "14.8B params"
    "Qwen3-30B-A3B": 30.5e9,  # Qwen3 card: 30.5B total, 3.3B activated, 29.9B non-embedding
}
PUBLISHED_NON_EMBEDDING_PARAMS: dict[str, float] = {
    "Qwen2.5-Math-1.5B": 1.31e9, "Qwen2.5-14B": 13.1e9, "Qwen3-30B-A3B": 29.9e9}
PUBLISHED_ACTIVE_PARAMS: dict[str, float] = {"Qwen3-30B-A3B": 3.3e9}
# Exact counts read off the released checkpoints (Hub safetensors metadata, safetensors index
# total_size / 2 bytes per bf16 weight, GGUF general.parameter_count), as quoted in several
# public repositories.
PUBLISHED_EXACT_PARAMS: dict[str, int] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000,
    "Qwen2.5-Math-1.5B": 1_543_714_304,
    "OctoThinker-3B-Hybrid-Base": 3_212_749_824,  # = Llama-3.2-3B's
    "Qwen2.5-14B": 14_770_033_664,  # index total_size 29,540,067,328 bytes in bf16
    "Qwen3-30B-A3B": 30_532_122_624,
}

PAPER_CONFIGS: dict[str, ModelConfig] = {
    name: ModelConfig.from_hf(hf) for name, hf in PAPER_HF_CONFIGS.items()}


def get_paper_config(name: str) -> ModelConfig:
  """The config of a paper model by name (or its Hugging Face repo id)."""
  return PAPER_CONFIGS[_canonical_name(name)]


def _canonical_name(name: str) -> str:
  if name in PAPER_CONFIGS:
    return name
  for key, repo in HF_REPOS.items():
    if name == repo:
      return key
  raise KeyError(f"Unknown paper model {name!r}; known: {sorted(PAPER_CONFIGS)} (or their repo "
                 f"ids {sorted(HF_REPOS.values())})")


# ------------------------------------------------------------------------------- loading ----

MODELS_DIR_ENV = "RL_FP16_MODELS_DIR"


def _hub_cache_dirs() -> list[str]:
  if os.environ.get("HF_HUB_CACHE"):
    return [os.environ["HF_HUB_CACHE"]]
  home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
  return [os.path.join(home, "hub")]


def local_checkpoint_dir(name: str) -> str | None:
  """A local directory holding the paper model `name`, or None.

  Looked up, in order: $RL_FP16_MODELS_DIR/<name> and $RL_FP16_MODELS_DIR/<repo id>, then the
  Hugging Face hub cache (snapshots already downloaded; nothing is fetched).
  """
  name = _canonical_name(name)
  repo = HF_REPOS[name]
  candidates = []
  if os.environ.get(MODELS_DIR_ENV):
    root = os.environ[MODELS_DIR_ENV]
    candidates += [os.path.join(root, name), os.path.join(root, repo)]
  for cache in _hub_cache_dirs():
    pattern = os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots", "*")
    candidates += sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)
  for path in candidates:
    if os.path.isfile(os.path.join(path, "config.json")):
      return path
  return None


def _architecture_mismatches(expected: ModelConfig, found: ModelConfig) -> list[str]:
  fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
  return [f"{f}: expected {getattr(expected, f)}, found {getattr(found, f)}" for f in fields
          if getattr(expected, f) != getattr(found, f)]


def load_paper_model(name_or_path: str | os.PathLike):
  """(ModelConfig, float32 params) from a local Hugging Face checkpoint directory.

  Args:
    name_or_path: a directory with config.json + safetensors, or a paper model name / repo id
      whose weights are available locally (see `local_checkpoint_dir`).
  Raises:
    FileNotFoundError: a paper model with no local checkpoint (this never downloads).
    ValueError: the local checkpoint's architecture is not the paper model's.
  """
  path = os.fspath(name_or_path)
  if os.path.isdir(path):
    return load_hf(path)
  try:
    name = _canonical_name(path)
  except KeyError:
    raise FileNotFoundError(
        f"{path!r} is neither a local Hugging Face model directory nor a paper model "
        f"(known: {sorted(PAPER_CONFIGS)})") from None
  directory = local_checkpoint_dir(name)
  if directory is None:
    raise FileNotFoundError(
        f"No local checkpoint of {name} ({HF_REPOS[name]}). This code never downloads weights: "
        f"fetch them where there is network access, e.g. `huggingface-cli download "
        f"{HF_REPOS[name]} --local-dir $RL_FP16_MODELS_DIR/{name}`, and pass that directory (or "
        f"set {MODELS_DIR_ENV}).")
  config, params = load_hf(directory)
  expected = PAPER_CONFIGS[name]
  if isinstance(expected, ModelConfig):
    mismatches = _architecture_mismatches(expected, config)
    if mismatches:
      raise ValueError(f"The checkpoint at {directory} is not {name}: " + "; ".join(mismatches))
  return config, params
