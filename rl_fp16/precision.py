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

Emulated precision: a policy with `significand_bits=k` computes in float32 but rounds every value
the decoder would hold in its compute dtype (weights, matmul / einsum outputs, norm outputs, RoPE,
attention probabilities and outputs, the MLP activation product, residual adds) to k significand
bits with `round_to_bits` (round-to-nearest-even; the exponent range of float32, or of a narrower
format with `exponent_bits`). Presets `eK` (K bits, float32's range) and `eKxE` (K bits, E exponent
bits: `e11x5` is fp16's format, `e8` is bf16's) make it a knob: k = 8 stands in for bf16, 11 for
fp16, 24 is float32 itself. See docs/dose_response.md for its calibration against the real dtypes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.dynamic_scale import DynamicScale

# Re-exported: the precision names live in the JAX-free rl_fp16.names.
from rl_fp16.names import (EMULATED_PRESET, FLOAT32_EXPONENT_BITS,  # pylint: disable=unused-import
                           FLOAT32_SIGNIFICAND_BITS, PRESETS, is_precision_name, parse_emulated,
                           precision_pair_parts)
from rl_fp16 import names

DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16,
}
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
    significand_bits: None (no emulation), or k in [1, 24]: the decoder computes in float32 and
      rounds every compute-dtype value to k significand bits (counting the implicit bit; bf16 has
      8, fp16 11) with `round_to_bits`. Needs float32 param and compute dtypes.
    exponent_bits: the emulated format's exponent bits, in [2, 8] (8: float32's range, no
      clamping; 5: float16's, with its subnormals and overflow to inf). Only with significand_bits.
    bitwise: the decoder computes every token's values in a form that does not depend on which
      rows, padding or cache layout surround it (`rl_fp16.models.layers.bitwise_rows`, the
      decoder's compacted layout; docs/bitwise.md), so the JAX sampler's log-probs equal
      `token_logprobs` bit for bit under the same policy and params.
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  norm_dtype: Any = jnp.float32
  softmax_dtype: Any = jnp.float32
  logsoftmax_dtype: Any = jnp.float32
  significand_bits: int | None = None
  exponent_bits: int = FLOAT32_EXPONENT_BITS
  bitwise: bool = False

  def __post_init__(self):
    for name in _DTYPE_FIELDS:
      object.__setattr__(self, name, to_dtype(getattr(self, name)))
    names.check_format(self.significand_bits, self.exponent_bits)
    if self.significand_bits is None:
      if self.exponent_bits != FLOAT32_EXPONENT_BITS:
        raise ValueError(f"exponent_bits={self.exponent_bits} needs significand_bits (emulation)")
    elif (self.param_dtype, self.compute_dtype) != (jnp.dtype(jnp.float32),) * 2:
      raise ValueError(f"Emulated precision (significand_bits={self.significand_bits}) computes in "
                       f"float32; got param_dtype={dtype_name(self.param_dtype)}, "
                       f"compute_dtype={dtype_name(self.compute_dtype)}")

  def replace(self, **changes) -> "DtypePolicy":
    return dataclasses.replace(self, **changes)

  @property
  def needs_loss_scaling(self) -> bool:
    """FP16 compute (real, or emulated with fp16's exponent range) is too narrow for unscaled
    gradients."""
    return (self.compute_dtype == jnp.dtype(jnp.float16)
            or (self.is_emulated and self.exponent_bits <= 5))

  @property
  def is_emulated(self) -> bool:
    """True when the compute dtype is emulated by rounding float32 values (`significand_bits`)."""
    return self.significand_bits is not None

  def round(self, x: jax.Array) -> jax.Array:
    """`x` rounded to the emulated format (`round_to_bits`); `x` unchanged without emulation.

    The decoder calls it on every value it holds in the compute dtype; gradients pass straight
    through, rounded to the same format (as a real low-precision backward holds its cotangents).
    """
    if self.significand_bits is None:
      return x
    return round_to_bits(x, self.significand_bits, self.exponent_bits)

  def to_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {name: dtype_name(getattr(self, name)) for name in _DTYPE_FIELDS}
    if self.is_emulated:
      out.update(significand_bits=self.significand_bits, exponent_bits=self.exponent_bits)
    if self.bitwise:
      out["bitwise"] = True
    return out


_DTYPE_FIELDS = tuple(f.name for f in dataclasses.fields(DtypePolicy) if f.name.endswith("_dtype"))


# ------------------------------------------------------------------- emulated precision ----


def _round_to_bits(x: jax.Array, bits: int, exponent_bits: int) -> jax.Array:
  """The rounding of `round_to_bits` (not differentiable: it works on the bit pattern)."""
  x = jnp.asarray(x, jnp.float32)
  shift = FLOAT32_SIGNIFICAND_BITS - bits
  y = x
  if shift:
    # Round-to-nearest-even on the bit pattern: add half an ulp of the target format minus one,
    # plus the bit that becomes the last kept one (ties go to even), then clear the dropped bits.
    # A carry out of the significand bumps the exponent, which is the right result (up to inf).
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (u >> shift) & 1
    u = (u + jnp.uint32((1 << (shift - 1)) - 1) + lsb) & jnp.uint32(~((1 << shift) - 1)
                                                                      & 0xFFFFFFFF)
    y = jax.lax.bitcast_convert_type(u, jnp.float32)
  if exponent_bits < FLOAT32_EXPONENT_BITS:
    emax = 2 ** (exponent_bits - 1) - 1
    emin = 1 - emax
    # Subnormals of the narrow format: a fixed grid of 2^(emin - bits + 1), rounded half to even
    # (scaling by powers of two is exact in float32, and jnp.round rounds half to even).
    grid = 2.0 ** (emin - bits + 1)
    subnormal = jnp.round(x * jnp.float32(1.0 / grid)) * jnp.float32(grid)
    y = jnp.where(jnp.abs(x) < jnp.float32(2.0 ** emin), subnormal, y)
    max_finite = (2.0 - 2.0 ** (1 - bits)) * 2.0 ** emax
    y = jnp.where(jnp.abs(y) > jnp.float32(max_finite), jnp.copysign(jnp.float32(jnp.inf), x), y)
  return jnp.where(jnp.isnan(x), x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def round_to_bits(x: jax.Array, bits: int, exponent_bits: int = FLOAT32_EXPONENT_BITS
                  ) -> jax.Array:
  """Rounds float32 values to `bits` significand bits, round-to-nearest-even.

  `bits` counts the implicit leading bit, as in IEEE formats: 8 is bfloat16's significand, 11
  float16's, 24 float32's (the identity). With `exponent_bits=8` the exponent range is float32's,
  so bits=8 equals a cast to bfloat16 and back; with fewer exponent bits values also take that
  format's range: subnormals on its fixed grid, overflow to +-inf (exponent_bits=5, bits=11 equals
  a cast to float16 and back). inf and NaN pass through. The result is float32.

  Differentiable as a straight-through estimator whose cotangent is rounded to the same format
  (the transpose of a cast, in a backward pass held in that format).
  """
  return _round_to_bits(x, bits, exponent_bits)


def _round_fwd(x, bits, exponent_bits):
  return _round_to_bits(x, bits, exponent_bits), None


def _round_bwd(bits, exponent_bits, _, g):
  return (_round_to_bits(g, bits, exponent_bits),)


round_to_bits.defvjp(_round_fwd, _round_bwd)


def get_policy(name: str, role: str = "trainer", *, bitwise: bool = False,
               **overrides) -> DtypePolicy:
  """A named preset: `fp32`, `bf16`, `fp16`, or emulated `eK` / `eKxE`, for a `trainer` or `sampler`.

  The trainer keeps float32 master weights and computes in the preset's dtype; the sampler also
  stores its weights in that dtype (as vLLM does). Norm statistics, attention softmax, logits and
  log-softmax are float32 unless overridden, e.g. `get_policy("bf16", softmax_dtype="bf16")`.
  Emulated presets hold float32 weights and compute in float32, rounding every compute-dtype value
  (weights included) to K significand bits and E exponent bits (default 8: float32's range);
  `e8` emulates bf16, `e11x5` fp16, `e24` is float32. `bitwise=True` sets `DtypePolicy.bitwise`.
  """
  emulated = parse_emulated(name)
  if name not in PRESETS and emulated is None:
    raise ValueError(f"Unknown precision {name!r}; allowed: {list(PRESETS)}, or emulated 'eK' / "
                     "'eKxE' (K significand bits in [1, 24], E exponent bits in [2, 8]; e.g. "
                     "'e8', 'e11x5')")
  if role not in ROLES:
    raise ValueError(f"Unknown role {role!r}; allowed: {list(ROLES)}")
  if emulated is not None:
    bits, exponent_bits = emulated
    return DtypePolicy(significand_bits=bits, exponent_bits=exponent_bits, bitwise=bitwise).replace(
        **{k: v if k in ("significand_bits", "exponent_bits") else to_dtype(v)
           for k, v in overrides.items()})
  compute = DTYPES[name]
  param = jnp.float32 if role == "trainer" else compute
  return DtypePolicy(param_dtype=param, compute_dtype=compute, bitwise=bitwise).replace(
      **{k: to_dtype(v) for k, v in overrides.items()})


@dataclasses.dataclass(frozen=True)
class PrecisionPair:
  """The trainer's and the sampler's policies for one run."""

  trainer: DtypePolicy
  sampler: DtypePolicy
  name: str


def get_precision_pair(name: str, *, bitwise: bool = False) -> PrecisionPair:
  """`"bf16"` (both sides), or `"TRAINER-SAMPLER"` such as `"bf16-fp16"` for mixed pairs.

  Emulated names work on either side: `"e8"` (both sides 8 bits), `"fp32-e6"` (float32 trainer,
  6-bit sampler). `bitwise=True`: both policies are bitwise (`DtypePolicy.bitwise`).
  """
  parts = precision_pair_parts(name)
  return PrecisionPair(trainer=get_policy(parts[0], "trainer", bitwise=bitwise),
                       sampler=get_policy(parts[1], "sampler", bitwise=bitwise), name=name)


# How a bitwise program may be compiled, in order of preference: XLA:CPU options, and the column
# counts (multiples of a quantum) to try for the attention's dots under them. YNNPACK runs single
# dots (never fused with their neighbours, which pulled other ops into a dot in different
# programs); the second candidate leaves the dots to Eigen. docs/bitwise.md, "Dot shape rules".
# Options of other backends' compilers ignore them.
BITWISE_DOT_CANDIDATES = (
    ({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}, (16, 32, 64)),
    ({"xla_cpu_experimental_ynn_fusion_type": ""}, (16,)),
)


@dataclasses.dataclass(frozen=True)
class BitwiseDots:
  """How this machine's bitwise programs are compiled (`compiler_options`) and shaped: every dot of
  a Linear has at least `layers.BITWISE_MIN_ROWS` rows, and every attention dot a multiple of
  `column_quantum` columns. `invariant`: this machine's dots were checked to give a row and a
  column the same bits at every such count (False: no candidate passed, and a bitwise run may log
  a nonzero mismatch)."""

  compiler_options: tuple[tuple[str, Any], ...]
  column_quantum: int
  invariant: bool


def _run_compiled(fn: Callable, options: dict[str, Any], *args: np.ndarray) -> np.ndarray:
  """fn(*args) compiled with `options` and run on host arrays; also from inside another jit's
  trace (where a `jax.jit` with compiler options would be refused as nested)."""
  return np.asarray(jax.jit(fn, compiler_options=options).lower(*args).compile()(*args))


def _rows_invariant(options: dict[str, Any]) -> bool:
  """Float32 matmul rows [128] x [128, 128] and [384] x [384, 128] get the same bits in a dot of
  64, 100, 320 or 1,000 rows as in one of 4,096."""
  dot = functools.partial(_run_compiled, jnp.matmul, options)
  rng = np.random.default_rng(0)
  for features in (128, 384):
    x = rng.standard_normal((4096, features), np.float32)
    w = rng.standard_normal((features, 128), np.float32)
    full = np.asarray(dot(x, w))
    if not all(np.array_equal(np.asarray(dot(x[:rows], w)), full[:rows])
               for rows in (64, 100, 320, 1000)):
      return False
  return True


def _columns_invariant(options: dict[str, Any], quantum: int) -> bool:
  """The columns of the bitwise attention's two dots (scores `bsd,bdn->bsn`, values
  `bsd,bsn->bdn`, 64 keys, head dim 32, float32) get the same bits at 1, 2 and 5 quanta of
  columns as at 40."""
  rng = np.random.default_rng(1)
  wide = 40 * quantum
  for spec, lhs_shape, rhs_shape in (("bsd,bdn->bsn", (4, 64, 32), (4, 32, wide)),
                                     ("bsd,bsn->bdn", (4, 64, 33), (4, 64, wide))):
    dot = functools.partial(_run_compiled, functools.partial(jnp.einsum, spec), options)
    lhs = rng.standard_normal(lhs_shape, np.float32)
    rhs = rng.standard_normal(rhs_shape, np.float32)
    full = np.asarray(dot(lhs, rhs))
    if not all(np.array_equal(np.asarray(dot(lhs, rhs[..., :n])), full[..., :n])
               for n in (quantum, 2 * quantum, 5 * quantum)):
      return False
  return True


@functools.lru_cache(maxsize=None)
def bitwise_dots() -> BitwiseDots:
  """The first of `BITWISE_DOT_CANDIDATES` (options, then the smallest column quantum) under which
  this machine's dots pass `_rows_invariant` and `_columns_invariant`; if none does, the first
  candidate with `invariant=False`. Probed once per process on the default backend (a few dozen
  small compiles, about a second on an idle 2-core CPU)."""
  for options, quanta in BITWISE_DOT_CANDIDATES:
    if not _rows_invariant(options):
      continue
    for quantum in quanta:
      if _columns_invariant(options, quantum):
        return BitwiseDots(tuple(options.items()), quantum, invariant=True)
  options, quanta = BITWISE_DOT_CANDIDATES[0]
  return BitwiseDots(tuple(options.items()), quanta[0], invariant=False)


def compiler_options(policy: DtypePolicy) -> dict[str, Any] | None:
  """The XLA options a program that runs `policy` is compiled with (None: the defaults; a bitwise
  policy: `bitwise_dots().compiler_options`)."""
  return dict(bitwise_dots().compiler_options) if policy.bitwise else None


def policy_jit(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` for a function with a static `policy` argument, compiled with
  `compiler_options(policy)`. Nested in another jit it is inlined: that jit's options apply."""
  plain = jax.jit(fn, **jit_kwargs)
  signature = inspect.signature(fn)

  @functools.cache
  def bitwise():  # built at the first bitwise call: its options come from a probe
    return jax.jit(fn, compiler_options=dict(bitwise_dots().compiler_options), **jit_kwargs)

  def pick(args, kwargs):
    policy = signature.bind_partial(*args, **kwargs).arguments["policy"]
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs)))
    return bitwise() if policy.bitwise and not traced else plain

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return pick(args, kwargs)(*args, **kwargs)

  call.lower = lambda *args, **kwargs: pick(args, kwargs).lower(*args, **kwargs)
  return call


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
