"""Dtype policies for the trainer and the sampler, and loss scaling for FP16.

A `DtypePolicy` says in which dtype each part of the forward runs. The parts that decide how far two
engines drift apart are configurable separately: RMSNorm statistics, the attention softmax and the
final logits / log-softmax (each float32 by default, as in vLLM and Hugging Face kernels).

Loss scaling uses `flax.training.dynamic_scale.DynamicScale`: it is a `flax.struct` pytree (so it
is passed into and returned from jitted step functions, and saved by orbax, like any other state),
its `value_and_grad` scales the loss, unscales the gradients in float32 and reports whether they are
finite, and it is maintained with Flax. `jmp` has equivalent objects but is unmaintained. A static
scale is the same object with `backoff_factor=1` and `growth_factor=1`: the scale never moves but a
non-finite step is still skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16,
}
PRESETS = ("fp32", "bf16", "fp16")
ROLES = ("trainer", "sampler")


def to_dtype(name_or_dtype: Any) -> jnp.dtype:
  """`"bf16"`, `"bfloat16"`, `jnp.bfloat16`, ... -> a numpy dtype; a clear error otherwise."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {name_or_dtype!r}; allowed: {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name_or_dtype])
  dtype = jnp.dtype(name_or_dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"Unsupported dtype {dtype}; allowed: float32, bfloat16, float16")
  return dtype


def dtype_name(dtype: Any) -> str:
  """jnp.bfloat16 -> "bfloat16" (the name vLLM and Hugging Face use)."""
  return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
  """Which dtype each part of the model runs in.

  Attributes:
    param_dtype: dtype the engine holds its weights in. The trainer keeps float32 master weights;
      a sampler holds them in its serving dtype (vLLM's `dtype`). Weights are rounded to this dtype
      before use.
    compute_dtype: dtype of activations and matmul inputs.
    output_dtype: dtype of the logits `forward` returns (the LM-head matmul accumulates in it).
    norm_dtype: dtype of the RMSNorm statistics (mean of squares and rsqrt).
    softmax_dtype: dtype of attention scores and softmax.
    logsoftmax_dtype: dtype of the final log-softmax that gives token log-probabilities.
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  norm_dtype: Any = jnp.float32
  softmax_dtype: Any = jnp.float32
  logsoftmax_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, to_dtype(getattr(self, field.name)))

  def replace(self, **changes) -> "DtypePolicy":
    return dataclasses.replace(self, **changes)

  @property
  def needs_loss_scaling(self) -> bool:
    """FP16 compute has too narrow a range for unscaled gradients."""
    return self.compute_dtype == jnp.dtype(jnp.float16)

  def to_dict(self) -> dict[str, str]:
    return {f.name: dtype_name(getattr(self, f.name)) for f in dataclasses.fields(self)}


def get_policy(name: str, role: str = "trainer", **overrides) -> DtypePolicy:
  """A named preset: `fp32`, `bf16` or `fp16`, for the `trainer` or the `sampler`.

  The trainer keeps float32 master weights and computes in the preset's dtype; the sampler also
  stores its weights in that dtype (as vLLM does). Norm statistics, attention softmax, logits and
  log-softmax are float32 unless overridden, e.g. `get_policy("bf16", softmax_dtype="bf16")`.
  """
  if name not in PRESETS:
    raise ValueError(f"Unknown precision {name!r}; allowed: {list(PRESETS)}")
  if role not in ROLES:
    raise ValueError(f"Unknown role {role!r}; allowed: {list(ROLES)}")
  compute = DTYPES[name]
  param = jnp.float32 if role == "trainer" else compute
  return DtypePolicy(param_dtype=param, compute_dtype=compute).replace(
      **{k: to_dtype(v) for k, v in overrides.items()})


@dataclasses.dataclass(frozen=True)
class PrecisionPair:
  """The trainer's and the sampler's policies for one run."""

  trainer: DtypePolicy
  sampler: DtypePolicy
  name: str


def get_precision_pair(name: str) -> PrecisionPair:
  """`"bf16"` (both sides), or `"TRAINER-SAMPLER"` such as `"bf16-fp16"` for mixed pairs."""
  parts = name.split("-")
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or any(p not in PRESETS for p in parts):
    raise ValueError(f"Unknown precision pair {name!r}; allowed: one of {list(PRESETS)} or "
                     f"TRAINER-SAMPLER with each in {list(PRESETS)}, e.g. 'bf16-fp16'")
  return PrecisionPair(trainer=get_policy(parts[0], "trainer"),
                       sampler=get_policy(parts[1], "sampler"), name=name)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating leaf of a pytree to `dtype` (integer leaves are left alone)."""
  dtype = jnp.dtype(dtype)

  def cast(x):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      return jnp.asarray(x, dtype)
    return x

  return jax.tree_util.tree_map(cast, tree)


# ---------------------------------------------------------------------------- loss scaling ----

LOSS_SCALINGS = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
  """How the FP16 loss is scaled. `kind="none"` for bf16/fp32 training."""

  kind: str = "dynamic"
  initial_scale: float = 2.0**15
  growth_interval: int = 2000
  growth_factor: float = 2.0
  backoff_factor: float = 0.5
  min_scale: float = 1.0

  def __post_init__(self):
    if self.kind not in LOSS_SCALINGS:
      raise ValueError(f"Unknown loss scaling {self.kind!r}; allowed: {list(LOSS_SCALINGS)}")
    if self.initial_scale <= 0 or self.min_scale <= 0:
      raise ValueError(f"Loss scales must be positive, got initial_scale={self.initial_scale}, "
                       f"min_scale={self.min_scale}")
    if not 0 < self.backoff_factor <= 1 or self.growth_factor < 1 or self.growth_interval < 1:
      raise ValueError(
          f"Need 0 < backoff_factor <= 1, growth_factor >= 1, growth_interval >= 1; got "
          f"{self.backoff_factor}, {self.growth_factor}, {self.growth_interval}")


def init_loss_scale(config: LossScaleConfig) -> DynamicScale | None:
  """The loss-scale state carried in the train state (None when no scaling is used)."""
  if config.kind == "none":
    return None
  static = config.kind == "static"
  return DynamicScale(
      growth_factor=1.0 if static else config.growth_factor,
      backoff_factor=1.0 if static else config.backoff_factor,
      growth_interval=config.growth_interval,
      fin_steps=jnp.asarray(0, jnp.int32),
      scale=jnp.asarray(config.initial_scale, jnp.float32),
      minimum_scale=config.min_scale,
  )


def default_loss_scale_config(policy: DtypePolicy) -> LossScaleConfig:
  """Dynamic scaling for fp16 compute, none otherwise."""
  return LossScaleConfig(kind="dynamic" if policy.needs_loss_scaling else "none")


def all_finite(tree: Any) -> jax.Array:
  """True when every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def value_and_grad(loss_fn, loss_scale: DynamicScale | None, has_aux: bool = True):
  """`jax.value_and_grad` that scales the loss when a loss scale is given.

  Returns a function of the same arguments giving `(new_loss_scale, grads_finite, (loss, aux),
  grads)`; grads are float32 and unscaled. Without a loss scale, `grads_finite` is still computed so
  that bf16/fp32 steps with a non-finite gradient are skipped too.
  """
  if loss_scale is not None:
    scaled = loss_scale.value_and_grad(loss_fn, has_aux=has_aux)

    def fn(*args):
      new_scale, finite, value, grads = scaled(*args)
      return new_scale, finite, value, grads

    return fn

  plain = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(*args):
    value, grads = plain(*args)
    grads = cast_floating(grads, jnp.float32)
    return None, all_finite(grads), value, grads

  return fn


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, a, b)`: keeps an update only when `pred` holds (skip on overflow)."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
