"""benchmarks/authorization_throughput.py: both shapes timed, exact restoration checked, files written."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Makes `benchmarks` importable.

from benchmarks import authorization_throughput as tp  # noqa: E402


def test_throughput_rows_for_both_shapes(tmp_path):
  assert tp.main(["--workdir", str(tmp_path), "--images", "6", "--repeats", "1"]) == 0
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["shape"] for r in rows] == ["28x28x1", "32x32x3"]
  assert all(r[c] > 0 for r in rows for c in tp.COLUMNS[2:])
  assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()


def test_targets_stay_within_the_fsp_budget():
  clean, target = tp.images((28, 28, 1), 4)
  assert clean.dtype == target.dtype == "uint8"
  assert 0 < abs(clean.astype(int) - target).max() <= 18
