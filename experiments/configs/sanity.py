r"""The sanity experiment at CPU scale: RL on the tiny base model's perfectible subset.

    python -m experiments.rl --config=experiments/configs/sanity.py \
        --config.algorithm=grpo --config.precision=fp16

A sound algorithm should drive training reward on a perfectible set towards 1; the paper's BF16
runs of uncorrected GRPO collapse while FP16 runs of every algorithm reach ~0.97-0.99.

`sweep()` is the sanity test's sweep, algorithm x precision x seed (launch/README.md):

    python -m launch.sweep --config=experiments/configs/sanity.py --max_parallel=2
    python -m launch.sweep --config=experiments/configs/sanity.py \
        --sweep_arg=algorithms=grpo,gspo --sweep_arg=precisions=bf16,fp16 --sweep_arg=seeds=0,1 \
        --override=steps=10 --override=engine=jax --dry_run
"""

from collections.abc import Iterator, Sequence
import dataclasses

import ml_collections

from rl_fp16 import evaluation
from rl_fp16 import names

# The algorithms of the paper's sanity test.
PAPER_ALGORITHMS = ("grpo", "grpo_token_tis", "gspo", "pg_seq_is", "grpo_seq_mis", "pg_seq_mis")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the committed tiny base model, or a Hugging Face directory
  config.engine = "vllm"  # or "jax"
  # Precision pair: "bf16", "fp16", "fp32", or "TRAINER-SAMPLER" such as "bf16-fp16".
  config.precision = "bf16"
  # grpo, grpo_token_tis, grpo_token_mis, grpo_seq_mis, gspo, pg, pg_seq_is, pg_seq_tis, pg_seq_mis
  config.algorithm = "grpo"
  config.advantage = "grpo"  # or "drgrpo"
  config.seed = 0
  config.steps = 20
  config.prompts_per_step = 8
  config.samples_per_prompt = 8
  config.num_minibatches = 2
  config.epochs = 1
  config.temperature = 1.0
  config.max_new_tokens = 256
  config.learning_rate = 1e-4
  config.grad_clip = 1.0
  config.loss = ml_collections.ConfigDict(dict(
      clip_eps_low=0.2, clip_eps_high=0.2, token_is_cap=2.0, seq_is_cap=10.0,
      gspo_eps_low=3e-4, gspo_eps_high=4e-4, aggregation="token_mean"))
  # Perfectible subset: problems the base model solves with pass rate in [low, high] over k
  # samples (fp32 JAX engine). A model directory may ship it as perfectible.jsonl.
  config.perfectible = ml_collections.ConfigDict(dict(pool=256, k=16, low=0.2, high=0.8))
  # LoRA RL: train rank-`rank` adapters on the listed projections, the base frozen (see
  # experiments/configs/lora.py). Disabled: full fine-tuning.
  config.lora = ml_collections.ConfigDict(dict(
      enabled=False, rank=1, alpha=2.0,
      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
  # "synthetic" (the model directory's task_config.json) or "math" (problems from data_path,
  # prompt template, math-verify reward; see sanity_r1_distill_1p5b.py).
  config.task = "synthetic"
  config.data_path = ""
  config.template = "r1_distill"
  config.max_prompt_tokens = 1024
  config.checkpoint_every = 10
  # Level of vLLM's own logger (engine="vllm"): "WARNING" keeps its per-step INFO lines out of the
  # progress output; "INFO" or "DEBUG" bring them back. A resume may change it.
  config.vllm_log_level = "WARNING"
  # How updated weights reach the sampler: "memory" (the engine in this process takes them in
  # memory) or "directory" (the trainer writes versioned HF directories under <run_dir>/weights,
  # step_NNNNNN/ + LATEST, and a sampler worker in a separate process reloads them; see
  # docs/sharding.md, "Weight sync modes").
  config.weight_sync = "memory"
  # Bitwise on-policy mode (engine "jax"): the JAX sampler's log-probs equal the trainer's bit for
  # bit and serve as logp_old (docs/bitwise.md).
  config.bitwise = False
  # A trainer and vLLM on one GPU: sampler_memory_fraction f is vLLM's gpu_memory_utilization and
  # JAX gets XLA_PYTHON_CLIENT_MEM_FRACTION = 1 - f - 0.05 (set before JAX starts); unset: both
  # defaults. sleep_level 1 or 2 puts vLLM to sleep between rollouts (GPU only; rl_fp16.colocation).
  config.colocate = ml_collections.ConfigDict(dict(
      sampler_memory_fraction=ml_collections.config_dict.placeholder(float), sleep_level=0))
  # Held-out evaluation (rl_fp16/evaluation.py): every `every` RL steps and after the last, sample
  # `samples_per_problem` responses to `num_problems` fresh problems not in the training set.
  # 0: off (the main job's 20 steps do not need it).
  config.eval = ml_collections.ConfigDict(dataclasses.asdict(evaluation.EvalConfig()))
  config.output_dir = "runs/sanity/{algorithm}_{precision}_seed{seed}"
  return config


def check_sweep_values(algorithms: Sequence[str] = (), precisions: Sequence[str] = (),
                       seeds: Sequence[int] = ()) -> None:
  """ValueError for an unknown algorithm, a bad precision pair or a seed that is not an int."""
  unknown = [a for a in algorithms if a not in names.ALGORITHMS]
  if unknown:
    raise ValueError(f"algorithms {unknown}: choose from {list(names.ALGORITHMS)}")
  names.check_precisions_and_seeds(precisions, seeds)


def sweep(algorithms: Sequence[str] = PAPER_ALGORITHMS,
          precisions: Sequence[str] = ("bf16", "fp16"),
          seeds: Sequence[int] = (0,)) -> Iterator[dict]:
  """Yields the overrides of each (algorithm, precision, seed); run directory
  {algorithm}_{precision}_seed{seed}."""
  check_sweep_values(algorithms, precisions, seeds)
  for algorithm in algorithms:
    for precision in precisions:
      for seed in seeds:
        yield {"algorithm": algorithm, "precision": precision, "seed": seed}
