"""The command: studies end to end on tiny settings, resume, trace, one-line errors."""

import contextlib
import glob
import json
import os
import stat

import pytest

from jipguard import rundir
from jipguard.fingerprint import cli

_TINY = [
  "--dataset", "digits", "--hidden", "32", "--design", "7,3,1", "--crc_bits", "0", "--customers", "2",
  "--base_epochs", "1", "--embed_epochs", "2", "--batch_size", "128", "--lr", "0.003", "--max_colluders", "2",
  "--coalitions", "2", "--attack_sizes", "1", "--attack_coalitions", "1", "--prune_alphas", "",
  "--no-independent", "--no-measure_costs", "--quiet",
]  # fmt: skip


def test_codes_study_writes_its_run_directory_and_accuses_no_innocent(tmp_path):
  w = str(tmp_path / "codes")
  assert cli.main(["codes", "--workdir", w, "--designs", "7,3,1;ag3", "--coalitions", "5", "--sold", "20"]) == 0
  for name in ("config.json", "metrics.json", "metrics.jsonl", "codes.md", "codes.csv", "detection.png", "report.md"):
    assert os.path.exists(os.path.join(w, name)), name
  m = rundir.read_json(os.path.join(w, "metrics.json"))
  assert m["max_any_innocent_accused"] == 0
  single = [r for r in m["rows"] if r["colluders"] == 1]
  assert all(r["detection"] == 1 for r in single)


def test_crc_study(tmp_path):
  w = str(tmp_path / "crc")
  args = ["crc", "--workdir", w, "--communities", "3", "--community_size", "12", "--bits", "6,9", "--iterations", "20"]
  assert cli.main([*args, "--quiet"]) == 0
  rows = rundir.read_json(os.path.join(w, "metrics.json"))["rows"]
  assert len(rows) == 2 * 4 and all(0 <= r["accuracy"] <= 1 for r in rows)
  assert os.path.exists(os.path.join(w, "crc.png"))


def test_collusion_study_resumes_and_trace_names_the_owner(tmp_path, capsys):
  w = str(tmp_path / "col")
  assert cli.main(["collusion", "--workdir", w, *_TINY]) == 0
  first = rundir.read_json(os.path.join(w, "metrics.json"))
  assert stat.S_IMODE(os.stat(os.path.join(w, "secret.json")).st_mode) == 0o600
  seed = str(json.load(open(os.path.join(w, "secret.json")))["seed"])
  for name in glob.glob(os.path.join(w, "*.md")) + [os.path.join(w, "metrics.json")]:
    assert seed not in open(name).read()
  # A rerun resumes: finished trainings and attacks are kept, results equal.
  assert cli.main(["collusion", "--workdir", w, *_TINY]) == 0
  again = rundir.read_json(os.path.join(w, "metrics.json"))
  assert again["rows"] == first["rows"] and again["accuracy_fingerprinted_mean"] == first["accuracy_fingerprinted_mean"]
  capsys.readouterr()
  models = sorted(glob.glob(os.path.join(w, "models", "customer_*.npz")))
  assert len(models) == 2
  assert cli.main(["trace", "--workdir", w, "--model", models[0]]) == 0
  out = capsys.readouterr().out
  assert out.startswith(("exact", "inconsistent", "beyond_resilience"))  # Never a wrong name:
  owner = int(os.path.basename(models[0])[len("customer_") : -4])
  if out.startswith("exact"):
    assert f"[{owner}]" in out
  # Another config in the same directory is refused with one line.
  assert cli.main(["collusion", "--workdir", w, *_TINY[:-1], "--mu", "0.5", "--quiet"]) == 2
  assert capsys.readouterr().err.count("error:") == 1


@pytest.mark.parametrize(
  "argv",
  [
    ["collusion", "--customers", "1"],
    ["collusion", "--tau", "1.5"],
    ["collusion", "--design", "6,3,1"],
    ["codes", "--designs", "pg6"],
    ["crc", "--p_in", "2"],
    ["trace", "--model", "x.npz"],
    ["codes", "--coalitions", "many"],
  ],
)
def test_bad_flags_exit_2_with_one_error_line_and_no_run_directory(argv, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) if "many" in argv else contextlib.nullcontext():
    assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "\n" not in err.strip()
  assert not os.path.exists(tmp_path / "runs")


def test_print_config(capsys):
  assert (
    cli.main(["collusion", "--print_config", "--customers", "8", "--max_colluders", "8", "--attack_sizes", "1,2"]) == 0
  )
  assert json.loads(capsys.readouterr().out)["customers"] == 8
