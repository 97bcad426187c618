r"""The trainer's loss-and-gradient at one shape: compiled temporary memory and step time.

    PYTHONPATH=. python experiments/benchmark/trainer_memory.py --rows=1 --width=2048 \
        --vocab=151936 --hidden=64 --layers=2 --precision=bf16

Builds the RL loss of `rl_fp16.train.make_loss_fn` (GRPO, temperature 1) on a random Qwen2-shaped
model, jits its value-and-gradient, and prints one JSON line: the compiled program's temporary
bytes (`memory_analysis().temp_size_in_bytes`), the bytes of the full [B, T, V] float32 logits for
scale, and the median seconds of `--repeats` timed calls after one warm-up call. It uses only
functions every version of the trainer has, so the same script measures an older checkout
(`PYTHONPATH=<that checkout>`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from rl_fp16 import objectives
from rl_fp16.batch import make_batch
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.precision import get_policy
from rl_fp16.train import LossSpec, make_loss_fn


def _batch(rows: int, width: int, vocab: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (rows, width))
  mask = np.ones_like(tokens)
  loss_mask = mask.copy()
  loss_mask[:, : width // 4] = 0
  logp_old = -rng.uniform(0.5, 6.0, tokens.shape) * loss_mask
  return make_batch(tokens, mask, loss_mask, logp_old, rng.normal(size=rows), logp_old=logp_old)


def measure(rows: int, width: int, vocab: int, hidden: int, layers: int, precision: str,
            repeats: int) -> dict:
  config = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max(width, 128))
  policy = get_policy(precision)
  loss_fn = make_loss_fn(config, policy, LossSpec("rl", "grpo", objectives.LossConfig(), 1.0))
  step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None), has_aux=True))
  params = init_params(config, jax.random.key(0))
  batch = jax.device_put(_batch(rows, width, vocab))
  compiled = step.lower(params, batch).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(params, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    times.append(time.perf_counter() - start)
  return {"rows": rows, "width": width, "vocab": vocab, "hidden": hidden, "layers": layers,
          "precision": precision, "temp_mib": temp / 2**20,
          "full_logits_f32_mib": rows * width * vocab * 4 / 2**20,
          "step_s_median": statistics.median(times), "step_s_all": times}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=1)
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--precision", default="bf16")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(json.dumps(measure(args.rows, args.width, args.vocab, args.hidden, args.layers,
                           args.precision, args.repeats)))


if __name__ == "__main__":
  main()
