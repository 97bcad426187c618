"""rl_fp16/seeds.py: the named streams keep the values every committed result was measured with,
and distinct consumers or steps never share a seed."""

import pytest

from rl_fp16 import seeds


def test_streams_keep_the_committed_values():
  # The values the README's main job, docs/ figures and the long runs were produced with.
  assert seeds.rl_step(0, 7) == 7 and seeds.rl_step(2, 7) == 2_000_013
  assert seeds.epoch_order(1, 3) == 7922
  assert seeds.perfectible_pool(1) == 78
  assert seeds.lora_init(0) == 1_000_033
  assert seeds.pretrain_batch(1, 5) == 1_000_008 and seeds.pretrain_eval(0) == 999_999
  assert seeds.benchmark_prompts(3) == 10_003


def test_steps_of_different_run_seeds_never_collide():
  steps = range(10_000)
  drawn = [seeds.rl_step(seed, step) for seed in range(10) for step in steps]
  assert len(set(drawn)) == len(drawn)


def test_vllm_row_seeds_of_all_steps_and_runs_are_distinct():
  # The paper recipe's 512 rows per step, over 300 steps of 3 run seeds: every row of every step
  # gets its own generator (under the earlier `seed + row`, consecutive steps shared rows' seeds).
  drawn = [seeds.sampler_row(seeds.rl_step(seed, step), row)
           for seed in range(3) for step in range(300) for row in range(512)]
  assert len(set(drawn)) == len(drawn)
  assert all(0 <= x < 2**63 for x in drawn)
  assert seeds.sampler_row(7, 3) == 7 * 1_000_003 + 3
  with pytest.raises(ValueError, match="row 1000003"):
    seeds.sampler_row(0, 1_000_003)
