"""The train step factory (`make_train_step`, `make_update`), its losses and the optimizer.

One pure per-minibatch update (`apply_gradients` on the loss of `make_loss_fn`) is the core of
every step: supervised or RL, full params or LoRA adapters, one device or a mesh. The factories
jit it once per (model config, policy, optimizer, loss, mesh, shardings), with the state donated
and, given a mesh, explicit in/out shardings from `rl_fp16.sharding`'s rules.

Every step takes and returns a `TrainState`. Params and optimizer state are float32 master copies;
the forward/backward runs in the trainer policy's compute dtype. With a loss scale (fp16), the
loss is scaled, the gradients unscaled in float32, and a step whose gradients are not finite is
skipped: params, optimizer state untouched, the scale backed off. bf16/fp32 steps with non-finite
gradients are skipped too.

The RL iteration around the step (sample -> reward -> advantage -> update -> weight sync) is
`rl_fp16.rl_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl_fp16 import advantages
from rl_fp16 import objectives, precision, sharding
from rl_fp16.batch import TrainBatch
from rl_fp16.checkpoints.train_state import TrainState
from rl_fp16.config_checks import FieldChecks
from rl_fp16.models import ModelConfig, apply_token_logprobs, default_positions, token_logprobs
from rl_fp16.models.decoder import apply_token_stats
from rl_fp16.models.lora import LoraConfig, merge_lora
from rl_fp16.precision import DtypePolicy, cast_floating, policy_jit
from rl_fp16.sampling.rollout import Rollout


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW as in the paper's runs: betas 0.9/0.95, no weight decay, grad clip 1.0, constant lr."""

  learning_rate: float = 1e-6
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  warmup_steps: int = 0

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.number("learning_rate", above=0)
    if self.grad_clip is not None:
      checks.number("grad_clip", above=0)
    for name in ("b1", "b2"):
      checks.number(name, at_least=0, at_most=1)
    checks.number("eps", above=0)
    checks.number("weight_decay", at_least=0)
    checks.integer("warmup_steps", 0)
    checks.done()


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW (float32 state)."""
  lr: Any = config.learning_rate
  if config.warmup_steps:
    lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    *args) -> tuple[TrainState, dict[str, jax.Array]]:
  """Differentiates `loss_fn(params, *args) -> (loss, aux)` and applies the update when finite.

  Returns the new state and metrics: `train/loss`, `train/grad_norm`, `train/loss_scale`,
  `train/skipped_steps` (1.0 when the update was skipped), plus `aux`.
  """
  grad_fn = precision.value_and_grad(loss_fn, state.loss_scale, has_aux=True)
  new_loss_scale, finite, (loss, aux), grads = grad_fn(state.params, *args)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  params = precision.select_tree(finite, new_params, state.params)
  opt_state = precision.select_tree(finite, new_opt_state, state.opt_state)
  grad_norm = optax.global_norm(grads)
  metrics = dict(aux)
  metrics.update({
      "train/loss": loss.astype(jnp.float32),
      "train/grad_norm": jnp.where(finite, grad_norm, jnp.nan),
      "train/loss_scale": (jnp.asarray(1.0) if new_loss_scale is None
                           else new_loss_scale.scale.astype(jnp.float32)),
      "train/skipped_steps": 1.0 - finite.astype(jnp.float32),
  })
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            loss_scale=new_loss_scale)
  return new_state, metrics


def sft_loss(params, batch: dict[str, jax.Array], *, config: ModelConfig, policy: DtypePolicy,
             logprob_chunk_tokens: int | None = None):
  """Mean next-token cross-entropy over `batch["loss_mask"]` positions.

  batch: tokens int32 [B, T], attention_mask int32 [B, T], loss_mask [B, T] (1 where the token is
  a target, e.g. the response; entry t scores log p(tokens[t] | tokens[<t])). The LM head and
  log-softmax run in chunks of `logprob_chunk_tokens` tokens, by default once the logits are
  large (`apply_token_stats`).
  """
  tokens, attention_mask = batch["tokens"], batch["attention_mask"]
  stats = apply_token_stats(config, policy, params, tokens, attention_mask,
                            default_positions(attention_mask), with_argmax=True,
                            chunk_tokens=logprob_chunk_tokens)
  mask = batch["loss_mask"].astype(jnp.float32).at[:, 0].set(0.0)
  num_tokens = jnp.maximum(mask.sum(), 1.0)
  loss = -(stats["logp"] * mask).sum() / num_tokens
  correct = (stats["argmax"] == tokens).astype(jnp.float32)
  accuracy = (correct * mask).sum() / num_tokens
  return loss, {"sft/token_accuracy": accuracy, "sft/num_tokens": mask.sum()}


# ------------------------------------------------------------------------------------ RL ----


FORWARD_LOGP = "forward_logp"
PADDING_FRAC = "train/padding_frac"  # of the token slots the update's forward computed


def rl_loss(params, batch: TrainBatch, base_params=None, *, config: ModelConfig,
            policy: DtypePolicy, algorithm: str, loss_config: objectives.LossConfig,
            temperature: float, lora_config: LoraConfig | None = None,
            logprob_chunk_tokens: int | None = None):
  """The policy loss of `objectives.policy_loss` on one minibatch, plus entropy.

  batch: a `TrainBatch` with logp_old set (refused without it). With `lora_config`, `params` are
  the adapters and the model is `merge_lora(base_params, params)` (the frozen base is an
  explicit, undifferentiated argument). Rows with `batch.logp_old_from_forward` take this
  forward's log-probs (without gradient) as their logp_old. Under a bitwise policy, or with
  `logp_old_from_forward`, the metrics also hold `FORWARD_LOGP`: this forward's log-probs,
  float32 [B, S] (0 off the loss mask); for the first minibatch, before any update, they are its
  logp_old. The LM head and log-softmax run in chunks of `logprob_chunk_tokens` tokens, by
  default once the logits are large (`apply_token_stats`).
  """
  if batch.logp_old is None:
    raise ValueError("rl_loss needs batch.logp_old (TrainBatch.replace(logp_old=...))")
  if lora_config is not None:
    params = merge_lora(base_params, params, lora_config)
  tokens, attention_mask = batch.tokens, batch.attention_mask
  stats = apply_token_stats(config, policy, params, tokens, attention_mask,
                            default_positions(attention_mask), temperature=temperature,
                            with_entropy=True, chunk_tokens=logprob_chunk_tokens)
  logp, entropy = stats["logp"], stats["entropy"]
  mask = batch.loss_mask
  forward_logp = jax.lax.stop_gradient(logp) * mask.astype(jnp.float32)
  logp_old, from_forward = batch.logp_old, batch.logp_old_from_forward
  if from_forward is not None:
    logp_old = jnp.where(from_forward[:, None] > 0, forward_logp, logp_old)
  loss, metrics = objectives.policy_loss(
      algorithm, logp=logp, logp_old=logp_old, logp_sampler=batch.logp_sampler,
      advantages=batch.advantages, mask=mask, config=loss_config)
  maskf = mask.astype(jnp.float32)
  metrics = dict(metrics)
  metrics["train/entropy"] = (entropy * maskf).sum() / jnp.maximum(maskf.sum(), 1.0)
  metrics[PADDING_FRAC] = 1.0 - attention_mask.astype(jnp.float32).mean()
  if policy.bitwise or from_forward is not None:
    metrics[FORWARD_LOGP] = forward_logp
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What one RL iteration does."""

  algorithm: str = "grpo"
  advantage: str = "grpo"
  loss: objectives.LossConfig = objectives.LossConfig()
  samples_per_prompt: int = 8
  num_minibatches: int = 2
  epochs: int = 1
  temperature: float = 1.0
  max_new_tokens: int = 256
  prompt_bucket: int = 32  # prompts are left-padded to a multiple of this (fewer recompilations)
  lora: LoraConfig | None = None  # train LoRA adapters on a frozen base instead of all params
  # The columns of the step's `TrainBatch` (every row's prompt and response from column 0):
  # > 0 pads all rows to the longest prompt + response rounded up to a multiple of
  # `sequence_bucket` (few widths, so few compilations); 0 pads them to the prompt width
  # (`prompt_bucket`) plus the response width (`max_new_tokens`).
  sequence_bucket: int = 64
  # > 0: each minibatch's rows are sorted by length and run in micro-batches of this many rows,
  # each at its own width (its longest row rounded up to `sequence_bucket`), their gradients
  # summed into the minibatch's one update (`micro_batched_loss`); 0: the minibatch in one.
  micro_batch_rows: int = 0

  def __post_init__(self):
    checks = FieldChecks(self)
    checks.choice("algorithm", objectives.ALGORITHMS)
    checks.choice("advantage", advantages.ADVANTAGE_ESTIMATORS)
    checks.integer("samples_per_prompt", 2)  # group-relative advantages need groups
    for name in ("num_minibatches", "epochs", "max_new_tokens", "prompt_bucket"):
      checks.integer(name, 1)
    checks.integer("sequence_bucket", 0)
    checks.integer("micro_batch_rows", 0)
    checks.check(not self.micro_batch_rows or self.sequence_bucket, "micro_batch_rows",
                 "micro-batches need sequence_bucket > 0 (their widths are its multiples)")
    checks.number("temperature", above=0)
    checks.done()


@functools.partial(policy_jit,
                   static_argnames=("config", "policy", "temperature", "lora_config"))
def packed_logprobs(config: ModelConfig, policy: DtypePolicy, params, batch: TrainBatch,
                    *, temperature: float = 1.0, base_params=None,
                    lora_config: LoraConfig | None = None) -> jax.Array:
  """The trainer's log-probs of every row's response tokens, float32 [B, S] (0 off
  `batch.loss_mask`), in one jitted forward over all rows: the batch's logp_old.

  With `lora_config`, `params` are the adapters and the model is `merge_lora(base_params, params)`.
  """
  if lora_config is not None:
    params = merge_lora(base_params, params, lora_config)
  attention_mask = batch.attention_mask
  logp = apply_token_logprobs(config, policy, params, batch.tokens, attention_mask,
                              default_positions(attention_mask), temperature)
  return logp * batch.loss_mask.astype(jnp.float32)


def trainer_logprobs(model_config: ModelConfig, policy: DtypePolicy, params, batch: TrainBatch,
                     *, rl_config: RLConfig, base_params=None, mesh=None) -> jax.Array:
  """`packed_logprobs` at `rl_config`'s temperature (and LoRA): float32 [B, S] on the batch's
  devices. With `mesh`, `batch` and `params` are placed on it and the result's rows are split
  over the batch axes, as the batch's are."""
  lora = rl_config.lora
  if mesh is None:
    lora_args = {} if lora is None else {"base_params": base_params, "lora_config": lora}
    return packed_logprobs(model_config, policy, params, batch,
                           temperature=rl_config.temperature, **lora_args)
  compute = _logprobs_on_mesh(model_config, policy, rl_config.temperature, lora, mesh)
  return compute(params, batch, base_params if lora is not None else None)


@functools.lru_cache(maxsize=16)
def _logprobs_on_mesh(model_config: ModelConfig, policy: DtypePolicy, temperature: float,
                      lora_config: LoraConfig | None, mesh):
  def compute(params, batch, base_params):
    return packed_logprobs(model_config, policy, params, batch, temperature=temperature,
                           base_params=base_params, lora_config=lora_config)
  return jax.jit(compute, out_shardings=sharding.batch_sharding(mesh),
                 compiler_options=precision.compiler_options(policy))


# ---------------------------------------------------------------------------- step factory ----

def batched_token_logprobs(model_config: ModelConfig, params: Any, rollout: Rollout, *,
                           policy: DtypePolicy, temperature: float = 1.0,
                           batch_size: int = 64) -> np.ndarray:
  """The trainer's log-probs of a rollout's response tokens, float32 [B, T] aligned with
  `rollout.logp_sampler` (0 on padding), computed `batch_size` rows at a time."""
  tokens, attention_mask, _ = rollout.full_sequence()
  prompt_len = rollout.prompt_tokens.shape[1]
  rows = tokens.shape[0]
  out = []
  for start in range(0, rows, batch_size):
    chunk = slice(start, min(start + batch_size, rows))
    t, m = tokens[chunk], attention_mask[chunk]
    pad = batch_size - t.shape[0] if rows > batch_size else 0
    if pad:
      t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], pad, 0)])
    logp = np.asarray(token_logprobs(model_config, params, t, policy=policy, attention_mask=m,
                                     temperature=temperature))
    out.append(logp[:t.shape[0] - pad, prompt_len:])
  return np.concatenate(out) * rollout.response_mask


LOSSES = ("rl", "sft")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static settings of a step's loss (hashable: part of the jit cache key).

  kind "sft": `sft_loss`. kind "rl": `rl_loss` with `algorithm`, `loss_config`, `temperature`
  and, for LoRA, `lora` (the adapters train on a frozen base passed to the step); with
  `micro_batch_rows`, in length-sorted micro-batches (`micro_batched_loss`).
  """

  kind: str
  algorithm: str | None = None
  loss_config: objectives.LossConfig | None = None
  temperature: float = 1.0
  lora: LoraConfig | None = None
  micro_batch_rows: int = 0
  sequence_bucket: int = 0


def loss_spec(loss: str, rl_config: "RLConfig | None" = None, base_params=None) -> LossSpec:
  """The `LossSpec` of `make_train_step`'s arguments, after checking that they fit together."""
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r}; allowed: {list(LOSSES)}")
  if loss == "sft":
    if rl_config is not None or base_params is not None:
      raise ValueError("loss='sft' takes no rl_config and no base_params (full fine-tuning)")
    return LossSpec("sft")
  if rl_config is None:
    raise ValueError("loss='rl' needs rl_config (its algorithm, loss, temperature and lora)")
  if (base_params is None) != (rl_config.lora is None):
    raise ValueError("LoRA needs both base_params and lora_config (rl_config.lora), or neither; "
                     f"got base_params={'set' if base_params is not None else None}, "
                     f"lora_config={rl_config.lora}")
  return LossSpec("rl", rl_config.algorithm, rl_config.loss, rl_config.temperature,
                  rl_config.lora, rl_config.micro_batch_rows, rl_config.sequence_bucket)


def make_loss_fn(model_config: ModelConfig, policy: DtypePolicy, spec: LossSpec) -> Callable:
  """`loss_fn(params, batch, base_params) -> (loss float32 [], metrics)` for `spec`.

  With `spec.lora`, `params` are the adapters and `base_params` the frozen base they merge into;
  otherwise `base_params` is None and unused.
  """
  if spec.kind == "sft":
    def loss_fn(params, batch, base_params):
      del base_params  # full fine-tuning
      return sft_loss(params, batch, config=model_config, policy=policy)
    return loss_fn
  loss_fn = functools.partial(rl_loss, config=model_config, policy=policy,
                              algorithm=spec.algorithm, loss_config=spec.loss_config,
                              temperature=spec.temperature, lora_config=spec.lora)
  if not spec.micro_batch_rows:
    return loss_fn
  return micro_batched_loss(loss_fn, micro_batch_rows=spec.micro_batch_rows,
                            sequence_bucket=spec.sequence_bucket, algorithm=spec.algorithm,
                            loss_config=spec.loss_config)


def micro_batched_loss(loss_fn: Callable, *, micro_batch_rows: int, sequence_bucket: int,
                       algorithm: str, loss_config: objectives.LossConfig) -> Callable:
  """`loss_fn(params, batch, base_params) -> (loss, metrics)` (`rl_loss`'s) run on length-sorted
  micro-batches: the same loss and metrics up to rounding, at a fraction of the padding.

  The batch's rows (B, a multiple of `micro_batch_rows`, else ValueError) are sorted by their
  last real column (in the update's packed layout, their length) and taken `micro_batch_rows`
  at a time; a micro-batch runs at its last real column rounded up to `sequence_bucket` (a
  `lax.switch` over the S / sequence_bucket widths, each compiled once). Its loss is weighted by its share
  of `objectives.aggregation_denominator` and its metrics by their `objectives.metric_counts`
  (entropy by tokens); `FORWARD_LOGP` comes back [B, S] in the batch's row order and
  `PADDING_FRAC` counts the slots the micro-batches computed.

  The gradient is a custom VJP: its backward runs each micro-batch's forward again and its
  backward at the incoming cotangent (a loss scale reaches every micro-batch), so at most one
  micro-batch's activations are live, and adds the gradients in float32.
  """
  aggregation, max_len = loss_config.aggregation, loss_config.max_response_len

  def counts(loss_mask):
    """What each averaged metric averages over: `metric_counts`, and tokens for the entropy."""
    out = objectives.metric_counts(algorithm, loss_mask)
    out["train/entropy"] = jnp.sum(loss_mask > 0).astype(jnp.float32)
    return out

  def plan(batch: TrainBatch):
    """The micro-batches' rows int [N, m], width indices int32 [N] and loss weights [N], and the
    S / sequence_bucket widths (static)."""
    rows, width = batch.tokens.shape
    if rows % micro_batch_rows:
      raise ValueError(f"micro_batch_rows={micro_batch_rows} must divide the minibatch's "
                       f"{rows} rows")
    ends = jnp.max(jnp.where(batch.attention_mask > 0, jnp.arange(1, width + 1), 0), axis=1)
    micro_rows = jnp.argsort(-ends, stable=True).reshape(-1, micro_batch_rows)
    widths = tuple(min(width, sequence_bucket * (i + 1))
                   for i in range(-(-width // sequence_bucket)))
    longest = ends[micro_rows].max(axis=1)
    index = jnp.clip(-(-longest // sequence_bucket) - 1, 0, len(widths) - 1).astype(jnp.int32)
    denominator = functools.partial(objectives.aggregation_denominator,
                                    aggregation=aggregation, max_response_len=max_len)
    weight = (jax.vmap(lambda r: denominator(batch.loss_mask[r]))(micro_rows)
              / denominator(batch.loss_mask))
    return micro_rows, index, weight, widths

  def run_micro(params, batch, base_params, rows, weight, *, width):
    """One micro-batch at `width` columns: (weighted loss, metrics, forward logp [m, S] or
    None)."""
    micro = jax.tree_util.tree_map(lambda x: x[rows][:, :width] if x.ndim == 2 else x[rows],
                                   batch)
    loss, metrics = loss_fn(params, micro, base_params)
    metrics = dict(metrics)
    forward_logp = metrics.pop(FORWARD_LOGP, None)
    if forward_logp is not None:
      forward_logp = jnp.pad(forward_logp, ((0, 0), (0, batch.width - width)))
    return loss * weight, metrics, forward_logp

  def forward(params, batch, base_params):
    micro_rows, index, weight, widths = plan(batch)
    branches = [functools.partial(run_micro, params, batch, base_params, width=width)
                for width in widths]

    def body(loss, micro):
      rows, i, w = micro
      part, metrics, forward_logp = jax.lax.switch(i, branches, rows, w)
      return loss + part, (metrics, forward_logp)
    loss, (metrics, forward_logp) = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                                 (micro_rows, index, weight))
    micro_counts = jax.vmap(lambda r: counts(batch.loss_mask[r]))(micro_rows)
    totals = counts(batch.loss_mask)
    combined = {key: (metrics[key] * micro_counts[key]).sum() / jnp.maximum(totals[key], 1.0)
                for key in totals}
    slots = micro_batch_rows * jnp.asarray(widths, jnp.float32)[index]
    combined[PADDING_FRAC] = 1.0 - batch.attention_mask.sum().astype(jnp.float32) / slots.sum()
    if forward_logp is not None:
      combined[FORWARD_LOGP] = jnp.zeros(batch.tokens.shape, jnp.float32).at[
          micro_rows.reshape(-1)].set(forward_logp.reshape(-1, batch.width))
    return loss, combined

  @jax.custom_vjp
  def micro_loss(params, batch, base_params):
    return forward(params, batch, base_params)

  def micro_loss_fwd(params, batch, base_params):
    return forward(params, batch, base_params), (params, batch, base_params)

  def micro_loss_bwd(residuals, cotangents):
    params, batch, base_params = residuals
    loss_cotangent = cotangents[0]
    micro_rows, index, weight, widths = plan(batch)

    def grad_at(width):
      def fn(rows, w):
        _, vjp = jax.vjp(lambda p: run_micro(p, batch, base_params, rows, w, width=width)[0],
                         params)
        return cast_floating(vjp(loss_cotangent)[0], jnp.float32)
      return fn

    def body(total, micro):
      rows, i, w = micro
      part = jax.lax.switch(i, [grad_at(width) for width in widths], rows, w)
      return jax.tree_util.tree_map(jnp.add, total, part), None
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    total, _ = jax.lax.scan(body, zeros, (micro_rows, index, weight))
    return jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), total, params), None, None

  micro_loss.defvjp(micro_loss_fwd, micro_loss_bwd)
  return micro_loss


def _freeze(tree) -> tuple:
  """A pytree of shardings as a hashable key (its treedef and leaves)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(leaves)


def _thaw(key: tuple):
  treedef, leaves = key
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _on_gathered_params(loss_fn: Callable, replicated) -> Callable:
  """`loss_fn` on params (and base params) gathered whole onto every device first, so that every
  device computes whole dots on its rows, as one device does (a bitwise policy on a mesh): no
  dot is split over sharded weights into partial sums."""
  def gather(tree):
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, replicated), tree)

  def fn(params, batch, base_params):
    return loss_fn(gather(params), batch, gather(base_params))
  return fn


@functools.lru_cache(maxsize=64)
def _jitted(form: str, model_config: ModelConfig, policy: DtypePolicy,
            optimizer: optax.GradientTransformation, spec: LossSpec, shardings: tuple | None):
  """The one jitted function of `form` for these statics (cached: building the same step again,
  e.g. in every `rl_iteration`, reuses its compilations; a rebuilt optimizer is a new key).

  form "step": `train_step(state, batch, base_params)`; form "update":
  `update(state, batch, order, base_params)`. shardings: None, or `_freeze` of (state, batch,
  base, replicated) shardings. The state is donated.
  """
  loss_fn = make_loss_fn(model_config, policy, spec)
  if shardings is not None and policy.bitwise:
    loss_fn = _on_gathered_params(loss_fn, _thaw(shardings)[3])

  def train_step(state, batch, base_params):
    """One optimizer update on one minibatch: the body of every step (plain, LoRA, sharded, and
    each iteration of the update's scan)."""
    return apply_gradients(state, optimizer, loss_fn, batch, base_params)

  def update(state, batch, order, base_params):
    def take(tree, rows):
      minibatch = jax.tree_util.tree_map(lambda value: jnp.take(value, rows, axis=0), tree)
      if shardings is not None:  # each minibatch's rows split over the batch axes, as a step's
        minibatch = jax.lax.with_sharding_constraint(minibatch, _thaw(shardings)[1])
      return minibatch

    if getattr(batch, "logp_old_from_forward", None) is None:
      return jax.lax.scan(lambda state, rows: train_step(state, take(batch, rows), base_params),
                          state, order)

    def body(carry, rows):  # logp_old of the rows whose first update is this one: its forward's
      state, logp_old, from_forward = carry
      minibatch = take(batch.replace(logp_old=logp_old, logp_old_from_forward=from_forward), rows)
      state, metrics = train_step(state, minibatch, base_params)
      logp_old = logp_old.at[rows].set(jnp.where(minibatch.logp_old_from_forward[:, None] > 0,
                                                 metrics[FORWARD_LOGP], minibatch.logp_old))
      return (state, logp_old, from_forward.at[rows].set(0)), metrics
    (state, _, _), metrics = jax.lax.scan(
        body, (state, batch.logp_old, batch.logp_old_from_forward), order)
    return state, metrics

  fn = train_step if form == "step" else update
  options = precision.compiler_options(policy)
  if shardings is None:
    return jax.jit(fn, donate_argnames="state", compiler_options=options)
  state_sharding, batch_sharding, base_sharding, replicated = _thaw(shardings)
  in_shardings = ((state_sharding, batch_sharding, base_sharding) if form == "step"
                  else (state_sharding, batch_sharding, replicated, base_sharding))
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_sharding, replicated),
                 donate_argnames="state", compiler_options=options)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
  """A jitted step with the frozen LoRA base bound (None without LoRA).

  `step(state, batch) -> (state, metrics)` (`make_train_step`) or
  `update(state, batch, order) -> (state, metrics [K])` (`make_update`); `lower(...)` takes the
  same arguments (ahead-of-time compilation). The state is donated; the base is not.
  """

  jitted: Any
  base_params: Any = None

  def __call__(self, state: TrainState, *args):
    return self.jitted(state, *args, self.base_params)

  def lower(self, state: TrainState, *args):
    return self.jitted.lower(state, *args, self.base_params)


def _make(form: str, model_config: ModelConfig, policy: DtypePolicy,
          optimizer: optax.GradientTransformation, *, loss: str, rl_config, mesh, base_params,
          state, rules) -> TrainStep:
  spec = loss_spec(loss, rl_config, base_params)
  shardings = None
  if mesh is not None:
    rules = sharding.DEFAULT_RULES if rules is None else rules
    if state is None:
      state = sharding.abstract_train_state(model_config, optimizer, policy,
                                            lora_config=spec.lora, base_params=base_params)
    base_sharding = None
    if base_params is not None:  # placed once here, so every call passes it as jit expects
      base_sharding = sharding.param_shardings(base_params, mesh, rules)
      base_params = jax.device_put(base_params, base_sharding)
    shardings = _freeze((sharding.state_shardings(state, mesh, rules),
                         sharding.batch_sharding(mesh), base_sharding, sharding.replicated(mesh)))
  return TrainStep(_jitted(form, model_config, policy, optimizer, spec, shardings), base_params)


def make_train_step(model_config: ModelConfig, policy: DtypePolicy,
                    optimizer: optax.GradientTransformation, *, loss: str = "rl",
                    rl_config: "RLConfig | None" = None, mesh=None, base_params=None,
                    state: TrainState | None = None, rules=None) -> TrainStep:
  """The train step: `step(state, batch) -> (state, metrics)`, one minibatch, jitted once.

  Closes over the optimizer and the static configs (none is a jit argument); the state is
  donated. Metrics: `apply_gradients`'s (float32 scalars).

  Args:
    loss: "rl" (`rl_loss`; batch: a `rl_fp16.batch.TrainBatch` with logp_old set) or "sft"
      (`sft_loss`; batch: a dict of tokens, attention_mask, loss_mask [B, S]).
    rl_config: with loss "rl": its algorithm, loss, temperature and lora are used.
    mesh: a `rl_fp16.sharding.make_mesh` mesh: the state goes in and out with
      `sharding.state_shardings`, the batch with `sharding.batch_sharding`, metrics replicated.
      Place the state with `sharding.shard_state` and the batch with `sharding.shard_batch` /
      `shard_global_batch` (jit does not move committed arrays).
    base_params: the frozen base params of LoRA (`rl_config.lora`; then `state.params` are the
      adapters); bound to the step, not donated, not updated; with a mesh, placed by
      `sharding.param_shardings` here.
    state: with a mesh, a template (concrete or from `jax.eval_shape`) of the state the step
      takes, when it is not `sharding.abstract_train_state`'s (e.g. another loss-scale setting).
    rules: with a mesh, the sharding rules (default `sharding.DEFAULT_RULES`).
  """
  return _make("step", model_config, policy, optimizer, loss=loss, rl_config=rl_config,
               mesh=mesh, base_params=base_params, state=state, rules=rules)


def make_update(model_config: ModelConfig, policy: DtypePolicy,
                optimizer: optax.GradientTransformation, *, loss: str = "rl",
                rl_config: "RLConfig | None" = None, mesh=None, base_params=None,
                state: TrainState | None = None, rules=None) -> TrainStep:
  """Every minibatch update of one generation batch in one jitted `lax.scan`:
  `update(state, batch, order) -> (state, metrics)`. The RL loop's one update path: plain, LoRA,
  sharded (`mesh`) and multi-process alike.

  batch: as `make_train_step`'s, for all rows; order: int32 [K, M], the row indices of the K
  minibatches in the order they are applied (with a mesh, replicated; M a multiple of
  data * fsdp). Each scan iteration is `make_train_step`'s update (`apply_gradients`) on rows
  `order[k]`; metrics come back stacked [K]. Rows with `batch.logp_old_from_forward` take their
  first update's forward log-probs as logp_old (`rl_loss`), kept for their later updates (later
  epochs). With `rl_config.micro_batch_rows`, each minibatch's loss and gradient run in
  length-sorted micro-batches (`micro_batched_loss`). One dispatch and one host round trip for
  all K updates; the state is donated. Arguments as `make_train_step`.
  """
  return _make("update", model_config, policy, optimizer, loss=loss, rl_config=rl_config,
               mesh=mesh, base_params=base_params, state=state, rules=rules)
