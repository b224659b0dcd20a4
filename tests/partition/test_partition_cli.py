"""The command: a tiny study end to end, and bad input as one `error:` line before any run directory."""

import json
import os

import pytest

from jipguard import rundir
from jipguard.partition import cli

_TINY = [
  "--train_size", "128", "--aux_size", "64", "--test_size", "32", "--num_owners", "4", "--batch_size", "8",
  "--hidden", "16", "--epochs", "1", "--warmup_epochs", "0", "--weights", "0.1", "--attacks", "attack8",
  "--attack_epochs", "1", "--opt_images", "4", "--opt_steps", "2", "--perceptual_epochs", "1",
  "--fingerprint_bits", "4", "--colluder", "1", "--colluder_attack", "attack8", "--quiet",
]  # fmt: skip


def test_tables_writes_its_run_directory(tmp_path):
  w = str(tmp_path / "run")
  assert cli.main(["tables", "--workdir", w, *_TINY]) == 0
  for name in ("config.json", "metrics.jsonl", "table1.md", "table2.csv", "table3.md", "reconstructions.png"):
    assert os.path.exists(os.path.join(w, name)), name
  m = rundir.read_json(os.path.join(w, "metrics.json"))
  assert set(m["accuracy"]) == {"none", "single@0.1", "multiple", "fingerprint", "shared"}
  assert set(m["attacks"]) == {"attack8", "optimisation"}
  assert all("dpd_aux" in r for a in m["attacks"].values() for r in a.values())
  # Table III: owner 1 colludes; with 4 owners and 32 test images, 8 are its own.
  assert m["collusion"]["none"]["colluder"]["images"] == 8 and m["collusion"]["none"]["same design"]["images"] == 24
  assert set(m["collusion"]["multiple"]) == {"colluder", "other designs"}  # One owner per design.
  assert m["collusion"]["shared"]["same design"]["images"] == 24  # Every owner goes through one defender.
  assert os.stat(os.path.join(w, "fingerprint_projection.json")).st_mode & 0o077 == 0
  rows = rundir.read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert sum("epoch" in r for r in rows) == 5  # One row per epoch of each setting.
  # A rerun (as after a kill before metrics.json) keeps the finished settings: no training again.
  os.remove(os.path.join(w, "metrics.json"))
  assert cli.main(["tables", "--workdir", w, *_TINY]) == 0
  assert sum("epoch" in r for r in rundir.read_jsonl(os.path.join(w, "metrics.jsonl"))) == 5
  again = rundir.read_json(os.path.join(w, "metrics.json"))
  assert again["accuracy"] == m["accuracy"] and again["attacks"] == m["attacks"]
  assert again["collusion"] == m["collusion"] and again["fingerprint_bit_errors"] == m["fingerprint_bit_errors"]


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--num_owners", "2"], "--num_owners"),
    (["--attacks", "attack9"], "--attacks"),
    (["--weights", "a,b"], "--weights"),
    (["--lr_model", "2"], "--lr_model"),
    (["--dataset", "nope"], "nope"),
    (["--colluder", "4"], "--colluder"),
    (["--colluder_attack", "attack9"], "--colluder_attack"),
    (["--fingerprint_bits", "-1"], "--fingerprint_bits"),
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


_CONV = [
  "--preset", "smoke", "--settings", "none", "--epochs", "1", "--warmup_epochs", "0", "--width", "0.125",
  "--attacks", "lfw_attack2", "--opt_images", "2", "--opt_steps", "2", "--quiet",
]  # fmt: skip


def test_conv_writes_its_run_directory_and_keeps_its_secret(tmp_path):
  w = str(tmp_path / "run")
  assert cli.main(["conv", "--workdir", w, *_CONV]) == 0
  for name in ("config.json", "metrics.jsonl", "table.md", "table.csv", "reconstructions_pool2.png", "report.md"):
    assert os.path.exists(os.path.join(w, name)), name
  assert os.stat(os.path.join(w, "fingerprint_projection.json")).st_mode & 0o077 == 0
  m = rundir.read_json(os.path.join(w, "metrics.json"))
  assert set(m["accuracy"]["pool2"]) == {"none"}  # The secret is drawn whatever the settings.
  assert set(m["attacks"]["pool2"]) == {"lfw_attack2", "optimisation"}
  assert "dpd_aux" in m["attacks"]["pool2"]["lfw_attack2"]["none"]  # The smoke preset trains DPD_aux's features.
  secret = rundir.read_secret(os.path.join(w, "fingerprint_projection.json"))
  assert str(secret["seed"]) not in open(os.path.join(w, "report.md")).read()
  os.remove(os.path.join(w, "metrics.json"))  # A rerun loads the finished settings and the same secret.
  assert cli.main(["conv", "--workdir", w, *_CONV]) == 0
  assert rundir.read_json(os.path.join(w, "metrics.json"))["accuracy"] == m["accuracy"]


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--splits", "pool9"], "--splits"),
    (["--settings", "single"], "--settings"),
    (["--width", "0"], "--width"),
    (["--attacks", "attack1"], "--attacks"),
    (["--dataset", "lfw"], "lfw needs --data_dir"),
  ],
)
def test_conv_bad_input_is_one_error_line_and_no_run_directory(tmp_path, capsys, flags, needle):
  w = tmp_path / "run"
  assert cli.main(["conv", "--workdir", str(w), *_CONV, *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
  assert not w.exists()
