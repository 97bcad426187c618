"""`ModelConfig`: the subset of a Hugging Face `config.json` our decoder needs.

Families: `qwen2` (q/k/v bias), `llama` (optional `attention_bias` / `mlp_bias`, `llama3` RoPE
scaling), `qwen3` (per-head q/k RMSNorm, explicit `head_dim`) and `qwen3_moe` (qwen3 attention;
sparse layers replace the MLP with a top-k mixture of experts). Grouped-query attention with any
ratio, tied or untied embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_MODEL_TYPES = ("qwen3_moe",)
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyperparameters, named as in Hugging Face configs."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable form of the HF dict
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  max_position_embeddings: int = 4096
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Mixture of experts (qwen3_moe only; 0 / defaults for dense families).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  # Execution option, not a Hugging Face field (`to_hf`/`from_hf` ignore it): recompute each
  # decoder layer's activations in the backward pass instead of keeping them (gradient
  # checkpointing, `flax.linen.remat` per layer). Same values; less memory, ~1/3 more FLOPs.
  remat: bool = False

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"Unknown model_type {self.model_type!r}; allowed: {list(MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"ModelConfig.num_attention_heads={self.num_attention_heads} does not divide "
            f"hidden_size={self.hidden_size} (give head_dim explicitly for Qwen3-style configs)")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"ModelConfig.num_key_value_heads={self.num_key_value_heads} does not divide "
          f"num_attention_heads={self.num_attention_heads}")
    if self.hidden_act != "silu":
      raise ValueError(f"ModelConfig.hidden_act {self.hidden_act!r} is not supported; "
                       "allowed: silu")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    rope_type = self.rope_dict.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"ModelConfig.rope_scaling rope_type {rope_type!r} is not supported; "
                       f"allowed: {list(ROPE_TYPES)}")
    object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    if not isinstance(self.remat, bool):
      raise ValueError(f"ModelConfig.remat must be True or False, got {self.remat!r}")
    self._check_moe()

  def _check_moe(self):
    """Validates the mixture-of-experts fields; errors name the offending field."""
    if self.model_type not in MOE_MODEL_TYPES:
      if self.num_experts:
        raise ValueError(f"ModelConfig.num_experts={self.num_experts} needs an MoE model_type "
                         f"({list(MOE_MODEL_TYPES)}), got {self.model_type!r}")
      return
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "decoder_sparse_step"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive for {self.model_type}, got "
                         f"{getattr(self, name)}")
    if self.num_experts_per_tok > self.num_experts:
      raise ValueError(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                       f"num_experts={self.num_experts}")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"ModelConfig.mlp_only_layers has layer indices {bad} outside "
                       f"[0, num_hidden_layers={self.num_hidden_layers})")
    if not self.moe_layers:
      raise ValueError("ModelConfig.mlp_only_layers / decoder_sparse_step leave no sparse layer; "
                       "a qwen3_moe model needs at least one (vLLM refuses none)")

  @property
  def rope_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @property
  def qk_norm(self) -> bool:
    """Qwen3 normalises each query and key head with an RMSNorm before RoPE."""
    return self.model_type in ("qwen3", "qwen3_moe")

  @property
  def is_moe(self) -> bool:
    return self.model_type in MOE_MODEL_TYPES

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the sparse (mixture-of-experts) layers, by Hugging Face's Qwen3-MoE rule."""
    if not self.is_moe or self.num_experts <= 0:
      return ()
    return tuple(i for i in range(self.num_hidden_layers)
                 if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------ Hugging Face mapping ----

  @classmethod
  def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> "ModelConfig":
    """Reads a Hugging Face config dict, `config.json` path or model directory.

    Accepts both the transformers 4.x keys (`rope_theta`, `rope_scaling`) and the transformers 5
    `rope_parameters` dict; a config holding both forms must not contradict itself. Refuses
    what the decoder cannot run faithfully instead of running something else: sliding-window
    attention (Qwen2/Qwen3 `use_sliding_window`, `layer_types`) whose window is shorter than
    `max_position_embeddings`.
    """
    if not isinstance(config, dict):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"No Hugging Face config at {path}")
      with open(path) as f:
        try:
          config = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"Corrupt Hugging Face config {path}: {e}") from e
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"Unknown model_type {model_type!r} in Hugging Face config; "
                       f"allowed: {list(MODEL_TYPES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
      raise ValueError(f"Hugging Face config lacks required fields {missing}")
    _check_no_sliding_window(config)
    rope = _rope_spec(config)
    rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    rope_scaling = None if rope_type == "default" else rope
    if model_type == "qwen2":
      qkv_bias, o_bias = True, False
    else:
      qkv_bias = o_bias = bool(config.get("attention_bias", False))
    heads = config["num_attention_heads"]
    moe = {}
    if model_type in MOE_MODEL_TYPES:
      # transformers 5 writes `num_local_experts` (its attribute_map alias of `num_experts`).
      num_experts = config.get("num_experts", config.get("num_local_experts"))
      missing = [k for k, v in (("num_experts", num_experts),
                                ("num_experts_per_tok", config.get("num_experts_per_tok")),
                                ("moe_intermediate_size", config.get("moe_intermediate_size")))
                 if v is None]
      if missing:
        raise ValueError(f"Hugging Face {model_type} config lacks required fields {missing}")
      moe = dict(num_experts=int(num_experts),
                 num_experts_per_tok=int(config["num_experts_per_tok"]),
                 moe_intermediate_size=int(config["moe_intermediate_size"]),
                 norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                 decoder_sparse_step=int(config.get("decoder_sparse_step", 1)),
                 mlp_only_layers=tuple(config.get("mlp_only_layers") or ()))
    return cls(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim"),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        hidden_act=config.get("hidden_act", "silu"),
        initializer_range=config.get("initializer_range", 0.02),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        **moe,
    )

  def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
    """A Hugging Face `config.json` dict (transformers 5 layout) that transformers and vLLM load."""
    if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
      raise ValueError("A qwen2 config needs qkv_bias=True and o_bias=False to be expressible in "
                       "Hugging Face's Qwen2 layout")
    if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
      raise ValueError(f"{self.model_type} has one attention_bias flag for q/k/v/o; got "
                       f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope.update(self.rope_dict)
    out = {
        "architectures": [ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": self.hidden_act,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if self.model_type == "qwen2":
      out.update(use_sliding_window=False, sliding_window=None)
    else:
      out["attention_bias"] = self.qkv_bias
    if self.model_type == "llama":
      out["mlp_bias"] = self.mlp_bias
    if self.is_moe:
      out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                 mlp_only_layers=list(self.mlp_only_layers), use_sliding_window=False,
                 sliding_window=None)
    return out

  def num_params(self, *, include_embeddings: bool = True, active_only: bool = False) -> int:
    """Parameter count, as Hugging Face reports it (tied embeddings counted once).

    With `active_only`, sparse layers count the router and `num_experts_per_tok` experts: the
    parameters one token uses (the "A3B" of Qwen3-30B-A3B).
    """
    d, h, kv, hd = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                    self.head_dim)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.o_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * hd
    mlp = 3 * d * self.intermediate_size
    if self.mlp_bias:
      mlp += 2 * self.intermediate_size + d
    layer = attn + mlp + 2 * d
    total = self.num_hidden_layers * layer + d
    # Sparse layers: a [D, E] router and E experts of 3 * D * moe_intermediate_size each.
    moe = self.num_experts * (d + 3 * d * self.moe_intermediate_size)
    total += len(self.moe_layers) * (moe - mlp)
    if active_only:
      unused = self.num_experts - self.num_experts_per_tok
      total -= len(self.moe_layers) * unused * 3 * d * self.moe_intermediate_size
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return total


def _rope_spec(config: dict[str, Any]) -> dict[str, Any]:
  """The RoPE dict of a HF config (`rope_parameters`, else legacy `rope_scaling`, else default).

  A config holding several specs that disagree (a legacy `rope_scaling` next to
  `rope_parameters`, a top-level `rope_theta` unlike `rope_parameters["rope_theta"]`) is refused:
  transformers, vLLM and we would each pick a different one.
  """
  def normalized(spec):
    spec = dict(spec or {})
    if "type" in spec:
      legacy = spec.pop("type")
      if spec.setdefault("rope_type", legacy) != legacy:
        raise ValueError(f"Hugging Face config RoPE spec {spec} has type={legacy!r} and "
                         f"rope_type={spec['rope_type']!r}")
    return spec

  params, legacy = normalized(config.get("rope_parameters")), normalized(config.get("rope_scaling"))
  conflicts = []
  if params and legacy:
    for key in sorted(set(params) | set(legacy)):
      if key == "rope_theta" and key not in legacy:
        continue  # the legacy form keeps theta at the top level (checked below)
      default = "default" if key == "rope_type" else None
      if params.get(key, default) != legacy.get(key, default):
        conflicts.append(f"{key}: rope_parameters {params.get(key, default)!r} vs rope_scaling "
                         f"{legacy.get(key, default)!r}")
  theta = params.get("rope_theta", legacy.get("rope_theta"))
  if theta is not None and config.get("rope_theta") is not None and (
      float(theta) != float(config["rope_theta"])):
    conflicts.append(f"rope_theta: rope_parameters {theta!r} vs top-level "
                     f"{config['rope_theta']!r}")
  if conflicts:
    raise ValueError("Hugging Face config has conflicting RoPE specs (legacy rope_scaling / "
                     "rope_theta next to rope_parameters); keep one, or make them agree: " +
                     "; ".join(conflicts))
  return {**legacy, **params}


def _check_no_sliding_window(config: dict[str, Any]) -> None:
  """Refuses a config whose attention is sliding-window on some layer (as transformers reads it).

  Qwen2/Qwen3 (and Qwen3-MoE): with `use_sliding_window`, layers listed as "sliding_attention" in
  `layer_types` (default: layers >= `max_window_layers`, 28 by default) see only the last
  `sliding_window` tokens. The decoder runs full attention, so such a model would be wrong past the
  window; a window >= `max_position_embeddings` never bites (longer sequences are refused).
  """
  if not config.get("use_sliding_window") or config.get("sliding_window") is None:
    return
  window = int(config["sliding_window"])
  layers = int(config["num_hidden_layers"])
  types = config.get("layer_types")
  if types:
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    rule = "layer_types"
  else:
    start = int(config.get("max_window_layers", 28))
    sliding = list(range(start, layers))
    rule = f"max_window_layers={start}"
  max_positions = int(config.get("max_position_embeddings", 4096))
  if sliding and window < max_positions:
    raise ValueError(
        f"Hugging Face config uses sliding-window attention (use_sliding_window=true, "
        f"sliding_window={window}, {rule}: layers {sliding} of {layers}), which this decoder does "
        f"not implement: it would run full attention and differ from the model past {window} "
        f"tokens. Use a config without it (use_sliding_window=false), or a sliding_window >= "
        f"max_position_embeddings ({max_positions})")
