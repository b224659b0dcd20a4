"""The sweep runner: grid expansion, array tasks, finished configs skipped, failures logged."""

import json
import os

import pytest

from experiment_modules import load_experiment

sweep = load_experiment("sweep", "sweep")

# A stand-in experiment: records each run, fails for --omega_tr 13, writes metrics.json last.
_FAKE = '''
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
'''


def _runs(out, name):
  with open(os.path.join(out, name, "runs.txt")) as f:
    return len(f.read().split())


def test_grid_expansion_and_names():
  axes = sweep.parse_grid(["omega_tr=10,50", "--seed=0,1,2"])
  configs = sweep.expand("/o", axes, ["--preset", "smoke"])
  assert len(configs) == 6 and configs[0].name == "omega_tr=10,seed=0" and configs[-1].name == "omega_tr=50,seed=2"
  assert configs[1].argv == ("--preset", "smoke", "--omega_tr", "10", "--seed", "1", "--workdir", "/o/omega_tr=10,seed=1")
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
  argv = ["--experiment", str(fake), "--out", out, "--grid", "omega_tr=10,13", "--grid", "seed=0,1", "--",
          "--preset", "smoke"]
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
