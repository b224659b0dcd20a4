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
