"""The rl_fp16 package's import graph stays acyclic.

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for every
`import` / `from ... import` in module A, at module level or inside a function, that names a module
B of the package. `from pkg import name` is an edge to the submodule `pkg.name` when it exists,
else to the package `pkg` itself (its `__init__`); a package's parents are not edges.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "rl_fp16"


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """{dotted module name: file} for every .py file under root/package (`__init__` as the package)."""
  modules = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module a (possibly relative) `from X import ...` names."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The modules of `modules` that `module` (source at `path`) imports, anywhere in the file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, is_package, node)
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        found.add(submodule if submodule in modules else source)
  return {name for name in found if name in modules and name != module}


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """{module: modules it imports} over the package's own modules."""
  files = module_files(root, package)
  names = set(files)
  return {name: imported_modules(name, path, names) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the directed graph, or None (iterative depth-first search)."""
  state = {}  # module -> "open" (on the current path) or "done"
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = "open"
    while stack:
      child = next(stack[-1], None)
      if child is None:
        state[path.pop()] = "done"
        stack.pop()
      elif state.get(child) == "open":
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = "open"
        path.append(child)
        stack.append(iter(sorted(graph.get(child, ()))))
  return None


def test_rl_fp16_has_no_import_cycle():
  graph = import_graph(REPO_ROOT, PACKAGE)
  assert "rl_fp16.models.decoder" in graph and graph["rl_fp16.models.decoder"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_layering():
  """layers <- moe <- decoder <- probes: the probes sit on top, moe knows no decoder."""
  graph = import_graph(REPO_ROOT, PACKAGE)
  models = "rl_fp16.models"
  assert not graph[f"{models}.moe"] & {f"{models}.decoder", f"{models}.probes"}
  assert f"{models}.probes" not in graph[f"{models}.decoder"]
  assert not graph[f"{models}.layers"] & {f"{models}.decoder", f"{models}.moe",
                                          f"{models}.probes"}


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_finds_a_function_level_cycle(tmp_path):
  """The old decoder <-> moe shape: a module-level import one way, a lazy one the other."""
  _write(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "from pkg.models.decoder import forward\n",
      "pkg/models/decoder.py": "from pkg.models import moe\n\ndef forward():\n  pass\n",
      "pkg/models/moe.py": ("def metric():\n"
                            "  from pkg.models import decoder\n"
                            "  return decoder.forward()\n"),
  })
  graph = import_graph(tmp_path, "pkg")
  assert graph["pkg.models.moe"] == {"pkg.models.decoder"}
  assert find_cycle(graph) in (["pkg.models.decoder", "pkg.models.moe", "pkg.models.decoder"],
                               ["pkg.models.moe", "pkg.models.decoder", "pkg.models.moe"])


@pytest.mark.parametrize("source, target", [
    ("from . import b\n", "pkg.b"),
    ("from .b import thing\n", "pkg.b"),
    ("import pkg.b as bee\n", "pkg.b"),
    ("from pkg import VALUE\n", "pkg"),
])
def test_import_forms_become_edges(tmp_path, source, target):
  _write(tmp_path, {"pkg/__init__.py": "VALUE = 1\n", "pkg/a.py": source, "pkg/b.py": ""})
  assert import_graph(tmp_path, "pkg")["pkg.a"] == {target}
  assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None


def test_public_pure_apply_matches_the_validating_wrappers():
  """`apply_logits` / `apply_token_logprobs` (what step functions call) are the public pure apply
  behind `forward` / `token_logprobs`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rl_fp16 import models  # pylint: disable=g-import-not-at-top
  from rl_fp16.precision import get_policy  # pylint: disable=g-import-not-at-top

  config = models.ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)
  params = models.init_params(config, jax.random.key(0))
  policy = get_policy("fp32")
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0
  positions = np.asarray(models.default_positions(mask))
  logits = models.apply_logits(config, policy, params, tokens, mask, positions)
  assert logits.shape == (2, 6, 32) and logits.dtype == policy.output_dtype
  np.testing.assert_array_equal(
      logits, models.forward(config, params, tokens, policy=policy, attention_mask=mask))
  logp = models.apply_token_logprobs(config, policy, params, tokens, mask, positions, 0.7)
  assert logp.shape == (2, 6) and logp.dtype == np.float32
  np.testing.assert_array_equal(
      logp, models.token_logprobs(config, params, tokens, policy=policy, attention_mask=mask,
                                  temperature=0.7))
