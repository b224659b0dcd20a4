"""Run directories: atomic writes, strict JSON, config refusal, secrets of mode 0600, tables."""

import csv
import json
import os

import numpy as np
import pytest

from jipguard import rundir


def test_write_json_is_strict_json():
  text = rundir.dumps(
    {
      "a": float("nan"),
      "b": [1.0, float("inf"), -float("inf")],
      "c": np.float32(0.5),
      "d": np.arange(3),
      "e": (1, 2),
      "f": np.int64(7),
    }
  )
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": 0.5, "d": [0, 1, 2], "e": [1, 2], "f": 7}


def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
  path = tmp_path / "metrics.json"
  rundir.write_json(path, {"v": 1})

  def fails(tmp):
    with open(tmp, "w") as f:
      f.write('{"v": 2')  # Half written...
    raise OSError("disk full")  # ... then the writer dies.

  with pytest.raises(OSError, match="disk full"):
    rundir.write_atomic(path, fails)
  assert json.loads(path.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # No temporary file left behind.
  rundir.write_npz(tmp_path / "a.npz", x=np.arange(4))
  with np.load(tmp_path / "a.npz") as z:
    np.testing.assert_array_equal(z["x"], np.arange(4))


def test_config_is_written_with_versions_and_another_config_is_refused(tmp_path):
  rundir.write_config(tmp_path, {"seed": 0, "lr": 0.1, "seeds": [0]})
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"] == {"seed": 0, "lr": 0.1, "seeds": [0]}
  assert {"jipguard_version", "jax_version", "devices"} <= set(saved)
  rundir.write_config(tmp_path, {"seed": 0, "lr": 0.1, "seeds": [0]})  # The same config resumes.
  with pytest.raises(rundir.ConfigMismatch, match=r"differs in \['lr'\]"):
    rundir.write_config(tmp_path, {"seed": 0, "lr": 0.2, "seeds": [0]})
  # Ignored keys may differ (a study extended by more seeds), and the file records the new value.
  rundir.write_config(tmp_path, {"seed": 0, "lr": 0.1, "seeds": [0, 1]}, ignore=("seeds",))
  assert json.loads((tmp_path / "config.json").read_text())["config"]["seeds"] == [0, 1]
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(rundir.ConfigMismatch, match="not a jipguard config.json"):
    rundir.write_config(tmp_path, {"seed": 0})
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(ValueError, match="not valid JSON"):
    rundir.write_config(tmp_path, {"seed": 0})


def test_secrets_are_their_owners_only_and_never_overwritten(tmp_path):
  old = os.umask(0o000)  # Even a permissive umask gives 0600.
  try:
    rundir.write_secret(tmp_path / "key.json", {"k": 123})
  finally:
    os.umask(old)
  assert (tmp_path / "key.json").stat().st_mode & 0o777 == 0o600
  assert rundir.read_secret(tmp_path / "key.json") == {"k": 123}
  with pytest.raises(FileExistsError):
    rundir.write_secret(tmp_path / "key.json", {"k": 456})
  os.chmod(tmp_path / "key.json", 0o644)
  with pytest.raises(PermissionError, match="chmod 600"):
    rundir.read_secret(tmp_path / "key.json")
  rundir.write_json(tmp_path / "public.json", {})  # Results stay readable by the group (umask).
  assert (tmp_path / "public.json").stat().st_mode & 0o777 == 0o666 & ~old


def test_tables_as_markdown_and_csv(tmp_path):
  rows = [{"method": "a|b", "mae": 0.123456, "n": 3}, {"method": "c", "mae": float("nan"), "n": 4}]
  rundir.write_table(tmp_path / "t", rows, ["method", "mae", "n"], title="T")
  md = (tmp_path / "t.md").read_text()
  assert md.startswith("# T\n") and "| a\\|b | 0.1235 | 3 |" in md and "| c | nan | 4 |" in md
  with open(tmp_path / "t.csv") as f:
    got = list(csv.reader(f))
  assert got[0] == ["method", "mae", "n"] and got[1] == ["a|b", "0.123456", "3"]
