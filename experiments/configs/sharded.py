"""The sanity RL experiment with sharded training: the sanity config plus a device mesh.

    python -m experiments.rl --config=experiments/configs/sharded.py \
        --config.mesh.data=2 --config.mesh.fsdp=4 --config.mesh.tensor=1

On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives 8 host devices to try it.
The per-minibatch rows (prompts_per_step * samples_per_prompt / num_minibatches) must be a
multiple of data * fsdp. Multi-host runs set `distributed` (or the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables); see docs/sharding.md.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import sanity


def get_config() -> ml_collections.ConfigDict:
  config = sanity.get_config()
  # ("data", "fsdp", "tensor") mesh over all devices; one size may be -1 (the rest of the devices).
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # jax.distributed.initialize settings; unset -> read from the environment, or single process.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int)))
  config.output_dir = "runs/sharded/{algorithm}_{precision}_seed{seed}"
  return config
