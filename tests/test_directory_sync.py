"""The directory weight sync, with the sampler in a separate process.

The versions directory (atomic versions, LATEST pointer, pruning) is tested directly; the
cross-process tests start a sampler worker (a "spawn" child with its own engine) that sees the
weights only through the directory, and check that after `sync_weights` its log-probs follow the
trainer's new params and no longer the old ones.
"""

import os

import jax
import numpy as np
import pytest

from deps import require

from rl_fp16.checkpoints import load_hf, versions
from rl_fp16.models import token_logprobs
from rl_fp16.precision import get_policy
from rl_fp16.sampling.directory_sync import DirectorySyncEngine
from rl_fp16.train import batched_token_logprobs
from rl_fp16.sampling.jax_sampler import SamplingConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = os.path.join(REPO, "experiments", "assets", "tiny_base")
FP32 = get_policy("fp32")
PROMPTS = [[1, 20, 21, 22], [1, 30, 31]]
SAMPLING = SamplingConfig(max_new_tokens=16, temperature=1.0)


def _perturbed(params, seed, scale=0.15):
  """Every tensor moved by `scale` of its RMS: a big, unmistakable weight update."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  moved = [np.asarray(x) + scale * float(np.sqrt(np.mean(np.square(x))) or 1.0)
           * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, moved)


def test_versions_are_atomic_pointed_at_and_pruned(tmp_path):
  config, params = load_hf(TINY_BASE)
  root = tmp_path / "weights"
  assert versions.latest_version(root) is None and versions.list_versions(root) == []
  for step in range(4):
    path = versions.write_version(root, step, config, params, keep=2)
    assert path == versions.version_dir(root, step) and path.endswith(f"step_{step:06d}")
    assert versions.latest_version(root) == step
  assert versions.list_versions(root) == [2, 3]
  # No temp directory or temp pointer file is left behind.
  assert sorted(os.listdir(root)) == ["LATEST", "step_000002", "step_000003"]
  # Each version is a complete HF model that loads back to the same params.
  _, loaded = load_hf(versions.version_dir(root, 3))
  np.testing.assert_array_equal(loaded["lm_head"]["kernel"] if "lm_head" in loaded else
                                loaded["embed_tokens"]["embedding"],
                                params["lm_head"]["kernel"] if "lm_head" in params else
                                params["embed_tokens"]["embedding"])
  # A resume from step 1 drops the versions a crashed run wrote after it.
  versions.write_version(root, 1, config, params, keep=2)
  assert versions.list_versions(root) == [1] and versions.latest_version(root) == 1
  with pytest.raises(ValueError, match="must be an integer >= 0, got -1"):
    versions.version_dir(root, -1)
  (root / "LATEST").write_text("twelve")
  with pytest.raises(ValueError, match="holds 'twelve'; expected a step number"):
    versions.latest_version(root)


def _check_follows_directory(engine, config, params0, tmp_path, bound):
  """Samples before and after a sync; the worker's log-probs must match the params it was sent."""
  rollout0 = engine.generate(PROMPTS, n=2, sampling=SAMPLING, seed=1)
  mask = rollout0.response_mask > 0
  logp0 = batched_token_logprobs(config, params0, rollout0, policy=FP32)
  assert np.abs(rollout0.logp_sampler - logp0)[mask].mean() < bound

  params1 = _perturbed(params0, seed=3)
  seconds = engine.sync_weights(params1)
  assert seconds > 0 and engine.last_write_s > 0 and engine.last_reload_s > 0
  assert engine.loaded_step() == 1
  assert versions.latest_version(engine.weights_dir) == 1
  rollout1 = engine.generate(PROMPTS, n=2, sampling=SAMPLING, seed=1)
  mask = rollout1.response_mask > 0
  new = np.abs(rollout1.logp_sampler - batched_token_logprobs(config, params1, rollout1,
                                                              policy=FP32))[mask].mean()
  old = np.abs(rollout1.logp_sampler - batched_token_logprobs(config, params0, rollout1,
                                                              policy=FP32))[mask].mean()
  print(f"{engine.name} worker after sync: mean |dlogp| vs new params {new:.2e}, vs old {old:.2e}"
        f"; write {engine.last_write_s:.2f} s, reload {engine.last_reload_s:.2f} s")
  assert new < bound, new
  assert old > 100 * bound, old  # the worker does not serve the old weights any more


# Per worker engine: its DirectorySyncEngine options and the |dlogp| bound of the new params.
WORKERS = {
    "jax": (dict(timeout_s=300), 1e-5),
    "vllm": (dict(max_model_len=128, cpu_kv_cache_space_gib=0.25, max_num_seqs=16,
                  timeout_s=600), 1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jax", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_worker_in_another_process_follows_the_directory(tmp_path, name):
  if name == "vllm":
    require("vllm")
  options, bound = WORKERS[name]
  config, params0 = load_hf(TINY_BASE)
  engine = DirectorySyncEngine(name, config, params0, FP32, weights_dir=tmp_path / "weights",
                               eos_token_ids=[], **options)
  try:
    assert engine.pid != os.getpid()
    _check_follows_directory(engine, config, params0, tmp_path, bound=bound)
  finally:
    engine.close()
  assert not engine._process.is_alive()  # pylint: disable=protected-access


@pytest.mark.slow
def test_worker_errors_come_back_with_the_worker_traceback(tmp_path):
  config, params0 = load_hf(TINY_BASE)
  engine = DirectorySyncEngine("jax", config, params0, FP32, weights_dir=tmp_path / "weights",
                               eos_token_ids=[], timeout_s=300)
  try:
    with pytest.raises(RuntimeError, match="failed on 'load'"):
      engine._call("load", 7)  # pylint: disable=protected-access  # no such version
  finally:
    engine.close()
  with pytest.raises(RuntimeError, match="closed"):
    engine.generate(PROMPTS, n=2, sampling=SAMPLING, seed=0)


@pytest.mark.slow
def test_rl_run_with_directory_sync(tmp_path):
  """`--config.weight_sync=directory` end to end (JAX worker process, fp32, committed tiny base):
  the first update moves the weights, and step 2's rollout must come from the version the worker
  reloaded (trainer and worker agree to the fp32 floor only on the synced weights)."""
  from experiments import rl as rl_experiment  # pylint: disable=g-import-not-at-top
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  from rl_fp16 import results  # pylint: disable=g-import-not-at-top

  config = sanity.get_config()
  config.update(dict(model=TINY_BASE, engine="jax", precision="fp32", weight_sync="directory",
                     steps=2, prompts_per_step=2, samples_per_prompt=8, max_new_tokens=192,
                     learning_rate=1e-3, output_dir=str(tmp_path / "run")))
  summary = rl_experiment.run(config)
  frame = results.read_metrics(summary["run_dir"])
  assert list(frame["step"]) == [1, 2]
  assert frame["reward/mean"].iloc[0] > 0 and frame["train/grad_norm"].iloc[0] > 0
  weights = os.path.join(summary["run_dir"], "weights")
  assert versions.latest_version(weights) == 2 and versions.list_versions(weights) == [1, 2]
  assert (frame["time/sync_s"] > 0).all()
  assert (frame["mismatch/logp_diff_mean"] < 1e-5).all(), frame["mismatch/logp_diff_mean"]
