"""Tests for stacked ensembles: one program equals N programs, sharding, resume, accuracy."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jipguard import data, ensemble, models, sharding
from jipguard.ensemble import _cpu, training


@functools.cache
def _digits():
  train, test = data.load("digits", "train"), data.load("digits", "test")
  return train, test


# One optimiser object and small models, so that trainers of equal configuration share
# compiled programs (compiling dominates these tests on a 2-core CPU).
_TX = optax.adam(1e-3)
_MLP = models.MLP(num_classes=10)
_CNN = models.CNN(num_classes=10, widths=(4, 8), dense=16)  # Batch norm and dropout.


# Adam divides by the gradient's scale, so it turns float noise in parameters whose
# gradient is ~0 into +-lr steps; comparisons of two computations use plain SGD.
_SGD = optax.sgd(0.05, momentum=0.9)


def _trainer(model=_MLP, batch_size=32, mesh=None, tx=_TX):
  return ensemble.EnsembleTrainer(model, tx, batch_size=batch_size, mesh=mesh)


def _member_inputs(m, n_pool, n_sample, seed=0):
  keys = jax.random.split(jax.random.key(seed), m)
  indices = data.bootstrap_indices(jax.random.key(seed + 1), n_pool, m, size=n_sample)
  return keys, indices


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("model", [_MLP, _CNN], ids=["mlp", "cnn"])
def test_ensemble_equals_members_trained_one_at_a_time(model):
  """Own keys, own bootstrap sample, own labels, own batch norm: vmap changes nothing."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  m = 3
  keys, indices = _member_inputs(m, 256, 128)
  labels_MxN = np.stack([data.flip_labels(jax.random.key(7 + i), y, r, 10) for i, r in enumerate([0, 0.3, 0.6])])
  together = _trainer(model, tx=_SGD).fit(keys, x, labels_MxN, indices=indices, epochs=2, progress=False)
  for i in range(m):
    alone = _trainer(model, tx=_SGD).fit(
      keys[i : i + 1], x, labels_MxN[i : i + 1], indices=indices[i : i + 1], epochs=2, progress=False
    )
    _assert_trees_close(together.state.member(i), alone.state, atol=2e-5)
  # Members really differ (own keys / samples / labels).
  p = jax.tree.leaves(together.state.params)[0]
  assert not np.allclose(p[0], p[1])


def test_step_loop_equals_scan_epoch():
  """The per-step path (conv models on CPU) trains exactly what the scan path trains."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(3, 256, 128)
  scanned = _trainer(_CNN, tx=_SGD)
  scanned.scan = True
  stepped = _trainer(_CNN, tx=_SGD)
  stepped.scan = False
  a = scanned.fit(keys, x, y, indices=indices, epochs=2, progress=False)
  b = stepped.fit(keys, x, y, indices=indices, epochs=2, progress=False)
  _assert_trees_close(a.state, b.state, atol=2e-5)
  np.testing.assert_allclose(a.history[-1]["loss"], b.history[-1]["loss"], rtol=1e-5)
  assert _trainer(_CNN).scan is None and _cpu.has_convolutions(a.state)
  assert not _cpu.has_convolutions(_trainer().init(keys, x))


def _ynn_convolutions(hlo: str) -> list[str]:
  """The fused computations with a convolution that compiled HLO text runs as YNNPACK fusions."""
  bodies = dict(re.findall(r"\n(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  return [
    c for c in re.findall(r"%ynn_fusion\S* = [^\n]*calls=(%[\w.\-]+)", hlo) if " convolution(" in bodies.get(c, "")
  ]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_conv_training_on_cpu_takes_eigen_convolutions_and_trains_the_same(monkeypatch):
  """Conv models' training steps on CPU compile with ``CPU_CONV_OPTIONS`` (Eigen's
  convolutions, not YNNPACK's; optimization barriers kept), MLPs with XLA's defaults; the
  options change no trained value beyond float rounding."""
  if not _cpu._xla_takes_conv_options():
    pytest.skip("this XLA:CPU does not know --xla_cpu_experimental_ynn_fusion_type's values")
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(2, 256, 128)
  cnn = _trainer(_CNN, tx=_SGD)
  assert _cpu.conv_compiler_options(cnn.init(keys, x).params) == _cpu.CPU_CONV_OPTIONS
  assert _cpu.conv_compiler_options(_trainer().init(keys, x).params) is None
  state = cnn.init(keys, x)
  batch_idx, batch_y, dropout_keys = training.epoch_batches(indices, jnp.asarray(y)[indices], keys, 0, batch_size=32)
  step_args = (state, jnp.asarray(x), batch_idx[0], batch_y[0], dropout_keys, jnp.int32(0))
  static = dict(model=_CNN, tx=_SGD, unroll_members=True)
  default_hlo = training.train_step.default.lower(*step_args, **static).compile().as_text()
  hlo = training.train_step.conv_cpu.lower(*step_args, **static).compile().as_text()
  assert _ynn_convolutions(default_hlo)  # This XLA's default, which the options turn off.
  assert " convolution(" in hlo and not _ynn_convolutions(hlo)
  # models.conv_xla_barrier's barriers (the CNN's 3x3 convolutions on CPU) reach XLA only here.
  assert " opt-barrier(" in hlo and " opt-barrier(" not in default_hlo
  compiled = training.train_step.conv_cpu._cache_size(), training.train_step.default._cache_size()
  with_options = cnn.fit(keys, x, y, indices=indices, epochs=2, progress=False)
  assert training.train_step.conv_cpu._cache_size() > compiled[0]
  assert training.train_step.default._cache_size() == compiled[1]
  monkeypatch.setattr(_cpu, "_xla_takes_conv_options", lambda: False)
  defaults = _trainer(_CNN, tx=_SGD).fit(keys, x, y, indices=indices, epochs=2, progress=False)
  assert training.train_step.default._cache_size() > compiled[1]
  _assert_trees_close(with_options.state, defaults.state, atol=2e-5)
  np.testing.assert_allclose(with_options.history[-1]["loss"], defaults.history[-1]["loss"], rtol=1e-5)


def test_member_major_epoch_equals_step_major(monkeypatch):
  """Groups of members through the whole epoch (CPU's cache-sized passes) train what all
  members at every step train; the automatic group is the largest divisor of M that fits."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(6, 256, 128)
  model = models.MLP(num_classes=10, dropout=0.2)  # Per-member dropout keys matter.
  fit = lambda per_pass: ensemble.EnsembleTrainer(model, _SGD, batch_size=32, members_per_pass=per_pass).fit(
    keys, x, y, indices=indices, epochs=2, progress=False
  )
  step_major = fit(0)
  state = step_major.state
  per_member = sum(a.nbytes for a in jax.tree.leaves((state.params, state.opt_state))) / 6
  assert _cpu.members_per_pass(state) is None  # Small members: all at every step.
  monkeypatch.setattr(_cpu, "CPU_PASS_BYTES", 4.5 * per_member)
  on_cpu = jax.default_backend() == "cpu"  # The automatic groups are CPU's; explicit ones run anywhere.
  assert _cpu.members_per_pass(state) == (3 if on_cpu else None)  # 4 fit, 3 divides 6.
  one_device = sharding.make_mesh(1, 1, jax.devices()[:1])
  assert _cpu.members_per_pass(state, one_device) is None  # Any mesh: all members.
  for per_pass in (1, 2, None):
    member_major = fit(per_pass)
    _assert_trees_close(step_major.state, member_major.state, atol=2e-5)
    np.testing.assert_allclose(step_major.history[-1]["loss"], member_major.history[-1]["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="must divide the number of members"):
    fit(4)
  with pytest.raises(ValueError, match="members_per_pass"):
    ensemble.EnsembleTrainer(_MLP, _SGD, batch_size=32, mesh=one_device, members_per_pass=2)


@pytest.mark.parametrize(
  "m,model,mesh_shape",
  [(8, _CNN, (8, 1)), (6, _MLP, (8, 1)), (3, _CNN, (2, 4))],
  ids=["cnn-step-loop", "mlp-scan-padded", "cnn-member2-data4"],
)
def test_sharded_equals_unsharded(m, model, mesh_shape, eight_devices):
  """Both epoch paths on 8 simulated devices; 6 members are padded to the 8-device mesh;
  on a (2, 4) mesh each member's batch (and its batch norm) is split over 4 devices."""
  train, test = _digits()
  x, y = train.images[:512], train.labels[:512]
  keys, indices = _member_inputs(m, 512, 256)
  plain = _trainer(model, tx=_SGD).fit(keys, x, y, indices=indices, epochs=2, progress=False)
  mesh = sharding.make_mesh(*mesh_shape)
  sharded = _trainer(model, mesh=mesh, tx=_SGD).fit(keys, x, y, indices=indices, epochs=2, progress=False)
  assert sharded.state.num_members == m
  _assert_trees_close(plain.state, sharded.state, atol=2e-5)
  logits_plain = ensemble.predict(model, plain.state.variables, test.images)
  logits_sharded = ensemble.predict(model, sharded.state.variables, test.images)
  np.testing.assert_allclose(logits_plain, logits_sharded, atol=1e-4)


def test_second_epoch_call_compiles_nothing():
  train, _ = _digits()
  trainer = _trainer()
  m = 2
  keys, indices = _member_inputs(m, len(train), 256)
  indices = jnp.asarray(indices)  # The jit cache keys on argument types (numpy vs jax).
  state = trainer.init(keys, train.images)
  x = jnp.asarray(train.images)
  labels = jnp.asarray(train.labels)[indices]
  state, _ = trainer.train_epoch(state, x, indices, labels, keys, 0)
  compiled = training.train_epoch.default._cache_size()
  state, _ = trainer.train_epoch(state, x, indices, labels, keys, 1)
  state, metrics = trainer.train_epoch(state, x, jnp.flip(indices, 1), labels, keys, 2)
  # A second trainer of equal configuration reuses the program too.
  state, metrics = _trainer().train_epoch(state, x, indices, labels, keys, 3)
  assert training.train_epoch.default._cache_size() == compiled
  assert metrics["loss"].shape == (m,)


def test_apply_predict_and_apply_each_agree():
  train, test = _digits()
  model = _MLP
  trainer = _trainer()
  keys, _ = _member_inputs(3, 10, 10)
  state = trainer.init(keys, train.images)
  x = jnp.asarray(test.images[:50])
  logits = ensemble.apply(model, state.variables, x)
  assert logits.shape == (3, 50, 10)
  np.testing.assert_allclose(ensemble.predict(model, state.variables, x, batch_size=16), logits, atol=1e-5)
  each = ensemble.apply_each(model, state.variables, jnp.stack([x, x[::-1], x]))
  np.testing.assert_allclose(each[0], logits[0], atol=1e-5)
  np.testing.assert_allclose(each[1], logits[1, ::-1], atol=1e-5)


@pytest.mark.parametrize("dropout", [False, True], ids=["inference", "dropout"])
def test_value_and_input_grad_is_the_same_sum_in_every_layout(dropout):
  """``value_and_input_grad`` of a weighted sum over members, divided per input, equals the
  plain per-input ``jax.value_and_grad`` of it, whichever layout ``prepare`` is asked for."""
  train, test = _digits()
  model = models.MLP(num_classes=10, dropout=0.3 if dropout else 0.0)
  variables = _trainer(model).init(jax.random.split(jax.random.key(0), 6), train.images).variables
  x = jnp.asarray(test.images[:5])
  weights_BxM = jnp.asarray(np.random.default_rng(0).random((5, 6)), jnp.float32)
  norm_B = jnp.arange(1.0, 6.0)
  keys_BxM = jax.vmap(lambda k: jax.random.split(k, 6))(jax.random.split(jax.random.key(2), 5)) if dropout else None

  def fn(logits_GxK, weights_G, norm):
    return jnp.sum(weights_G * jnp.sum(jnp.square(logits_GxK), -1)) / norm

  def direct(x_b, w_b, n_b, k_b):
    if k_b is None:
      logits = jax.vmap(lambda v: model.apply(v, x_b[None], train=False)[0])(variables)
    else:
      logits = jax.vmap(lambda v, k: model.apply(v, x_b[None], train=True, rngs={"dropout": k})[0])(variables, k_b)
    return fn(logits, w_b, n_b)

  want_value, want_grad = jax.vmap(jax.value_and_grad(direct))(x, weights_BxM, norm_B, keys_BxM)
  assert float(jnp.abs(want_grad).sum()) > 0
  for layout, per_pass in (
    ("vmap", None),
    ("unroll", None),
    ("groups", 2),
    ("groups", 3),
    ("shared_input", 2),
    ("shared_input", None),
  ):
    members = ensemble.prepare(model, variables, layout=layout, members_per_pass=per_pass)
    value, grad = jax.jit(ensemble.value_and_input_grad, static_argnums=1)(
      members, fn, x, weights_BxM, norm_B, dropout_keys_BxM=keys_BxM
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=layout)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=layout)
    assert members.num_members == 6


def test_shared_input_members_give_the_plain_logits_and_input_gradient():
  """Groups of members whose input layer is one product (the sanitize step on CPU): the same
  logits and the same gradient to the shared input as the vmapped members, with and without
  dropout after that layer; the input layer's bias is kept."""
  train, test = _digits()
  model = models.MLP(num_classes=10, dropout=0.3)
  variables = _trainer(model).init(jax.random.split(jax.random.key(0), 6), train.images).variables
  # Trained-looking biases: a dropped bias would not be caught by init's zeros.
  variables = jax.tree_util.tree_map_with_path(
    lambda path, a: a + 0.5 if "bias" in jax.tree_util.keystr(path) else a, variables
  )
  x = jnp.asarray(test.images[:5])
  cot = jax.random.normal(jax.random.key(1), (6, 5, 10))
  keys = jax.random.split(jax.random.key(2), 6)

  def plain(x, keys):
    if keys is None:
      return ensemble.apply(model, variables, x)
    return jax.vmap(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))(variables, keys)

  def shared(x, keys, members_per_pass):
    members = _cpu.share_input(model, variables, members_per_pass)
    fn = (
      (lambda v: model.apply(v, x, train=False))
      if keys is None
      else (lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))
    )
    g = members.members_per_pass
    args = () if keys is None else (keys.reshape(-1, g, *keys.shape[1:]),)
    per_group = [
      _cpu.map_shared_input(fn, jax.tree.map(lambda a, i=i: a[i], members), x, *[a[i] for a in args])
      for i in range(6 // g)
    ]
    return jnp.concatenate(per_group)

  for k in (None, keys):
    want_grad = jax.grad(lambda x, k=k: jnp.sum(plain(x, k) * cot))(x)
    for per_pass in (1, 2, None):
      got = shared(x, k, per_pass)
      np.testing.assert_allclose(got, plain(x, k), rtol=1e-5, atol=1e-5)
      got_grad = jax.grad(lambda x, k=k, per_pass=per_pass: jnp.sum(shared(x, k, per_pass) * cot))(x)
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(want_grad).sum()) > 0
  members = _cpu.share_input(model, variables, 2)
  assert members.forward.shape == (3, 64, 2 * 256) and members.backward.shape == (3, 2 * 256, 64)
  assert "kernel" not in members.variables["params"]["Dense_0"]
  # ensemble.prepare lays members out this way on CPU only, without a mesh, for models with an input layer.
  assert (ensemble.prepare(model, variables).layout == "shared_input") == (jax.default_backend() == "cpu")
  assert ensemble.prepare(model, variables, mesh=sharding.make_mesh(1, 1, jax.devices()[:1])).layout == "vmap"
  assert ensemble.prepare(_CNN, variables).layout != "shared_input"
  with pytest.raises(ValueError, match="must divide"):
    _cpu.share_input(model, variables, 4)
  with pytest.raises(ValueError, match="Dense layer"):
    _cpu.share_input(_CNN, variables)


def test_unrolled_apply_equals_vmapped_for_conv_models():
  x = jnp.asarray(np.random.default_rng(0).random((6, 8, 8, 1), np.float32))
  state = _trainer(_CNN).init(jax.random.split(jax.random.key(0), 3), x)
  np.testing.assert_allclose(
    ensemble.apply(_CNN, state.variables, x, unroll=True),
    ensemble.apply(_CNN, state.variables, x, unroll=False),
    atol=1e-5,
  )
  assert _cpu.has_convolutions(state) and _cpu.has_convolutions(state.variables)
  assert _cpu.unroll_members(state.variables) == (jax.default_backend() == "cpu")
  assert not _cpu.unroll_members(_trainer().init(jax.random.split(jax.random.key(0), 2), x).variables)


def test_clean_mlp_ensemble_reaches_90_percent_on_digits():
  train, test = _digits()
  keys, _ = _member_inputs(4, 1, 1)
  res = _trainer(batch_size=64).fit(
    keys, train.images, train.labels, epochs=30, eval_data=(test.images, test.labels), progress=False
  )
  acc = np.asarray(res.history[-1]["eval_accuracy"])
  assert acc.min() >= 0.90, acc


def test_clean_mlp_ensemble_reaches_84_percent_on_embedded_fashion_mnist():
  train, test = data.load("fashion_mnist_subset", "train"), data.load("fashion_mnist_subset", "test")
  keys, _ = _member_inputs(2, 1, 1)
  res = _trainer(batch_size=128).fit(
    keys, train.images, train.labels, epochs=10, eval_data=(test.images, test.labels), progress=False
  )
  acc = np.asarray(res.history[-1]["eval_accuracy"])
  assert acc.min() >= 0.84, acc


def test_more_label_noise_scores_monotonically_lower():
  """What makes sellers of different quality: accuracy falls with the flip rate."""
  train, test = _digits()
  rates = [0.0, 0.5, 0.7, 0.8, 0.88]
  reps = 2
  labels = np.stack(
    [data.flip_labels(jax.random.key(100 + i), train.labels, r, 10) for r in rates for i in range(reps)]
  )
  keys, _ = _member_inputs(len(labels), 1, 1)
  res = _trainer(batch_size=64).fit(
    keys, train.images, labels, epochs=40, eval_data=(test.images, test.labels), progress=False
  )
  acc = np.asarray(res.history[-1]["eval_accuracy"]).reshape(len(rates), reps).mean(1)
  assert np.all(np.diff(acc) < 0), acc
  assert acc[0] >= 0.9 and acc[-1] <= acc[0] - 0.2, acc


class _Stop(Exception):
  pass


def _noisy_epoch(epoch, x, labels_MxS):
  """An epoch's data drawn afresh from the epoch: noisy pixels, a third of the labels re-drawn."""
  k_x, k_flip, k_y = jax.random.split(jax.random.fold_in(jax.random.key(7), epoch), 3)
  x = jnp.clip(x + 0.1 * jax.random.normal(k_x, x.shape), 0.0, 1.0)
  flip = jax.random.bernoulli(k_flip, 1 / 3, labels_MxS.shape)
  return x, jnp.where(flip, jax.random.randint(k_y, labels_MxS.shape, 0, 10), labels_MxS)


def test_epoch_data_is_drawn_for_the_real_members_only(eight_devices):
  """``fit(epoch_data=)``: each epoch trains on what the hook returns for that epoch, and 6
  members padded to an 8-device mesh train as without the mesh (the hook sees the 6 members'
  labels, not the padded 8: a draw of another shape would give other labels)."""
  train, _ = _digits()
  x, y = train.images[:512], train.labels[:512]
  keys, indices = _member_inputs(6, 512, 256)
  seen = []

  def hook(epoch, x, labels_MxS):
    seen.append((epoch, labels_MxS.shape))
    return _noisy_epoch(epoch, x, labels_MxS)

  plain = _trainer(tx=_SGD).fit(keys, x, y, indices=indices, epochs=2, progress=False, epoch_data=hook)
  assert seen == [(0, (6, 256)), (1, (6, 256))]
  sharded = _trainer(mesh=sharding.make_mesh(8, 1), tx=_SGD).fit(
    keys, x, y, indices=indices, epochs=2, progress=False, epoch_data=hook
  )
  assert seen[2:] == seen[:2]
  _assert_trees_close(plain.state, sharded.state, atol=2e-5)
  # The hook's data is what trained: by hand, epoch by epoch, the same state.
  trainer = _trainer(tx=_SGD)
  state, labels_MxS = trainer.init(keys, x), jnp.asarray(y)[indices]
  for epoch in range(2):
    x_e, y_e = _noisy_epoch(epoch, jnp.asarray(x), labels_MxS)
    state, _ = trainer.train_epoch(state, x_e, jnp.asarray(indices), y_e, keys, epoch)
  _assert_trees_close(plain.state, state, atol=0)
  clean = _trainer(tx=_SGD).fit(keys, x, y, indices=indices, epochs=2, progress=False)
  assert not np.allclose(clean.state.params["Dense_0"]["kernel"], plain.state.params["Dense_0"]["kernel"])
  with pytest.raises(ValueError, match="epoch_data changed the shapes"):
    _trainer(tx=_SGD).fit(keys, x, y, indices=indices, epochs=1, progress=False, epoch_data=lambda e, x, l: (x[:-1], l))


def test_init_state_starts_from_given_weights_and_is_part_of_the_configuration(tmp_path):
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(2, 256, 128)
  first = _trainer().fit(keys, x, y, indices=indices, epochs=2, progress=False)
  # No epochs: the given weights, with a fresh optimiser state.
  start = _trainer().fit(keys, x, y, indices=indices, epochs=0, progress=False, init_state=first.state)
  _assert_trees_close(start.state.params, first.state.params, atol=0)
  _assert_trees_close(start.state.opt_state, jax.vmap(_TX.init)(first.state.params), atol=0)
  tuned = _trainer().fit(
    keys,
    x,
    y,
    indices=indices,
    epochs=1,
    progress=False,
    init_state=first.state,
    checkpoint=ensemble.Checkpointing(tmp_path),
  )
  fresh = _trainer().fit(keys, x, y, indices=indices, epochs=1, progress=False)
  assert tuned.history[0]["loss"][0] < fresh.history[0]["loss"][0]  # It went on from trained weights.
  with pytest.raises(ValueError, match="different configuration"):  # Another start is another run.
    _trainer().fit(keys, x, y, indices=indices, epochs=2, progress=False, checkpoint=ensemble.Checkpointing(tmp_path))
  with pytest.raises(ValueError, match="init_state is not an ensemble of 3 members"):
    _trainer().fit(*_member_inputs(3, 256, 128)[:1], x, y, epochs=1, progress=False, init_state=first.state)


def test_killed_run_resumes_and_equals_uninterrupted(tmp_path):
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(3, 256, 128)
  straight = _trainer(_CNN).fit(keys, x, y, indices=indices, epochs=4, progress=False)

  def stop_after_two(epoch, record):
    if epoch == 2:
      raise _Stop

  with pytest.raises(_Stop):
    _trainer(_CNN).fit(
      keys,
      x,
      y,
      indices=indices,
      epochs=4,
      checkpoint=ensemble.Checkpointing(tmp_path),
      on_epoch_end=stop_after_two,
      progress=False,
    )
  resumed = _trainer(_CNN).fit(
    keys, x, y, indices=indices, epochs=4, checkpoint=ensemble.Checkpointing(tmp_path), progress=False
  )
  assert resumed.resumed_from == 2
  assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
  _assert_trees_close(straight.state, resumed.state, atol=0)
  # A finished run is reused, not retrained.
  again = _trainer(_CNN).fit(
    keys, x, y, indices=indices, epochs=4, checkpoint=ensemble.Checkpointing(tmp_path), progress=False
  )
  assert again.resumed_from == 4
  _assert_trees_close(straight.state, again.state, atol=0)
  template = _trainer(_CNN).init(keys, x)
  _assert_trees_close(straight.state, ensemble.load_checkpoint(tmp_path, template), atol=0)


def _saved_epochs(checkpoint_dir):
  return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def test_checkpoint_interval_skips_saves_but_a_stopped_run_keeps_its_finished_epochs(tmp_path):
  """With an interval longer than the run, only the epoch an exception stops at is saved
  (not every epoch), and resuming from it equals the uninterrupted run."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(3, 256, 128)
  straight = _trainer().fit(keys, x, y, indices=indices, epochs=5, progress=False)

  def stop_after_three(epoch, record):
    if epoch == 3:
      raise _Stop

  with pytest.raises(_Stop):
    _trainer().fit(
      keys,
      x,
      y,
      indices=indices,
      epochs=5,
      checkpoint=ensemble.Checkpointing(tmp_path, interval_s=1e9),
      on_epoch_end=stop_after_three,
      progress=False,
    )
  assert _saved_epochs(tmp_path) == [3]  # Epochs 1 and 2 were due but inside the interval.
  resumed = _trainer().fit(
    keys, x, y, indices=indices, epochs=5, checkpoint=ensemble.Checkpointing(tmp_path, interval_s=1e9), progress=False
  )
  assert resumed.resumed_from == 3 and [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
  assert _saved_epochs(tmp_path) == [3, 5]  # The last epoch is always saved.
  _assert_trees_close(straight.state, resumed.state, atol=0)


def test_interrupt_while_an_epoch_runs_saves_that_epoch(tmp_path, monkeypatch):
  """A KeyboardInterrupt while epoch 3 computes (here: while its metrics are awaited), with no
  save due: epoch 2's state went into epoch 3's program (donated), so ``fit`` completes epoch 3
  and saves it; the resumed run equals the uninterrupted one."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(2, 256, 128)
  straight = _trainer().fit(keys, x, y, indices=indices, epochs=4, progress=False)
  calls, to_host = [], training.distributed.to_host

  def interrupted_third(tree):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return to_host(tree)

  monkeypatch.setattr(training.distributed, "to_host", interrupted_third)
  with pytest.raises(KeyboardInterrupt):
    _trainer().fit(
      keys, x, y, indices=indices, epochs=4, checkpoint=ensemble.Checkpointing(tmp_path, interval_s=1e9), progress=False
    )
  monkeypatch.undo()
  assert _saved_epochs(tmp_path) == [3]
  resumed = _trainer().fit(
    keys, x, y, indices=indices, epochs=4, checkpoint=ensemble.Checkpointing(tmp_path), progress=False
  )
  assert resumed.resumed_from == 3
  assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
  _assert_trees_close(straight.state, resumed.state, atol=0)


def test_sigterm_saves_the_finished_epochs(tmp_path):
  """``distributed.interrupt_on_sigterm``: a real SIGTERM during training becomes
  KeyboardInterrupt, ``fit`` saves the epochs it finished, and a rerun resumes there."""
  import os  # noqa: PLC0415
  import signal  # noqa: PLC0415

  from jipguard import distributed  # noqa: PLC0415

  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(2, 256, 128)

  def terminate_after_two(epoch, record):
    if epoch == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  try:
    assert distributed.interrupt_on_sigterm()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
      _trainer().fit(
        keys,
        x,
        y,
        indices=indices,
        epochs=4,
        checkpoint=ensemble.Checkpointing(tmp_path, interval_s=1e9),
        on_epoch_end=terminate_after_two,
        progress=False,
      )
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert _saved_epochs(tmp_path) == [2]
  resumed = _trainer().fit(
    keys, x, y, indices=indices, epochs=4, checkpoint=ensemble.Checkpointing(tmp_path), progress=False
  )
  assert resumed.resumed_from == 2
  straight = _trainer().fit(keys, x, y, indices=indices, epochs=4, progress=False)
  _assert_trees_close(straight.state, resumed.state, atol=0)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
  train, _ = _digits()
  x, y = train.images[:128], train.labels[:128]
  keys, _ = _member_inputs(2, 1, 1)
  _trainer().fit(keys, x, y, epochs=1, checkpoint=ensemble.Checkpointing(tmp_path), progress=False)
  with pytest.raises(ValueError, match="different configuration"):
    _trainer().fit(keys, x, (y + 1) % 10, epochs=2, checkpoint=ensemble.Checkpointing(tmp_path), progress=False)
  with pytest.raises(ValueError, match="different configuration"):
    _trainer().fit(
      keys, x, y, epochs=2, checkpoint=ensemble.Checkpointing(tmp_path, fingerprint={"lr": 0.1}), progress=False
    )


def test_non_finite_loss_fails_fast(tmp_path):
  train, _ = _digits()
  x = np.array(train.images[:128])
  x[5] = np.nan
  keys, _ = _member_inputs(2, 1, 1)
  with pytest.raises(FloatingPointError, match="non-finite training loss at epoch 1 in members \\[0, 1\\]"):
    _trainer().fit(keys, x, train.labels[:128], epochs=3, checkpoint=ensemble.Checkpointing(tmp_path), progress=False)
  assert not any(p.name.isdigit() for p in tmp_path.iterdir())  # Nothing non-finite was saved.


def test_shape_errors():
  train, _ = _digits()
  keys, _ = _member_inputs(2, 1, 1)
  with pytest.raises(ValueError, match="indices must have shape"):
    _trainer().fit(keys, train.images, train.labels, indices=np.zeros((3, 64), int), epochs=1, progress=False)
  with pytest.raises(ValueError, match="labels must have shape"):
    _trainer().fit(keys, train.images, train.labels[:10], epochs=1, progress=False)
  with pytest.raises(ValueError, match="fewer than batch_size"):
    _trainer().fit(keys, train.images, train.labels, indices=np.zeros((2, 8), int), epochs=1, progress=False)


def _bias_penalty(params, target_K):
  """Pulls member's output bias to its own target."""
  return 10.0 * jnp.sum((params["Dense_2"]["bias"] - target_K) ** 2)


@pytest.mark.parametrize("per_pass", [0, 1], ids=["step-major", "member-major"])
def test_penalty_is_per_member_and_vmapped_equals_alone(per_pass, tmp_path):
  """A penalty with per-member data pulls each member to its own target; the ensemble equals
  each member trained alone; the data is part of the checkpoint's configuration."""
  train, _ = _digits()
  x, y = train.images[:256], train.labels[:256]
  keys, indices = _member_inputs(3, 256, 128)
  targets = np.stack([np.full(10, t, np.float32) for t in (-1.0, 0.0, 2.0)])
  trainer = lambda: ensemble.EnsembleTrainer(
    _MLP, _SGD, batch_size=32, members_per_pass=per_pass, penalty=_bias_penalty
  )
  ckpt = ensemble.Checkpointing(str(tmp_path / "ck"))
  together = trainer().fit(keys, x, y, indices=indices, epochs=3, progress=False, penalty_data=targets, checkpoint=ckpt)
  bias = np.asarray(together.state.params["Dense_2"]["bias"])
  # Twelve steps move each member's bias most of the way to its own target (SGD from ~0).
  assert np.all(np.abs(bias.mean(1) - targets[:, 0]) < 0.5 * np.abs(targets[:, 0]) + 0.05), bias.mean(1)
  for i in (0, 2):
    alone = trainer().fit(
      keys[i : i + 1], x, y, indices=indices[i : i + 1], epochs=3, progress=False, penalty_data=targets[i : i + 1]
    )
    _assert_trees_close(together.state.member(i), alone.state, atol=2e-5)
  with pytest.raises(ValueError, match="configuration"):
    trainer().fit(keys, x, y, indices=indices, epochs=3, progress=False, penalty_data=targets + 1, checkpoint=ckpt)
  with pytest.raises(ValueError, match="leading member axis"):
    trainer().fit(keys, x, y, indices=indices, epochs=1, progress=False, penalty_data=targets[:2])
  with pytest.raises(ValueError, match="without a penalty"):
    _trainer().fit(keys, x, y, indices=indices, epochs=1, progress=False, penalty_data=targets)


def test_conv_predict_chunks_by_member_images_and_keeps_the_logits(monkeypatch):
  """Conv members are predicted in chunks of at most CONV_MEMBER_IMAGES_PER_CHUNK / M images
  (here 3 images for M=2, so 7 images take 3 padded chunks); the logits equal one pass."""
  from jipguard.ensemble import members  # noqa: PLC0415 (the module whose constant is patched)

  model = models.get_model("cnn", 10).clone(widths=(4, 8), dense=16)
  trainer = ensemble.EnsembleTrainer(model, optax.sgd(0.1), batch_size=4)
  x = np.random.default_rng(0).random((7, 8, 8, 3), dtype=np.float32)
  state = trainer.init(jax.random.split(jax.random.key(0), 2), x)
  full = ensemble.apply(model, state.variables, jnp.asarray(x))
  monkeypatch.setattr(members, "CONV_MEMBER_IMAGES_PER_CHUNK", 6)
  seen, inner = [], members._predict
  monkeypatch.setattr(
    members, "_predict", lambda *a, batch_size: seen.append(batch_size) or inner(*a, batch_size=batch_size)
  )
  chunked = ensemble.predict(model, state.variables, x)
  assert seen == [3]
  np.testing.assert_allclose(chunked, full, atol=1e-5)
  assert chunked.shape == (2, 7, 10)
