"""python -m experiments.gpu_check --config=experiments/gpu_check/config.py (see gpu_check.py)."""

from experiments import common
from experiments.gpu_check import gpu_check
from rl_fp16 import cli

if __name__ == "__main__":
  cli.run_main(gpu_check.run, validate=common.check_config)
