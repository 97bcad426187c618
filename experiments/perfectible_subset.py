r"""Builds the paper's "perfectible" subset for a base model.

Samples k responses per problem (temperature 1, the fp32 JAX engine, so the subset does not depend
on the precision under study) and keeps the problems whose pass rate lies in [low, high]. Writes
`perfectible.jsonl` (problem fields + pass_rate) next to the model, where `experiments.rl` finds it
(`rl_fp16.data.rl_problems.load_or_build_subset`).

    python -m experiments.perfectible_subset --config=experiments/configs/perfectible_subset.py
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common
from rl_fp16 import cli
from rl_fp16.data import perfectible
from rl_fp16.data.rl_problems import PERFECTIBLE_FILE, build_subset, load_task



def build(config) -> dict:
  model = common.load_policy_model(config.model)
  task = load_task(model)
  subset, rates = build_subset(model, task, pool=config.pool, k=config.k, low=config.low,
                              high=config.high, max_new_tokens=config.max_new_tokens,
                              seed=config.seed)
  path = config.output or os.path.join(model.tokenizer_dir, PERFECTIBLE_FILE)
  perfectible.write_subset(path, subset, rates)
  print(f"{len(subset)} of {config.pool} problems have pass rate in [{config.low}, "
        f"{config.high}] over {config.k} samples (mean {np.mean(rates) if rates else 0:.2f}); "
        f"wrote {path}")
  return {"path": path, "size": len(subset), "pass_rates": rates}


if __name__ == "__main__":
  cli.run_main(build, validate=common.check_config)
