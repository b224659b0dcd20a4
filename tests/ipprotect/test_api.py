"""The one-call API (``ipprotect.sanitize_dataset``) and the config's recommended defaults."""

import dataclasses

import numpy as np
import pytest

from jipguard import data, ipprotect
from jipguard.ipprotect import job, objective


def test_readme_snippet_runs_as_written(readme_snippet):
  """README's three lines, executed verbatim: sanitized images and a report of the buyer's own utility."""
  scope = {}
  exec(readme_snippet("ipprotect"), scope)
  sanitized, report, ds = scope["sanitized"], scope["report"], scope["ds"]
  assert sanitized.shape == (300, 28, 28, 1) and np.all(np.isfinite(sanitized))
  assert isinstance(report, ipprotect.SanitizeReport) and report.num_images == 300
  assert 0 <= report.utility_mae_val < 0.2 and report.compliance_val > 0.6  # Utility kept on Omega_V.
  assert 1 <= report.steps_mean <= job.preset("smoke").sanitizer.steps and report.seconds > 0
  # Worthless as images: far from every original (none is within the distance of a re-draw).
  x, s = ds.images[:300].reshape(300, -1), sanitized.reshape(300, -1)
  assert np.sqrt(((s[:, None] - x[None]) ** 2).mean(-1)).min() > 0.5
  assert report.config["anchor_seed"] is None  # A fresh secret, kept nowhere without a workdir.


def test_sanitize_dataset_resumes_from_its_workdir_and_rejects_bad_input(tmp_path):
  ds = data.load("fashion_mnist_subset", "test").subset(slice(0, 40))
  first, _ = ipprotect.sanitize_dataset(ds.images, ds.labels, preset="smoke", workdir=tmp_path)
  secret = tmp_path / "checkpoints" / "anchor_secret.json"
  assert secret.stat().st_mode & 0o777 == 0o600
  again, _ = ipprotect.sanitize_dataset(ds.images, ds.labels, preset="smoke", workdir=tmp_path)
  np.testing.assert_array_equal(first, again)  # Same secret, models and batches: restored.
  bad = ds.images.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(data.DataError, match="NaN"):
    ipprotect.sanitize_dataset(bad, ds.labels, preset="smoke")
  with pytest.raises(data.DataError, match="40 images but 39 labels"):
    ipprotect.sanitize_dataset(ds.images, ds.labels[:-1], preset="smoke")
  with pytest.raises(ValueError, match="omega_tr must be an integer >= 1"):
    ipprotect.sanitize_dataset(ds.images, ds.labels, preset="smoke", omega_tr=0)


def test_sanitizer_defaults_are_the_recommended_preset_and_paper_is_named():
  recommended = job.preset("default").sanitizer
  assert dataclasses.replace(objective.SanitizerConfig(), data_batch=recommended.data_batch) == recommended
  paper = objective.SanitizerConfig.paper()
  assert (paper.loss, paper.learning_rate, paper.steps, paper.zeta) == ("logits", 0.01, 2000, 0.5)
  assert job.preset("paper").sanitizer == objective.SanitizerConfig.paper(data_batch=5000, zeta=0.5, tau=1.5)
  assert objective.SanitizerConfig.paper(steps=10).steps == 10
