"""Attacks: the positive controls (no defender: both attacks reconstruct well) and the metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jipguard.partition import attacks, defense, networks


def _baseline_mse(aux, x):
  """MSE of the best input-blind guess: the auxiliary images' mean image."""
  return float(np.mean((x - aux.mean(0)) ** 2))


def test_positive_control_inverse_networks_reconstruct_undefended_states(fashion, undefended):
  _, _, aux, x_te, y_te = fashion
  locals_M = jax.tree.map(lambda a: a[None], undefended.local_params)
  h = jnp.asarray(defense.uploaded_states(undefended, x_te))[None]
  clean = float(np.mean(defense.classify(undefended, x_te) == y_te))
  for name in ("attack3", "attack8"):
    dec = networks.attack(name, x_te.shape[1:])
    state, losses = attacks.train_inverse(
      dec, undefended.split.local, locals_M, aux, attacks.InverseConfig(epochs=6, batch_size=32)
    )
    assert losses[-1][0] < losses[0][0]
    m = attacks.reconstruction_metrics(
      x_te, attacks.invert(dec, state.params, h)[0], y_te, lambda z: defense.classify(undefended, z)
    )
    assert m["mse"] < 0.5 * _baseline_mse(aux, x_te), (name, m)
    assert m["ssim"] > 0.4 and m["reprint_accuracy"] > clean - 0.15, (name, m)


def test_positive_control_the_optimisation_attack_reconstructs_undefended_states(fashion, undefended):
  _, _, aux, x_te, y_te = fashion
  x, y = x_te[:50], y_te[:50]
  h = jnp.asarray(defense.uploaded_states(undefended, x))
  x_hat = attacks.optimisation_attack(
    undefended.split.local, undefended.local_params, h, image_shape=x.shape[1:], tv_weight=0.01
  )
  m = attacks.reconstruction_metrics(x, x_hat, y, lambda z: defense.classify(undefended, z))
  assert m["mse"] < 0.5 * _baseline_mse(aux, x) and m["ssim"] > 0.4, m


def test_metrics_of_perfect_and_of_bad_reconstructions():
  x = np.asarray(jax.random.uniform(jax.random.key(0), (4, 28, 28, 1)))
  m = attacks.reconstruction_metrics(x, x, np.zeros(4), lambda z: np.zeros(len(z)))
  assert m["mse"] == 0 and m["ssim"] == pytest.approx(1.0, abs=1e-5) and m["reprint_accuracy"] == 1
  assert attacks.ssim(x, 1 - x).mean() < 0.1
  with pytest.raises(ValueError, match="shape"):
    attacks.reconstruction_metrics(x, x[:2], np.zeros(4), lambda z: z)
  with pytest.raises(ValueError, match="finite"):
    attacks.reconstruction_metrics(x, x * np.nan, np.zeros(4), lambda z: z)
  with pytest.raises(ValueError, match="attack"):
    networks.attack("attack9", (28, 28, 1))
  with pytest.raises(ValueError, match="conv"):
    networks.attack("cifar_attack1", (28, 28, 1))  # A conv decoder needs a conv local part.


def test_fit_inverse_on_the_local_states_is_train_inverse(fashion, undefended):
  aux = fashion[2][:128]
  locals_M = jax.tree.map(lambda a: a[None], undefended.local_params)
  dec = networks.attack("attack8", aux.shape[1:])
  cfg = attacks.InverseConfig(epochs=1, batch_size=32)
  a, _ = attacks.train_inverse(dec, undefended.split.local, locals_M, aux, cfg)
  h = jnp.asarray(defense.uploaded_states(undefended, aux))[None]
  b, _ = attacks.fit_inverse(dec, h, aux, cfg)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  with pytest.raises(ValueError, match="states"):
    attacks.fit_inverse(dec, h[:, :64], aux, cfg)


def test_positive_control_a_colluding_owner_lets_the_server_invert_its_defender(fashion, defended):
  """The colluding-owner attack (Table III): trained on the pairs (x_aux, what owner 0's defender
  uploads for them), it reconstructs owner 0's test images far better than the attacker that
  only knows f_l, and better than the input-blind guess (not as well as the undefended positive
  control: the defender's images lost information, privacy MSE ~0.29)."""
  _, _, aux, x_te, _ = fashion
  mine = np.arange(len(x_te)) % defended.config.num_owners == 0
  x0 = x_te[mine]
  h0 = jnp.asarray(defense.uploaded_states(defended, x0, owner=0))[None]
  np.testing.assert_allclose(h0[0], defense.uploaded_states(defended, x_te)[mine], atol=1e-5)
  dec = networks.attack("attack3", x_te.shape[1:])
  cfg = attacks.InverseConfig(epochs=10, batch_size=32)
  locals_M = jax.tree.map(lambda a: a[None], defended.local_params)
  blind, _ = attacks.train_inverse(dec, defended.split.local, locals_M, aux, cfg)
  colluding, _ = attacks.fit_inverse(dec, defense.uploaded_states(defended, aux, owner=0)[None], aux, cfg)
  mse = {
    name: float(np.mean((np.asarray(attacks.invert(dec, s.params, h0)[0]) - x0) ** 2))
    for name, s in (("blind", blind), ("colluding", colluding))
  }
  guess = _baseline_mse(aux, x0)
  assert mse["blind"] > guess, mse  # Against the defender the f_l-only attacker is worse than a blind guess,
  assert mse["colluding"] < 0.6 * guess and mse["colluding"] < 0.5 * mse["blind"], mse  # the colluder's is not.
