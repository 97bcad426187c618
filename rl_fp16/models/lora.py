"""LoRA adapters on the decoder's projection kernels.

An adapted kernel is W' = W + (alpha / rank) * A @ B with W [in, out] frozen, A [in, rank] and
B [rank, out] trained. Adapter params are a plain nested dict on the same paths as the kernels
they adapt, with `lora_a` / `lora_b` leaves where the base has `kernel`:

    layers_{i}/self_attn/{q,k,v,o}_proj/lora_a [in, r], lora_b [r, out]
    layers_{i}/mlp/{gate,up,down}_proj/lora_a [in, r], lora_b [r, out]

Kernels with leading dimensions (stacked experts [E, in, out]) get adapters [E, in, r] and
[E, r, out]. B starts at zero, so the adapted model starts exactly equal to the base.

The adapted model is the decoder run on merged params (`merge_lora`), in the trainer's dtype
policy as usual: the merge is done in float32 and the policy then rounds the merged weights, the
same weights the sampler receives through checkpoint conversion. Trainer and sampler thus see one
set of weights and LoRA adds no mismatch source of its own. At large scale one would instead
apply the low-rank product per matmul (y = x @ W + s * (x @ A) @ B): merging materialises a
full-size copy of every adapted kernel and, in the backward pass, a full-size gradient for it,
which is what LoRA exists to avoid. For the models trained here those copies are small, and
merging is exact and simple.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from rl_fp16.config_checks import FieldChecks
from rl_fp16.models.config import ModelConfig
from rl_fp16.models import decoder
from rl_fp16.models.decoder import Params
from rl_fp16.precision import DtypePolicy, to_dtype

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their rank and scale (hashable: a static jit argument).

  Attributes:
    rank: r >= 1, the inner dimension of A @ B.
    alpha: the update is scaled by alpha / rank.
    targets: projection names from `LORA_TARGETS`.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    checks = FieldChecks(self)
    if isinstance(self.targets, str):
      checks.fail("targets", f"must be a sequence of names, not a string; allowed names: "
                  f"{', '.join(LORA_TARGETS)}")
    else:
      object.__setattr__(self, "targets", tuple(self.targets))
      unknown = [t for t in self.targets if t not in LORA_TARGETS]
      checks.check(bool(self.targets) and not unknown, "targets",
                   f"unknown {unknown}; allowed: a non-empty subset of {list(LORA_TARGETS)}")
      checks.check(len(set(self.targets)) == len(self.targets), "targets", "duplicate names")
    checks.integer("rank", 1)
    checks.number("alpha", above=0)
    checks.done()

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _adapted_kernels(params: Params, targets: tuple[str, ...], prefix: tuple[str, ...] = ()
                     ) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(path of the projection, kernel) for every `.../{target}/kernel` in `params`."""
  for key, value in params.items():
    if not hasattr(value, "items"):
      continue
    if key in targets and "kernel" in value:
      yield prefix + (key,), value["kernel"]
    else:
      yield from _adapted_kernels(value, targets, prefix + (key,))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _lora_paths(lora_params: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  """Paths of the projections that hold `lora_a` / `lora_b`."""
  for key, value in lora_params.items():
    if "lora_a" in value:
      yield prefix + (key,)
    else:
      yield from _lora_paths(value, prefix + (key,))


def init_lora(config: LoraConfig, base_params: Params, rng: jax.Array) -> Params:
  """Float32 adapters for every target kernel of `base_params`.

  A [..., in, r] ~ normal(0, 1 / sqrt(in)) (variance-preserving for x @ A), B [..., r, out] = 0,
  so `merge_lora(base, init_lora(...))` equals the base.

  Raises ValueError naming the kernel when the rank exceeds min(in, out), and listing the
  projections the model has when a target matches no kernel.
  """
  found = list(_adapted_kernels(base_params, config.targets))
  missing = [t for t in config.targets if not any(path[-1] == t for path, _ in found)]
  if missing:
    present = sorted({path[-1] for path, _ in _adapted_kernels(base_params, LORA_TARGETS)})
    raise ValueError(f"LoRA targets {missing} match no kernel in the params; this model has "
                     f"{present}")
  lora: dict[str, Any] = {}
  keys = jax.random.split(rng, len(found))
  for key, (path, kernel) in zip(keys, found):
    *lead, d_in, d_out = kernel.shape
    if config.rank > min(d_in, d_out):
      raise ValueError(f"LoRA rank {config.rank} exceeds min(in, out) = {min(d_in, d_out)} of "
                       f"{'/'.join(path)}/kernel {tuple(kernel.shape)}; allowed ranks: 1.."
                       f"{min(d_in, d_out)}")
    a = jax.random.normal(key, (*lead, d_in, config.rank), jnp.float32) / math.sqrt(d_in)
    _set(lora, path, {"lora_a": a, "lora_b": jnp.zeros((*lead, config.rank, d_out), jnp.float32)})
  return lora


def merge_lora(base_params: Params, lora_params: Params, lora_config: LoraConfig, *,
               dtype: Any = None) -> Params:
  """Full params with every adapted kernel replaced by W + (alpha / r) * A @ B.

  The merge is computed in float32. Pure, jittable (`lora_config` and `dtype` static) and
  differentiable with respect to `lora_params`; `base_params` is not modified.

  Args:
    base_params: the frozen base (decoder layout).
    lora_params: from `init_lora` (or trained).
    dtype: when given, every floating leaf of the result is cast to it (e.g. an export in the
      serving dtype); None keeps each leaf's dtype (a merged kernel takes its base kernel's).
  Returns:
    A new nested dict with the decoder's layout (a shallow copy sharing the untouched leaves).
  """
  def copy(tree):
    return {k: copy(v) if hasattr(v, "items") else v for k, v in tree.items()}

  merged = copy(base_params)
  for path in _lora_paths(lora_params):
    adapter = _get(lora_params, path)
    try:
      kernel = _get(base_params, path + ("kernel",))
    except KeyError as e:
      raise ValueError(f"LoRA adapter {'/'.join(path)} has no base kernel "
                       f"{'/'.join(path)}/kernel") from e
    a = jnp.asarray(adapter["lora_a"], jnp.float32)
    b = jnp.asarray(adapter["lora_b"], jnp.float32)
    if a.shape[-1] != lora_config.rank or a.shape[:-1] != kernel.shape[:-1]:
      raise ValueError(f"{'/'.join(path)}/lora_a has shape {a.shape}, expected "
                       f"{(*kernel.shape[:-1], lora_config.rank)} for kernel {kernel.shape}")
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    new = jnp.asarray(kernel, jnp.float32) + jnp.asarray(lora_config.scale, jnp.float32) * delta
    _set(merged, path + ("kernel",), new.astype(jnp.asarray(kernel).dtype))
  if dtype is not None:
    dtype = to_dtype(dtype)
    merged = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        jax.tree_util.tree_map(jnp.asarray, merged))
  return merged


def forward(config: ModelConfig, base_params: Params, lora_params: Params,
            lora_config: LoraConfig, tokens, *, policy: DtypePolicy, attention_mask=None,
            positions=None) -> jax.Array:
  """The adapted model's full-sequence forward: the decoder on `merge_lora(base, lora)`.

  Returns logits [B, T, V] in `policy.output_dtype` (see `rl_fp16.models.forward`).
  """
  merged = merge_lora(base_params, lora_params, lora_config)
  return decoder.forward(config, merged, tokens, policy=policy, attention_mask=attention_mask,
                         positions=positions)


def num_params(lora_params: Params) -> int:
  """Number of trainable adapter parameters."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora_params))
