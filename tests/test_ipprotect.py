"""Tests for IPProtect: the objective, the sanitizer's guarantees, sellers, and the main job."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiment_modules import load_experiment
from jipguard import data, ensemble, ipprotect, models, pipeline

_MODEL = models.MLP(num_classes=10, hidden=(32,))
_CFG = ipprotect.SanitizerConfig(steps=60, data_batch=4, loss="probs", learning_rate=0.1, zeta=0.01,
                                 val_every=10, min_steps=20)


@functools.cache
def _setup():
  """A tiny buyer set and 6 + 2 sampled models (module-cached: training is the slow part)."""
  test = data.load("fashion_mnist_subset", "test")
  buyer = test.subset(np.arange(48))
  omega = ipprotect.sample_models(_MODEL, ipprotect.TrainConfig(epochs=10, batch_size=16), jax.random.key(0),
                                  buyer, 8, progress=False)
  return buyer, omega.member(slice(0, 6)).variables, omega.member(slice(6, 8)).variables


def test_hinge_is_zero_inside_the_ball_and_linear_outside():
  buyer, tr, _ = _setup()
  anchor = jax.random.normal(jax.random.key(1), buyer.image_shape)
  target = ensemble.apply(_MODEL, tr, buyer.images[:1])[:, 0]
  weights = jnp.ones(6)
  objective = functools.partial(ipprotect.image_objective, target_MxC=target, anchor=anchor, weights_M=weights,
                                key=jax.random.key(2), params=tr, model=_MODEL)
  cfg = dataclasses.replace(_CFG, lam=0.7, tau=1.5)
  direction = jax.random.normal(jax.random.key(3), buyer.image_shape)
  direction = direction / ipprotect.rms_distance(direction, 0)
  for radius in (0.0, 0.5, 1.49):
    _, (_, security) = objective(anchor + radius * direction, cfg=cfg)
    assert float(security) == 0.0
  for radius in (1.6, 3.0):
    _, (_, security) = objective(anchor + radius * direction, cfg=cfg)
    assert float(security) == pytest.approx(0.7 * (radius - 1.5), rel=1e-4)
  # Utility term: zero at the original image itself.
  _, (utility, _) = objective(jnp.asarray(buyer.images[0]), cfg=cfg)
  assert float(utility) < 1e-5


def _objective_of(buyer, tr, images, cfg):
  target = jnp.swapaxes(ensemble.apply(_MODEL, tr, buyer.images[:len(images)]), 0, 1)
  anchors = jax.vmap(lambda k: jax.random.normal(k, buyer.image_shape))(
      ipprotect.image_keys(ipprotect.secret_key(7), 0, len(images)))
  f = jax.vmap(functools.partial(ipprotect.image_objective, model=_MODEL, cfg=cfg), in_axes=(0, 0, 0, None, 0, None))
  keys = jax.random.split(jax.random.key(0), len(images))
  return f(jnp.asarray(images), target, anchors, jnp.ones(6), keys, tr)[0]


def test_objective_decreases():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, val_stop=False, steps=1)
  start = ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_seed=7)
  end = ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], dataclasses.replace(cfg, steps=60),
                                 start=0, seed=0, anchor_seed=7)
  before, after = _objective_of(buyer, tr, start.images, cfg), _objective_of(buyer, tr, end.images, cfg)
  assert np.all(np.asarray(after) < 0.5 * np.asarray(before)), (before, after)
  assert np.all(end.steps == 60)


def test_batch_equals_images_one_by_one():
  buyer, tr, va = _setup()
  batch = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_seed=11)
  for k in range(4):
    one = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[k:k + 1], _CFG, start=k, seed=3, anchor_seed=11)
    assert one.steps[0] == batch.steps[k]
    np.testing.assert_allclose(one.images[0], batch.images[k], atol=1e-4)
  # Padding a batch with inactive images changes nothing either.
  padded = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_seed=11,
                                    pad_to=8)
  np.testing.assert_allclose(padded.images, batch.images, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=["data8", "member2-data4"])
def test_sharded_sanitize_equals_single_device(mesh_shape, eight_devices):
  """Images split over the data axis (12 images padded to 16), models over the member axis."""
  from jipguard import sharding
  buyer, tr, va = _setup()
  # Images stop after 10-25 steps. (Much longer runs of this lr-0.1 "probs" setting drift
  # apart: Adam's normalisation amplifies rounding in near-zero gradients once softmax saturates.)
  cfg = dataclasses.replace(_CFG, data_batch=12, steps=30, min_steps=10, val_every=5, zeta=0.02)
  plain = ipprotect.sanitize(_MODEL, tr, va, buyer.images[:12], cfg, seed=3, anchor_seed=11, progress=False)
  sharded = ipprotect.sanitize(_MODEL, tr, va, buyer.images[:12], cfg, seed=3, anchor_seed=11, progress=False,
                               mesh=sharding.make_mesh(*mesh_shape))
  np.testing.assert_array_equal(plain.steps, sharded.steps)
  assert len(set(plain.steps.tolist())) > 1  # The stopping rule acted, per image.
  np.testing.assert_allclose(plain.images, sharded.images, atol=1e-4)
  np.testing.assert_allclose(plain.val_loss, sharded.val_loss, atol=1e-5)
  with pytest.raises(ValueError, match="member axis"):
    ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:8], cfg, start=0, seed=3, anchor_seed=11,
                             mesh=sharding.make_mesh(4, 2))  # |Omega_Tr| = 6 members on 4 shards.


@pytest.mark.parametrize("robust", [False, True], ids=["plain", "noise-dropout"])
def test_members_per_pass_sums_the_same_objective(robust, monkeypatch):
  """Summing Eq. 9 over groups of members (CPU's cache-sized passes), with their input
  layer as one product or not, gives the objective's own gradient and utility, per image and
  with the robust options' randomness; a whole sanitization with the automatic groups forced
  small takes the same steps to the same images."""
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, input_noise=0.1 * robust, hidden_dropout=0.2 * robust, tau=0.5)  # Hinge active.
  x = jnp.asarray(buyer.images[:4])
  targets = jnp.swapaxes(ensemble.apply(_MODEL, tr, x), 0, 1)
  anchors = jax.random.normal(jax.random.key(1), x.shape)
  weights = jnp.asarray(np.random.default_rng(0).random((4, 6)) < 0.7, jnp.float32).at[:, 0].set(1)
  keys = jax.random.split(jax.random.key(2), 4)
  objective = functools.partial(ipprotect.image_objective, model=_MODEL, cfg=cfg)
  (_, (util, _)), grads = jax.vmap(jax.value_and_grad(objective, has_aux=True), in_axes=(0, 0, 0, 0, 0, None))(
      x + 0.3, targets, anchors, weights, keys, tr)
  assert float(jnp.min(jnp.abs(grads).sum((1, 2, 3)))) > 0
  opt = ipprotect.optimizer(cfg).init(x)
  whole = ipprotect.sanitize_step(tr, x + 0.3, opt, targets, anchors, weights, keys, model=_MODEL, cfg=cfg)
  for per_pass in (1, 2, 3):
    got_util, got_grads = ipprotect._grouped_utility_grads(tr, x + 0.3, targets, anchors, weights, keys,
                                                           model=_MODEL, cfg=cfg, members_per_pass=per_pass)
    np.testing.assert_allclose(got_util, util, rtol=1e-5)
    np.testing.assert_allclose(got_grads, grads, rtol=1e-4, atol=1e-7)
    step = ipprotect.sanitize_step(tr, x + 0.3, opt, targets, anchors, weights, keys, model=_MODEL, cfg=cfg,
                                   members_per_pass=per_pass)
    np.testing.assert_allclose(step[2], whole[2], rtol=1e-5)
  for per_pass in (1, 2, None):  # Groups whose input layer is one product (sanitize_batch on CPU).
    shared = ensemble.share_input(_MODEL, tr, per_pass)
    got_util, got_grads = ipprotect._grouped_utility_grads(shared, x + 0.3, targets, anchors, weights, keys,
                                                           model=_MODEL, cfg=cfg,
                                                           members_per_pass=shared.members_per_pass)
    np.testing.assert_allclose(got_util, util, rtol=1e-5)
    np.testing.assert_allclose(got_grads, grads, rtol=1e-4, atol=1e-7)
    step = ipprotect.sanitize_step(shared, x + 0.3, opt, targets, anchors, weights, keys, model=_MODEL, cfg=cfg)
    np.testing.assert_allclose(step[2], whole[2], rtol=1e-5)
  with pytest.raises(ValueError, match="must divide"):
    ipprotect.sanitize_step(tr, x, opt, targets, anchors, weights, keys, model=_MODEL, cfg=cfg, members_per_pass=4)
  with pytest.raises(ValueError, match="already grouped"):
    ipprotect.sanitize_step(shared, x, opt, targets, anchors, weights, keys, model=_MODEL, cfg=cfg, members_per_pass=2)
  if robust or jax.default_backend() != "cpu":  # The automatic groups are CPU's.
    return
  run = lambda: ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_seed=11)
  assert ensemble.members_per_pass(tr) is None
  whole = run()
  monkeypatch.setattr(ensemble, "CPU_PASS_BYTES", 2.5 * sum(a[0].nbytes for a in jax.tree.leaves(tr)))
  assert ensemble.members_per_pass(tr) == 2
  grouped = run()
  monkeypatch.setattr(ensemble, "shared_input_members", lambda *args: None)  # Plain variables in groups.
  plain_groups = run()
  for got in (grouped, plain_groups):
    np.testing.assert_array_equal(got.steps, whole.steps)
    np.testing.assert_allclose(got.images, whole.images, atol=1e-4)
    np.testing.assert_allclose(got.val_loss, whole.val_loss, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_conv_sanitizing_on_cpu_takes_eigen_convolutions_and_computes_the_same(monkeypatch):
  """For conv models on CPU the sanitize step and ``sanitize_batch``'s loop compile with
  ``ensemble.CPU_CONV_OPTIONS``; Eq. 9's utility and a whole sanitization come out as with
  XLA's defaults (float rounding)."""
  if not ensemble._xla_takes_conv_options():
    pytest.skip("this XLA:CPU does not know --xla_cpu_experimental_ynn_fusion_type's values")
  buyer, tr_mlp, _ = _setup()
  cnn = models.CNN(num_classes=10, widths=(4, 8), dense=16)
  images = buyer.images[:4]
  trainer = ensemble.EnsembleTrainer(cnn, optax.adam(1e-3), batch_size=16)
  tr = trainer.init(jax.random.split(jax.random.key(5), 3), images).variables
  va = trainer.init(jax.random.split(jax.random.key(6), 2), images).variables
  assert ipprotect.sanitize_step_jit.for_members(tr) is ipprotect.sanitize_step_jit.conv_cpu
  assert ipprotect.sanitize_step_jit.for_members(tr_mlp) is ipprotect.sanitize_step_jit.default
  cfg = dataclasses.replace(_CFG, steps=30, tau=0.5)
  x = jnp.asarray(images)
  targets = jnp.swapaxes(ensemble.apply(cnn, tr, x), 0, 1)
  anchors = jax.random.normal(jax.random.key(1), x.shape)
  weights = jnp.ones((4, 3), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 4)
  args = (tr, x + 0.3, ipprotect.optimizer(cfg).init(x), targets, anchors, weights, keys)
  eigen = ipprotect.sanitize_step_jit.conv_cpu(*args, model=cnn, cfg=cfg)
  default = ipprotect.sanitize_step_jit.default(*args, model=cnn, cfg=cfg)
  np.testing.assert_allclose(eigen[2], default[2], rtol=1e-5)
  run = lambda: ipprotect.sanitize_batch(cnn, tr, va, images, cfg, start=0, seed=3, anchor_seed=11)
  compiled = ipprotect._run_steps.conv_cpu._cache_size(), ipprotect._run_steps.default._cache_size()
  with_options = run()
  assert ipprotect._run_steps.conv_cpu._cache_size() > compiled[0]
  assert ipprotect._run_steps.default._cache_size() == compiled[1]
  monkeypatch.setattr(ensemble, "_xla_takes_conv_options", lambda: False)
  defaults = run()
  assert ipprotect._run_steps.default._cache_size() > compiled[1]
  np.testing.assert_array_equal(with_options.steps, defaults.steps)
  np.testing.assert_allclose(with_options.images, defaults.images, atol=1e-4)
  np.testing.assert_allclose(with_options.val_loss, defaults.val_loss, atol=1e-5)


def test_compaction_drops_stopped_images_and_changes_nothing(monkeypatch):
  """With 16 images of which most stop early, the loop continues on a smaller batch."""
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, data_batch=16, steps=60, min_steps=10, val_every=5, zeta=0.02)
  monkeypatch.setitem(ipprotect._MIN_BUCKET, jax.default_backend(), 1)  # Down to 1 image (the CPU's floor).
  before = ipprotect._run_steps.default._cache_size()
  compact = ipprotect.sanitize(_MODEL, tr, va, buyer.images[:16], cfg, seed=3, anchor_seed=11, progress=False)
  assert ipprotect._run_steps.default._cache_size() > before + 1  # The 16-image program and a smaller one.
  full = ipprotect.sanitize(_MODEL, tr, va, buyer.images[:16], dataclasses.replace(cfg, compact=False), seed=3,
                            anchor_seed=11, progress=False)
  assert np.sum(compact.steps <= 15) >= 12 and compact.steps.max() > 20  # It was worth compacting.
  np.testing.assert_array_equal(compact.steps, full.steps)
  np.testing.assert_allclose(compact.images, full.images, atol=1e-4)
  np.testing.assert_allclose(compact.val_loss, full.val_loss, atol=1e-5)
  np.testing.assert_allclose(compact.train_loss, full.train_loss, atol=1e-5)
  # With a floor on the compacted batch (accelerators' default: fewer programs to compile),
  # the batch stops shrinking there, and nothing else changes.
  batches = []
  gather = ipprotect._gather
  monkeypatch.setattr(ipprotect, "_gather", lambda slots, index: batches.append(len(index)) or gather(slots, index))
  monkeypatch.setitem(ipprotect._MIN_BUCKET, jax.default_backend(), 8)
  floored = ipprotect.sanitize(_MODEL, tr, va, buyer.images[:16], cfg, seed=3, anchor_seed=11, progress=False)
  assert batches == [8]  # Without the floor: 8, then 4 or fewer once 12 or more have stopped.
  np.testing.assert_array_equal(floored.steps, full.steps)
  np.testing.assert_allclose(floored.images, full.images, atol=1e-4)


def test_stopping_rule_stops_images_and_stopped_images_do_not_change():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, zeta=10.0, steps=200)  # Every image converges at min_steps.
  res = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], cfg, start=0, seed=0, anchor_seed=1)
  assert np.all(res.steps == cfg.min_steps)
  longer = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], dataclasses.replace(cfg, steps=400),
                                    start=0, seed=0, anchor_seed=1)
  np.testing.assert_array_equal(longer.images, res.images)
  never = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:4], dataclasses.replace(cfg, zeta=0.0),
                                   start=0, seed=0, anchor_seed=1)
  assert np.all(never.steps == 200)


def test_anchor_secret_changes_the_result_and_is_64_bit():
  buyer, tr, va = _setup()
  a = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:2], _CFG, start=0, seed=0, anchor_seed=2**63 + 5)
  b = ipprotect.sanitize_batch(_MODEL, tr, va, buyer.images[:2], _CFG, start=0, seed=0, anchor_seed=5)
  assert not np.allclose(a.images, b.images)
  with pytest.raises(ValueError, match="anchor seed"):
    ipprotect.secret_key(2**64)


class _Killed(Exception):
  pass


def test_resumed_sanitization_equals_uninterrupted(tmp_path, monkeypatch):
  buyer, tr, va = _setup()
  images = buyer.images[:12]
  straight = ipprotect.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_seed=9, progress=False)
  real = ipprotect.sanitize_batch
  calls = []

  def dies_on_second_batch(*args, **kwargs):
    calls.append(kwargs["start"])
    if len(calls) == 2:
      raise _Killed
    return real(*args, **kwargs)

  monkeypatch.setattr(ipprotect, "sanitize_batch", dies_on_second_batch)
  with pytest.raises(_Killed):
    ipprotect.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_seed=9, checkpoint_dir=tmp_path, progress=False)
  monkeypatch.setattr(ipprotect, "sanitize_batch", real)
  calls.clear()
  spy = lambda *a, **k: (calls.append(k["start"]), real(*a, **k))[1]
  monkeypatch.setattr(ipprotect, "sanitize_batch", spy)
  resumed = ipprotect.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_seed=9, checkpoint_dir=tmp_path,
                               progress=False)
  assert calls == [4, 8]  # Batch 0 came from the checkpoint.
  for f in dataclasses.fields(ipprotect.BatchResult):
    if f.name != "seconds":  # Wall times differ between runs.
      np.testing.assert_array_equal(getattr(resumed, f.name), getattr(straight, f.name))
  assert np.all(resumed.seconds > 0)
  # All restored: the batch times are those recorded when the batches ran.
  again = ipprotect.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_seed=9, checkpoint_dir=tmp_path,
                             progress=False)
  np.testing.assert_array_equal(again.seconds, resumed.seconds)
  with pytest.raises(ValueError, match="different configuration"):
    ipprotect.sanitize(_MODEL, tr, va, images, dataclasses.replace(_CFG, lam=1.0), seed=0, anchor_seed=9,
                       checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="differs in \\['anchor'\\]"):
    ipprotect.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_seed=10, checkpoint_dir=tmp_path,
                       progress=False)


def test_sanitizer_input_errors():
  buyer, tr, va = _setup()
  bad = np.array(buyer.images[:2])
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    ipprotect.sanitize(_MODEL, tr, va, bad, _CFG, seed=0, anchor_seed=1, progress=False)
  with pytest.raises(ValueError, match="val_stop needs"):
    ipprotect.sanitize(_MODEL, tr, None, buyer.images[:2], _CFG, seed=0, anchor_seed=1, progress=False)
  with pytest.raises(ValueError, match="model_batch"):
    ipprotect.sanitize(_MODEL, tr, va, buyer.images[:2], dataclasses.replace(_CFG, model_batch=7), seed=0,
                       anchor_seed=1, progress=False)
  with pytest.raises(ValueError, match="loss must be"):
    ipprotect.SanitizerConfig(loss="hinge")
  with pytest.raises(ValueError, match="temperature must be > 0"):
    ipprotect.SanitizerConfig(temperature=0.0)


def test_seller_labels_follow_the_table_i_interpretation():
  labels = np.repeat(np.arange(10), 100)
  noise = (0.0, 1.0, 3.0)
  out = ipprotect.seller_labels(jax.random.key(0), labels, noise, 2, 10)
  assert out.shape == (6, 1000)
  np.testing.assert_array_equal(out[0], out[1])  # A seller's models share its dataset.
  changed = (out[::2] != labels).mean(1)
  np.testing.assert_allclose(changed, [0.0, 0.5 * 0.9, 0.875 * 0.9], atol=1e-3)
  assert ipprotect.resample_rate(0) == 0 and ipprotect.resample_rate(5) == pytest.approx(1 - 1 / 32)


def test_smoke_preset_end_to_end_and_rerun_reuses_everything(tmp_path):
  cfg = pipeline.preset("smoke")
  m = pipeline.run(cfg, str(tmp_path), progress=False)
  for key in ("utility_mae", "seller_utility_original", "seller_utility_sanitized", "compliance_train",
              "compliance_val", "risk_train", "risk_val", "rank_correlation", "compliance_lower_bound",
              "images_per_second"):
    assert key in m
  assert len(m["seller_utility_original"]) == 8
  assert 0 <= m["utility_mae_fresh_images"] <= 1 and 0 <= m["utility_mae_val_oob"] <= 1
  # The fresh-images reference: are as many other test images, none of them a buyer image.
  buyer, _ = pipeline.load_data(cfg)
  ref = pipeline.reference_set(cfg, len(buyer))
  assert len(ref) == len(buyer)
  flat = lambda d: {a.tobytes() for a in d.images}
  assert not flat(ref) & flat(buyer)
  for name in ("config.json", "metrics.json", "report.md", "sanitized.npz", "examples.png", "sellers.png"):
    assert (tmp_path / name).exists(), name
  assert "loss = margin (kappa = 1.0)" in (tmp_path / "report.md").read_text()  # The smoke preset's loss.
  assert "stopping rule on (every 10 steps from step 20)" in (tmp_path / "report.md").read_text()  # smoke's schedule.
  # sanitized.npz: sanitized images and labels only, none of them (close to) an original.
  buyer, _ = pipeline.load_data(cfg)
  with np.load(tmp_path / "sanitized.npz") as f:
    assert sorted(f.files) == ["images", "labels"]
    san, lab = f["images"], f["labels"]
  np.testing.assert_array_equal(lab, buyer.labels)
  x = buyer.images.reshape(len(buyer), -1)
  s = san.reshape(len(san), -1)
  rms = np.sqrt(((s[:, None] - x[None]) ** 2).mean(-1))
  assert rms.min() > 0.5, rms.min()
  xc = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  sc = (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)
  assert (sc @ xc.T / x.shape[1]).max() < 0.8
  # The anchor secret stays in the private checkpoints, in no shared artefact.
  secret = json.loads((tmp_path / "checkpoints" / "anchor_secret.json").read_text())["anchor_seed"]
  for name in ("config.json", "metrics.json", "report.md", "sanitized.npz"):
    assert str(secret).encode() not in (tmp_path / name).read_bytes()
  # A rerun resumes from the checkpoints and reproduces the metrics.
  again = pipeline.run(cfg, str(tmp_path), progress=False)
  assert again["utility_mae"] == m["utility_mae"]
  assert again["timings"]["sanitize_s"] < m["timings"]["sanitize_s"]
  # Throughput is that of the sanitization when it ran, not of restoring it.
  assert again["images_per_second"] == m["images_per_second"] > 0
  with pytest.raises(ValueError, match="different configuration"):
    pipeline.run(dataclasses.replace(cfg, omega_tr=5), str(tmp_path), progress=False)


def test_experiment_flags_override_the_preset():
  mod = load_experiment("ipprotect", "ipprotect_main")
  cfg, workdir, _ = mod.parse(["--omega_tr", "10", "--lam", "0.5", "--no_val_stop", "--preset", "paper",
                               "--seller_epochs", "2"])
  assert cfg.omega_tr == 10 and cfg.sanitizer.lam == 0.5 and not cfg.sanitizer.val_stop
  assert cfg.sanitizer.steps == 2000 and cfg.sanitizer.tau == 1.5 and cfg.seller_train.epochs == 2
  assert workdir.endswith("ipprotect-fashion_mnist_subset-paper-tr10-s0")
  json.dumps(pipeline.config_to_json(cfg))
  assert pipeline.config_from_json(json.loads(json.dumps(pipeline.config_to_json(cfg)))) == cfg
  given = dataclasses.replace(cfg, anchor_seed=123456789)
  assert "123456789" not in json.dumps(pipeline.config_to_json(given))
  cfg, _, _ = mod.parse(["--margin", "3"])
  assert cfg.sanitizer.loss == "margin" and cfg.sanitizer.margin == 3.0  # The default preset's loss.
  cfg, _, _ = mod.parse(["--loss", "probs", "--temperature", "2"])
  assert cfg.sanitizer.loss == "probs" and cfg.sanitizer.temperature == 2.0
  cfg, _, _ = mod.parse([])
  assert (cfg.sanitizer.val_every, cfg.sanitizer.min_steps) == (10, 50)  # The default preset's schedule.
  cfg, _, _ = mod.parse(["--val_every", "25", "--min_steps", "75"])
  assert (cfg.sanitizer.val_every, cfg.sanitizer.min_steps) == (25, 75)


def test_kl_loss_is_distillation_kl():
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((5, 10)), jnp.float32) for _ in range(2))
  got = ipprotect._distance(a, b, "kl", 2.0)
  p, q = jax.nn.softmax(b / 2.0), jax.nn.softmax(a / 2.0)
  np.testing.assert_allclose(got, jnp.sum(p * jnp.log(p / q), -1), rtol=1e-5)
  assert np.all(np.asarray(got) > 0)
  np.testing.assert_allclose(ipprotect._distance(b, b, "kl"), 0.0, atol=1e-6)


def test_margin_loss_is_the_cw_hinge_and_keeps_its_gradient_where_probs_saturates():
  target = jnp.array([0.0, 3.0, 1.0])  # Class 1.
  dist = lambda a, kind, **kw: ipprotect._distance(jnp.asarray(a), target, kind, **kw)
  assert float(dist([0.0, 5.0, 1.0], "margin")) == 0.0                         # Wins by 4 >= 1.
  assert float(dist([0.0, 5.0, 4.5], "margin")) == pytest.approx(0.5)          # Wins by 0.5 < 1.
  assert float(dist([3.0, 1.0, 0.0], "margin", margin=2.0)) == pytest.approx(4.0)
  # Saturated on a wrong class: the probability loss has no gradient left, the margin loss does.
  saturated = jnp.array([60.0, 0.0, 0.0])
  g_probs = jax.grad(lambda a: ipprotect._distance(a, target, "probs"))(saturated)
  g_margin = jax.grad(lambda a: ipprotect._distance(a, target, "margin"))(saturated)
  assert float(jnp.abs(g_probs).max()) < 1e-12
  np.testing.assert_allclose(g_margin, [1.0, -1.0, 0.0])


def test_margin_loss_makes_every_training_model_predict_its_class_on_the_original():
  buyer, tr, _ = _setup()
  cfg = dataclasses.replace(_CFG, loss="margin", margin=2.0, val_stop=False, steps=60)
  out = ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:8], cfg, start=0, seed=0, anchor_seed=7)
  want = np.asarray(ensemble.apply(_MODEL, tr, buyer.images[:8]).argmax(-1))
  got = np.asarray(ensemble.apply(_MODEL, tr, out.images))
  start = ipprotect.starting_points(buyer.image_shape, 0, 8, seed=0, anchor_seed=7)[0]
  assert (np.asarray(ensemble.apply(_MODEL, tr, start).argmax(-1)) == want).mean() < 0.5  # Noise: mostly wrong.
  np.testing.assert_array_equal(got.argmax(-1), want)
  # ... by the margin (up to the last step's size), with the images still far from the originals.
  top2 = np.sort(got, -1)[..., -2:]
  assert np.all(top2[..., 1] - top2[..., 0] > 1.5)
  assert np.all(np.asarray(jax.vmap(ipprotect.rms_distance)(out.images, buyer.images[:8])) > 0.5)
  assert "margin" not in ipprotect.SanitizerConfig().fingerprint()
  assert ipprotect.SanitizerConfig(loss="margin", margin=2.0).fingerprint()["margin"] == 2.0
  with pytest.raises(ValueError, match="margin must be >= 0"):
    ipprotect.SanitizerConfig(margin=-1.0)


def test_weight_decay_is_coupled_l2_and_kills_unused_weights():
  # A weight whose data gradient is always zero (an always-black pixel) decays to ~0 under the
  # coupled L2 (torch Adam's weight_decay) within ~|w| / lr steps, and stays put without it.
  params = {"w": jnp.array([0.05, 0.05])}
  data_grad = {"w": jnp.array([0.0, 1.0])}
  for wd, expect_unused in ((0.0, 0.05), (1e-4, 0.0)):
    tx = ipprotect.TrainConfig(learning_rate=1e-3, weight_decay=wd).optimizer()
    p, state = params, tx.init(params)
    for _ in range(200):
      updates, state = tx.update(data_grad, state, p)
      p = optax.apply_updates(p, updates)
    assert abs(float(p["w"][0]) - expect_unused) < 2e-3, (wd, p)
  assert ipprotect.TrainConfig().fingerprint() == {"epochs": 5, "batch_size": 128, "learning_rate": 1e-3}
  assert ipprotect.TrainConfig(weight_decay=0.1).fingerprint()["weight_decay"] == 0.1
  with pytest.raises(ValueError, match="weight_decay"):
    ipprotect.TrainConfig(weight_decay=-1.0)


def test_out_of_bag_mask_marks_exactly_the_models_that_did_not_train_on_an_image():
  boots = ipprotect.sample_bootstraps(jax.random.key(5), 40, 6)
  mask = ipprotect.out_of_bag_mask(boots, 40)
  assert mask.shape == (40, 6)
  for i in range(40):
    trained = np.array([i in row for row in boots])
    if trained.all():
      assert np.all(mask[i] == 1)  # Fallback: every model.
    else:
      np.testing.assert_array_equal(mask[i], (~trained).astype(np.float32))
  assert 0.25 < float(np.mean(mask)) < 0.5  # ~ (1 - 1/n)^n = 0.37 of the models per image.
  # sample_models trains on exactly these bootstraps: a model that never saw an image and one
  # that did are told apart by their loss on it (memorised images have near-zero loss).
  buyer = data.load("fashion_mnist_subset", "test").subset(np.arange(40))
  omega = ipprotect.sample_models(_MODEL, ipprotect.TrainConfig(epochs=40, batch_size=8), jax.random.key(5), buyer,
                                  6, progress=False)
  probs = jax.nn.softmax(ensemble.apply(_MODEL, omega.variables, buyer.images), -1)  # M x N x C
  p_true = np.asarray(jnp.take_along_axis(probs, jnp.asarray(buyer.labels)[None, :, None], -1)[..., 0]).T
  strict = ipprotect.out_of_bag_mask(boots, 40).astype(bool) & (mask.sum(1, keepdims=True) < 6)
  assert p_true[~strict].mean() > 0.85 and p_true[strict].mean() < p_true[~strict].mean() - 0.1, (
      p_true[~strict].mean(), p_true[strict].mean())


def test_out_of_bag_fits_each_image_only_to_its_eligible_models():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, val_stop=False, steps=30, out_of_bag=True)
  only_first = np.zeros((4, 6), np.float32)
  only_first[:, 0] = 1.0
  got = ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_seed=7,
                                 member_mask=only_first)
  first = jax.tree.map(lambda a: a[:1], tr)
  want = ipprotect.sanitize_batch(_MODEL, first, None, buyer.images[:4], dataclasses.replace(cfg, out_of_bag=False),
                                  start=0, seed=0, anchor_seed=7)
  # (Float rounding of the masked sum, amplified by Adam's normalisation, moves pixels ~1e-4.)
  np.testing.assert_allclose(got.images, want.images, atol=1e-3)
  plain = ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], dataclasses.replace(cfg, out_of_bag=False),
                                   start=0, seed=0, anchor_seed=7)
  assert np.abs(plain.images - got.images).max() > 0.1
  with pytest.raises(ValueError, match="member_mask is required"):
    ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_seed=7)
  with pytest.raises(ValueError, match="member_mask must be"):
    ipprotect.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_seed=7,
                             member_mask=np.zeros((4, 6)))
  # The option is off by default and then absent from fingerprints (older runs resume).
  assert "out_of_bag" not in ipprotect.SanitizerConfig().fingerprint()
  assert ipprotect.SanitizerConfig(out_of_bag=True).fingerprint()["out_of_bag"] is True


def test_saturation_diagnostic_restores_the_runs_sampled_models(tmp_path, capsys):
  import re
  mod = load_experiment("ipprotect_saturation", "saturation")
  flags = ["--preset", "smoke", "--cache_dir", str(tmp_path), "--images", "8", "--checkpoints", "40", "5"]
  assert mod.main(flags) == 0
  first = capsys.readouterr().out
  # The two ensembles, where pipeline.run keeps a run's models with this --cache_dir.
  assert sorted(d.split("-")[0] for d in os.listdir(tmp_path)) == ["omega", "sellers"]
  found = re.findall(r"noise (\d\.\d+) \(> 0.999: (\d\.\d+)\)", first)
  assert len(found) == 2 and all(0 <= float(v) <= 1 for pair in found for v in pair)
  # The trajectory, in step order; the smoke preset's margin loss fits every Omega_Tr model.
  steps = re.findall(r"step (\d+): compliance Omega_Tr (\d\.\d+), stuck (\d\.\d+)", first)
  assert [s[0] for s in steps] == ["5", "40"]
  assert float(steps[-1][1]) == 1.0 and float(steps[-1][2]) == 0.0
  # Rerun: the same, from the restored ensembles.
  assert mod.main(flags) == 0
  assert capsys.readouterr().out == first


def test_every_ablation_variant_parses_and_names_its_loss():
  # A variant that left the loss to the preset would silently change when the preset does
  # (it did: the default went from probs to margin).
  ablation = load_experiment("ipprotect_ablation", "ablation")
  for name, flags in ablation.VARIANTS.items():
    assert "--loss" in flags, name
    cfg, _, _ = pipeline.config_from_flags(ablation.BASE + flags)
    assert name.split(" ")[0].split(",")[0] in (cfg.sanitizer.loss, "paper"), name
