"""The repository's scripts (``experiments/*.py``, ``scripts/*.py``: not packages) as modules for the tests."""

import importlib.util
import os
import sys

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _load(folder: str, name: str, module_name: str | None):
  spec = importlib.util.spec_from_file_location(module_name or f"{name}_{folder}",
                                                os.path.join(_ROOT, folder, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # Dataclasses look their module up there.
  spec.loader.exec_module(mod)
  return mod


def load_experiment(name: str, module_name: str | None = None):
  """A fresh module of ``experiments/<name>.py``, registered in ``sys.modules`` as ``module_name``."""
  return _load("experiments", name, module_name)


def load_script(name: str, module_name: str | None = None):
  """A fresh module of ``scripts/<name>.py``, registered in ``sys.modules`` as ``module_name``."""
  return _load("scripts", name, module_name)
