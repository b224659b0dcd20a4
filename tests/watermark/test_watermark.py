"""Tests of jipguard.watermark: LCT, learners, verification (Eq. 6), sharding, no retrace, statistics, studies, CLI."""

import colorsys
import dataclasses

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jipguard import data, ensemble, sharding, watermark
from jipguard.ensemble import _cpu
from jipguard.watermark import cli, lct, learner, studies, verifier

K_STAR = 120.0
GRID = np.arange(0, 360, 10, dtype=np.float32)


def _rgb(seed, n=6, hw=5, lo=0.3, hi=0.7):
  return np.random.default_rng(seed).uniform(lo, hi, (n, hw, hw, 3)).astype(np.float32)


class LctTest(parameterized.TestCase):
  def test_yiq_matrix_matches_colorsys(self):
    rgb = np.random.default_rng(0).uniform(0, 1, (50, 3))
    ours = rgb @ lct.T_YIQ.T
    # Python's colorsys uses rounded NTSC coefficients (0.30 / 0.59 / 0.11, ...).
    ref = np.array([colorsys.rgb_to_yiq(*p) for p in rgb])
    np.testing.assert_allclose(ours, ref, atol=0.02)
    # Grey has no chroma: the I and Q rows sum to 0, the Y row to 1.
    np.testing.assert_allclose(lct.T_YIQ.sum(1), [1, 0, 0], atol=2e-3)

  def test_zero_signature_is_identity(self):
    x = np.random.default_rng(1).uniform(0, 1, (4, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(lct.lct(x, 0.0), x, atol=1e-5)
    np.testing.assert_allclose(lct.lct(x, 360.0), x, atol=1e-5)

  @parameterized.parameters(15.0, 60.0, 210.0)
  def test_round_trip_and_luma(self, k):
    x = _rgb(2, lo=0.45, hi=0.55)  # Near grey: no clipping for any rotation.
    y = lct.lct(x, k)
    assert float(jnp.max(jnp.abs(y - x))) > 1e-3  # Actually changed.
    np.testing.assert_allclose(lct.lct(y, -k), x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y) @ lct.T_YIQ[0], x @ lct.T_YIQ[0], atol=1e-5)  # Luma kept.

  def test_user_transform_round_trip_and_clip(self):
    t = lct.user_transform(jax.random.key(3))
    assert t.shape == (3, 3) and np.linalg.cond(t) <= 20
    assert np.all(np.abs(t) <= 1)
    x = _rgb(3, lo=0.49, hi=0.51)
    np.testing.assert_allclose(lct.lct(lct.lct(x, 40.0, t), -40.0, t), x, atol=1e-4)
    big = lct.lct(np.random.default_rng(4).uniform(0, 1, (3, 4, 4, 3)), 100.0, t)
    assert float(big.min()) >= 0 and float(big.max()) <= 1

  def test_blue_shift(self):
    mask = lct.secret_pixels(jax.random.key(0), (8, 8), num_pixels=20)
    assert int(mask.sum()) == 20
    x = _rgb(5, hw=8)
    y = np.asarray(lct.blue_shift(x, 0.2, mask))
    np.testing.assert_allclose(y[..., :2], x[..., :2])
    np.testing.assert_allclose(y[..., 2][:, np.asarray(mask)], x[..., 2][:, np.asarray(mask)] + 0.2, atol=1e-6)
    np.testing.assert_allclose(y[..., 2][:, ~np.asarray(mask)], x[..., 2][:, ~np.asarray(mask)])

  def test_bad_inputs(self):
    with pytest.raises(ValueError, match="RGB"):
      lct.lct(np.zeros((2, 4, 4, 1)), 10.0)
    with pytest.raises(ValueError, match="num_pixels"):
      lct.secret_pixels(jax.random.key(0), (4, 4), 17)
    with pytest.raises(ValueError, match="NaN"):
      lct.mark(np.full((1, 2, 2, 3), np.nan), 10.0)
    with pytest.raises(ValueError, match="3x3"):
      lct.Watermark.hue(np.eye(2))


class StatisticsTest(parameterized.TestCase):
  def test_circular_matching(self):
    np.testing.assert_array_equal(verifier.match([355, 20, 40, 100], [5, 5, 5, 90], tau=15), [True, False, False, True])
    np.testing.assert_allclose(verifier.distance(350, 10), 20)
    np.testing.assert_allclose(verifier.distance(0.5, 0.1, period=None), 0.4)

  def test_adv_p(self):
    assert verifier.adv_p([True] * 10, 0.5) == pytest.approx(0.5)
    assert verifier.adv_p([True, False], 0.5) == pytest.approx(0.0)
    with pytest.raises(ValueError):
      verifier.adv_p([], 0.5)

  def test_mia_thresholds(self):
    assert verifier.mia_std_threshold(np.array([0.1, 0.3])) == pytest.approx(0.2)
    t = verifier.mia_pow_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.8, 0.9]))
    assert 0.3 < t <= 0.8

  def test_colorize_and_users(self):
    grey = np.random.default_rng(0).uniform(0, 1, (20, 4, 4, 1)).astype(np.float32)
    c = lct.colorize(0, grey, np.zeros(20, np.int32), 10)
    assert c.shape == (20, 4, 4, 3) and c.dtype == np.float32 and c.min() >= 0 and c.max() <= 1
    users = lct.assign_users(0, 20, 3, 4)
    assert users.shape == (3, 4) and len(np.unique(users)) == 12
    marked = lct.mark_users(c, users, [30.0, 60.0, 90.0])
    rest = np.setdiff1d(np.arange(20), users.ravel())
    np.testing.assert_array_equal(marked[rest], c[rest])
    np.testing.assert_allclose(marked[users[1]], lct.mark(c[users[1]], 60.0), atol=1e-6)
    with pytest.raises(ValueError):
      lct.assign_users(0, 20, 6, 4)


@pytest.fixture(scope="module")
def trained():
  """An MLP on 3,000 coloured Fashion-MNIST images where one user's 60 carry signature K_STAR."""
  train = data.load("fashion_mnist_subset", "train").subset(slice(0, 3000))
  test = data.load("fashion_mnist_subset", "test")
  x = lct.colorize(0, train.images, train.labels, 10)
  users = lct.assign_users(0, len(x), 1, 60)
  marked = lct.mark_users(x, users, [K_STAR])
  cfg = learner.LearnerConfig(
    model="mlp", epochs=30, batch_size=64, learning_rate=2e-3, augment=learner.NAMED_AUGMENTS["none"]
  )
  model, state, hist = learner.train_learners(
    cfg, jax.random.split(jax.random.key(0), 1), marked, train.labels, 10, progress=False
  )
  xt = lct.colorize(1, test.images, test.labels, 10)
  return dict(
    model=model,
    variables=learner.member_variables(state, 0),
    user_x=x[users[0]],
    user_y=train.labels[users[0]],
    held_x=xt[:600].reshape(3, 200, 28, 28, 3),
    held_y=test.labels[:600].reshape(3, 200),
    history=hist,
  )


def test_interrupted_learner_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
  """``train_learners`` is ``EnsembleTrainer.fit`` with a per-epoch augmentation: a learner
  stopped in its third epoch keeps two, and the rerun sees the same augmented epochs (crops,
  flips, stochastic label smoothing drawn from the epoch) and ends where an uninterrupted one does."""
  train = data.load("fashion_mnist_subset", "train").subset(slice(0, 256))
  x = lct.colorize(0, train.images, train.labels, 10)
  cfg = learner.LearnerConfig(
    model="mlp", epochs=4, batch_size=64, augment=learner.Augment(crop=2, flip=True, label_smoothing=0.2)
  )
  keys = jax.random.split(jax.random.key(3), 2)
  _, straight, hist = learner.train_learners(cfg, keys, x, train.labels, 10, progress=False)
  assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
  calls, train_epoch = [], ensemble.EnsembleTrainer.train_epoch

  def stopped_in_the_third(self, *args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return train_epoch(self, *args)

  monkeypatch.setattr(ensemble.EnsembleTrainer, "train_epoch", stopped_in_the_third)
  with pytest.raises(KeyboardInterrupt):
    learner.train_learners(cfg, keys, x, train.labels, 10, checkpoint_dir=str(tmp_path), progress=False)
  monkeypatch.undo()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2]
  _, resumed, hist2 = learner.train_learners(
    cfg, keys, x, train.labels, 10, checkpoint_dir=str(tmp_path), progress=False
  )
  assert hist2 == hist
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = dataclasses.replace(cfg, augment=learner.Augment(crop=2, flip=True))
  with pytest.raises(ValueError, match="different configuration"):
    learner.train_learners(other, keys, x, train.labels, 10, checkpoint_dir=str(tmp_path), progress=False)


def test_grid_search_recovers_k_star(trained):
  r = verifier.grid_search(trained["model"], trained["variables"], trained["user_x"], trained["user_y"], GRID)
  assert verifier.match(r.recovered, K_STAR, tau=lct.PAPER_TAU), (r.recovered, r.losses)
  # Held-out users' images were never used: their recovered signature is within tau of 0.
  for x, y in zip(trained["held_x"], trained["held_y"]):
    h = verifier.grid_search(trained["model"], trained["variables"], x, y, GRID)
    assert verifier.distance(h.recovered, 0.0) < lct.PAPER_TAU, (h.recovered, h.losses)


def test_gradient_search_recovers_k_star(trained):
  best, sigs, losses = verifier.gradient_search(
    trained["model"],
    trained["variables"],
    trained["user_x"],
    trained["user_y"],
    inits=(0.0, 90.0, 180.0, 270.0),
    steps=60,
    learning_rate=2.0,
  )
  assert sigs.shape == (4,) and losses.shape == (4,)
  assert verifier.distance(best, K_STAR) < lct.PAPER_TAU, (best, sigs, losses)


def _loop_losses(model, variables, x, y, sigs):
  import optax

  out = []
  for s in sigs:
    logits = model.apply(variables, lct.lct(x, float(s)), train=False)
    out.append(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
  return np.stack(out)


def test_jitted_equals_loop_and_sharded(trained, request):
  model, v = trained["model"], trained["variables"]
  x, y = trained["user_x"][:13], trained["user_y"][:13]
  sigs = np.array([0, 7, 33, 90, 120, 181, 270, 300, 359, 12, 45, 200, 5], np.float32)  # 13: not a multiple of 8.
  ref = _loop_losses(model, v, x, y, sigs)
  single = verifier.signature_losses(model, v, x, y, sigs, chunk=8)  # Chunks pad both axes.
  assert single.shape == (13, 13)
  np.testing.assert_allclose(single, ref, rtol=1e-4, atol=1e-5)
  request.getfixturevalue("eight_devices")  # The sharded half.
  mesh = sharding.make_mesh()
  sharded = verifier.signature_losses(model, v, x, y, sigs, mesh=mesh, chunk=8)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)


def test_default_chunk_keeps_dense_models_marked_batch_in_cache(trained):
  """CPU, no convolutions: as many marked images as fit the CPU pass size; conv models 4,096."""
  from jipguard import models

  model, v = trained["model"], trained["variables"]
  assert not any(leaf.ndim == 4 for leaf in jax.tree.leaves(v))
  if jax.default_backend() == "cpu":
    assert verifier.default_chunk(v, (28, 28, 3)) == _cpu.CPU_PASS_BYTES // (4 * 28 * 28 * 3) < 4096
  else:  # Accelerators: 4,096 always.
    assert verifier.default_chunk(v, (28, 28, 3)) == 4096
  assert verifier.default_chunk(v, (2, 2, 3)) == 4096
  cnn = models.CNN(num_classes=10, widths=(4, 8), dense=16)
  cnn_v = jax.jit(lambda k: cnn.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(jax.random.key(0))
  assert verifier.default_chunk(cnn_v, (28, 28, 3)) == 4096
  x, y = trained["user_x"][:4], trained["user_y"][:4]
  with pytest.raises(ValueError, match="chunk must be >= 1"):
    verifier.signature_losses(model, v, x, y, GRID[:3], chunk=0)


def test_no_retrace(trained):
  model, v = trained["model"], trained["variables"]
  x, y = trained["user_x"][:10], trained["user_y"][:10]
  verifier.signature_losses(model, v, x, y, GRID[:6])
  before = verifier._signature_losses._cache_size()
  a = verifier.signature_losses(model, v, x[::-1], y[::-1], GRID[6:12])
  b = verifier.signature_losses(model, v, x, y, GRID[6:12] + 1.0)
  assert verifier._signature_losses._cache_size() == before
  assert not np.allclose(a, b)


def test_blue_watermark_grid(trained):
  model, v = trained["model"], trained["variables"]
  mask = lct.secret_pixels(jax.random.key(1), (28, 28), 512)
  blue = lct.Watermark.blue(mask)
  sigs = np.array([0.0, 0.1, 0.3], np.float32)
  got = verifier.signature_losses(model, v, trained["user_x"][:5], trained["user_y"][:5], sigs, watermark=blue)
  import optax

  ref = [
    optax.softmax_cross_entropy_with_integer_labels(
      model.apply(v, lct.blue_shift(trained["user_x"][:5], s, mask), train=False), trained["user_y"][:5]
    )
    for s in sigs
  ]
  np.testing.assert_allclose(got, np.stack(ref), rtol=1e-4, atol=1e-5)


def test_signature_losses_errors(trained):
  model, v = trained["model"], trained["variables"]
  with pytest.raises(ValueError, match="labels"):
    verifier.signature_losses(model, v, trained["user_x"], trained["user_y"][:3], GRID)
  with pytest.raises(ValueError, match="finite"):
    verifier.signature_losses(model, v, trained["user_x"], trained["user_y"], np.array([np.nan]))


def test_prune(trained):
  v = trained["variables"]
  p = learner.prune(v, 0.5)
  kernels = [w for path, w in jax.tree_util.tree_flatten_with_path(p["params"])[0] if path[-1].key == "kernel"]
  for w in kernels:
    assert 0.45 <= float(jnp.mean(w == 0)) <= 0.55
  with pytest.raises(ValueError):
    learner.prune(v, 1.0)


def test_benchmark_kernel_matches_torch_reference():
  pytest.importorskip("torch")
  from benchmarks import watermark_kernel

  err = watermark_kernel.max_rel_err(watermark_kernel.GridSize("mlp", 5, 7))
  assert err < watermark_kernel.CHECK_RTOL, err
  assert [s.label for s in watermark_kernel.SIZES(True)]


def test_cli_mark_and_verify(trained, tmp_path, capsys):
  learner.save_model(str(tmp_path / "model"), "mlp", 10, (28, 28, 3), trained["variables"])
  model, v, meta = learner.load_model(str(tmp_path / "model"))
  assert meta["image_shape"] == [28, 28, 3]
  np.testing.assert_allclose(
    learner.logits(model, v, trained["user_x"][:4]),
    learner.logits(trained["model"], trained["variables"], trained["user_x"][:4]),
    rtol=1e-6,
  )
  np.savez(tmp_path / "mine.npz", images=trained["user_x"], labels=trained["user_y"])
  assert (
    cli.main(
      ["mark", "--input", str(tmp_path / "mine.npz"), "--signature", "40", "--output", str(tmp_path / "marked.npz")]
    )
    == 0
  )
  with np.load(tmp_path / "marked.npz") as z:
    np.testing.assert_allclose(z["images"], lct.mark(trained["user_x"], 40.0), atol=1e-6)
    np.testing.assert_array_equal(z["labels"], trained["user_y"])
  capsys.readouterr()
  assert (
    cli.main(
      [
        "verify",
        "--model",
        str(tmp_path / "model"),
        "--images",
        str(tmp_path / "mine.npz"),
        "--signature",
        str(K_STAR),
        "--grid_step",
        "10",
        "--plot",
        str(tmp_path / "curve.png"),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "verdict: MATCH" in out and (tmp_path / "curve.png").exists()
  with pytest.raises(FileNotFoundError):
    learner.load_model(str(tmp_path))


@pytest.mark.parametrize(
  "study,flags,match",
  [
    (
      "multiuser",
      {},
      r"--heldout_users x --heldout_per_user = 100 x 100 = 10000 images, but the test split of "
      r"fashion_mnist_subset has 1000: lower them",
    ),
    (
      "multiuser",
      {"heldout_users": 5, "train_size": 500},
      r"--num_users x --per_user .* = 24 x 100 = 2400 "
      r"images, but the train split .* has 500",
    ),
    ("defences", {"heldout_users": 5, "train_size": 50}, r"= 1 x 100 = 100 images, but the train split"),
    (
      "defences",
      {"heldout_users": 100, "heldout_per_user": 10},
      r"= 100 x 10 = 1000 images, but the held-out half of the test split of fashion_mnist_subset has 500",
    ),
  ],
)
def test_studies_name_the_flags_when_a_split_is_too_small_before_training(tmp_path, study, flags, match):
  cfg = studies.STUDIES[study](dataset="fashion_mnist_subset", **flags)
  with pytest.raises(ValueError, match=match):
    {"multiuser": studies.multiuser, "defences": studies.defences}[study](cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # Nothing was trained.


def test_one_call_verify_matches_the_marked_user_and_not_a_held_out_one(trained):
  """Positive control: the user whose images the learner saw marked; negative: held-out images."""
  model, v = trained["model"], trained["variables"]
  hit = watermark.verify(model, v, trained["user_x"], trained["user_y"], signature=K_STAR, grid_step=5)
  assert isinstance(hit, watermark.Verdict) and hit.matched and hit.distance < lct.PAPER_TAU
  miss = watermark.verify(model, v, trained["held_x"][0], trained["held_y"][0], signature=K_STAR, grid_step=5)
  assert not miss.matched
  assert not watermark.verify(model, v, trained["held_x"][0], trained["held_y"][0], grid_step=5).matched  # Null.
  with pytest.raises(ValueError, match="RGB"):
    watermark.verify(model, v, trained["user_x"][..., :1], trained["user_y"])
  with pytest.raises(ValueError, match="labels must have shape"):
    watermark.verify(model, v, trained["user_x"], trained["user_y"][:-1])


def test_readme_snippet_runs_as_written(trained, readme_snippet):
  """README's three lines, executed verbatim on a user's images and the learner that saw them marked."""
  scope = dict(
    images=trained["user_x"], labels=trained["user_y"], model=trained["model"], variables=trained["variables"]
  )
  exec(readme_snippet("watermark"), scope)
  np.testing.assert_allclose(scope["marked"], lct.mark(trained["user_x"], 60.0), atol=1e-6)
  assert isinstance(scope["verdict"], watermark.Verdict) and scope["verdict"].signature == 60.0


def test_resnet_learner_with_crop_and_flip_recovers_k_star_and_not_held_out_users():
  """The paper's setting, small: a ResNet-8 trained with random crops + flips (its default
  augmentation) on 600 tinted 14x14 images, 100 of them one user's, marked with K_STAR. The
  marked user's signature is recovered; held-out users' images give the null signature."""
  train = data.load("fashion_mnist_subset", "train").subset(slice(0, 600))
  test = data.load("fashion_mnist_subset", "test").subset(slice(0, 600))

  def small(x):  # 28x28 -> 14x14 (2x2 means): a quarter of the convolutions' work.
    return x.reshape(len(x), 14, 2, 14, 2, -1).mean((2, 4))

  x = lct.colorize(0, small(train.images), train.labels, 10)
  users = lct.assign_users(0, len(x), 1, 100)
  cfg = learner.LearnerConfig(
    model="resnet8", epochs=40, batch_size=64, learning_rate=5e-3, augment=learner.NAMED_AUGMENTS["crop_flip"]
  )
  model, state, _ = learner.train_learners(
    cfg, jax.random.split(jax.random.key(0), 1), lct.mark_users(x, users, [K_STAR]), train.labels, 10, progress=False
  )
  variables = learner.member_variables(state, 0)
  r = verifier.grid_search(model, variables, x[users[0]], train.labels[users[0]], GRID)
  assert verifier.match(r.recovered, K_STAR, tau=lct.PAPER_TAU), (r.recovered, r.losses)
  xt = lct.colorize(1, small(test.images), test.labels, 10)
  for u in range(3):
    h = verifier.grid_search(model, variables, xt[200 * u : 200 * (u + 1)], test.labels[200 * u : 200 * (u + 1)], GRID)
    assert verifier.distance(h.recovered, 0.0) < lct.PAPER_TAU, (h.recovered, h.losses)


class _Trained(Exception):
  pass


@pytest.mark.parametrize(
  "argv",
  [
    ["multiuser", "--heldout_users", "5", "--train_size", "500", "--per_user", "10"],
    ["sweep", "--vary", "augment", "--heldout_users", "5", "--train_size", "500"],
    ["defences", "--heldout_users", "5", "--train_size", "500"],
  ],
)
@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_reaches_every_study_learner(tmp_path, monkeypatch, argv, quiet):
  """``--quiet`` turns off the learner's progress bar in each study (checked at its first learner)."""
  seen = []

  def fake_train(*args, progress=True, **kwargs):
    seen.append(progress)
    raise _Trained

  monkeypatch.setattr(learner, "train_learners", fake_train)
  flags = ["--dataset", "fashion_mnist_subset", "--workdir", str(tmp_path / "run"), "--debug"]
  with pytest.raises(_Trained):
    cli.main(argv + flags + (["--quiet"] if quiet else []))
  assert seen == [not quiet]


def test_heldout_distance_is_circular_and_sample_std():
  s = studies.heldout_distance([0.0, 350.0, 5.0, 20.0])  # |k^ - 0| = 0, 10, 5, 20 degrees.
  assert s["heldout_abs_recovered_mean"] == pytest.approx(8.75)
  assert s["heldout_abs_recovered_std"] == pytest.approx(np.std([0, 10, 5, 20], ddof=1))
  assert studies.heldout_distance([180.0])["heldout_abs_recovered_std"] is None
