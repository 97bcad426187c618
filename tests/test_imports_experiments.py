"""No experiment imports another: shared logic lives in rl_fp16/, shared experiment helpers in
experiments/common.py, configs in experiments/configs/. An experiment is a runnable module
experiments/NAME.py or a study folder experiments/NAME/; a study's config file
(experiments/NAME/config.py) may be built on by others, as those in experiments/configs/ are."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
SHARED = ("experiments.common", "experiments.configs")  # importable from any experiment


def experiment_modules(directory: str = EXPERIMENTS) -> list[str]:
  """The experiments: the runnable modules experiments/*.py but __init__ and common, and the
  study folders experiments/NAME/ (packages) but configs."""
  found = []
  for name in os.listdir(directory):
    if name.endswith(".py") and name not in ("__init__.py", "common.py"):
      found.append(f"experiments.{name[:-3]}")
    elif name != "configs" and os.path.isfile(os.path.join(directory, name, "__init__.py")):
      found.append(f"experiments.{name}")
  return sorted(found)


def source_files(experiment: str) -> list[tuple[str, str]]:
  """(package of relative imports, path) of each Python file of an experiment."""
  path = os.path.join(REPO, *experiment.split("."))
  if os.path.isfile(path + ".py"):
    return [("experiments", path + ".py")]
  files = []
  for root, _, names in os.walk(path):
    folder = os.path.relpath(root, path)
    package = experiment if folder == "." else ".".join([experiment, *folder.split(os.sep)])
    files += [(package, os.path.join(root, name)) for name in names if name.endswith(".py")]
  return sorted(files)


def is_shared(module: str) -> bool:
  """experiments.common, experiments/configs/ and a study's config file."""
  parts = module.split(".")
  return (any(module == s or module.startswith(s + ".") for s in SHARED)
          or (len(parts) >= 3 and parts[0] == "experiments" and parts[2] == "config"))


def imported_modules(source: str, package: str = "experiments") -> set[str]:
  """Every module a source imports, anywhere in it (module level, functions, branches), with
  `from experiments import x` read as "experiments.x" and relative imports resolved against
  `package`. `from P import a, b` also imports P, unless all of P.a, P.b are shared."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # from . import x / from .x import y / from .. import z
        parents = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(filter(None, [*parents, base]))
      names = [f"{base}.{alias.name}" for alias in node.names]
      found.update(names)
      if not all(is_shared(name) for name in names):
        found.add(base)
  return found


def experiment_imports(module: str, source: str, experiments: list[str],
                       package: str = "experiments") -> list[str]:
  """The other experiments whose code `source` (of experiment `module`) imports."""
  imported = {name for name in imported_modules(source, package) if not is_shared(name)}
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
             "import experiments.configs.sanity\nfrom rl_fp16 import profiling\n"
             "from experiments.benchmark import config\nimport experiments.benchmark.config\n")
  assert experiment_imports("experiments.sanity", allowed, experiments) == []
  for source in ("from experiments.benchmark import benchmark\n",
                 "from experiments.benchmark import config, report\n",
                 "from experiments.benchmark.report import padding_waste\n",
                 "from ..benchmark import report\n"):
    assert experiment_imports("experiments.sanity", source, experiments,
                              package="experiments.sanity") == ["experiments.benchmark"], source
  # Inside a study its own modules are not another experiment's.
  assert experiment_imports("experiments.benchmark", "from . import report\n", experiments,
                            package="experiments.benchmark") == []


def test_the_study_folders_are_experiments():
  found = experiment_modules()
  for study in ("benchmark", "dose_response", "gpu_check", "long_runs"):
    assert f"experiments.{study}" in found
  assert "experiments.configs" not in found and "experiments.common" not in found


@pytest.mark.parametrize("module", experiment_modules())
def test_no_experiment_imports_another(module):
  for package, path in source_files(module):
    with open(path, encoding="utf-8") as f:
      source = f.read()
    others = experiment_imports(module, source, experiment_modules(), package)
    assert not others, (f"{path} imports {others}: move what it needs into rl_fp16/ (or "
                        f"experiments/common.py), or run the other experiment as a subprocess")
