"""Checkpoint conversion (Hugging Face safetensors <-> Flax params) and orbax train-state saving."""

from rl_fp16.checkpoints.hf import (copy_tokenizer_files, from_hf_state_dict, hf_layout, load_hf,
                                    save_hf, to_hf_device_arrays, to_hf_state_dict)
from rl_fp16.checkpoints.safetensors_io import read_safetensors
