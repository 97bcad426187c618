"""No runnable experiment module imports another (issue 12): shared logic lives in rl_fp16/,
shared experiment helpers in experiments/common.py, configs in experiments/configs/."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
SHARED = ("experiments.common", "experiments.configs")  # importable from any experiment


def experiment_modules(directory: str = EXPERIMENTS) -> list[str]:
  """The runnable experiment modules: experiments/*.py but __init__ and common."""
  return sorted(f"experiments.{name[:-3]}" for name in os.listdir(directory)
                if name.endswith(".py") and name not in ("__init__.py", "common.py"))


def imported_modules(source: str, package: str = "experiments") -> set[str]:
  """Every module a source imports, anywhere in it (module level, functions, branches), with
  `from experiments import x` read as "experiments.x" and relative imports resolved."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # from . import x / from .x import y, inside experiments/
        base = ".".join(filter(None, [package, base]))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return found


def experiment_imports(module: str, source: str, experiments: list[str]) -> list[str]:
  """The other runnable experiment modules that `source` (of `module`) imports."""
  imported = imported_modules(source)
  return sorted(other for other in experiments if other != module and (
      other in imported or any(name.startswith(other + ".") for name in imported)))


def test_the_checker_sees_every_form_of_import():
  experiments = ["experiments.rl", "experiments.benchmark", "experiments.sanity"]
  for source in ("from experiments import rl\n", "import experiments.rl\n",
                 "from experiments.rl import run\n", "from . import rl\n",
                 "def f():\n  from experiments import common, rl\n",
                 "if True:\n  import experiments.rl as r\n"):
    assert experiment_imports("experiments.sanity", source, experiments) == [
        "experiments.rl"], source
  allowed = ("from experiments import common\nfrom experiments.configs import benchmark\n"
             "import experiments.configs.sanity\nfrom rl_fp16 import profiling\n")
  assert experiment_imports("experiments.sanity", allowed, experiments) == []


@pytest.mark.parametrize("module", experiment_modules())
def test_no_experiment_imports_another(module):
  path = os.path.join(REPO, *module.split(".")) + ".py"
  with open(path, encoding="utf-8") as f:
    source = f.read()
  others = experiment_imports(module, source, experiment_modules())
  assert not others, (f"{module} imports {others}: move what it needs into rl_fp16/ (or "
                      f"experiments/common.py), or run the other experiment as a subprocess")
