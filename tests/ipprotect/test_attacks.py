"""Tests of jipguard.ipprotect.attacks and pix2pix: linkage, reconstructions, positive controls, threat model."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

from jipguard import data, models
from jipguard.ipprotect import attacks, baselines, pix2pix, sanitizer, sellers
from jipguard.ipprotect.objective import SanitizerConfig
from jipguard.ipprotect.sellers import TrainConfig


def _digits():
  """Buyer (40), distractors (40) and D_A (1,000) from disjoint parts of sklearn's digits."""
  ds = data.load("digits", "train")
  return ds.subset(np.arange(40)), ds.subset(np.arange(40, 80)), ds.subset(np.arange(80, 1080))


def _candidates(buyer, distractors):
  return np.concatenate([buyer.images, distractors.images]), np.concatenate([buyer.labels, distractors.labels])


def _instahide(key):
  public = baselines.public_dataset((8, 8, 1))
  return lambda x, y: baselines.instahide_mix(key, x, public, 4)[0]


# --------------------------------------------------------------------------- linkage metric


def test_linkage_equals_a_hand_computation():
  # 3 queries, 4 candidates; true candidates 0, 1, 2; classes of the candidates: a a b b.
  scores = np.array(
    [
      [0.9, 0.1, 0.5, 0.95],  # True 0 scores 0.9; candidate 3 beats it: rank 1 (within class a: rank 0).
      [0.2, 0.8, 0.1, 0.0],  # True 1 first: rank 0.
      [0.7, 0.6, 0.3, 0.3],  # True 2 at 0.3, tied with 3 (ties count against), 0 and 1 above: rank 3.
    ]
  )
  out = attacks.linkage(scores, np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([0, 0, 1, 1]), ks=(1, 2))
  np.testing.assert_array_equal(attacks.ranks(scores, np.array([0, 1, 2])), [1, 0, 3])
  assert out["top1"] == pytest.approx(1 / 3)
  assert out["top2"] == pytest.approx(2 / 3)
  assert out["chance_top1"] == pytest.approx(1 / 4) and out["chance_top2"] == pytest.approx(2 / 4)
  # Within class: query 0 among {0, 1} rank 0; query 1 rank 0; query 2 among {2, 3} tied: rank 1.
  assert out["within_class_top1"] == pytest.approx(2 / 3)
  assert out["within_class_chance_top1"] == pytest.approx(1 / 2)
  assert out["mean_rank"] == pytest.approx(4 / 3)


def test_constant_scores_never_beat_chance():
  scores = np.zeros((5, 10))
  np.testing.assert_array_equal(attacks.ranks(scores, np.arange(5)), 9)
  assert attacks.linkage(scores, np.arange(5), np.zeros(5, int), np.zeros(10, int))["top1"] == 0.0


def test_correlation_matrix_matches_pixel_correlation():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 4, 4, 1)), rng.normal(size=(6, 4, 4, 1))
  np.testing.assert_allclose(
    np.diag(attacks.correlation_matrix(a, b)), attacks.metrics.pixel_correlation(a, b), atol=1e-12
  )


def test_ranks_reject_a_forbidden_true_candidate():
  with pytest.raises(ValueError, match="allowed"):
    attacks.ranks(np.zeros((2, 3)), np.array([0, 1]), np.array([[False, True, True], [True, True, True]]))


# ------------------------------------------------------------------------ positive controls


def test_pixel_linkage_links_identity_and_magnitude_linkage_links_instahide():
  buyer, distractors, _ = _digits()
  cand, cl = _candidates(buyer, distractors)
  for kind in ("pixel", "lowpass"):
    assert (
      attacks.linkage(attacks.pixel_scores(buyer.images, cand, kind), np.arange(40), buyer.labels, cl)["top1"] == 1.0
    )
  shared = _instahide(jax.random.key(1))(buyer.images, buyer.labels)
  out = attacks.linkage(attacks.pixel_scores(shared, cand, "magnitude"), np.arange(40), buyer.labels, cl)
  assert out["top1"] >= 10 * out["chance_top1"]  # Chance 1/80; InstaHide's sign mask removed by |.|.


def test_ridge_inverse_reconstructs_identity_and_instahide_beyond_the_class_mean():
  buyer, distractors, aux = _digits()
  cand, cl = _candidates(buyer, distractors)
  baseline = attacks.reconstruction_scores(
    attacks.class_mean_images(aux, buyer.labels), buyer.images, buyer.labels, cand, cl
  )
  identity = lambda x, y: x
  for buyer_mech, adversary_mech in (
    (identity, identity),
    (_instahide(jax.random.key(2)), _instahide(jax.random.key(3))),
  ):
    adv = attacks.prepare_with(adversary_mech, aux)  # The adversary's own draws of the mechanism.
    shared = attacks.Shared(np.asarray(buyer_mech(buyer.images, buyer.labels), np.float32), buyer.labels)
    rec = attacks.fit_ridge_inverse(adv, alpha=1.0)(shared.images)
    out = attacks.reconstruction_scores(rec, buyer.images, buyer.labels, cand, cl)
    assert out["link_top1"] >= 10 * out["link_chance_top1"]
    assert out["link_top1"] > baseline["link_top1"]
    if buyer_mech is identity:  # InstaHide's reconstruction correlates less than its class mean, yet links.
      assert out["correlation"] > baseline["correlation"]


def test_pix2pix_reconstructs_identity_far_better_than_chance():
  buyer, distractors, aux = _digits()
  crop = lambda x: np.ascontiguousarray(x[:, :7, :7])  # An odd size: padded to 8 x 8 inside, cropped back.
  cand, cl = _candidates(buyer, distractors)
  rows = []
  cfg = pix2pix.GANConfig(features=(8, 16), epochs=10, batch_size=30, learning_rate=2e-3)
  gan = pix2pix.fit(jax.random.key(0), crop(aux.images[:300]), crop(aux.images[:300]), cfg, log=rows.append)
  rec = gan(crop(buyer.images))
  assert rec.shape == crop(buyer.images).shape and rec.min() >= 0 and rec.max() <= 1
  assert [r["epoch"] for r in rows] == list(range(10)) and all(np.isfinite(r["l1"]) for r in rows)
  out = attacks.reconstruction_scores(rec, crop(buyer.images), buyer.labels, crop(cand), cl)
  assert out["link_top1"] >= 10 * out["link_chance_top1"]
  with pytest.raises(ValueError, match="fewer than one batch"):
    pix2pix.fit(jax.random.key(0), rec, rec, pix2pix.GANConfig(batch_size=41))


def test_optimisation_attack_stays_in_range_and_moves_off_the_class_mean_on_identity():
  buyer, distractors, aux = _digits()
  cand, cl = _candidates(buyer, distractors)
  model = models.get_model("mlp", 10)
  params = sellers.train_models(
    model,
    TrainConfig(epochs=20, batch_size=50),
    jax.random.key(0),
    aux.images,
    aux.labels,
    num_members=4,
    progress=False,
  ).variables
  adv = attacks.Adversary(aux, aux.images, model, params)
  shared = attacks.Shared(buyer.images, buyer.labels)
  rec = attacks.optimisation_attack(adv, shared, num_models=4, steps=100, learning_rate=0.05, weight=0.1)
  mean = attacks.class_mean_images(aux, buyer.labels)
  assert rec.shape == buyer.images.shape and rec.min() >= 0 and rec.max() <= 1
  out = attacks.reconstruction_scores(rec, buyer.images, buyer.labels, cand, cl)
  base = attacks.reconstruction_scores(mean, buyer.images, buyer.labels, cand, cl)
  assert not np.allclose(rec, mean)
  assert out["link_top1"] >= 5 * out["link_chance_top1"] and out["link_top1"] > base["link_top1"]


# ------------------------------------------------------------------------------ threat model


def test_the_adversary_cannot_reach_the_buyers_models_or_anchors():
  """No attack's signature, and no field of what the adversary holds, admits a buyer model or anchor."""
  forbidden = ("anchor", "params_tr", "params_v", "omega", "secret", "buyer", "original")
  public = [
    attacks.prepare_ipprotect,
    attacks.prepare_with,
    attacks.feature_scores,
    attacks.fit_ridge_inverse,
    attacks.optimisation_attack,
    attacks.pixel_scores,
    pix2pix.fit,
  ]
  for fn in public:
    for name in inspect.signature(fn).parameters:
      assert not any(f in name for f in forbidden), (fn.__name__, name)
  assert {f.name for f in dataclasses.fields(attacks.Shared)} == {"images", "labels"}
  assert {f.name for f in dataclasses.fields(attacks.Adversary)} == {"aux", "aux_sanitized", "model", "params"}
  assert {f.name for f in dataclasses.fields(attacks.PublicSettings)} == {
    "model",
    "omega_train",
    "sanitizer",
    "omega_tr",
    "omega_v",
    "buyer_size",
    "cross_fit_folds",
  }
  assert "anchor" not in str(dataclasses.fields(SanitizerConfig))


def test_prepare_ipprotect_sanitizes_d_a_with_its_own_models_and_fresh_anchors(monkeypatch):
  _, _, aux = _digits()
  aux = aux.subset(np.arange(40))
  settings = attacks.PublicSettings(
    model=models.get_model("mlp", 10),
    omega_train=TrainConfig(epochs=2, batch_size=10),
    sanitizer=SanitizerConfig(steps=12, data_batch=20, val_every=4, min_steps=4, loss="margin", learning_rate=0.1),
    omega_tr=3,
    omega_v=2,
    buyer_size=20,
  )
  drawn = []
  fresh = sanitizer.anchor_secret
  monkeypatch.setattr(sanitizer, "anchor_secret", lambda *a: drawn.append(fresh(*a)) or drawn[-1])
  a = attacks.prepare_ipprotect(settings, aux, seed=0)
  assert a.aux_sanitized.shape == aux.images.shape and len(a.aux) == 40
  assert jax.tree.leaves(a.params)[0].shape[0] == 5  # |Omega_Tr| + |Omega_V| of its own.
  assert not np.allclose(a.aux_sanitized, aux.images)
  assert len(drawn) == 2 and len(set(drawn)) == 2  # A fresh 256-bit anchor secret of its own per chunk.
  assert all(len(d) == 32 for d in drawn)
  with pytest.raises(ValueError, match="fewer than the buyer"):
    attacks.prepare_ipprotect(dataclasses.replace(settings, buyer_size=41), aux, seed=0)


def test_shared_rejects_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    attacks.Shared(np.full((2, 4, 4, 1), np.nan, np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="one label each"):
    attacks.Shared(np.zeros((2, 4, 4, 1), np.float32), np.zeros(3, np.int32))
