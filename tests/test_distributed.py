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
  procs = [subprocess.Popen([sys.executable, _WORKER, "--out", str(two), "--coordinator_address",
                             f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
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
