"""Hugging Face safetensors <-> Flax params, both directions.

`to_hf_state_dict` gives the tensors a Hugging Face `*ForCausalLM` (and vLLM) expects, in memory;
`save_hf` writes them as a model directory (atomically); `load_hf` reads one back (any stored dtype,
single or sharded safetensors) into float32 params. The `hf_layout` table drives both directions;
the safetensors files themselves are read and written by `rl_fp16.checkpoints.safetensors_io`.

Mixture-of-experts layers (qwen3_moe) are written in the per-expert layout of the Hugging Face hub
checkpoints, which transformers 5 writes with `save_pretrained` and vLLM loads:

    model.layers.{i}.mlp.gate.weight [E, D]
    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight [moe_intermediate_size, D]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight [D, moe_intermediate_size]

Reading also accepts transformers 5's in-memory fused layout (`model.state_dict()` of a
`Qwen3MoeForCausalLM`): `mlp.experts.gate_up_proj` [E, 2 * I, D] (gate rows first) and
`mlp.experts.down_proj` [E, D, I].
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rl_fp16.checkpoints import safetensors_io
from rl_fp16.models.config import ModelConfig
from rl_fp16.precision import dtype_name, to_dtype

Params = dict[str, Any]

_LINEARS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"  # present in a tied checkpoint only as a copy of EMBEDDING


def _linear_bias(config: ModelConfig, module: str, proj: str) -> bool:
  if module == "mlp":
    return config.mlp_bias
  return config.o_bias if proj == "o_proj" else config.qkv_bias


def hf_layout(config: ModelConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...], bool]]:
  """HF tensor name -> (path into our params, HF shape, transposed?) for every tensor of a config.

  An expert's tensor is one slice of a stacked parameter: its path ends with the expert index (an
  int), e.g. ("layers_0", "mlp", "experts", "gate_proj", "kernel", 3).
  """
  d, v = config.hidden_size, config.vocab_size
  h, kv, hd, inter = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                      config.intermediate_size)
  out_in = {"q_proj": (h * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d),
            "o_proj": (d, h * hd), "gate_proj": (inter, d), "up_proj": (inter, d),
            "down_proj": (d, inter)}
  layout = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), (v, d), False),
            "model.norm.weight": (("norm", "scale"), (d,), False)}
  sparse_layers = set(config.moe_layers)
  moe_inter = config.moe_intermediate_size
  expert_out_in = {"gate_proj": (moe_inter, d), "up_proj": (moe_inter, d),
                   "down_proj": (d, moe_inter)}
  for i in range(config.num_hidden_layers):
    ours, hf = f"layers_{i}", f"model.layers.{i}"
    layout[f"{hf}.input_layernorm.weight"] = ((ours, "input_layernorm", "scale"), (d,), False)
    layout[f"{hf}.post_attention_layernorm.weight"] = (
        (ours, "post_attention_layernorm", "scale"), (d,), False)
    if i in sparse_layers:
      layout[f"{hf}.mlp.gate.weight"] = ((ours, "mlp", "gate", "kernel"),
                                         (config.num_experts, d), True)
      for e in range(config.num_experts):
        for proj, shape in expert_out_in.items():
          layout[f"{hf}.mlp.experts.{e}.{proj}.weight"] = (
              (ours, "mlp", "experts", proj, "kernel", e), shape, True)
    for module, projs in _LINEARS.items():
      if module == "mlp" and i in sparse_layers:
        continue
      for proj in projs:
        layout[f"{hf}.{module}.{proj}.weight"] = ((ours, module, proj, "kernel"), out_in[proj],
                                                  True)
        if _linear_bias(config, module, proj):
          layout[f"{hf}.{module}.{proj}.bias"] = ((ours, module, proj, "bias"),
                                                  (out_in[proj][0],), False)
    if config.qk_norm:
      for norm in ("q_norm", "k_norm"):
        layout[f"{hf}.self_attn.{norm}.weight"] = ((ours, "self_attn", norm, "scale"), (hd,),
                                                   False)
  if not config.tie_word_embeddings:
    layout["lm_head.weight"] = (("lm_head", "kernel"), (v, d), True)
  return layout


def _numpy_dtype(dtype: Any) -> np.dtype:
  dtype = to_dtype(dtype)
  return np.dtype(ml_dtypes.bfloat16) if dtype_name(dtype) == "bfloat16" else np.dtype(dtype)


def _param_path(path: tuple[Any, ...]) -> tuple[str, ...]:
  """The parameter a layout path names (without a trailing expert index)."""
  return path[:-1] if isinstance(path[-1], int) else path


def _get(params: Params, path: tuple[str, ...]) -> Any:
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"params lack {'/'.join(path)}")
    node = node[key]
  return node


def _flat_paths(params: Params, prefix=()) -> Iterator[tuple[str, ...]]:
  for key, value in params.items():
    if isinstance(value, Mapping):
      yield from _flat_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def to_hf_state_dict(config: ModelConfig, params: Params, dtype: Any = "float32"
                     ) -> dict[str, np.ndarray]:
  """Our params -> {HF tensor name: numpy array [HF shape] in `dtype`} (bfloat16 via ml_dtypes).

  `to_hf_device_arrays`, then everything copied to the host at once. The arrays may be read-only
  (views of JAX's host buffers); copy one before writing to it.
  """
  state = jax.device_get(to_hf_device_arrays(config, params, dtype))
  return {name: np.ascontiguousarray(value) for name, value in state.items()}


def to_hf_device_arrays(config: ModelConfig, params: Params, dtype: Any = "float32"
                        ) -> dict[str, jax.Array]:
  """Our params -> {HF tensor name: jax.Array [HF shape] in `dtype`}, where the params live (no
  host copy: e.g. for DLPack into torch on the same device).

  Raises ValueError naming the tensor when a parameter is missing, unexpected or mis-shaped, holds
  NaN/inf, or holds a value beyond `dtype`'s range (e.g. 1e5 in float16, which the cast would
  turn into inf): nothing is returned then, so nothing reaches an engine or a file.
  The transposes, the cast and a per-tensor max |value| reduction run in one jitted XLA program
  where the params live (per config and dtype); only the maxima come to the host.
  """
  np_dtype = _numpy_dtype(dtype)
  layout = hf_layout(config)
  expected_paths = {_param_path(path) for path, _, _ in layout.values()}
  unexpected = sorted("/".join(p) for p in _flat_paths(params) if p not in expected_paths)
  if unexpected:
    raise ValueError(f"params hold tensors the {config.model_type} config does not use: "
                     f"{unexpected[:5]}")
  for name, (path, hf_shape, transposed) in layout.items():  # shapes only: no data moves
    param = _param_path(path)
    try:
      shape = tuple(np.shape(_get(params, param)))
    except KeyError as e:
      raise ValueError(f"Missing parameter {'/'.join(param)} (HF tensor {name})") from e
    if param != path:  # one expert of a stacked [E, in, out] parameter
      expected = (config.num_experts,) + (hf_shape[::-1] if transposed else hf_shape)
      if shape != expected:
        raise ValueError(f"Parameter {'/'.join(param)} has shape {shape}, expected "
                         f"{expected} for tensors {name.rsplit('.', 3)[0]}.*")
      shape, path = shape[1:], param
    if transposed:
      shape = shape[::-1]
    if shape != hf_shape:
      raise ValueError(f"Parameter {'/'.join(path)} has HF shape {shape}, expected "
                       f"{hf_shape} for tensor {name}")
  # params hold exactly the layout's tensors now (checked above), so all of them go to the device.
  state, max_abs = _hf_tensors(config, params, np_dtype)
  max_abs = np.asarray(jax.device_get(max_abs))
  limit = float(ml_dtypes.finfo(np_dtype).max)
  problems = []
  for name, peak in zip(layout, max_abs):  # max_abs follows the layout's order
    if np.isfinite(peak) and peak <= limit:
      continue
    path = layout[name][0]
    where = f"tensor {name} (param {'/'.join(_param_path(path))})"
    if np.isfinite(peak):
      problems.append(f"{where} has max |value| {peak:.6g}, outside the {np_dtype.name} range "
                      f"(max |value| {limit:.6g}): the cast would make it inf")
    else:  # the error path only: count on the host
      value = np.asarray(_get(params, _param_path(path)))
      value = value[path[-1]] if _param_path(path) != path else value
      problems.append(f"{where} has {int(np.size(value) - np.isfinite(value).sum())} "
                      "non-finite value(s) (NaN/inf)")
  if problems:
    raise ValueError(f"params cannot be converted to {np_dtype.name}:\n  " +
                     "\n  ".join(problems))
  return state


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _hf_tensors(config: ModelConfig, params: Params, dtype: np.dtype
                ) -> tuple[dict[str, jax.Array], jax.Array]:
  """{HF name: the parameter (one expert of a stacked one), transposed to HF layout, in dtype},
  and float32 [num tensors]: each tensor's max |value| before the cast, in the layout's order
  (one reduction per tensor; NaN and inf propagate into it)."""
  state, max_abs = {}, []
  for name, (path, _, transposed) in hf_layout(config).items():
    value = _get(params, _param_path(path))
    if _param_path(path) != path:
      value = value[path[-1]]
    state[name] = (value.T if transposed else value).astype(dtype)
    max_abs.append(jnp.max(jnp.abs(value), initial=0).astype(jnp.float32))
  return state, jnp.stack(max_abs)


def from_hf_state_dict(config: ModelConfig, state: Mapping[str, Any]) -> Params:
  """{HF tensor name: array} -> our float32 params. Errors name the missing/unexpected tensor.

  A checkpoint with tied embeddings may still store `lm_head.weight` (transformers sometimes
  does); it must then equal the embedding and is dropped (see `tied_lm_head_problem`). Tensors
  holding NaN/inf are refused by name.
  """
  layout = hf_layout(config)
  state = _split_fused_experts(config, state)
  names = set(state)
  if config.tie_word_embeddings and TIED_HEAD in names:
    problem = tied_lm_head_problem(state)
    if problem:
      raise ValueError(f"Checkpoint refused: {problem}")
    names.discard(TIED_HEAD)
  missing = sorted(set(layout) - names)
  if missing:
    raise ValueError(f"Checkpoint is missing tensor(s) {missing[:5]}"
                     f"{' and more' if len(missing) > 5 else ''}")
  unexpected = sorted(n for n in names - set(layout) if not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise ValueError(f"Checkpoint has unexpected tensor(s) {unexpected[:5]} for a "
                     f"{config.model_type} config")
  params: Params = {}
  experts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for name, (path, hf_shape, transposed) in layout.items():
    value = np.asarray(state[name])
    if tuple(value.shape) != hf_shape:
      raise ValueError(f"Tensor {name} has shape {tuple(value.shape)}, expected {hf_shape}")
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
      raise ValueError(f"Tensor {name} holds {int(np.size(value) - np.isfinite(value).sum())} "
                       "non-finite value(s) (NaN/inf); refusing to load it")
    if transposed:
      value = value.T
    if isinstance(path[-1], int):
      experts.setdefault(path[:-1], {})[path[-1]] = value
      continue
    _set(params, path, np.ascontiguousarray(value))
  for path, by_index in experts.items():
    _set(params, path, np.stack([by_index[e] for e in range(len(by_index))]))
  return params


def tied_lm_head_problem(state: Mapping[str, Any]) -> str | None:
  """Why the `lm_head.weight` in a tied-embedding model's `state` cannot be dropped, or None.

  With tied embeddings the LM head *is* the embedding, so an `lm_head.weight` (transformers' state
  dicts repeat it, some checkpoints store it) is redundant and dropped, but only when it equals
  `model.embed_tokens.weight`; a different one would be silently ignored. The one check for both
  checkpoint loading (`from_hf_state_dict`) and the vLLM sampler's weight updates. Arrays may be
  numpy (ml_dtypes bfloat16 included) or torch tensors.
  """
  embed, head = state.get(EMBEDDING), state[TIED_HEAD]
  if embed is head:
    return None
  where = "the model ties word embeddings (tie_word_embeddings=true in config.json)"
  if embed is None:
    return f"tensor {TIED_HEAD!r} is given without {EMBEDDING!r}, but {where}"
  embed, head = _float32(embed), _float32(head)
  if embed.shape != head.shape:
    return (f"tensor {TIED_HEAD!r} has shape {head.shape}, {EMBEDDING!r} {embed.shape}, but "
            f"{where}")
  if np.array_equal(embed, head):
    return None
  diff = float(np.nanmax(np.abs(embed - head))) if embed.size else 0.0
  return (f"tensor {TIED_HEAD!r} differs from {EMBEDDING!r} (max |difference| {diff:.3g}), but "
          f"{where}: the head is the embedding and this {TIED_HEAD} would be ignored. Untie the "
          f"model (tie_word_embeddings=false) or drop {TIED_HEAD}")


def _float32(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().float().cpu().numpy()
  return np.asarray(value).astype(np.float32, copy=False)


def _set(params: Params, path: tuple[str, ...], value: np.ndarray) -> None:
  node = params
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _split_fused_experts(config: ModelConfig, state: Mapping[str, Any]) -> Mapping[str, Any]:
  """Rewrites transformers 5's fused expert tensors into the per-expert names (others as is)."""
  fused = {name: _FUSED_RE.match(name) for name in state}
  fused = {name: m for name, m in fused.items() if m}
  if not fused:
    return state
  out = {name: value for name, value in state.items() if name not in fused}
  inter = config.moe_intermediate_size
  for name, match in fused.items():
    prefix, kind = match.groups()
    value = np.asarray(state[name])
    if value.ndim != 3 or value.shape[0] != config.num_experts:
      raise ValueError(f"Tensor {name} has shape {tuple(value.shape)}, expected "
                       f"[{config.num_experts}, ...] (one slice per expert)")
    if kind == "gate_up_proj" and value.shape[1] != 2 * inter:
      raise ValueError(f"Tensor {name} has shape {tuple(value.shape)}, expected "
                       f"({config.num_experts}, {2 * inter}, {config.hidden_size})")
    for e in range(value.shape[0]):
      pieces = ({"gate_proj": value[e, :inter], "up_proj": value[e, inter:]}
                if kind == "gate_up_proj" else {"down_proj": value[e]})
      for proj, piece in pieces.items():
        key = f"{prefix}.{e}.{proj}.weight"
        if key in state:
          raise ValueError(f"Checkpoint holds both fused {name} and per-expert {key}")
        out[key] = piece
  return out


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
  """Reads a Hugging Face model directory into (ModelConfig, float32 params)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
  config = ModelConfig.from_hf(path)
  return config, from_hf_state_dict(config, safetensors_io.read_safetensors(path))


def save_hf(path: str | os.PathLike, config: ModelConfig, params: Params, *,
            dtype: Any = "float32", tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int | None = None) -> str:
  """Writes a Hugging Face model directory that transformers and vLLM load.

  The directory is built next to `path` and renamed into place, so a crash never leaves a
  half-written model; an existing directory at `path` is replaced.

  Args:
    dtype: stored dtype ("float32", "bfloat16", "float16"); also written as the config's dtype.
    tokenizer_dir: a directory whose tokenizer files (tokenizer.json, tokenizer_config.json,
      special_tokens_map.json, ...) are copied alongside.
    max_shard_bytes: when set, shards as `model-0000i-of-0000n.safetensors` with an index.
  Returns:
    The path written.
  """
  path = os.fspath(path)
  state = to_hf_state_dict(config, params, dtype)
  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_hf(dtype_name(to_dtype(dtype))), f, indent=2)
    safetensors_io.write_safetensors(tmp, state, max_shard_bytes)
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, tmp)
    if os.path.exists(path):
      old = f"{tmp}.old"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
                   "chat_template.jinja")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
  """Copies the tokenizer files present in `src` to `dst`; errors when there are none."""
  copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(src, name))]
  if not copied:
    raise FileNotFoundError(f"No tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {src}")
  for name in copied:
    shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  return copied
