"""The paper's Fig. 5 attack: a pix2pix conditional GAN from sanitized images to originals.

Isola et al. (2017): a U-Net generator G(x~) and a PatchGAN discriminator D(x~, x) that
scores overlapping patches as real or generated; G minimises the adversarial loss plus
``l1_weight`` times the L1 distance to the original. Trained on the adversary's pairs
(sanitized D_A, D_A) (``attacks.Adversary``) and applied to the shared buyer images.

Differences from pix2pix, for 28 x 28 images on a CPU: two down / up levels (images are
padded to a multiple of 4 and cropped back), no normalisation layers and no dropout in G (the
noise of pix2pix's dropout is not needed to score reconstructions), Adam(2e-4, b1 = 0.5) as
in the paper. Inputs are standardised with D~_A's mean and standard deviation (IPProtect's
images are ~N(0, 1), InstaHide's in [-1, 1], Identity's in [0, 1]); outputs are in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class GANConfig:
  """pix2pix's training settings."""

  features: tuple[int, ...] = (32, 64)  # Channels of the down-sampling levels (G and D).
  epochs: int = 20  # Passes over the pairs.
  batch_size: int = 32  # Pairs per step (the last partial batch of an epoch is dropped).
  learning_rate: float = 2e-4  # Adam step of G and D (pix2pix).
  beta1: float = 0.5  # Adam's b1 (pix2pix).
  l1_weight: float = 100.0  # lambda of the L1 term (pix2pix).

  def __post_init__(self):
    if not self.features or min(self.features) < 1:
      raise ValueError(f"features must be positive channel counts, got {self.features}")
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
    if not self.learning_rate > 0 or self.l1_weight < 0:
      raise ValueError(f"learning_rate must be > 0 and l1_weight >= 0, got {self.learning_rate}, {self.l1_weight}")


class UNet(nn.Module):
  """pix2pix's generator: strided convolutions down, transposed convolutions up, skips between."""

  features: Sequence[int] = (32, 64)
  out_channels: int = 1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h, skips = x_BxHxWxC, []
    for f in self.features:
      skips.append(h)
      h = nn.leaky_relu(nn.Conv(f, (4, 4), strides=2)(h), 0.2)
    h = nn.relu(nn.Conv(self.features[-1], (3, 3))(h))
    for f, skip in zip(reversed(self.features), reversed(skips)):
      h = nn.relu(nn.ConvTranspose(f, (4, 4), strides=(2, 2))(h))
      h = jnp.concatenate([h, skip], axis=-1)
    return nn.sigmoid(nn.Conv(self.out_channels, (3, 3))(h))


class PatchGAN(nn.Module):
  """pix2pix's discriminator: one real / fake logit per receptive-field patch of (x~, x)."""

  features: Sequence[int] = (32, 64)

  @nn.compact
  def __call__(self, cond_BxHxWxC: jax.Array, image_BxHxWxC: jax.Array) -> jax.Array:
    h = jnp.concatenate([cond_BxHxWxC, image_BxHxWxC], axis=-1)
    for f in self.features:
      h = nn.leaky_relu(nn.Conv(f, (4, 4), strides=2)(h), 0.2)
    return nn.Conv(1, (3, 3))(h)


def _bce(logits: jax.Array, real: bool) -> jax.Array:
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, float(real))))


def _step(state, batch, *, gen, disc, cfg):
  """One pix2pix step: D on (real, detached fake), then G on adversarial + L1."""
  g_params, d_params, g_opt, d_opt = state
  cond, target = batch
  tx = optax.adam(cfg.learning_rate, b1=cfg.beta1)
  fake = gen.apply(g_params, cond)

  def d_loss(p):
    return 0.5 * (
      _bce(disc.apply(p, cond, target), True) + _bce(disc.apply(p, cond, jax.lax.stop_gradient(fake)), False)
    )

  def g_loss(p):
    out = gen.apply(p, cond)
    adv = _bce(disc.apply(d_params, cond, out), True)
    l1 = jnp.mean(jnp.abs(out - target))
    return adv + cfg.l1_weight * l1, (adv, l1)

  dl, d_grad = jax.value_and_grad(d_loss)(d_params)
  d_updates, d_opt = tx.update(d_grad, d_opt)
  (_, (adv, l1)), g_grad = jax.value_and_grad(g_loss, has_aux=True)(g_params)
  g_updates, g_opt = tx.update(g_grad, g_opt)
  state = (optax.apply_updates(g_params, g_updates), optax.apply_updates(d_params, d_updates), g_opt, d_opt)
  return state, jnp.stack([dl, adv, l1])


@functools.partial(jax.jit, static_argnames=("gen", "disc", "cfg"))
def _epoch(state, cond_SxBxHxWxC, target_SxBxHxWxC, *, gen, disc, cfg):
  """One epoch as a scan over its batches; returns the state and the mean (D, G-adv, L1) losses."""
  state, losses = jax.lax.scan(
    functools.partial(_step, gen=gen, disc=disc, cfg=cfg), state, (cond_SxBxHxWxC, target_SxBxHxWxC)
  )
  return state, losses.mean(0)


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
  h, w = x.shape[1:3]
  return np.pad(x, [(0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)])


@dataclasses.dataclass(frozen=True)
class Pix2Pix:
  """A trained generator: call it on sanitized images to get reconstructions in [0, 1]."""

  generator: UNet
  params: Any
  mean: float  # Input standardisation (D~_A's statistics).
  std: float
  multiple: int  # Inputs are padded to a multiple of this.

  def __call__(self, sanitized_NxHxWxC: np.ndarray, batch: int = 256) -> np.ndarray:
    x = np.asarray(sanitized_NxHxWxC, np.float32)
    h, w = x.shape[1:3]
    z = _pad((x - self.mean) / self.std, self.multiple)
    apply = jax.jit(self.generator.apply)
    out = np.concatenate([np.asarray(apply(self.params, z[s : s + batch])) for s in range(0, len(z), batch)])
    return out[:, :h, :w].astype(np.float32)


def fit(
  key: jax.Array,
  sanitized_NxHxWxC: np.ndarray,
  targets_NxHxWxC: np.ndarray,
  cfg: GANConfig = GANConfig(),
  *,
  log: Callable[[dict[str, float]], None] | None = None,
) -> Pix2Pix:
  """Trains pix2pix on pairs (sanitized, original); ``log`` receives each epoch's mean losses."""
  x = np.asarray(sanitized_NxHxWxC, np.float32)
  y = np.asarray(targets_NxHxWxC, np.float32)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"pairs must be two NHWC arrays of one shape, got {x.shape} and {y.shape}")
  steps = len(x) // cfg.batch_size
  if steps < 1:
    raise ValueError(f"{len(x)} pairs are fewer than one batch of {cfg.batch_size}")
  multiple = 2 ** len(cfg.features)
  mean, std = float(x.mean()), float(x.std()) or 1.0
  xz, yz = _pad((x - mean) / std, multiple), _pad(y, multiple)
  gen, disc = UNet(cfg.features, y.shape[-1]), PatchGAN(cfg.features)
  k_g, k_d, k_perm = jax.random.split(key, 3)
  g_params = gen.init(k_g, xz[:1])
  d_params = disc.init(k_d, xz[:1], yz[:1])
  tx = optax.adam(cfg.learning_rate, b1=cfg.beta1)
  state = (g_params, d_params, tx.init(g_params), tx.init(d_params))
  for epoch in range(cfg.epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, epoch), len(x)))[: steps * cfg.batch_size]
    shape = (steps, cfg.batch_size, *xz.shape[1:])
    state, losses = _epoch(state, xz[perm].reshape(shape), yz[perm].reshape(shape), gen=gen, disc=disc, cfg=cfg)
    losses = np.asarray(losses)
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(f"pix2pix losses became non-finite at epoch {epoch}; lower the learning rate")
    if log is not None:
      log({"epoch": epoch, "d_loss": float(losses[0]), "g_adv": float(losses[1]), "l1": float(losses[2])})
  return Pix2Pix(gen, state[0], mean, std, multiple)
