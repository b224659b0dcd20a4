"""The attacks on the uploaded hidden states, and the metrics of their reconstructions.

The attacker is the honest-but-curious server (section II-B): it knows the local part
``f_l`` (it sends it to the owners) and sees every uploaded state ``H' = f_l(x')``, but not
the owners' private defenders nor their images.

* Inverse network (:func:`train_inverse`, :func:`invert`): a decoder ``H -> X`` of
  ``networks.ATTACKS`` trained on auxiliary images the attacker owns, on the pairs
  ``(f_l(x_aux), x_aux)``, then applied to the uploaded states. M decoders of one design train
  as one stacked ensemble (``ensemble.EnsembleState``, the step vmapped): member m attacks
  target m's local part (``local_params_M``), e.g. the no / single / multiple defender models.
* Optimisation attack (:func:`optimisation_attack`): ``argmin_x ||f_l(x) - H'||^2`` over
  images ``x = sigmoid(z)`` in [0, 1], Adam from the grey image ``z = 0``.
* Metrics (:func:`reconstruction_metrics`): per-image MSE, SSIM (``dm_pix.ssim``, 11x11
  Gaussian window, sigma 1.5, on [0, 1] pixels) and reprint accuracy: a classifier's accuracy on
  the reconstructions; optionally DPD_aux (:mod:`perceptual`), the stand-in for the paper's
  DPD, whose pretrained perceptual network does not exist offline.

Positive control (tests/partition/test_attacks.py): without a defender both attacks recover
their inputs well.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import ensemble
from jipguard.partition import networks, split

PyTree = Any


@dataclasses.dataclass(frozen=True)
class InverseConfig:
  """Training of the inverse networks."""

  epochs: int = 10  # Passes over the auxiliary images.
  batch_size: int = 64  # Auxiliary images per step.
  lr: float = 1e-3  # Adam learning rate.
  seed: int = 0  # Initialisation and batches.


def _local_states(local, local_params_M, x_NxHxWxC):
  """``h_MxNxD``: each target's local part on the auxiliary images."""
  return jax.vmap(lambda p: local.apply(split.as_variables(p), x_NxHxWxC))(local_params_M)


def _unroll(decoder) -> bool:
  """Conv decoders' members step one by one on the CPU backend (see ``ensemble.members.apply``)."""
  return isinstance(decoder, networks.ConvDecoder) and jax.default_backend() == "cpu"


def _inverse_step(state, h_BxD, x_B, key, *, decoder, tx):
  """One member's MSE step on its batch (vmapped over members)."""

  def loss(p):
    x_hat = decoder.apply({"params": p}, h_BxD, train=True, rngs={"dropout": key})
    return jnp.mean((x_hat - x_B) ** 2)

  value, grads = jax.value_and_grad(loss)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return dataclasses.replace(state, params=optax.apply_updates(state.params, updates), opt_state=opt_state), value


@functools.partial(jax.jit, static_argnames=("decoder", "tx", "batch_size"), donate_argnums=(0,))
def _inverse_epoch(state, h_MxNxD, x_NxHxWxC, key, *, decoder, tx, batch_size):
  n = x_NxHxWxC.shape[0]
  steps = n // batch_size
  perm_key, dropout_key = jax.random.split(key)
  order = jax.random.permutation(perm_key, n)[: steps * batch_size].reshape(steps, batch_size)
  step = functools.partial(_inverse_step, decoder=decoder, tx=tx)

  def body(state, t):
    idx = order[t]
    keys = jax.random.split(jax.random.fold_in(dropout_key, t), h_MxNxD.shape[0])
    state, loss = ensemble.members.map_members(
      lambda s, h, k: step(s, h, x_NxHxWxC[idx], k), state, h_MxNxD[:, idx], keys, unroll=_unroll(decoder)
    )
    return state, loss

  state, loss_TxM = jax.lax.scan(body, state, jnp.arange(steps))
  return state, loss_TxM.mean(0)


def train_inverse(
  decoder, local, local_params_M: PyTree, x_aux: np.ndarray, cfg: InverseConfig = InverseConfig()
) -> tuple[ensemble.EnsembleState, list[np.ndarray]]:
  """M inverse networks of one design, member m on ``(f_l(local_params_M[m], x_aux), x_aux)``
  (``local_params_M``: the stacked local parts' variables, or an MLP's bare params).

  Returns:
    The stacked decoders, and each epoch's training MSE per member (M floats).

  Raises:
    ValueError: Fewer auxiliary images than one batch.
  """
  x = jnp.asarray(x_aux, jnp.float32)
  return fit_inverse(decoder, _local_states(local, local_params_M, x), x, cfg)


def fit_inverse(
  decoder, h_MxNxD: np.ndarray | jax.Array, x_aux: np.ndarray, cfg: InverseConfig = InverseConfig()
) -> tuple[ensemble.EnsembleState, list[np.ndarray]]:
  """M inverse networks of one design, member m on the pairs ``(h_MxNxD[m, n], x_aux[n])``: any
  states the attacker holds for its auxiliary images (:func:`train_inverse`'s ``f_l(x_aux)``, or
  what a colluding owner's defender makes of them).

  Returns:
    The stacked decoders, and each epoch's training MSE per member (M floats).

  Raises:
    ValueError: Fewer auxiliary images than one batch, or states that are not one per image.
  """
  x = jnp.asarray(x_aux, jnp.float32)
  h = jnp.asarray(h_MxNxD, jnp.float32)
  if x.shape[0] < cfg.batch_size:
    raise ValueError(f"{x.shape[0]} auxiliary images, fewer than batch_size={cfg.batch_size}")
  if h.ndim < 3 or h.shape[1] != x.shape[0]:
    raise ValueError(f"states must be M x N x ... with N = {x.shape[0]} images, got {h.shape}")
  m = h.shape[0]
  key = jax.random.key(cfg.seed)
  tx = optax.adam(cfg.lr)
  state = ensemble.members.init(jax.random.split(jax.random.fold_in(key, 0), m), h[0, :1], model=decoder, tx=tx)
  losses = []
  for epoch in range(cfg.epochs):
    state, loss = _inverse_epoch(
      state, h, x, jax.random.fold_in(key, epoch + 1), decoder=decoder, tx=tx, batch_size=cfg.batch_size
    )
    losses.append(np.asarray(loss))
  return state, losses


@functools.partial(jax.jit, static_argnames=("decoder",))
def invert(decoder, params_M: PyTree, h_MxNxD: jax.Array) -> jax.Array:
  """Member m's reconstruction of target m's states: ``x_hat_MxNxHxWxC``."""
  return ensemble.members.map_members(
    lambda p, h: decoder.apply({"params": p}, h), params_M, h_MxNxD, unroll=_unroll(decoder)
  )


@functools.partial(jax.jit, static_argnames=("local", "image_shape", "steps"))
def optimisation_attack(
  local,
  local_params: PyTree,
  h_NxD: jax.Array,
  *,
  image_shape: tuple[int, ...],
  steps: int = 300,
  lr: float = 0.1,
  tv_weight: float = 0.0,
) -> jax.Array:
  """``x_hat = sigmoid(z*)``, ``z* = argmin_z mean((f_l(sigmoid(z)) - h)^2) + tv_weight * TV(sigmoid(z))``
  per image (Adam from z = 0; TV the mean absolute difference of neighbouring pixels, the
  smoothness prior of He et al.'s regularised maximum-likelihood attack).

  The loss is a sum over images of per-image losses, so each image's search is independent.
  """
  tx = optax.adam(lr)
  z = jnp.zeros((h_NxD.shape[0], *image_shape), jnp.float32)

  def loss(z):
    x = jax.nn.sigmoid(z)
    h = local.apply(split.as_variables(local_params), x)
    fit = jnp.mean(((h - h_NxD) ** 2).reshape(h.shape[0], -1), axis=-1)
    tv = jnp.mean(jnp.abs(jnp.diff(x, axis=1)), axis=(1, 2, 3)) + jnp.mean(jnp.abs(jnp.diff(x, axis=2)), axis=(1, 2, 3))
    return jnp.sum(fit + tv_weight * tv)

  def body(carry, _):
    z, opt = carry
    g = jax.grad(loss)(z)
    updates, opt = tx.update(g, opt, z)
    return (optax.apply_updates(z, updates), opt), None

  (z, _), _ = jax.lax.scan(body, (z, tx.init(z)), None, length=steps)
  return jax.nn.sigmoid(z)


def ssim(x_NxHxWxC: np.ndarray, x_hat_NxHxWxC: np.ndarray) -> np.ndarray:
  """Per-image SSIM (``dm_pix.ssim``: Gaussian 11x11 window, sigma 1.5, max value 1)."""
  return np.asarray(dm_pix.ssim(jnp.asarray(x_NxHxWxC), jnp.asarray(x_hat_NxHxWxC), max_val=1.0))


def reconstruction_metrics(
  x: np.ndarray,
  x_hat: np.ndarray,
  labels: np.ndarray,
  classify: Callable[[np.ndarray], np.ndarray],
  distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
  """``mse`` (per pixel), ``ssim`` (mean over images), ``reprint_accuracy`` (``classify`` on
  ``x_hat``) and, given a per-image ``distance`` (``perceptual.PerceptualDistance``), its mean as
  ``dpd_aux``.

  Raises:
    ValueError: Shapes differ, or a reconstruction is not finite.
  """
  x, x_hat = np.asarray(x, np.float32), np.asarray(x_hat, np.float32)
  if x.shape != x_hat.shape:
    raise ValueError(f"originals {x.shape} and reconstructions {x_hat.shape} differ in shape")
  if not np.all(np.isfinite(x_hat)):
    raise ValueError("reconstructions are not finite")
  out = {
    "mse": float(np.mean((x - x_hat) ** 2)),
    "ssim": float(np.mean(ssim(x, x_hat))),
    "reprint_accuracy": float(np.mean(classify(x_hat) == np.asarray(labels))),
  }
  if distance is not None:
    out["dpd_aux"] = float(np.mean(distance(x, x_hat)))
  return out
