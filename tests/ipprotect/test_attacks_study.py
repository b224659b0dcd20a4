"""Tests of the attack study's pieces: the cross-fit defence, pairing, the report's choices and the command."""

import json
import types

import jax
import numpy as np
import pytest

from jipguard import data
from jipguard.ipprotect import attack_report, attack_study, defences, sanitizer
from jipguard.ipprotect.objective import SanitizerConfig
from jipguard.ipprotect.sellers import TrainConfig


def test_cross_fit_never_sanitizes_an_image_against_models_trained_on_it(monkeypatch):
  ds = data.load("digits", "train").subset(np.arange(21))
  calls = {"train": [], "sanitize": []}

  def fake_models(model, cfg, key, dataset, num_models, **kwargs):
    calls["train"].append({tuple(x.ravel()) for x in dataset.images})
    assert cfg.batch_size <= len(dataset)  # Capped at the other folds' size.
    return types.SimpleNamespace(variables={"w": np.zeros((num_models, 1))})

  def fake_sanitize(model, p_tr, p_v, images, cfg, **kwargs):
    calls["sanitize"].append({tuple(x.ravel()) for x in images})
    assert len(p_tr["w"]) == 3 and len(p_v["w"]) == 2
    return sanitizer.BatchResult(images + 1, *(np.zeros(len(images)) for _ in range(3)))

  monkeypatch.setattr(defences.sellers, "sample_models", fake_models)
  monkeypatch.setattr(defences.sanitizer, "sanitize", fake_sanitize)
  out = defences.cross_fit_sanitize(
    None, TrainConfig(batch_size=64), SanitizerConfig(), 3, 2, ds, seed=0, anchor_secrets=[1, 2, 3], folds=3
  )
  np.testing.assert_array_equal(out, ds.images + 1)  # Every image once, in the dataset's order.
  assert len(calls["train"]) == 3
  for trained, sanitized in zip(calls["train"], calls["sanitize"]):
    assert not trained & sanitized and len(trained) + len(sanitized) == 21
  with pytest.raises(ValueError, match="one anchor secret per fold"):
    defences.cross_fit_sanitize(None, TrainConfig(), SanitizerConfig(), 3, 2, ds, seed=0, anchor_secrets=[1], folds=2)


def test_folds_are_balanced():
  fold = defences.fold_of(11, 3, jax.random.key(0))
  assert sorted(np.bincount(fold)) == [3, 4, 4]
  with pytest.raises(ValueError, match="folds"):
    defences.fold_of(5, 1, jax.random.key(0))


def test_pair_by_label_pairs_only_equal_labels_once():
  a, b = np.array([0, 1, 1, 2, 2, 2]), np.array([2, 1, 0, 0, 2, 3])
  ia, ib = attack_study._pair_by_label(jax.random.key(0), a, b)
  np.testing.assert_array_equal(a[ia], b[ib])
  assert len(ia) == 4 and len(set(ia)) == 4 and len(set(ib)) == 4  # 0:1, 1:1, 2:2 pairs.


def _piece(method, mae, pixel, ridge, class_mean=0.9):
  link = [{"attack": a, "top1": pixel, "within_class_top1": pixel} for a in ("pixel", "lowpass")]
  recon = [
    {"attack": a, "link_top1": t, "link_within_class_top1": t, "ssim": 0.1}
    for a, t in (("class_mean", class_mean), ("ridge", ridge), ("pix2pix", 0.0))
  ]
  return {"method": method, "utility_mae": mae, "link": link, "recon": recon}


def test_best_link_ignores_the_class_mean_and_the_default_never_buys_security_with_utility():
  assert attack_report.best_link(_piece("ipprotect", 0.05, 0.3, 0.1)) == {
    "top1": 0.3,
    "attack": "pixel",
    "within_class_top1": 0.3,
  }
  rows = attack_report.tradeoff_rows(
    [
      _piece("ipprotect", 0.05, 0.4, 0.1),
      _piece("out_of_bag", 0.06, 0.2, 0.1),  # Within 0.02 of the MAE: eligible.
      _piece("anchor", 0.20, 0.0, 0.0),  # Perfect linkage defence, but utility lost: never chosen.
      _piece("identity", 0.0, 1.0, 1.0),  # Not an IPProtect variant.
    ]
  )
  assert [r["method"] for r in rows] == ["ipprotect", "out_of_bag", "anchor"]
  assert attack_report.choose_default(rows)["method"] == "out_of_bag"


def test_command_rejects_bad_flags_with_one_error_line(capsys):
  for argv in (
    ["--methods", "ipprotect,nope"],
    ["--omega_tr_grid", "0,10"],
    ["--omega_tr_grid", "ten"],
    ["--preset", "huge"],
    ["--gan_epochs", "0"],
    ["--seeds", "a"],
  ):
    assert attack_study.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), (argv, err)


def test_print_config_resolves_the_preset_and_flags(capsys):
  assert attack_study.main(["--preset", "smoke", "--methods", "identity,ipprotect", "--print_config"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert cfg["methods"] == ["identity", "ipprotect"] and cfg["victim"] == "smoke"
  assert cfg["victim_config"]["buyer_size"] == 24


def test_help_shows_every_default(capsys):
  with pytest.raises(SystemExit):
    attack_study.main(["--help"])
  out = capsys.readouterr().out
  for flag in ("--preset", "--methods", "--omega_tr_grid", "--buyer_size_grid", "--seeds", "--gan_epochs", "--seed"):
    line = out[out.index(flag) :].split("\n  --")[0]
    assert "default" in line, flag
