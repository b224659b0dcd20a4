"""The study end to end at smoke scale: run directory, exactness, the harness's positive control, resume."""

import json
import os

import numpy as np
import pytest

from jipguard.authorization import study

SMOKE = dict(
  train_size=192,
  test_size=300,
  model="mlp",
  layer="Dense_0",
  epochs=8,
  surrogate_epochs=1,
  countermeasures="jpeg50",
  iterations=3,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study") / "run")
  cfg = study.StudyConfig(**SMOKE)
  return cfg, workdir, study.run(cfg, workdir, progress=False)


def test_run_directory(finished):
  _, workdir, m = finished
  for name in ("config.json", "metrics.json", "metrics.jsonl", "report.md", "grid.png", "table1.md", "table1.csv"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.stat(os.path.join(workdir, "key.json")).st_mode & 0o777 == 0o600
  key = json.load(open(os.path.join(workdir, "key.json")))["key"]
  assert key not in open(os.path.join(workdir, "report.md")).read()
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == list(range(1, 9))
  assert set(m["accuracy"]) == {*study.CONDITIONS, "jpeg50"}


def test_exact_restoration_and_the_lsb_bound(finished):
  _, workdir, m = finished
  assert m["images"]["restored_exact_equal"] is True
  assert m["images"]["lsb_max_abs_error"] == 1
  assert m["images"]["lsb_pixels_changed_max"] <= m["images"]["payload_bits"]
  with np.load(os.path.join(workdir, "sets.npz")) as z:
    np.testing.assert_array_equal(z["restored_exact"], z["clean"])


def test_the_harness_detects_a_harmful_training_set(finished):
  """Positive control: images transformed to look like another class's images train a model far
  below the clean one, so an unchanged accuracy elsewhere is a measurement, not a broken harness."""
  _, _, m = finished
  acc = {k: v["test_accuracy"] for k, v in m["accuracy"].items()}
  assert acc["clean"] > 0.6
  assert acc["mrit_other"] < acc["clean"] - 0.3


def test_a_rerun_resumes_and_changes_nothing(finished):
  cfg, workdir, m = finished
  again = study.run(cfg, workdir, progress=False)
  assert again["accuracy"] == m["accuracy"]
  with pytest.raises(ValueError, match="different configuration"):
    study.run(study.StudyConfig(**{**SMOKE, "epochs": 3}), workdir, progress=False)
