"""A 2-process ``jax.distributed`` run (2 CPU devices each) equals a 1-process run on 4."""

import os
import socket
import subprocess
import sys

import numpy as np

_WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return env


def test_two_processes_equal_one(tmp_path):
  one = tmp_path / "one.npz"
  subprocess.run([sys.executable, _WORKER, "--out", str(one)], env=_env(4), check=True, timeout=600)
  two = tmp_path / "two.npz"
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        _WORKER,
        "--out",
        str(two),
        "--coordinator_address",
        f"localhost:{port}",
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  a, b = np.load(one), np.load(two)
  assert int(a["process_count"]) == 1 and int(b["process_count"]) == 2
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
  for k in a.files:
    if k != "process_count":
      np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
  assert len(set(a["steps"].tolist())) > 1  # The per-image stopping rule ran across hosts too.


_CACHE_CHILD = """
import sys, jax, jax.numpy as jnp
from jipguard import distributed
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print(distributed.enable_compilation_cache(sys.argv[1]))  # The default keeps even this small program.
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
print(float(f(jnp.arange(12.0).reshape(3, 4)).sum()))
print(len(hits))
"""


def test_compilation_cache_is_reused_by_the_next_process(tmp_path):
  """A second process finds the first one's compiled program on disk and computes the same."""
  cache = tmp_path / "xla"
  env = {k: v for k, v in _env(1).items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JIPGUARD_COMPILATION_CACHE")}
  runs = [
    subprocess.run(
      [sys.executable, "-c", _CACHE_CHILD, str(cache)], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    for _ in range(2)
  ]
  assert runs[0][0] == runs[1][0] == str(cache)
  assert runs[0][1] == runs[1][1]  # Same value from the cached program.
  assert int(runs[0][2]) == 0 and int(runs[1][2]) >= 1
  assert any(cache.iterdir())


def test_compilation_cache_flag_and_precedence(monkeypatch, tmp_path):
  import argparse

  from jipguard import distributed

  parser = argparse.ArgumentParser()
  distributed.add_flags(parser)
  assert parser.parse_args([]).compilation_cache == "off"  # conftest keeps the tests' cache off.
  assert distributed.enable_compilation_cache("off") is None
  monkeypatch.delenv("JIPGUARD_COMPILATION_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert distributed.default_compilation_cache() == str(tmp_path / "jipguard" / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert distributed.enable_compilation_cache(tmp_path / "ours") == str(tmp_path / "jax")
  assert not (tmp_path / "ours").exists()


def test_every_experiment_takes_the_compilation_cache_flag(tmp_path):
  where = str(tmp_path / "c")
  from jipguard.ipprotect import cli  # noqa: PLC0415
  from jipguard.watermark import cli as watermark_cli  # noqa: PLC0415
  from jipguard.watermark import studies  # noqa: PLC0415

  assert cli.tradeoff_parse(["--compilation_cache", where])[-1].compilation_cache == where
  for cmd in (
    ["multiuser"],
    ["sweep", "--vary", sorted(studies.SWEEPS)[0]],
    ["defences"],
    ["mark", "--input", "a", "--output", "b", "--signature", "1"],
  ):
    assert watermark_cli.parser().parse_args([*cmd, "--compilation_cache", where]).compilation_cache == where
  assert cli.flag_parser().parse_args(["--compilation_cache", where]).compilation_cache == where


def test_compilation_cache_shared_by_concurrent_processes(tmp_path):
  """Array jobs sharing one cache: processes compiling and writing the same program at once all
  succeed with the same value, and a later process reads the entry they left."""
  cache = tmp_path / "xla"
  env = {k: v for k, v in _env(1).items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JIPGUARD_COMPILATION_CACHE")}
  child = [sys.executable, "-c", _CACHE_CHILD, str(cache)]
  procs = [
    subprocess.Popen(child, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  values = {out.split()[1] for out, _ in outs}
  later = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout.split()
  assert values == {later[1]}
  assert int(later[2]) >= 1  # A cache hit on what the concurrent writers left.
