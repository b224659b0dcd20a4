"""Conv settings: split composition, conv defenders and decoders, positive controls, fingerprints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jipguard import data
from jipguard.partition import attacks, defense, networks, split

TINY = dict(
  arch="lfw_cnn", width=0.5, split_at="pool1", num_owners=4, epochs=3, warmup_epochs=1, batch_size=8,
  lr_model=3e-3, lr_defender=3e-3, dropout=0.0, seed=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def colour():
  """16x16 colour Fashion-MNIST: 400 owners', 400 auxiliary, 100 test images."""
  ds = data.load("fashion_mnist_subset")
  x = np.asarray(jax.image.resize(data.colourise(ds.images[:900], 0), (900, 16, 16, 3), "linear")).clip(0, 1)
  x, y = x.astype(np.float32), ds.labels[:900]
  return x[:400], y[:400], x[400:800], x[800:], y[800:]


@pytest.fixture(scope="module")
def undefended(colour):
  return defense.train(defense.DefenseConfig(**TINY), *colour[:2])


@pytest.fixture(scope="module")
def defended(colour):
  return defense.train(defense.DefenseConfig(designs=("mirror",), defender_weight=0.1, **TINY), *colour[:2])


@pytest.mark.parametrize(
  ("arch", "at", "side"),
  [("lfw_cnn", "pool1", 16), ("lfw_cnn", "pool2", 16), ("lfw_cnn", "pool3", 16), ("vgg19_bn", "pool2", 32)],
)
def test_conv_local_then_remote_equals_the_unsplit_model_bit_for_bit(arch, at, side):
  model = split.build(arch, 10, width=1 / 16)
  x = jax.random.uniform(jax.random.key(1), (3, side, side, 3))
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree.map(
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), variables
  )  # Non-trivial BN stats.
  net = split.split_model(model, at)
  local, remote = split.split_variables(net, variables)
  np.testing.assert_array_equal(split.compose(net, local, remote, x), model.apply(variables, x))
  assert set(local["params"]) == {f"pool{i + 1}" for i in range(net.num_local)} and set(local) == {
    "params",
    "batch_stats",
  }
  jax.tree.map(np.testing.assert_array_equal, split.merge_variables(net, local, remote), variables)
  with pytest.raises(ValueError, match="pool9"):
    split.split_model(model, "pool9")


def test_mirror_decoders_undo_the_local_part_and_the_papers_pool2_shapes():
  net = split.split_model(split.build("lfw_cnn", 10), "pool2")
  dec = networks.defender("mirror", (64, 64, 3), net.local)
  assert [(k, s) for _, k, s, _ in dec.layers] == [(5, 2), (5, 1), (8, 2), (8, 1)]  # deconv 5,5 then 8,8 as printed.
  vgg = split.split_model(split.build("vgg19_bn", 10), "pool2")
  assert [(k, s) for _, k, s, _ in networks.defender("mirror", (32, 32, 3), vgg.local).layers] == [
    (3, 2),
    (3, 2),
    (3, 1),
  ]
  h = jnp.zeros((2, *split.hidden_shape(vgg, (32, 32, 3))))
  for name in ("cifar_attack1", "cifar_attack2", "cifar_attack3"):
    d = networks.attack(name, (32, 32, 3), vgg.local)
    assert d.apply(d.init(jax.random.key(0), h), h).shape == (2, 32, 32, 3)
  a7 = networks.attack("attack7", (28, 28, 1))
  assert a7.apply(a7.init(jax.random.key(0), jnp.zeros((2, 900))), jnp.zeros((2, 900))).shape == (2, 28, 28, 1)


def test_conv_defenders_trained_as_one_ensemble_equal_defenders_trained_one_by_one(colour):
  x, y = colour[0][:32], colour[1][:32]
  cfg = dict(TINY, epochs=1, warmup_epochs=0, width=0.25, num_owners=2)
  together = defense.train(defense.DefenseConfig(designs=("mirror",), **cfg), x, y)  # Two owners, one ensemble.
  alone = defense.train(defense.DefenseConfig(designs=("mirror",) * 2, **cfg), x, y)  # Each owner its own group.
  for (_, (o,)), state in zip(alone.config.groups(), alone.defenders):
    jax.tree.map(
      lambda a, b, o=o: np.testing.assert_allclose(a[o], b[0], atol=1e-5), together.defenders[0].params, state.params
    )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), together.variables, alone.variables)


def _baseline_mse(aux, x):
  """MSE of the best input-blind guess: the auxiliary images' mean image."""
  return float(np.mean((x - aux.mean(0)) ** 2))


def test_positive_control_each_conv_attack_reconstructs_undefended_states(colour, undefended):
  _, _, aux, x_te, y_te = colour
  local = undefended.split.local
  h = jnp.asarray(defense.uploaded_states(undefended, x_te))
  classify = lambda z: defense.classify(undefended, z)  # noqa: E731
  locals_M = jax.tree.map(lambda a: a[None], undefended.local_variables)
  for name in ("lfw_attack1", "lfw_attack2"):
    dec = networks.attack(name, x_te.shape[1:], local)
    state, _ = attacks.train_inverse(dec, local, locals_M, aux, attacks.InverseConfig(epochs=8, batch_size=32, lr=3e-3))
    m = attacks.reconstruction_metrics(x_te, attacks.invert(dec, state.params, h[None])[0], y_te, classify)
    assert m["mse"] < 0.5 * _baseline_mse(aux, x_te) and m["ssim"] > 0.4, (name, m)
  x_hat = attacks.optimisation_attack(
    local, undefended.local_variables, h[:20], image_shape=x_te.shape[1:], tv_weight=0.01
  )
  m = attacks.reconstruction_metrics(x_te[:20], x_hat, y_te[:20], classify)
  blind = attacks.ssim(x_te[:20], np.broadcast_to(aux.mean(0), x_te[:20].shape)).mean()
  # Weaker through a conv part (batch norm, pools) than through the MLP: beats the blind guess on both metrics.
  assert m["mse"] < 0.9 * _baseline_mse(aux, x_te[:20]) and m["ssim"] > max(0.4, blind + 0.1), (
    "optimisation",
    m,
    blind,
  )


def test_a_conv_defender_raises_a_trained_attackers_mse_and_the_model_still_learns(colour, undefended, defended):
  _, _, aux, x_te, y_te = colour
  # Chance is 0.1 (100 test images: one standard deviation 0.03); the defended model learns slower.
  assert defense.accuracy(undefended, x_te, y_te) > 0.3 and defense.accuracy(defended, x_te, y_te) > 0.15
  locals_M = jax.tree.map(lambda *a: jnp.stack(a), undefended.local_variables, defended.local_variables)
  dec = networks.attack("lfw_attack2", x_te.shape[1:], undefended.split.local)
  state, _ = attacks.train_inverse(
    dec, undefended.split.local, locals_M, aux, attacks.InverseConfig(epochs=8, batch_size=32, lr=3e-3)
  )
  h = jnp.stack([defense.uploaded_states(t, x_te) for t in (undefended, defended)])
  x_hat = attacks.invert(dec, state.params, h)
  mse_none, mse_def = (float(jnp.mean((x_hat[m] - x_te) ** 2)) for m in range(2))
  assert mse_def > 2 * mse_none


def test_the_studys_fingerprint_penalty_is_the_fingerprint_papers_and_embeds(undefended):
  from jipguard import fingerprint  # noqa: PLC0415 (the two papers compose here, not in jipguard/)

  remote = split.split_variables(undefended.split, undefended.variables)[1]["params"]
  p = remote["Dense_0"]["kernel"].shape[0]
  rng = np.random.default_rng(0)
  proj, f_L = rng.standard_normal((16, p)).astype(np.float32), np.sign(rng.standard_normal(16)).astype(np.float32)
  ours, theirs = defense.fingerprint_penalty(proj, 0.2), fingerprint.Penalty(proj, layers=("Dense_0",), mu=0.2)
  np.testing.assert_allclose(ours(remote, f_L), theirs(remote, f_L), rtol=1e-6)
  f_hat = fingerprint.extract(remote, proj, ("Dense_0",))
  assert defense.fingerprint_bit_errors(ours, remote, f_L) == pytest.approx(np.mean(np.sign(f_hat) != f_L))
