"""Tests for IPProtect's sanitizer: Eq. 9, Algorithm 1's guarantees, the losses, the member layouts."""

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jipguard import data, ensemble, models
from jipguard.ensemble import _cpu
from jipguard.ipprotect import objective, sanitizer, sellers

_MODEL = models.MLP(num_classes=10, hidden=(32,))
_CFG = objective.SanitizerConfig(
  steps=60, data_batch=4, loss="probs", learning_rate=0.1, zeta=0.01, val_every=10, min_steps=20
)


@functools.cache
def _setup():
  """A tiny buyer set and 6 + 2 sampled models (module-cached: training is the slow part)."""
  test = data.load("fashion_mnist_subset", "test")
  buyer = test.subset(np.arange(48))
  omega = sellers.sample_models(
    _MODEL, sellers.TrainConfig(epochs=10, batch_size=16), jax.random.key(0), buyer, 8, progress=False
  )
  return buyer, omega.member(slice(0, 6)).variables, omega.member(slice(6, 8)).variables


def test_hinge_is_zero_inside_the_ball_and_linear_outside():
  buyer, tr, _ = _setup()
  anchor = jax.random.normal(jax.random.key(1), buyer.image_shape)
  target = ensemble.apply(_MODEL, tr, buyer.images[:1])[:, 0]
  weights = jnp.ones(6)
  eq9 = functools.partial(
    objective.image_objective,
    target_MxK=target,
    anchor=anchor,
    weights_M=weights,
    key=jax.random.key(2),
    params=tr,
    model=_MODEL,
  )
  cfg = dataclasses.replace(_CFG, lam=0.7, tau=1.5)
  direction = jax.random.normal(jax.random.key(3), buyer.image_shape)
  direction = direction / objective.rms_distance(direction, 0)
  for radius in (0.0, 0.5, 1.49):
    _, (_, security) = eq9(anchor + radius * direction, cfg=cfg)
    assert float(security) == 0.0
  for radius in (1.6, 3.0):
    _, (_, security) = eq9(anchor + radius * direction, cfg=cfg)
    assert float(security) == pytest.approx(0.7 * (radius - 1.5), rel=1e-4)
  # Utility term: zero at the original image itself.
  _, (utility, _) = eq9(jnp.asarray(buyer.images[0]), cfg=cfg)
  assert float(utility) < 1e-5


def _objective_of(buyer, tr, images, cfg):
  target = jnp.swapaxes(ensemble.apply(_MODEL, tr, buyer.images[: len(images)]), 0, 1)
  anchors = jax.vmap(lambda k: jax.random.normal(k, buyer.image_shape))(sanitizer.anchor_keys(7, 0, len(images)))
  f = jax.vmap(functools.partial(objective.image_objective, model=_MODEL, cfg=cfg), in_axes=(0, 0, 0, None, 0, None))
  keys = jax.random.split(jax.random.key(0), len(images))
  return f(jnp.asarray(images), target, anchors, jnp.ones(6), keys, tr)[0]


def test_objective_decreases():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, val_stop=False, steps=1)
  start = sanitizer.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_secret=7)
  end = sanitizer.sanitize_batch(
    _MODEL, tr, None, buyer.images[:4], dataclasses.replace(cfg, steps=60), start=0, seed=0, anchor_secret=7
  )
  before, after = _objective_of(buyer, tr, start.images, cfg), _objective_of(buyer, tr, end.images, cfg)
  assert np.all(np.asarray(after) < 0.5 * np.asarray(before)), (before, after)
  assert np.all(end.steps == 60)


def test_batch_equals_images_one_by_one():
  buyer, tr, va = _setup()
  batch = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_secret=11)
  for k in range(4):
    one = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[k : k + 1], _CFG, start=k, seed=3, anchor_secret=11)
    assert one.steps[0] == batch.steps[k]
    np.testing.assert_allclose(one.images[0], batch.images[k], atol=1e-4)
  # Padding a batch with inactive images changes nothing either.
  padded = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_secret=11, pad_to=8)
  np.testing.assert_allclose(padded.images, batch.images, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=["data8", "member2-data4"])
def test_sharded_sanitize_equals_single_device(mesh_shape, eight_devices):
  """Images split over the data axis (12 images padded to 16), models over the member axis."""
  from jipguard import sharding

  buyer, tr, va = _setup()
  # Images stop after 10-25 steps. (Much longer runs of this lr-0.1 "probs" setting drift
  # apart: Adam's normalisation amplifies rounding in near-zero gradients once softmax saturates.)
  cfg = dataclasses.replace(_CFG, data_batch=12, steps=30, min_steps=10, val_every=5, zeta=0.02)
  plain = sanitizer.sanitize(_MODEL, tr, va, buyer.images[:12], cfg, seed=3, anchor_secret=11, progress=False)
  sharded = sanitizer.sanitize(
    _MODEL,
    tr,
    va,
    buyer.images[:12],
    cfg,
    seed=3,
    anchor_secret=11,
    progress=False,
    mesh=sharding.make_mesh(*mesh_shape),
  )
  np.testing.assert_array_equal(plain.steps, sharded.steps)
  assert len(set(plain.steps.tolist())) > 1  # The stopping rule acted, per image.
  np.testing.assert_allclose(plain.images, sharded.images, atol=1e-4)
  np.testing.assert_allclose(plain.val_loss, sharded.val_loss, atol=1e-5)
  with pytest.raises(ValueError, match="member axis"):
    sanitizer.sanitize_batch(
      _MODEL, tr, va, buyer.images[:8], cfg, start=0, seed=3, anchor_secret=11, mesh=sharding.make_mesh(4, 2)
    )  # |Omega_Tr| = 6 members on 4 shards.


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
  eq9 = functools.partial(objective.image_objective, model=_MODEL, cfg=cfg)
  (_, (util, _)), grads = jax.vmap(jax.value_and_grad(eq9, has_aux=True), in_axes=(0, 0, 0, 0, 0, None))(
    x + 0.3, targets, anchors, weights, keys, tr
  )
  assert float(jnp.min(jnp.abs(grads).sum((1, 2, 3)))) > 0
  opt = objective.optimizer(cfg).init(x)
  args = (x + 0.3, opt, targets, anchors, weights, keys)
  whole = objective.sanitize_step(objective.step_members(_MODEL, tr, cfg, layout="vmap"), *args, cfg=cfg)
  layouts = [
    ("groups", 1),
    ("groups", 2),
    ("groups", 3),  # Plain variables in groups.
    ("shared_input", 1),
    ("shared_input", 2),
    ("shared_input", None),
  ]  # Input layer as one product.
  for layout, per_pass in layouts:
    members = objective.step_members(_MODEL, tr, cfg, layout=layout, members_per_pass=per_pass)
    assert members.members_per_pass == (per_pass or 6)
    got_util, got_grads = objective.objective_grads(members, x + 0.3, targets, anchors, weights, keys, cfg=cfg)
    np.testing.assert_allclose(got_util, util, rtol=1e-5)
    np.testing.assert_allclose(got_grads, grads, rtol=1e-4, atol=1e-7)
    step = objective.sanitize_step(members, *args, cfg=cfg)
    np.testing.assert_allclose(step[2], whole[2], rtol=1e-5)
  with pytest.raises(ValueError, match="must divide"):
    objective.step_members(_MODEL, tr, cfg, layout="groups", members_per_pass=4)
  with pytest.raises(ValueError, match="layout must be one of"):
    objective.step_members(_MODEL, tr, cfg, layout="grouped")
  if robust or jax.default_backend() != "cpu":  # The automatic groups are CPU's.
    return
  chosen = []
  step_members = objective.step_members
  monkeypatch.setattr(sanitizer, "step_members", lambda *a, **k: chosen.append(step_members(*a, **k)) or chosen[-1])
  run = lambda: sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:4], _CFG, start=0, seed=3, anchor_secret=11)
  assert _cpu.members_per_pass(tr) is None
  whole = run()
  monkeypatch.setattr(_cpu, "CPU_PASS_BYTES", 2.5 * sum(a[0].nbytes for a in jax.tree.leaves(tr)))
  assert _cpu.members_per_pass(tr) == 2
  grouped = run()
  monkeypatch.setattr(models, "input_layer", lambda model: None)  # Plain variables in groups.
  plain_groups = run()
  assert [(m.layout, m.members_per_pass) for m in chosen] == [("shared_input", 6), ("shared_input", 2), ("groups", 2)]
  for got in (grouped, plain_groups):
    np.testing.assert_array_equal(got.steps, whole.steps)
    np.testing.assert_allclose(got.images, whole.images, atol=1e-4)
    np.testing.assert_allclose(got.val_loss, whole.val_loss, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_conv_sanitizing_on_cpu_takes_eigen_convolutions_and_computes_the_same(monkeypatch):
  """For conv models on CPU the sanitize step and ``sanitize_batch``'s loop compile with
  ``_cpu.CPU_CONV_OPTIONS``; Eq. 9's utility and a whole sanitization come out as with
  XLA's defaults (float rounding)."""
  if not _cpu._xla_takes_conv_options():
    pytest.skip("this XLA:CPU does not know --xla_cpu_experimental_ynn_fusion_type's values")
  buyer, tr_mlp, _ = _setup()
  cnn = models.CNN(num_classes=10, widths=(4, 8), dense=16)
  images = buyer.images[:4]
  trainer = ensemble.EnsembleTrainer(cnn, optax.adam(1e-3), batch_size=16)
  tr = trainer.init(jax.random.split(jax.random.key(5), 3), images).variables
  va = trainer.init(jax.random.split(jax.random.key(6), 2), images).variables
  cfg = dataclasses.replace(_CFG, steps=30, tau=0.5)
  members = objective.step_members(cnn, tr, cfg)
  assert members.layout == "unroll"
  assert objective.sanitize_step_jit.for_members(members) is objective.sanitize_step_jit.conv_cpu
  assert objective.sanitize_step_jit.for_members(objective.step_members(_MODEL, tr_mlp, cfg)) is (
    objective.sanitize_step_jit.default
  )
  x = jnp.asarray(images)
  targets = jnp.swapaxes(ensemble.apply(cnn, tr, x), 0, 1)
  anchors = jax.random.normal(jax.random.key(1), x.shape)
  weights = jnp.ones((4, 3), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 4)
  args = (members, x + 0.3, objective.optimizer(cfg).init(x), targets, anchors, weights, keys)
  eigen = objective.sanitize_step_jit.conv_cpu(*args, cfg=cfg)
  default = objective.sanitize_step_jit.default(*args, cfg=cfg)
  np.testing.assert_allclose(eigen[2], default[2], rtol=1e-5)
  run = lambda: sanitizer.sanitize_batch(cnn, tr, va, images, cfg, start=0, seed=3, anchor_secret=11)
  compiled = sanitizer._run_steps.conv_cpu._cache_size(), sanitizer._run_steps.default._cache_size()
  with_options = run()
  assert sanitizer._run_steps.conv_cpu._cache_size() > compiled[0]
  assert sanitizer._run_steps.default._cache_size() == compiled[1]
  monkeypatch.setattr(_cpu, "_xla_takes_conv_options", lambda: False)
  defaults = run()
  assert sanitizer._run_steps.default._cache_size() > compiled[1]
  np.testing.assert_array_equal(with_options.steps, defaults.steps)
  np.testing.assert_allclose(with_options.images, defaults.images, atol=1e-4)
  np.testing.assert_allclose(with_options.val_loss, defaults.val_loss, atol=1e-5)


def test_compaction_drops_stopped_images_and_changes_nothing(monkeypatch):
  """With 16 images of which most stop early, the loop continues on a smaller batch."""
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, data_batch=16, steps=60, min_steps=10, val_every=5, zeta=0.02)
  monkeypatch.setitem(sanitizer._MIN_BUCKET, jax.default_backend(), 1)  # Down to 1 image (the CPU's floor).
  before = sanitizer._run_steps.default._cache_size()
  compact = sanitizer.sanitize(_MODEL, tr, va, buyer.images[:16], cfg, seed=3, anchor_secret=11, progress=False)
  assert sanitizer._run_steps.default._cache_size() > before + 1  # The 16-image program and a smaller one.
  full = sanitizer.sanitize(
    _MODEL, tr, va, buyer.images[:16], dataclasses.replace(cfg, compact=False), seed=3, anchor_secret=11, progress=False
  )
  assert np.sum(compact.steps <= 15) >= 8 and compact.steps.max() > 20  # It was worth compacting.
  np.testing.assert_array_equal(compact.steps, full.steps)
  np.testing.assert_allclose(compact.images, full.images, atol=1e-4)
  np.testing.assert_allclose(compact.val_loss, full.val_loss, atol=1e-5)
  np.testing.assert_allclose(compact.train_loss, full.train_loss, atol=1e-5)
  # With a floor on the compacted batch (accelerators' default: fewer programs to compile),
  # the batch stops shrinking there, and nothing else changes.
  batches = []
  gather = sanitizer._gather
  monkeypatch.setattr(sanitizer, "_gather", lambda slots, index: batches.append(len(index)) or gather(slots, index))
  monkeypatch.setitem(sanitizer._MIN_BUCKET, jax.default_backend(), 8)
  floored = sanitizer.sanitize(_MODEL, tr, va, buyer.images[:16], cfg, seed=3, anchor_secret=11, progress=False)
  assert batches == [8]  # Without the floor: 8, then 4 or fewer once 12 or more have stopped.
  np.testing.assert_array_equal(floored.steps, full.steps)
  np.testing.assert_allclose(floored.images, full.images, atol=1e-4)


def test_stopping_rule_stops_images_and_stopped_images_do_not_change():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, zeta=10.0, steps=200)  # Every image converges at min_steps.
  res = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:4], cfg, start=0, seed=0, anchor_secret=1)
  assert np.all(res.steps == cfg.min_steps)
  longer = sanitizer.sanitize_batch(
    _MODEL, tr, va, buyer.images[:4], dataclasses.replace(cfg, steps=400), start=0, seed=0, anchor_secret=1
  )
  np.testing.assert_array_equal(longer.images, res.images)
  never = sanitizer.sanitize_batch(
    _MODEL, tr, va, buyer.images[:4], dataclasses.replace(cfg, zeta=0.0), start=0, seed=0, anchor_secret=1
  )
  assert np.all(never.steps == 200)


def test_anchor_secret_changes_the_result_and_is_256_bit():
  buyer, tr, va = _setup()
  secret = sanitizer.anchor_secret()
  assert isinstance(secret, bytes) and len(secret) == 32 and secret != sanitizer.anchor_secret()
  a = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:2], _CFG, start=0, seed=0, anchor_secret=secret)
  flipped = bytes([secret[0] ^ 1]) + secret[1:]  # One bit of 256 changes every anchor.
  b = sanitizer.sanitize_batch(_MODEL, tr, va, buyer.images[:2], _CFG, start=0, seed=0, anchor_secret=flipped)
  assert not np.allclose(a.images, b.images)
  keys = lambda s: np.asarray(jax.random.key_data(sanitizer.anchor_keys(s, 0, 3)))
  assert not np.any(keys(secret) == keys(flipped))
  # The starting noise is secret too (another KDF label): not a function of the public seed alone.
  start = lambda s, seed: np.asarray(sanitizer.starting_points((4, 4, 1), 0, 2, seed=seed, anchor_secret=s)[0])
  np.testing.assert_array_equal(start(secret, 0), start(secret, 1))
  assert not np.allclose(start(secret, 0), start(flipped, 0))
  starts = np.asarray(jax.random.key_data(sanitizer.anchor_keys(secret, 0, 3, "start")))
  assert not np.any(starts == keys(secret))
  # A given integer seed derives a 256-bit secret (reproducible); images of one secret have distinct keys.
  assert sanitizer.anchor_secret(5) == sanitizer.anchor_secret(5) != sanitizer.anchor_secret(6)
  assert len(np.unique(keys(5), axis=0)) == 3
  np.testing.assert_array_equal(keys(5)[1:], np.asarray(jax.random.key_data(sanitizer.anchor_keys(5, 1, 2))))
  # The keyed commitment differs per secret and contains neither the secret nor a plain hash of the seed.
  c = sanitizer.anchor_commitment(secret)
  assert c != sanitizer.anchor_commitment(flipped) and secret.hex() not in c
  assert hashlib.sha256(b"5").hexdigest() != sanitizer.anchor_commitment(5)
  with pytest.raises(ValueError, match="32 bytes"):
    sanitizer.anchor_keys(b"short", 0, 1)
  with pytest.raises(ValueError, match="non-negative"):
    sanitizer.anchor_secret(-1)


class _Killed(Exception):
  pass


def test_resumed_sanitization_equals_uninterrupted(tmp_path, monkeypatch):
  buyer, tr, va = _setup()
  images = buyer.images[:12]
  straight = sanitizer.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_secret=9, progress=False)
  real = sanitizer.sanitize_batch
  calls = []

  def dies_on_second_batch(*args, **kwargs):
    calls.append(kwargs["start"])
    if len(calls) == 2:
      raise _Killed
    return real(*args, **kwargs)

  monkeypatch.setattr(sanitizer, "sanitize_batch", dies_on_second_batch)
  with pytest.raises(_Killed):
    sanitizer.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_secret=9, checkpoint_dir=tmp_path, progress=False)
  monkeypatch.setattr(sanitizer, "sanitize_batch", real)
  calls.clear()
  spy = lambda *a, **k: (calls.append(k["start"]), real(*a, **k))[1]
  monkeypatch.setattr(sanitizer, "sanitize_batch", spy)
  resumed = sanitizer.sanitize(
    _MODEL, tr, va, images, _CFG, seed=0, anchor_secret=9, checkpoint_dir=tmp_path, progress=False
  )
  assert calls == [4, 8]  # Batch 0 came from the checkpoint.
  for f in dataclasses.fields(sanitizer.BatchResult):
    if f.name != "seconds":  # Wall times differ between runs.
      np.testing.assert_array_equal(getattr(resumed, f.name), getattr(straight, f.name))
  assert np.all(resumed.seconds > 0)
  # All restored: the batch times are those recorded when the batches ran.
  again = sanitizer.sanitize(
    _MODEL, tr, va, images, _CFG, seed=0, anchor_secret=9, checkpoint_dir=tmp_path, progress=False
  )
  np.testing.assert_array_equal(again.seconds, resumed.seconds)
  with pytest.raises(ValueError, match="different configuration"):
    sanitizer.sanitize(
      _MODEL,
      tr,
      va,
      images,
      dataclasses.replace(_CFG, lam=1.0),
      seed=0,
      anchor_secret=9,
      checkpoint_dir=tmp_path,
      progress=False,
    )
  with pytest.raises(ValueError, match="differs in \\['anchor'\\]"):
    sanitizer.sanitize(_MODEL, tr, va, images, _CFG, seed=0, anchor_secret=10, checkpoint_dir=tmp_path, progress=False)


def test_sanitizer_input_errors():
  buyer, tr, va = _setup()
  bad = np.array(buyer.images[:2])
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    sanitizer.sanitize(_MODEL, tr, va, bad, _CFG, seed=0, anchor_secret=1, progress=False)
  with pytest.raises(ValueError, match="val_stop needs"):
    sanitizer.sanitize(_MODEL, tr, None, buyer.images[:2], _CFG, seed=0, anchor_secret=1, progress=False)
  with pytest.raises(ValueError, match="model_batch"):
    sanitizer.sanitize(
      _MODEL,
      tr,
      va,
      buyer.images[:2],
      dataclasses.replace(_CFG, model_batch=7),
      seed=0,
      anchor_secret=1,
      progress=False,
    )
  with pytest.raises(ValueError, match="loss must be"):
    objective.SanitizerConfig(loss="hinge")
  with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
    objective.SanitizerConfig(temperature=0.0)


def test_kl_loss_is_distillation_kl():
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((5, 10)), jnp.float32) for _ in range(2))
  got = objective.distance(a, b, "kl", 2.0)
  p, q = jax.nn.softmax(b / 2.0), jax.nn.softmax(a / 2.0)
  np.testing.assert_allclose(got, jnp.sum(p * jnp.log(p / q), -1), rtol=1e-5)
  assert np.all(np.asarray(got) > 0)
  np.testing.assert_allclose(objective.distance(b, b, "kl"), 0.0, atol=1e-6)


def test_margin_loss_is_the_cw_hinge_and_keeps_its_gradient_where_probs_saturates():
  target = jnp.array([0.0, 3.0, 1.0])  # Class 1.
  dist = lambda a, kind, **kw: objective.distance(jnp.asarray(a), target, kind, **kw)
  assert float(dist([0.0, 5.0, 1.0], "margin")) == 0.0  # Wins by 4 >= 1.
  assert float(dist([0.0, 5.0, 4.5], "margin")) == pytest.approx(0.5)  # Wins by 0.5 < 1.
  assert float(dist([3.0, 1.0, 0.0], "margin", margin=2.0)) == pytest.approx(4.0)
  # Saturated on a wrong class: the probability loss has no gradient left, the margin loss does.
  saturated = jnp.array([60.0, 0.0, 0.0])
  g_probs = jax.grad(lambda a: objective.distance(a, target, "probs"))(saturated)
  g_margin = jax.grad(lambda a: objective.distance(a, target, "margin"))(saturated)
  assert float(jnp.abs(g_probs).max()) < 1e-12
  np.testing.assert_allclose(g_margin, [1.0, -1.0, 0.0])


def test_margin_loss_makes_every_training_model_predict_its_class_on_the_original():
  buyer, tr, _ = _setup()
  cfg = dataclasses.replace(_CFG, loss="margin", margin=2.0, val_stop=False, steps=60)
  out = sanitizer.sanitize_batch(_MODEL, tr, None, buyer.images[:8], cfg, start=0, seed=0, anchor_secret=7)
  want = np.asarray(ensemble.apply(_MODEL, tr, buyer.images[:8]).argmax(-1))
  got = np.asarray(ensemble.apply(_MODEL, tr, out.images))
  start = sanitizer.starting_points(buyer.image_shape, 0, 8, seed=0, anchor_secret=7)[0]
  assert (np.asarray(ensemble.apply(_MODEL, tr, start).argmax(-1)) == want).mean() < 0.5  # Noise: mostly wrong.
  np.testing.assert_array_equal(got.argmax(-1), want)
  # ... by the margin (up to the last step's size), with the images still far from the originals.
  top2 = np.sort(got, -1)[..., -2:]
  assert np.all(top2[..., 1] - top2[..., 0] > 1.5)
  assert np.all(np.asarray(jax.vmap(objective.rms_distance)(out.images, buyer.images[:8])) > 0.5)
  assert "margin" not in objective.SanitizerConfig().fingerprint()
  assert objective.SanitizerConfig(loss="margin", margin=2.0).fingerprint()["margin"] == 2.0
  with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
    objective.SanitizerConfig(margin=-1.0)


def test_out_of_bag_fits_each_image_only_to_its_eligible_models():
  buyer, tr, va = _setup()
  cfg = dataclasses.replace(_CFG, val_stop=False, steps=30, out_of_bag=True)
  only_first = np.zeros((4, 6), np.float32)
  only_first[:, 0] = 1.0
  got = sanitizer.sanitize_batch(
    _MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_secret=7, member_mask=only_first
  )
  first = jax.tree.map(lambda a: a[:1], tr)
  want = sanitizer.sanitize_batch(
    _MODEL, first, None, buyer.images[:4], dataclasses.replace(cfg, out_of_bag=False), start=0, seed=0, anchor_secret=7
  )
  # (Float rounding of the masked sum, amplified by Adam's normalisation, moves pixels ~1e-4.)
  np.testing.assert_allclose(got.images, want.images, atol=1e-3)
  plain = sanitizer.sanitize_batch(
    _MODEL, tr, None, buyer.images[:4], dataclasses.replace(cfg, out_of_bag=False), start=0, seed=0, anchor_secret=7
  )
  assert np.abs(plain.images - got.images).max() > 0.1
  with pytest.raises(ValueError, match="member_mask is required"):
    sanitizer.sanitize_batch(_MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_secret=7)
  with pytest.raises(ValueError, match="member_mask must be"):
    sanitizer.sanitize_batch(
      _MODEL, tr, None, buyer.images[:4], cfg, start=0, seed=0, anchor_secret=7, member_mask=np.zeros((4, 6))
    )
  # The option is off by default and then absent from fingerprints (older runs resume).
  assert "out_of_bag" not in objective.SanitizerConfig().fingerprint()
  assert objective.SanitizerConfig(out_of_bag=True).fingerprint()["out_of_bag"] is True
