"""The pre-registered long runs' design (docs/long_runs_preregistration.md): the primary arms in
their registered order and the engine rule's configurations and budget.

`python -m launch.long_runs` runs the arms (each `python -m experiments.rl --config=PAPER_CONFIG`
with the arm's precision and seed); `python -m experiments.long_runs.report` reports them.
"""

PAPER_CONFIG = "experiments/configs/paper.py:grpo"
PRECISIONS = ("bf16", "fp16", "fp32")
SEEDS = (0, 1, 2)
# (run name, precision, seed) of the 9 primary runs, in the registered order (seed by seed).
ARMS = tuple((f"grpo_{p}_seed{s}", p, s) for s in SEEDS for p in PRECISIONS)

# The engine rule: (engine, prompts per step) in the registered order; the first whose median
# step time is within the budget is taken.
SPEEDCHECK_ORDER = (("vllm", 64), ("jax", 64), ("vllm", 32), ("jax", 32), ("vllm", 16),
                    ("jax", 16))
MAX_SECONDS_PER_STEP = 40.0  # the registered budget (30 machine-hours for the primary block)
SPEEDCHECK_STEPS = 10
