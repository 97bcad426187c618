"""A Hugging Face model directory's safetensors: one file, or shards with an index, read and written.

    model.safetensors                          one file, or
    model-00001-of-0000n.safetensors ...       shards, with
    model.safetensors.index.json               {"metadata": {...}, "weight_map": {tensor: shard}}

`read_safetensors` reads either layout (index, single file, or bare shards) into numpy arrays in
their stored dtype and refuses a tensor stored twice or outside the shard the index names;
`write_safetensors` writes one file or, with a shard size, shards plus the index. Conversion to
and from our params lives in `rl_fp16.checkpoints.hf`.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import safetensors
import safetensors.numpy

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d+-of-\d+\.safetensors$")


def _safetensors_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files to read, and the index's weight map (tensor -> file name) if any."""
  single = os.path.join(path, SAFETENSORS_SINGLE)
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"Corrupt safetensors index {index}: {e}") from e
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    return files, weight_map
  if os.path.exists(single):
    return [single], None
  shards = sorted(f for f in os.listdir(path) if _SHARD_RE.match(f))
  if shards:
    return [os.path.join(path, f) for f in shards], None
  raise FileNotFoundError(f"No {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or shards in {path}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a model directory (single file or shards) as numpy arrays, stored dtype.

  A tensor stored in two shards, or in a shard other than the one the index's `weight_map` names,
  is refused: which copy a loader picks is then arbitrary (vLLM and transformers may differ).
  """
  state, found_in = {}, {}
  files, weight_map = _safetensors_files(path)
  for file in files:
    if not os.path.exists(file):
      raise FileNotFoundError(f"Safetensors shard {file} named in the index does not exist")
    try:
      with safetensors.safe_open(file, framework="np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise ValueError(f"Corrupt safetensors file {file}: {e}") from e
    base = os.path.basename(file)
    for name, value in tensors.items():
      if name in found_in:
        raise ValueError(f"Tensor {name} is stored twice, in {found_in[name]} and in {base} "
                         f"({path}); keep one copy")
      if weight_map is not None and weight_map.get(name) != base:
        raise ValueError(f"Tensor {name} is in {base} but the index {SAFETENSORS_INDEX} maps it "
                         f"to {weight_map.get(name)} ({path})")
      found_in[name] = base
      state[name] = value
  return state


def write_safetensors(directory: str, state: dict[str, np.ndarray],
                       max_shard_bytes: int | None) -> None:
  """Writes `state` into `directory`: one file, or shards of at most `max_shard_bytes` (a tensor
  larger than that gets a shard of its own) plus the index."""
  metadata = {"format": "pt"}
  if not max_shard_bytes:
    safetensors.numpy.save_file(state, os.path.join(directory, SAFETENSORS_SINGLE), metadata)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in state.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(directory, file), metadata)
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
    json.dump(index, f, indent=2)
