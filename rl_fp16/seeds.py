"""The seed streams of a run, every one derived from the run's single `seed` (docs/design.md,
"Seeds").

Each consumer draws from its own named stream, so drawing more in one place never shifts another
place's numbers. A stream is a fixed integer function of (run seed, index), not a
`jax.random.fold_in` key: vLLM takes one integer seed per request, and numpy's and the task
generator's RNGs take integers, so an integer is what every consumer needs. The constants are
the ones every committed figure was measured with (and the pre-registered long runs compare
precisions on the same streams of the same seed), so they are fixed: changing one changes those
results.

The vLLM engine takes one integer seed per request: row r of a batch sampled with base seed s
gets `sampler_row(s, r)`, disjoint across (s, r) pairs (the earlier `s + r` let consecutive steps
share rows' sampling noise; docs/design.md, "Seeds", says which figures used it). The JAX engine
derives its rows from one `jax.random.key(rl_step(seed, step))`.
"""

_STEP_STRIDE = 1_000_003  # prime, above any step count: (seed, step) pairs never collide
_EPOCH_STRIDE = 7919  # prime, above any epoch count
_ROW_STRIDE = 1_000_003  # prime, above any batch's row count
_SEED_MODULUS = 2**63  # vLLM / torch take seeds below 2**64


def rl_step(seed: int, step: int) -> int:
  """Sampling seed of RL step `step` (the engine's base seed; also seeds the minibatch
  shuffle)."""
  return seed * _STEP_STRIDE + step


def sampler_row(seed: int, row: int) -> int:
  """Integer seed of row `row` (< 1,000,003) of a batch the vLLM engine samples with base seed
  `seed`: distinct for distinct (seed, row) pairs while seed * 1,000,003 + row < 2**63."""
  if not 0 <= row < _ROW_STRIDE:
    raise ValueError(f"row {row} is outside [0, {_ROW_STRIDE})")
  return (seed * _ROW_STRIDE + row) % _SEED_MODULUS


def epoch_order(seed: int, epoch: int) -> int:
  """Seed of the problem order of epoch `epoch` over the training subset."""
  return seed * _EPOCH_STRIDE + epoch


def perfectible_pool(seed: int) -> int:
  """Seed of the fresh problems screened for the perfectible subset."""
  return seed + 77


def lora_init(seed: int) -> int:
  """Seed of the LoRA adapters' initialisation (a `jax.random.key` seed)."""
  return seed + 1_000_033


def pretrain_batch(seed: int, step: int) -> int:
  """Seed of the problems of supervised pre-training step `step`."""
  return seed * _STEP_STRIDE + step


def pretrain_eval(seed: int) -> int:
  """Seed of the pre-training run's evaluation problems (disjoint from its batches' seeds)."""
  return seed + 999_999


def benchmark_prompts(seed: int) -> int:
  """Seed of the task problems whose prompts a benchmark times (offset from training's)."""
  return seed + 10_000
