"""rl_fp16/seeds.py: the named streams keep the values every committed result was measured with,
and distinct consumers or steps never share a seed."""

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
  # vLLM samples row r of a step with rl_step + r: 512 rows of the paper recipe over 10,000
  # steps stay inside the run seed's range (rows of consecutive steps do overlap: see seeds.py).
  assert seeds.rl_step(0, 9_999) + 512 < seeds.rl_step(1, 0)
