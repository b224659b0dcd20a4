"""The trade-off study end to end at ``--preset smoke``: points, resume, Table III, figures."""

import csv
import functools
import json
import os

import numpy as np
import pytest

from jipguard.ipprotect import cli, exposure, tradeoff


@functools.cache
def _study(out):
  mod = tradeoff
  cfg, *_ = cli.tradeoff_parse(["--preset", "smoke", "--quiet"])
  table = mod.run_study(cfg, out, progress=False, log=lambda *_: None)
  return mod, cfg, table


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tradeoff"))
  return (out, *_study(out))


def _points(out):
  root = os.path.join(out, "points", "fashion_mnist_subset")
  pts = {}
  for name in sorted(os.listdir(root)):
    with open(os.path.join(root, name)) as f:
      pts[name[: -len(".json")]] = json.load(f)
  return pts


def test_every_point_and_artefact_is_written(study):
  out, mod, cfg, table = study
  pts = _points(out)
  expected = {f"ipprotect-{n}-s0" for n in cfg.omega_tr} | {"identity-None-s0", "random-None-s0"}
  expected |= {f"{m}-{p}-s0" for m in ("instahide", "dp_merf") for p in cfg.params[m]}
  assert set(pts) == expected
  for name in (
    "table3.md",
    "table3.json",
    "fig2.png",
    "fig2_image.png",
    "fig2_training.png",
    "fig2_inference.png",
    "config.json",
  ):
    assert os.path.getsize(os.path.join(out, name)) > 0
  md = open(os.path.join(out, "table3.md")).read()
  with open(os.path.join(out, "table3.csv")) as f:  # The same table for a spreadsheet.
    rows = list(csv.DictReader(f))
  assert {r["method"] for r in rows} >= {"IPProtect", "Identity"} and all(r["mae_mean"] for r in rows)
  assert "stand-in" in md and "VGG conv5_1 perceptual loss" not in md.split("Image IP exposure column")[1][:80]
  assert table["image_metric"] == "own_cnn_feature"
  for p in pts.values():
    assert p["num_images"] == 24 and set(p["training_per_model"]) == set(exposure.ZOO)


def test_identity_exposes_most_random_near_chance_and_ipprotect_uses_the_sellers(study):
  out, mod, cfg, _ = study
  pts = _points(out)
  ident, rand = pts["identity-None-s0"], pts["random-None-s0"]
  assert ident["utility_mae"] == 0.0
  assert ident["image_exposure"]["pixel_mse"] == "inf" and ident["image_exposure"]["own_cnn_feature"] == "inf"
  for kind in ("training_exposure", "inference_exposure"):
    assert ident[kind] == max(p[kind] for p in pts.values())
    assert abs(rand[kind] - 0.1) < 0.06  # 1 / |C|.
  for n in (2, 6):  # The study's seller models are job.run's (restored from its cache, not retrained).
    p = pts[f"ipprotect-{n}-s0"]
    assert p["utility_mae"] == pytest.approx(p["utility_mae_pipeline"], abs=1e-6)
  cache = mod._Context(cfg, out, "fashion_mnist_subset", 0, False).ipcfg.cache_dir
  assert len([d for d in os.listdir(cache) if d.startswith("sellers-")]) == 1  # One training, shared.
  assert pts["instahide-4-s0"]["public_dataset"]


def test_table3_harmonic_means_match_the_points(study):
  out, mod, _, table = study
  pts = list(_points(out).values())
  with open(os.path.join(out, "table3.json")) as f:
    assert json.load(f)["tables"] == json.loads(json.dumps(table["tables"]))
  for kind in ("image", "training", "inference"):
    t = table["tables"]["fashion_mnist_subset"][kind]
    hm_pts = [p for p in pts if p["method"] in ("ipprotect", "dp_merf", "instahide")]
    exp = lambda p, kind=kind: (
      float(p["image_exposure"]["own_cnn_feature"]) if kind == "image" else p[f"{kind}_exposure"]
    )
    mae_max, exp_max = max(p["utility_mae"] for p in hm_pts), max(exp(p) for p in hm_pts)
    for method in ("ipprotect", "dp_merf", "instahide"):
      hms = []
      for p in hm_pts:
        if p["method"] == method:
          x, y = p["utility_mae"] / mae_max, exp(p) / exp_max
          hms.append(2 * x * y / (x + y))
      assert t[method]["hmean"][0] == pytest.approx(np.mean(hms), abs=1e-9)
      assert t[method]["hmean"][1] == pytest.approx(np.std(hms, ddof=1), abs=1e-9)  # Sample spread.
    assert t["identity"]["hmean"] is None and t["random"]["hmean"] is None


def test_a_finished_sweep_resumes_without_recomputing(study, monkeypatch):
  import dataclasses

  out, mod, cfg, table = study

  def fail(*args, **kwargs):
    raise AssertionError("a finished point was recomputed")

  monkeypatch.setattr(mod, "_sanitized", fail)
  monkeypatch.setattr(mod.exposure, "training_exposure", fail)
  again = mod.run_study(cfg, out, progress=False, log=lambda *_: None)
  assert again["tables"] == table["tables"]
  os.remove(os.path.join(out, "points", "fashion_mnist_subset", "dp_merf-40-s0.json"))
  partial = mod.run_study(cfg, out, progress=False, log=lambda *_: None, report_only=True)
  assert partial["points"] == again["points"] - 1
  more_seeds = dataclasses.replace(cfg, seeds=(0, 1))  # Extending a sweep is allowed.
  assert (
    mod.run_study(more_seeds, out, progress=False, log=lambda *_: None, report_only=True)["points"] == partial["points"]
  )
  with pytest.raises(ValueError, match="dx_size"):
    mod.run_study(dataclasses.replace(cfg, dx_size=100), out, progress=False)
  # A study made with another content of the same IPProtect preset name is refused, not mixed.
  real_preset = mod.job.preset
  monkeypatch.setattr(
    mod.job,
    "preset",
    lambda name, dataset: dataclasses.replace(
      real_preset(name, dataset), sanitizer=dataclasses.replace(real_preset(name, dataset).sanitizer, loss="probs")
    ),
  )
  with pytest.raises(ValueError, match="ipprotect_configs"):
    mod.run_study(cfg, out, progress=False)
  with pytest.raises(ValueError, match="unknown methods"):
    mod.run_study(dataclasses.replace(cfg, methods=("ipprotect", "pca")), out, progress=False)
