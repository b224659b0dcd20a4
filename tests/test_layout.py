"""The package's layout rules, checked on its imports (ast), and the thin entry points.

The ground floor (``data``, ``models``, ``sharding``, ``distributed``, ``rundir``, ``sweep``,
``ensemble``) never imports a paper; a paper never imports another paper; nothing in
``jipguard/`` imports ``experiments`` or ``benchmarks``. Every import counts, also one inside a
function.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "jipguard"
PAPERS = ("ipprotect", "watermark", "fingerprint", "authorization", "partition")
FORBIDDEN_TOP = ("experiments", "benchmarks", "tests")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """``(line, absolute module name)`` of every import in ``path`` (relative ones resolved)."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
      # `from jipguard import ipprotect` imports the sub-package ipprotect.
      out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
      out.append((node.lineno, base))
  return out


def _paper(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "jipguard" and parts[1] in PAPERS else None


def violations(root: pathlib.Path = _PACKAGE) -> list[str]:
  """Every import under ``root`` that breaks a layout rule, as ``file:line: reason``."""
  found = {}  # One report per line and offending target package.
  for path in sorted(root.rglob("*.py")):
    own = _paper(_module_name(path))
    for line, target in _imports(path):
      where = f"{path.relative_to(_ROOT)}:{line}"
      top, theirs = target.split(".")[0], _paper(target)
      if top in FORBIDDEN_TOP:
        found.setdefault((where, top), f"{where}: jipguard imports {target}")
      elif theirs is not None and theirs != own:
        found.setdefault(
          (where, theirs),
          f"{where}: {'the ground floor' if own is None else 'paper ' + own} imports paper {theirs} ({target})",
        )
  return list(found.values())


def test_imports_follow_the_layout_rules():
  assert violations() == []


def test_the_checker_catches_each_kind_of_violation(tmp_path, monkeypatch):
  """A ground-floor module importing a paper, a paper importing another (relative import,
  inside a function) and a module importing experiments are all reported."""
  pkg = tmp_path / "jipguard"
  (pkg / "ipprotect").mkdir(parents=True)
  (pkg / "watermark").mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "ensemble.py").write_text("from jipguard import watermark\n")
  (pkg / "ipprotect" / "__init__.py").write_text("from jipguard import rundir\nfrom . import sanitizer\n")
  (pkg / "ipprotect" / "sanitizer.py").write_text("def f():\n  from ..watermark import lct\n")
  (pkg / "watermark" / "__init__.py").write_text("import experiments.sweep\n")
  monkeypatch.setattr(sys.modules[__name__], "_ROOT", tmp_path)
  found = violations(pkg)
  assert len(found) == 3, found
  assert any("ensemble.py:1: the ground floor imports paper watermark" in f for f in found)
  assert any("sanitizer.py:2: paper ipprotect imports paper watermark (jipguard.watermark.lct)" in f for f in found)
  assert any("jipguard imports experiments.sweep" in f for f in found)


def test_every_sub_package_names_its_public_api():
  for init in sorted(_PACKAGE.glob("*/__init__.py")):
    if init.parent.name.startswith("_"):
      continue
    tree = ast.parse(init.read_text())
    names = [
      t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    ]
    assert "__all__" in names, init
    assert ast.get_docstring(tree) and "| letter | meaning |" in ast.get_docstring(tree), (
      f"{init}: its docstring defines the letters of the shape suffixes"
    )


@pytest.mark.parametrize("script", sorted(p.name for p in (_ROOT / "experiments").glob("*.py")))
def test_every_experiment_is_a_thin_runnable_entry_point(script):
  path = _ROOT / "experiments" / script
  assert len(path.read_text().splitlines()) <= 100, f"{script}: logic belongs in jipguard/"
  out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "usage:" in out.stdout
