"""The command: a tiny study end to end, and bad input as one `error:` line before any run directory."""

import json
import os

import pytest

from jipguard import rundir
from jipguard.partition import cli

_TINY = [
  "--train_size", "128", "--aux_size", "64", "--test_size", "32", "--num_owners", "4", "--batch_size", "8",
  "--hidden", "16", "--epochs", "1", "--warmup_epochs", "0", "--weights", "0.1", "--attacks", "attack8",
  "--attack_epochs", "1", "--opt_images", "4", "--opt_steps", "2", "--quiet",
]  # fmt: skip


def test_tables_writes_its_run_directory(tmp_path):
  w = str(tmp_path / "run")
  assert cli.main(["tables", "--workdir", w, *_TINY]) == 0
  for name in ("config.json", "metrics.jsonl", "table1.md", "table2.csv", "reconstructions.png", "report.md"):
    assert os.path.exists(os.path.join(w, name)), name
  m = rundir.read_json(os.path.join(w, "metrics.json"))
  assert set(m["accuracy"]) == {"none", "single@0.1", "multiple"}
  assert set(m["attacks"]) == {"attack8", "optimisation"}
  rows = rundir.read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert sum("epoch" in r for r in rows) == 3  # One row per epoch of each setting.
  # A rerun (as after a kill before metrics.json) keeps the finished settings: no training again.
  os.remove(os.path.join(w, "metrics.json"))
  assert cli.main(["tables", "--workdir", w, *_TINY]) == 0
  assert sum("epoch" in r for r in rundir.read_jsonl(os.path.join(w, "metrics.jsonl"))) == 3
  again = rundir.read_json(os.path.join(w, "metrics.json"))
  assert again["accuracy"] == m["accuracy"] and again["attacks"] == m["attacks"]


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--num_owners", "2"], "--num_owners"),
    (["--attacks", "attack9"], "--attacks"),
    (["--weights", "a,b"], "--weights"),
    (["--lr_model", "2"], "--lr_model"),
    (["--dataset", "nope"], "nope"),
  ],
)
def test_bad_input_is_one_error_line_and_no_run_directory(tmp_path, capsys, flags, needle):
  w = tmp_path / "run"
  assert cli.main(["tables", "--workdir", str(w), *_TINY, *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
  assert not w.exists()


def test_print_config_shows_the_preset_with_overrides(capsys):
  assert cli.main(["tables", "--preset", "smoke", "--seed", "3", "--print_config"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert cfg["num_owners"] == 4 and cfg["seed"] == 3
