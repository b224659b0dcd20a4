"""Embedding: the regulariser drives the extracted code to the customer's fingerprint; one
ensemble equals customers fine-tuned one by one; averaged copies trace their colluders; pruned
and fine-tuned copies trace their owner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jipguard import data, ensemble, models
from jipguard.fingerprint import codes, embedding, tracing, vendor

_MODEL = models.MLP(num_classes=10, hidden=(128, 128))  # On 8x8 digits: P = 64 + 128 = 192.
_LAYERS = ("Dense_0", "Dense_1")
_BOOK = codes.paper_codebook(49, 7)  # 2 x 56 codes, L = 98 + 16 community bits.
_LAYOUT = embedding.Layout(crc_bits=16, code_lengths=(49, 49))
_TX = optax.adam(3e-3)
_STD = 4.0  # Fits in the few steps of these tests (the default 1.0 needs ~3x more; docs/fingerprint.md).


@functools.cache
def _setup():
  train, test = data.load("digits", "train"), data.load("digits", "test")
  base_trainer = ensemble.EnsembleTrainer(_MODEL, _TX, batch_size=64)
  base = base_trainer.fit(jax.random.key(0)[None], train.images, train.labels, epochs=4, progress=False).state
  params0 = jax.tree.map(lambda a: a[0], base.params)
  secret = embedding.Secret(
    seed=12345,
    length=_LAYOUT.length,
    size=embedding.theta_size(params0, embedding.layer_predicate(_LAYERS)),
    code_lengths=_LAYOUT.code_lengths,
  )
  penalty = embedding.Penalty(secret.projection(_STD), _LAYERS, mu=embedding.PAPER_MU)
  trainer = ensemble.EnsembleTrainer(_MODEL, _TX, batch_size=64, penalty=penalty)
  customers = np.array([5, 700, 1500, 3100])
  rng = np.random.default_rng(0)
  crc = rng.integers(0, 2, (len(customers), 16))
  bases = secret.bases()
  f = np.stack([embedding.fingerprint_vector(_BOOK.e(c), bases, _LAYOUT, b) for c, b in zip(customers, crc)])
  keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.key(1), c))(jnp.asarray(customers))
  fit = vendor.embed(trainer, base, f, keys, train.images, train.labels, epochs=6, progress=False)
  return train, test, base, secret, penalty, trainer, customers, f, keys, fit


def test_regulariser_drives_the_extracted_code_to_the_fingerprint():
  train, test, base, secret, _, _, customers, f, _, fit = _setup()
  bases = secret.bases()
  f_hat = embedding.extract(fit.state.params, secret.projection(_STD), _LAYERS, members=True)
  assert np.all(embedding.bit_error_rate(f_hat, f, bases, _LAYOUT) == 0)
  _, e_hat = embedding.coefficients(f_hat, bases, _LAYOUT)
  assert np.abs(e_hat - _BOOK.e(customers).T).max() < 0.15  # Inside tau = 0.85's margin.
  # The base model carries no fingerprint: its bits are about half wrong.
  f_base = embedding.extract(jax.tree.map(lambda a: a[0], base.params), secret.projection(_STD), _LAYERS)
  assert embedding.bit_error_rate(f_base, f[0], bases, _LAYOUT) > 0.25
  for m, c in enumerate(customers):
    d = tracing.decode_coefficients(e_hat[m], _BOOK, embedding.PAPER_TAU)
    assert d.status == "exact" and d.accused == (c,)
  # Accuracy preserved (within 3 points of the base).
  acc_base = ensemble.accuracy(_MODEL, base.variables, test.images, test.labels)[0]
  acc = ensemble.accuracy(_MODEL, fit.state.variables, test.images, test.labels)
  assert acc.min() > acc_base - 0.03, (acc, acc_base)


def test_one_ensemble_equals_customers_one_by_one():
  train, _, base, _, _, trainer, _, f, keys, fit = _setup()
  for m in (0, 3):
    alone = vendor.embed(
      trainer, base, f[m : m + 1], keys[m : m + 1], train.images, train.labels, epochs=6, progress=False
    )
    for a, b in zip(jax.tree.leaves(fit.state.member(m).params), jax.tree.leaves(alone.state.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_averaged_copies_trace_their_colluders_and_still_work():
  _, test, base, secret, _, _, customers, _, _, fit = _setup()
  for coalition in ([0, 1], [0, 2, 3], [0, 1, 2, 3]):
    avg = vendor.average(fit.state.params, coalition)
    f_hat = embedding.extract(avg, secret.projection(_STD), _LAYERS, members=True)[0]
    _, e_hat = embedding.coefficients(f_hat, secret.bases(), _LAYOUT)
    d = tracing.decode_coefficients(e_hat, _BOOK, embedding.PAPER_TAU, issued=customers)
    assert d.status == "exact" and d.accused == tuple(customers[coalition])
    acc = ensemble.accuracy(_MODEL, {"params": avg}, test.images, test.labels)[0]
    assert acc > ensemble.accuracy(_MODEL, base.variables, test.images, test.labels)[0] - 0.03


@pytest.mark.parametrize(("alpha", "traced"), [(0.1, True), (0.6, False)])
def test_pruned_copy_traces_its_owner_or_names_nobody(alpha, traced):
  """Magnitude pruning of the fingerprinted layers: at alpha = 10% the owner is named; at 60%
  (without the sparse fine-tuning that would restore it) the extracted coefficients leave
  tau's margin and the decoder names nobody rather than a wrong customer."""
  _, _, _, secret, _, _, customers, _, _, fit = _setup()
  pruned = vendor.prune(fit.state.params, _LAYERS, alpha)
  zeros = np.mean(np.asarray(pruned["Dense_0"]["kernel"]) == 0)
  assert abs(zeros - alpha) < 0.02
  f_hat = embedding.extract(pruned, secret.projection(_STD), _LAYERS, members=True)
  _, e_hat = embedding.coefficients(f_hat, secret.bases(), _LAYOUT)
  named = [tracing.decode_coefficients(e_hat[m], _BOOK, embedding.PAPER_TAU).accused for m in range(len(customers))]
  assert all(set(a) <= {c} for a, c in zip(named, customers))
  assert all(a == (c,) for a, c in zip(named, customers)) == traced, named


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_fine_tuned_copy_traces_its_owner(alpha):
  """Fine-tuning without the regulariser for 10% of the base's training batches (the paper's
  attacker), after pruning alpha of the fingerprinted layers (sparse fine-tuning: pruned weights
  stay zero), keeps the owners traced."""
  train, _, _, secret, _, _, customers, _, keys, fit = _setup()
  steps = int(0.1 * 4 * (len(train.images) // 64))  # 10% of the base's 4 epochs.
  idx = np.broadcast_to(np.arange(steps * 64), (len(customers), steps * 64))
  attacker = ensemble.EnsembleTrainer(_MODEL, vendor.masked(optax.adam(1e-3)), batch_size=64)
  pruned = vendor.prune(fit.state.params, _LAYERS, alpha)
  init = ensemble.EnsembleState(params=pruned, batch_stats={}, opt_state=None)
  tuned = attacker.fit(keys, train.images, train.labels, indices=idx, epochs=1, init_state=init, progress=False)
  kernel = np.asarray(tuned.state.params["Dense_0"]["kernel"])
  assert np.array_equal(kernel == 0, np.asarray(pruned["Dense_0"]["kernel"]) == 0)  # Sparse.
  assert not np.allclose(kernel, np.asarray(pruned["Dense_0"]["kernel"]))
  f_hat = embedding.extract(tuned.state.params, secret.projection(_STD), _LAYERS, members=True)
  _, e_hat = embedding.coefficients(f_hat, secret.bases(), _LAYOUT)
  for m, c in enumerate(customers):
    assert tracing.decode_coefficients(e_hat[m], _BOOK, embedding.PAPER_TAU).accused == (c,)


def test_penalty_and_extraction_errors():
  _, _, _, secret, penalty, trainer, _, f, keys, _ = _setup()
  with pytest.raises(ValueError, match="no kernel matches"):
    embedding.select_kernels({"Dense_0": {"kernel": jnp.zeros((3, 2))}}, embedding.layer_predicate(("Conv_9",)))
  with pytest.raises(ValueError, match="projection takes"):
    embedding.extract({"Dense_0": {"kernel": jnp.zeros((3, 2))}}, secret.projection(_STD), ("Dense_0",))
  with pytest.raises(ValueError, match="customers x L"):
    vendor.embed(trainer, None, f[:, :5], keys, None, None, epochs=1)
  assert "seed" not in repr(secret) and "12345" not in repr(secret)
  assert hash(penalty) == hash(penalty) and penalty != embedding.Penalty(penalty.projection, _LAYERS)
