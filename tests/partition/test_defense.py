"""Defenders: one ensemble equals one by one; a defender obfuscates and the model still learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jipguard import data
from jipguard.partition import attacks, defense, networks, split


def _tiny(designs, **kw):
  cfg = dict(num_owners=4, hidden=(32, 32, 16), epochs=1, warmup_epochs=0, batch_size=8, seed=3)
  return defense.DefenseConfig(designs=designs, **{**cfg, **kw})


def test_defenders_trained_as_one_ensemble_equal_defenders_trained_one_by_one():
  ds = data.load("fashion_mnist_subset")
  x, y = ds.images[:64], ds.labels[:64]
  together = defense.train(_tiny(("defender2",)), x, y)  # Four owners, one stacked ensemble.
  alone = defense.train(_tiny(("defender2",) * 4), x, y)  # Each owner its own group of one.
  assert [len(o) for _, o in together.config.groups()] == [4]
  assert [len(o) for _, o in alone.config.groups()] == [1, 1, 1, 1]
  for (_, owners), state in zip(alone.config.groups(), alone.defenders):
    (o,) = owners
    jax.tree.map(
      lambda a, b, o=o: np.testing.assert_allclose(a[o], b[0], atol=1e-5), together.defenders[0].params, state.params
    )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), together.params, alone.params)


def test_a_defender_raises_a_trained_attackers_mse_and_the_model_still_learns(fashion, undefended, defended):
  _, _, aux, x_te, y_te = fashion
  assert defended.history[-1]["privacy_mse"] > 0.05  # Its obfuscated images are far from the inputs.
  assert defense.accuracy(defended, x_te, y_te) > 0.3  # Chance is 0.1.
  locals_M = jax.tree.map(lambda *a: jnp.stack(a), undefended.local_params, defended.local_params)
  dec = networks.attack("attack3", x_te.shape[1:])
  state, _ = attacks.train_inverse(
    dec, undefended.split.local, locals_M, aux, attacks.InverseConfig(epochs=10, batch_size=32)
  )
  h = jnp.stack([defense.uploaded_states(t, x_te) for t in (undefended, defended)])
  x_hat = attacks.invert(dec, state.params, h)
  mse_none, mse_def = (float(jnp.mean((x_hat[m] - x_te) ** 2)) for m in range(2))
  assert mse_def > 2 * mse_none


def test_without_a_design_the_obfuscated_images_are_the_inputs(undefended, fashion):
  x_te = fashion[3]
  np.testing.assert_array_equal(defense.obfuscate(undefended, x_te)[0], x_te)


def test_configs_are_validated():
  with pytest.raises(ValueError, match="designs"):
    defense.DefenseConfig(designs=("nope",))
  with pytest.raises(ValueError, match="num_owners"):
    defense.DefenseConfig(designs=networks.MULTIPLE, num_owners=2)
  with pytest.raises(ValueError, match="batch_size"):
    defense.train(_tiny(()), np.zeros((8, 28, 28, 1), np.float32), np.zeros(8, np.int32))
  assert dataclasses.asdict(defense.DefenseConfig())["hidden"] == split.PAPER_HIDDEN


def test_a_fingerprint_penalty_on_the_remote_part_composes_with_partitioning():
  """Eq. 27 in Theta_r during Algorithm 1: ``fingerprint.Penalty`` as ``defense.train``'s penalty."""
  from jipguard import fingerprint  # noqa: PLC0415 (the two papers compose here, not in jipguard/)

  ds = data.load("fashion_mnist_subset")
  x, y = ds.images[:64], ds.labels[:64]
  rng = np.random.default_rng(0)
  proj = rng.standard_normal((8, 32)).astype(np.float32)  # X: L=8 x P=32 (remote Dense_0 is 32 -> 16).
  f_L = np.sign(rng.standard_normal(8)).astype(np.float32)
  cfg = _tiny(("defender2",), epochs=5, batch_size=4, lr_model=0.03)
  pen = fingerprint.Penalty(proj, layers=("Dense_0",), mu=1.0)
  marked = defense.train(cfg, x, y, penalty=pen, penalty_data=jnp.asarray(f_L))
  plain = defense.train(cfg, x, y)

  def error(t):
    remote = split.split_params(t.params, t.split.num_local)[1]
    return np.mean((fingerprint.extract(remote, proj, ("Dense_0",)) - f_L) ** 2)

  assert error(marked) < 0.5 * error(plain)


def test_every_owner_has_its_groups_design_and_obfuscate_takes_one_owner(defended, fashion):
  cfg = dataclasses.replace(defended.config, designs=networks.MULTIPLE, num_owners=20)
  designs = cfg.owner_designs()
  for name, owners in cfg.groups():
    assert all(designs[o] == name for o in owners)
  assert sorted(designs) == sorted(d for d in networks.MULTIPLE for _ in range(5))
  assert defense.DefenseConfig(num_owners=3).owner_designs() == ("", "", "")
  x = fashion[3][:8]
  x1, owner = defense.obfuscate(defended, x, owner=1)
  assert (owner == 1).all()
  np.testing.assert_allclose(x1[1::4], defense.obfuscate(defended, x)[0][1::4], atol=1e-6)  # Image n is owner n % 4's.
  assert not np.allclose(x1[0], defense.obfuscate(defended, x)[0][0])  # Owner 0's defender is another one.
  with pytest.raises(ValueError, match="owner"):
    defense.obfuscate(defended, x, owner=4)


def test_a_training_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
  ds = data.load("fashion_mnist_subset")
  x, y = ds.images[:64], ds.labels[:64]
  cfg = _tiny(("defender2", "single"), epochs=3, warmup_epochs=1)
  whole = defense.train(cfg, x, y)
  ckpt = str(tmp_path / "setting.partial.npz")

  def stop_after_two(record):
    if record["epoch"] == 2:
      raise KeyboardInterrupt  # A kill after epoch 2's checkpoint.

  with pytest.raises(KeyboardInterrupt):
    defense.train(cfg, x, y, checkpoint=ckpt, on_epoch_end=stop_after_two)
  seen = []
  resumed = defense.train(cfg, x, y, checkpoint=ckpt, on_epoch_end=seen.append)
  assert [r["epoch"] for r in seen] == [3]  # Only the missing epoch was trained.
  assert resumed.history == whole.history
  jax.tree.map(np.testing.assert_array_equal, resumed.variables, whole.variables)
  jax.tree.map(
    np.testing.assert_array_equal, [d.params for d in resumed.defenders], [d.params for d in whole.defenders]
  )
  with pytest.raises(ValueError, match="another training"):
    defense.train(dataclasses.replace(cfg, defender_weight=0.5), x, y, checkpoint=ckpt)
