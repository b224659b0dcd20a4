"""Test-wide JAX settings: 8 simulated CPU devices for sharding tests, strict ranks.

The suite runs on CPU unless ``JAX_PLATFORMS`` says otherwise, e.g. on one GPU
``JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false python -m pytest -n 4 tests``: then
float32 matrix products run in full precision (JAX's GPU default, TF32, rounds at ~1e-3,
beyond the tests' equality tolerances), CPU-only heuristics are asserted off, and tests that
need 8 devices skip where there are fewer.
"""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Experiments run in-process by the tests keep their compiled programs in memory only.
os.environ["JIPGUARD_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if jax.default_backend() != "cpu":
  jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def eight_devices():
  """Requires 8 devices: conftest's simulated CPU devices, or 8 accelerators (else skips)."""
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
  elif jax.device_count() < 8:
    pytest.skip(f"needs 8 devices; {jax.default_backend()} has {jax.device_count()}")


@pytest.fixture
def readme_snippet():
  """``readme_snippet(name)``: the code block under ``<!-- snippet: name -->`` in README.md."""
  import pathlib  # noqa: PLC0415
  import re  # noqa: PLC0415

  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()

  def get(name: str) -> str:
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no snippet {name!r}"
    return found.group(1)

  return get
