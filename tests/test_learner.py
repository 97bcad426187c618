"""`learner.setup`: the train state (full or LoRA adapters on a frozen base), the caller's restore
and engine factory."""

import jax
import numpy as np

from rl_fp16 import learner
from rl_fp16.models import ModelConfig, init_params
from rl_fp16.models.lora import LoraConfig
from rl_fp16.precision import get_precision_pair
from rl_fp16.train import OptimizerConfig, RLConfig

CONFIG = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     qkv_bias=True)


def test_setup_restores_then_builds_the_engine_from_the_policy_params():
  params = init_params(CONFIG, jax.random.key(0))
  rl_config = RLConfig(num_minibatches=2, epochs=2)
  seen = {}

  def make_engine(policy_params, start_step):
    seen.update(params=policy_params, start_step=start_step)
    return "engine"

  built = learner.setup(CONFIG, params, pair=get_precision_pair("bf16"), rl_config=rl_config,
                        optimizer_config=OptimizerConfig(learning_rate=1e-3), seed=0,
                        restore=lambda state: state.replace(step=state.step + 8),
                        make_engine=make_engine)
  assert built.engine == "engine" and built.base_params is None
  assert built.start_step == seen["start_step"] == 2  # 8 updates of 2 minibatches x 2 epochs
  assert seen["params"] is built.state.params


def test_lora_state_holds_only_adapters_and_the_engine_gets_merged_params():
  params = init_params(CONFIG, jax.random.key(0))
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
  built = learner.setup(CONFIG, params, pair=get_precision_pair("fp32"),
                        rl_config=RLConfig(lora=lora),
                        optimizer_config=OptimizerConfig(learning_rate=1e-3), seed=0,
                        make_engine=lambda policy_params, start_step: policy_params)
  assert built.start_step == 0 and built.base_params is not None
  leaves = jax.tree_util.tree_leaves
  assert len(leaves(built.state.params)) < len(leaves(params))
  assert len(leaves(built.engine)) == len(leaves(params))
  for got, want in zip(leaves(built.engine), leaves(params)):  # B = 0: the merge is the base
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32))
