"""Sharded training on a device mesh: rules on parameter names -> shardings (which
`rl_fp16.train.make_train_step(..., mesh=mesh)` jits the train step with), placement helpers.

The mesh has three named axes:

* ``data``: pure data parallelism (parameters replicated along it).
* ``fsdp``: data parallelism whose members also split the parameters and optimizer state
  (ZeRO-3 style; XLA all-gathers a weight before use and reduce-scatters its gradient).
* ``tensor``: Megatron-style tensor parallelism inside attention and the MLP.

The batch is split over ``("data", "fsdp")``. Parameter shardings come from regex rules on the
"/"-joined parameter path (``DEFAULT_RULES``); a mesh axis that does not divide its dimension is
dropped for that dimension (logged), so every rule works for every model and mesh. The optimizer
state mirrors the parameters: a leaf whose dict-key path and shape match a parameter (optax's Adam
``mu`` / ``nu``) gets that parameter's sharding; anything else (counts, loss scale, step)
is replicated. On one device (mesh 1x1x1) everything is replicated and the step is the plain one.
LoRA: the adapters (no rule matches them) take the fallback spec, the frozen base the rules.

Multi-host: call `rl_fp16.distributed.initialize_distributed` first in every process;
`jax.devices()` then lists the devices of all hosts and the mesh spans them. See
docs/sharding.md.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rl_fp16 import precision
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models.lora import LoraConfig, init_lora
from rl_fp16.precision import DtypePolicy

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the "/"-joined path, PartitionSpec). The first match wins; paths with no match use
# `fallback_spec`. Kernels are [in, out]: the "column" projections (q, k, v, gate, up) split their
# output features over `tensor`, the "row" projections (o, down) split their input features, so
# attention and the MLP each need a single all-reduce over `tensor`. The other dimension is split
# over `fsdp`.
Rules = Sequence[tuple[str, P]]
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    # [V, D]: rows over tensor x fsdp, so the lookup is a masked local gather + one all-reduce and
    # its output is free to take the batch sharding (splitting D would force a full re-layout).
    (r"(^|/)embed_tokens/embedding$", P(("tensor", "fsdp"))),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    # Qwen3-MoE: experts stacked [E, in, out] (expert axis replicated), router [D, E].
    (r"(^|/)experts/(gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"(^|/)experts/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"(^|/)mlp/gate/kernel$", P("fsdp")),
    (r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(^|/)(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"(^|/)(o_proj|down_proj)/bias$", P()),
    (r"(^|/)scale$", P()),  # RMSNorm scales, incl. qwen3 q_norm / k_norm
)


# ----------------------------------------------------------------------------------- mesh ----


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, on every host).

  One size may be -1: it takes the devices the others leave. The product must equal the number
  of devices. Axis types are `Auto` (XLA's sharding propagation inside the step).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(data), int(fsdp), int(tensor)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh sizes must be positive, with at most one -1; got data={data}, "
                     f"fsdp={fsdp}, tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into data={data} x fsdp={fsdp} x "
                       f"tensor={tensor}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(mesh_config: Mapping[str, int] | None) -> Mesh:
  """`make_mesh(**mesh_config)`; None gives all devices on `fsdp`."""
  return make_mesh(**dict(mesh_config or {}))


# ---------------------------------------------------------------------------------- rules ----


def path_name(path: Sequence[Any]) -> str:
  """A jax key path -> "layers_0/self_attn/q_proj/kernel" (dict keys and attribute names only)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def _dict_key_path(path: Sequence[Any]) -> tuple[str, ...]:
  """Only the dict keys of a key path: the parameter path inside an optax state leaf's path."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _axis_size(axis_sizes: Mapping[str, int], axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(axis_sizes[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], axis_sizes: Mapping[str, int], name: str = "") -> P:
  """`spec` adapted to an array of `shape`: padded / truncated to its rank; where the mesh axes of
  a dimension do not divide it, trailing axes are dropped until they do (at worst the dimension
  is replicated; logged)."""
  entries = list(spec)[:len(shape)] + [None] * max(len(shape) - len(spec), 0)
  fitted = []
  for dim, axes in zip(shape, entries):
    if axes is not None and dim % _axis_size(axis_sizes, axes):
      wanted = (axes,) if isinstance(axes, str) else tuple(axes)
      kept = wanted
      while kept and dim % _axis_size(axis_sizes, kept):
        kept = kept[:-1]
      logging.info("sharding: %s dim %d (size %d) is not divisible by mesh axes %s (size %d); "
                   "sharding it over %s only", name or "array", len(fitted), dim, wanted,
                   _axis_size(axis_sizes, wanted), kept or "no axis (replicated)")
      axes = None if not kept else kept[0] if len(kept) == 1 else kept
    fitted.append(axes)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def _fallback_spec(shape: Sequence[int], axis_sizes: Mapping[str, int]) -> P:
  """Unmatched leaves: 0/1-D replicated; larger ones split their largest fsdp-divisible dim."""
  fsdp = axis_sizes.get("fsdp", 1)
  if len(shape) < 2 or fsdp == 1:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: shape[i])
  return P(*([None] * best + ["fsdp"]))


def spec_for(name: str, shape: Sequence[int], axis_sizes: Mapping[str, int],
             rules: Rules = DEFAULT_RULES) -> P:
  """The PartitionSpec of the parameter called `name` with `shape` under `rules`."""
  for pattern, spec in rules:
    if re.search(pattern, name):
      return fit_spec(spec, shape, axis_sizes, name)
  return fit_spec(_fallback_spec(shape, axis_sizes), shape, axis_sizes, name)


def _axis_sizes(mesh_or_sizes: Mesh | Mapping[str, int]) -> dict[str, int]:
  if isinstance(mesh_or_sizes, Mesh):
    return dict(mesh_or_sizes.shape)
  return dict(mesh_or_sizes)


def param_specs(params: Any, mesh: Mesh | Mapping[str, int], rules: Rules = DEFAULT_RULES) -> Any:
  """PartitionSpecs (a tree like `params`; arrays or ShapeDtypeStructs) for a mesh or axis sizes."""
  sizes = _axis_sizes(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(path_name(path), np.shape(x), sizes, rules), params)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for every parameter (a tree like `params`)."""
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                param_specs(params, mesh, rules),
                                is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: TrainState, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> TrainState:
  """NamedShardings for a `TrainState` (concrete or from `jax.eval_shape`).

  Params follow `rules`; an optimizer-state leaf whose dict-key path and shape equal those of a
  parameter shares its sharding (Adam's mu / nu); every other leaf is replicated.
  """
  params = param_shardings(state.params, mesh, rules)
  by_path = {_dict_key_path(path): (tuple(np.shape(x)), sharding) for (path, x), sharding in zip(
      jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(params))}
  rep = replicated(mesh)

  def opt_leaf(path, x):
    match = by_path.get(_dict_key_path(path))
    if match is not None and match[0] == tuple(np.shape(x)):
      return match[1]
    return rep

  return state.replace(
      step=rep,
      params=params,
      opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state),
      loss_scale=jax.tree_util.tree_map(lambda _: rep, state.loss_scale),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------ placement ----


def shard_state(state: TrainState, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> TrainState:
  """Places a (host or single-device) `TrainState` on the mesh with `state_shardings`.

  Multi-host: every process must pass the same values (e.g. the same seed / checkpoint).
  """
  return jax.device_put(state, state_shardings(state, mesh, rules))


def _placed_rows(batch: Any, mesh: Mesh, place, global_rows) -> Any:
  """Every leaf of `batch` ([B, ...] arrays) placed by `place(sharding, value)`, after checking
  that its global row count `global_rows(value)` divides over ("data", "fsdp")."""
  sharding = batch_sharding(mesh)
  ways = _axis_size(dict(mesh.shape), BATCH_AXES)

  def leaf(path, value):
    value = np.asarray(value)
    if global_rows(value) % ways:
      raise ValueError(f"Batch '{path_name(path)}' has {global_rows(value)} rows, not divisible "
                       f"by data x fsdp = {ways}; choose a minibatch size that is a multiple of it")
    return place(sharding, value)

  return jax.tree_util.tree_map_with_path(leaf, batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """A batch (a dict or `TrainBatch` of [B, ...] arrays) as global arrays split over
  ("data", "fsdp").

  Each process passes its own rows (on one host: the whole batch); the global batch size is the
  sum over processes and must be divisible by data * fsdp.
  """
  return _placed_rows(batch, mesh, jax.make_array_from_process_local_data,
                      lambda value: value.shape[0] * jax.process_count())


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
  """A batch (a dict or `TrainBatch` of [B, ...] arrays) as global arrays split over
  ("data", "fsdp"), where every process passes the whole batch (the same values) and places the
  rows of its own devices.

  On one process this equals `shard_batch`. B must be divisible by data * fsdp.
  """
  return _placed_rows(
      batch, mesh,
      lambda sharding, value: jax.make_array_from_process_local_data(sharding, value, value.shape),
      lambda value: value.shape[0])


# ----------------------------------------------------------------------------- train step ----


def abstract_train_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                         policy: DtypePolicy, *, lora_config: LoraConfig | None = None,
                         base_params: Any = None) -> TrainState:
  """Shapes and dtypes (no allocation) of the `TrainState` `rl_fp16.train` builds for `config`:
  full params, or with `lora_config` the adapters `init_lora` makes for `base_params`."""
  loss_scale = precision.init_loss_scale(precision.default_loss_scale_config(policy))

  def build(base_params):
    key = jax.random.key(0)
    params = (init_params(config, key) if lora_config is None
              else init_lora(lora_config, base_params, key))
    return TrainState.create(params, optimizer, loss_scale=loss_scale)

  return jax.eval_shape(build, base_params)


def describe(state_or_params: Any) -> dict[str, str]:
  """{"layers_0/self_attn/q_proj/kernel": "PartitionSpec('fsdp', 'tensor')", ...} for logging."""
  return {path_name(path): str(getattr(getattr(x, "sharding", None), "spec", None))
          for path, x in jax.tree_util.tree_leaves_with_path(state_or_params)}
