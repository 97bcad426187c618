"""A config saved as JSON (a run directory's config.json, or one experiments.sanity writes).

    python -m experiments.rl --config=experiments/configs/from_json.py:/path/to/config.json

experiments.sanity hands each precision's checked config to `python -m experiments.rl` this way.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))
