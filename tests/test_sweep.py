"""The sweep runner: grid expansion, array tasks, finished configs skipped, failures logged."""

import json
import os

import pytest

from jipguard import sweep

# A stand-in experiment: records each run, fails for --omega_tr 13, writes metrics.json last.
_FAKE = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--workdir"); p.add_argument("--omega_tr", type=int); p.add_argument("--seed", type=int)
p.add_argument("--preset")
a = p.parse_args()
os.makedirs(a.workdir, exist_ok=True)
with open(os.path.join(a.workdir, "runs.txt"), "a") as f:
  f.write("run\\n")
if a.omega_tr == 13:
  raise SystemExit("boom")
with open(os.path.join(a.workdir, "metrics.json"), "w") as f:
  json.dump({"utility_mae": a.omega_tr / 1000 + a.seed, "preset": a.preset}, f)
"""


def _runs(out, name):
  with open(os.path.join(out, name, "runs.txt")) as f:
    return len(f.read().split())


def test_grid_expansion_and_names():
  axes = sweep.parse_grid(["omega_tr=10,50", "--seed=0,1,2"])
  configs = sweep.expand("/o", axes, ["--preset", "smoke"])
  assert len(configs) == 6 and configs[0].name == "omega_tr=10,seed=0" and configs[-1].name == "omega_tr=50,seed=2"
  assert configs[1].argv == (
    "--preset",
    "smoke",
    "--omega_tr",
    "10",
    "--seed",
    "1",
    "--workdir",
    "/o/omega_tr=10,seed=1",
  )
  assert [c.name for c in sweep.my_configs(configs, 1, 4)] == ["omega_tr=10,seed=1", "omega_tr=50,seed=2"]
  assert [c.name for c in sweep.my_configs(configs, 5, None)] == ["omega_tr=50,seed=2"]
  for bad in (["omega_tr"], ["omega_tr="], ["a=1", "a=2"], ["a=x/y"]):
    with pytest.raises(ValueError):
      sweep.parse_grid(bad)
  with pytest.raises(ValueError, match="outside"):
    sweep.my_configs(configs, 6, None)


def test_sweep_skips_finished_configs_and_logs_failures(tmp_path, capsys):
  fake = tmp_path / "fake.py"
  fake.write_text(_FAKE)
  out = str(tmp_path / "sweep")
  argv = [
    "--command",
    str(fake),
    "--workdir",
    out,
    "--grid",
    "omega_tr=10,13",
    "--grid",
    "seed=0,1",
    "--",
    "--preset",
    "smoke",
  ]
  # One array task first: exactly its config runs.
  assert sweep.main(argv[:4] + ["--task_index", "1"] + argv[4:]) == 0
  assert sorted(d for d in os.listdir(out) if "=" in d) == ["omega_tr=10,seed=1"]
  assert os.path.exists(os.path.join(out, "sweep.task1.json"))
  # The whole grid: the failing configs are reported, the others finish.
  assert sweep.main(argv) == 1
  rows = {r["name"]: r for r in json.load(open(os.path.join(out, "sweep.json")))["configs"]}
  assert rows["omega_tr=10,seed=1"]["metrics"]["utility_mae"] == pytest.approx(1.01)
  assert rows["omega_tr=13,seed=0"]["status"].startswith("failed")
  assert "boom" in open(os.path.join(out, "logs", "omega_tr=13,seed=0.log")).read()
  # Again: finished configs are not rerun; failed ones are retried.
  assert sweep.main(argv) == 1
  assert _runs(out, "omega_tr=10,seed=0") == 1 and _runs(out, "omega_tr=10,seed=1") == 1  # Ran once, ever.
  assert _runs(out, "omega_tr=13,seed=1") == 2
  assert "finished before, skipped" in capsys.readouterr().out
  with open(os.path.join(out, "omega_tr=10,seed=0", "metrics.json")) as f:
    assert json.load(f)["preset"] == "smoke"  # The base arguments reached the experiment.


# A stand-in for a long run: says it started (with its pid), then "trains" until stopped; on the
# way out it takes a moment to "save" (during which more SIGTERMs arrive) and marks it done.
_LONG = """
import argparse, os, sys, time
sys.path.insert(0, {root!r})
from jipguard import distributed
distributed.interrupt_on_sigterm()
p = argparse.ArgumentParser()
p.add_argument("--workdir"); p.add_argument("--seed")
a = p.parse_args()
os.makedirs(a.workdir, exist_ok=True)
with open(os.path.join(a.workdir, "started"), "w") as f:
  f.write(str(os.getpid()))
try:
  time.sleep(120)
except KeyboardInterrupt:
  time.sleep(1.0)
  open(os.path.join(a.workdir, "saved"), "w").close()
  raise
"""


@pytest.mark.parametrize("also_child", [False, True])
def test_sigterm_to_a_sweep_lets_its_running_config_save(tmp_path, also_child):
  """``kill`` of the sweep alone (the run gets the forwarded SIGTERM), or SIGTERM to both as
  a scheduler sends it (the run ignores the second while it saves): the run saves, the sweep
  stops with status 130 and says how to resume."""
  import signal  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fake = tmp_path / "long.py"
  fake.write_text(_LONG.format(root=root))
  out = tmp_path / "sweep"
  proc = subprocess.Popen(
    [
      sys.executable,
      os.path.join(root, "experiments", "sweep.py"),
      "--command",
      str(fake),
      "--workdir",
      str(out),
      "--grid",
      "seed=0,1",
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  started = out / "seed=0" / "started"
  deadline = time.monotonic() + 120
  while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert started.exists(), "the run never started"
  if also_child:
    os.kill(int(started.read_text()), signal.SIGTERM)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130, stdout
  assert (out / "seed=0" / "saved").exists()  # The run finished its save despite two SIGTERMs.
  assert not (out / "seed=1").exists()  # The sweep stopped instead of going on.
  assert "stopped (signal SIGTERM); the same command resumes" in stdout
