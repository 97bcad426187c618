"""Perfectible subset of the synthetic task for a base model.

    python -m experiments.perfectible_subset --config=experiments/configs/perfectible_subset.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the committed tiny base model, or a model directory with a task
  config.pool = 256  # candidate problems
  config.k = 16  # samples per problem
  config.low = 0.2
  config.high = 0.8
  config.max_new_tokens = 256
  config.seed = 0
  # Where to write; empty: perfectible.jsonl inside the model directory (read by experiments.rl).
  config.output = ""
  return config
