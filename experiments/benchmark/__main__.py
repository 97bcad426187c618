"""python -m experiments.benchmark --config=experiments/benchmark/config.py (see benchmark.py)."""

import os

from experiments import common
from experiments.benchmark import benchmark
from rl_fp16 import cli

if __name__ == "__main__":
  # vLLM's per-engine INFO and WARNING lines would bury the tables (set it to see them).
  os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
  cli.run_main(benchmark.run, validate=common.check_config)
