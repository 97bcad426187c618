"""Weight syncs into real vLLM serve exactly the pushed weights, refuse bad ones, and log quietly.

One engine per dtype (fp32, bf16, fp16) on the committed tiny base (tied embeddings), shared by the
module's tests. The reference is our trainer (`rl_fp16.models.token_logprobs`, fp32 policy) on the
params the engine should serve.
"""

import json
import logging
import os
import shutil

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from deps import require  # pylint: disable=g-import-not-at-top

require("vllm")

import torch  # pylint: disable=g-import-not-at-top

from rl_fp16.checkpoints import load_hf, to_hf_state_dict  # pylint: disable=g-import-not-at-top
from rl_fp16.models import token_logprobs  # pylint: disable=g-import-not-at-top
from rl_fp16.precision import get_policy, get_precision_pair  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import vllm_logs  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling import vllm_sampler  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling.engines import make_engine  # pylint: disable=g-import-not-at-top
from rl_fp16.sampling.jax_sampler import SamplingConfig  # pylint: disable=g-import-not-at-top

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = os.path.join(REPO, "experiments", "assets", "tiny_base")
FP32 = get_policy("fp32")
PROMPTS = [[1, 20, 21, 22], [1, 30, 31], [1, 40, 41, 42, 43, 44]]
SAMPLING = SamplingConfig(max_new_tokens=24, temperature=1.0)
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Perturbation of each tensor, relative to its RMS: big enough that a stale LM head (serving the
# load-time weights; docs/design.md, "Environment notes") is far outside bf16/fp16 rounding noise.
PERTURBATION = 0.15
# Mean and max |logp_vllm - logp_old| over the sampled tokens after a sync, per engine dtype.
# fp32: the kernel floor. bf16/fp16: rounding. Each test also checks that a stale head would
# exceed both bounds on the same tokens (see README numbers in the test's printout).
MEAN_BOUND = {"float32": 1e-5, "bfloat16": 0.02, "float16": 0.004}
MAX_BOUND = {"float32": 1e-4, "bfloat16": 0.6, "float16": 0.15}
RELOAD_WARNING = "Failed to load weights"


class Served:
  """The module's engine for one dtype and the params it should be serving."""

  def __init__(self, dtype, workdir):
    self.dtype = dtype
    self.workdir = workdir
    self.config, self.base = load_hf(TINY_BASE)
    self.params = self.base
    # bf16 starts with vLLM's INFO logs on (make_engine's keyword), the others at the default.
    self.log_level = "INFO" if dtype == "bfloat16" else "WARNING"
    self.engine = make_engine("vllm", self.config, self.base,
                              get_precision_pair(PRECISIONS[dtype]).sampler, workdir=workdir,
                              max_model_len=128, cpu_kv_cache_space_gib=0.25, max_num_seqs=64,
                              vllm_log_level=self.log_level)
    # After the start: vLLM's logging dictConfig replaces the "vllm" logger's handlers.
    self.records = _Records()
    logging.getLogger("vllm").addHandler(self.records)

  def sample(self, seed=3):
    return self.engine.generate(PROMPTS, n=4, sampling=SAMPLING, seed=seed)

  def close(self):
    self.engine.close()
    logging.getLogger("vllm").removeHandler(self.records)


class _Records(logging.Handler):
  """Every record vLLM's logger would print (its level and the loggers' filters applied)."""

  def __init__(self):
    super().__init__(logging.NOTSET)
    self.records = []

  def emit(self, record):
    self.records.append(record)

  def take(self):
    out, self.records = self.records, []
    return out


@pytest.fixture(scope="module", params=list(PRECISIONS))
def served(request, tmp_path_factory):
  holder = Served(request.param, str(tmp_path_factory.mktemp(f"engine_{request.param}")))
  yield holder
  holder.close()


def _perturb(params, seed, scale=PERTURBATION):
  """params + scale * rms(leaf) * N(0, 1), every leaf; checks that every leaf moved."""
  rng = np.random.default_rng(seed)

  def move(x):
    x = np.asarray(x, np.float32)
    rms = float(np.sqrt(np.mean(np.square(x))))
    return x + (scale * rms * rng.standard_normal(x.shape)).astype(np.float32)

  new = jax.tree_util.tree_map(move, params)
  deltas = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), new, params))
  assert min(deltas) > 0, "the perturbation must move every tensor"
  return new


def _trainer_logp(config, params, rollout):
  tokens, mask, _ = rollout.full_sequence()
  logp = np.asarray(token_logprobs(config, params, tokens, policy=FP32, attention_mask=mask))
  return logp[:, rollout.prompt_tokens.shape[1]:]


def _diff(rollout, logp, reference=None):
  """(mean, max) |logp - reference| over the response tokens (default reference: vLLM's)."""
  reference = rollout.logp_sampler if reference is None else reference
  d = np.abs(reference - logp)[rollout.response_mask == 1]
  return float(d.mean()), float(d.max())


def _stale_head_gap(served, params, rollout):
  """How far a stale head would be: our model with `params`' body and the initial (load-time)
  embedding as an untied LM head, against `params`, on the rollout's tokens."""
  untied = served.config.replace(tie_word_embeddings=False)
  stale = dict(params, lm_head={"kernel": np.asarray(served.base["embed_tokens"]["embedding"]).T})
  return _diff(rollout, _trainer_logp(served.config, params, rollout),
               _trainer_logp(untied, stale, rollout))


def _assert_serves(served, params, rollout, what):
  mean, worst = _diff(rollout, _trainer_logp(served.config, params, rollout))
  assert mean <= MEAN_BOUND[served.dtype] and worst <= MAX_BOUND[served.dtype], (
      f"{served.dtype} {what}: vLLM vs trainer mean {mean:.3g}, max {worst:.3g}")
  return mean, worst


def _hf_names(served):
  return served.engine.sampler.weight_spec.shapes


@pytest.mark.parametrize("sync", ["in_memory", "from_dir"])
def test_sync_serves_the_pushed_weights(served, sync, tmp_path):
  """After a sync of perturbed params, vLLM's log-probs are the trainer's on those params, and
  the bound used would catch a stale LM head (the head's packed copy of the load-time weights)."""
  new = _perturb(served.base, seed=1 if sync == "in_memory" else 2)
  if sync == "in_memory":
    served.engine.sync_weights(jax.device_put(new))  # device arrays, as the trainer holds them
    # JAX and vLLM share the (CPU) device: every tensor went over by DLPack, none via the host.
    assert served.engine.last_transfer == {"dlpack": len(_hf_names(served)), "host": 0}
  else:
    served.engine.sync_weights(new, directory=tmp_path / "synced")
  served.params = new
  rollout = served.sample()
  mean, worst = _assert_serves(served, new, rollout, f"after the {sync} sync")
  stale_mean, stale_max = _stale_head_gap(served, new, rollout)
  print(f"{served.dtype} {sync}: vLLM vs trainer mean {mean:.3g} max {worst:.3g}; a stale head "
        f"would be off by mean {stale_mean:.3g} max {stale_max:.3g}")
  assert stale_mean > 2 * MEAN_BOUND[served.dtype] and stale_max > MAX_BOUND[served.dtype]
  # And the sync changed what is served: the initial params no longer match.
  assert _diff(rollout, _trainer_logp(served.config, served.base, rollout))[0] > stale_mean / 2


def test_bad_weights_are_refused_and_the_engine_keeps_serving(served):
  config, good = served.config, served.params
  sampler = served.engine.sampler
  state = {k: np.array(v) for k, v in to_hf_state_dict(config, good, served.dtype).items()}

  nan_state = dict(state)
  nan_state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].copy()
  nan_state["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has 1 non-finite"):
    sampler.sync_weights(nan_state)
  inf_state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}
  inf_state["model.norm.weight"][0] = float("inf")
  with pytest.raises(ValueError, match=r"'model.norm.weight' has 1 non-finite"):
    sampler.sync_weights(inf_state)

  # Our params: non-finite values, or values the engine dtype cannot hold, are refused by name in
  # the conversion, before anything reaches the engine.
  bad = jax.tree_util.tree_map(np.array, good)
  bad["layers_2"]["self_attn"]["o_proj"]["kernel"][0, 0] = np.inf
  with pytest.raises(ValueError, match=r"model.layers.2.self_attn.o_proj.weight \(param "
                     r"layers_2/self_attn/o_proj/kernel\) has 1 non-finite"):
    served.engine.sync_weights(bad)
  if served.dtype == "float16":
    big = jax.tree_util.tree_map(np.array, good)
    big["layers_0"]["mlp"]["down_proj"]["kernel"][1, 2] = 1e5
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight .*max \|value\| "
                       r"100000, outside the float16 range \(max \|value\| 65504\)"):
      served.engine.sync_weights(big)
    with pytest.raises(ValueError, match=r"outside the float16 range"):
      to_hf_state_dict(config, big, "float16")
    # The sampler checks the range of the engine dtype itself too (a float32 state dict).
    f32_state = {k: v.astype(np.float32) for k, v in state.items()}
    f32_state["model.embed_tokens.weight"][7, 7] = -1e5
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has max \|value\| 100000, "
                       r"outside the float16 range"):
      sampler.sync_weights(f32_state)

  rollout = served.sample(seed=11)
  assert np.isfinite(rollout.logp_sampler).all()
  _assert_serves(served, good, rollout, "after refused updates")


def test_sync_logs_only_what_matters(served):
  """No INFO lines at the default level, no expected reload warnings at any level; other
  warnings still reach the output."""
  served.records.take()
  served.engine.sync_weights(served.params)
  served.sample()
  records = served.records.take()
  messages = [r.getMessage() for r in records]
  assert records or served.log_level == "WARNING"  # the handler sees vLLM's records
  assert not [m for m in messages if RELOAD_WARNING in m], messages
  assert logging.getLogger("vllm").level == getattr(logging, served.log_level)
  if served.log_level == "WARNING":
    assert all(r.levelno >= logging.WARNING for r in records), messages
  else:  # make_engine(vllm_log_level="INFO") brings vLLM's INFO lines back
    assert any(r.levelno == logging.INFO for r in records), messages
  # A reload warning about any other layer is not expected: it passes.
  logging.getLogger(vllm_logs.RELOAD_LOGGER).warning("%s: Failed to load weights",
                                                     "QKVParallelLinear")
  assert [r.getMessage() for r in served.records.take()] == [
      "QKVParallelLinear: Failed to load weights"]


def test_expected_warning_filter_keeps_the_untied_head_warning():
  tied = vllm_logs.ExpectedWarnings(("RotaryEmbedding", "ParallelLMHead"))
  untied = vllm_logs.ExpectedWarnings(("RotaryEmbedding",))

  def record(layer):
    return logging.LogRecord(vllm_logs.RELOAD_LOGGER, logging.WARNING, __file__, 1,
                             "%s: Failed to load weights", (layer,), None)

  assert not tied.filter(record("ParallelLMHead")) and not tied.filter(record("RotaryEmbedding"))
  assert untied.filter(record("ParallelLMHead")) and not untied.filter(record("RotaryEmbedding"))


def test_expected_warning_filter_drops_the_second_engines_thread_warning():
  # Logged (10x) when sanity starts its fp16 engine after the bf16 one in the same process.
  drop = vllm_logs.ExpectedWarnings(("RotaryEmbedding",))

  def record(msg):
    return logging.LogRecord(vllm_logs.CPU_WORKER_LOGGER, logging.WARNING, __file__, 1, msg,
                             None, None)

  assert not drop.filter(record("CPU backend doesn't allow to use `torch.set_num_threads` after "
                                "the thread binding, skip it."))
  assert drop.filter(record("Speculative decoding on CPU without Intel OpenMP in LD_PRELOAD"))


def test_config_vocab_unlike_the_tensors_is_refused_before_vllm_starts(tmp_path):
  model_dir = tmp_path / "model"
  shutil.copytree(TINY_BASE, model_dir)
  config = json.loads((model_dir / "config.json").read_text())
  config["vocab_size"] = 60
  (model_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has shape \(54, 128\), but "
                     r"config.json says vocab_size=60"):
    vllm_sampler.VllmSampler(model_dir, vllm_sampler.VllmConfig(dtype="float32"))
  with pytest.raises(ValueError, match="log_level"):
    vllm_sampler.VllmConfig(log_level="LOUD")
