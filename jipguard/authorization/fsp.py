"""Feature-space perturbation (FSP): Inkawhich et al.'s activation attack (CVPR 2019, paper ref. [4]).

Each image x is perturbed within an L_inf ball of radius epsilon so that its features at one
layer of a surrogate model move towards those of a *target image* of another class:

    minimise  || f_L(x') - f_L(x_t) ||_2^2   subject to  ||x' - x||_inf <= epsilon, x' in [0, 1],

by iterative sign-gradient steps of size ``step`` (default ``epsilon / iterations``) with
MI-FGSM momentum (the gradient normalised by its mean absolute value, accumulated with decay
``momentum``; 0 turns momentum off). The paper gives no settings; the defaults are Inkawhich's
published ones (epsilon 0.07 on [0, 1] pixels, 10 iterations, momentum 1.0), each a flag.

Target images (:func:`choose_targets`, on the host): for each image, a class other than its
own (by default the next class, ``y + 1 mod K``, the same for every image of a class; or one
drawn uniformly), and among ``candidates`` random images of that class the one whose features
are farthest from the source's (Inkawhich's choice of a distant target, which moves the
features the most).

:func:`perturb_one` is written for one image; :func:`perturb` is it vmapped over a batch and
jitted once (the surrogate's module and the config static). The surrogate is trained as a
one-member stacked ensemble (:func:`train_surrogate`, ``jipguard.ensemble``).

Guarantees (tests/authorization/test_fsp.py): ``|x' - x| <= epsilon`` and ``x'`` in [0, 1];
the feature distance to the target falls; a second batch of the same shape compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import ensemble, models

PyTree = Any
TARGET_CLASSES = ("random", "next")


@dataclasses.dataclass(frozen=True)
class FSPConfig:
  """Settings of the feature-space perturbation.

  Attributes:
    epsilon: L_inf radius on [0, 1] pixels (Inkawhich: 0.07).
    iterations: Sign-gradient steps (Inkawhich: 10).
    step: Step size; 0 means ``epsilon / iterations``.
    momentum: MI-FGSM decay of the accumulated gradient (Inkawhich: 1.0); 0 turns it off.
    layer: Name of the surrogate's sub-module whose output is the feature map (for
      ``resnet8`` / ``resnet20``: ``ResidualBlock_<i>``; for ``cnn``: e.g. ``BatchNorm_2``).
    candidates: Random images of the target class among which the farthest is the target.
    target_class: ``next`` (class ``y + 1 mod K`` for every image of class y: a class-consistent
      mapping, as in the adversarial-poisoning literature; the default, because only it made the
      protected images train clearly worse models in docs/authorization.md's study) or ``random``
      (a random other class per image, Inkawhich's transfer setting).
  """

  epsilon: float = 0.07
  iterations: int = 10
  step: float = 0.0
  momentum: float = 1.0
  layer: str = "ResidualBlock_1"
  candidates: int = 20
  target_class: str = "next"

  def __post_init__(self):
    if not 0 < self.epsilon <= 1:
      raise ValueError(f"--epsilon must lie in (0, 1], got {self.epsilon}")
    if not 0 <= self.iterations <= 1000:
      raise ValueError(f"--iterations must lie in [0, 1000], got {self.iterations}")
    if not 0 <= self.step <= 1 or not 0 <= self.momentum <= 10:
      raise ValueError(f"--step must lie in [0, 1] and --momentum in [0, 10], got {self.step}, {self.momentum}")
    if self.target_class not in TARGET_CLASSES:
      raise ValueError(f"--target_class must be one of {TARGET_CLASSES}, got {self.target_class!r}")
    if self.candidates < 1:
      raise ValueError(f"--candidates must be >= 1, got {self.candidates}")

  @property
  def step_size(self) -> float:
    return self.step or self.epsilon / max(self.iterations, 1)


def features(model: nn.Module, variables: PyTree, x_HxWxC: jax.Array, layer: str) -> jax.Array:
  """The flattened output of sub-module ``layer`` of ``model`` on ONE image (inference mode)."""
  _, state = model.apply(variables, x_HxWxC[None], train=False, capture_intermediates=lambda mdl, _: mdl.name == layer)
  found = state.get("intermediates", {}).get(layer)
  if found is None:
    raise ValueError(f"the surrogate has no sub-module {layer!r} (--layer)")
  return found["__call__"][0].reshape(-1)


def check_layer(model: nn.Module, image_shape: tuple[int, ...], layer: str) -> None:
  """ValueError naming ``--layer`` unless ``model`` has a sub-module ``layer`` (shapes only: no
  compilation, no work)."""

  def probe():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return features(model, model.init(jax.random.key(0), x), x[0], layer)

  jax.eval_shape(probe)


def perturb_one(
  model: nn.Module, variables: PyTree, x_HxWxC: jax.Array, target_HxWxC: jax.Array, cfg: FSPConfig
) -> jax.Array:
  """FSP of one image towards one target image's features (see the module docstring)."""
  f_target = jax.lax.stop_gradient(features(model, variables, target_HxWxC, cfg.layer))
  loss = lambda z: jnp.sum((features(model, variables, z, cfg.layer) - f_target) ** 2)
  lo, hi = jnp.clip(x_HxWxC - cfg.epsilon, 0, 1), jnp.clip(x_HxWxC + cfg.epsilon, 0, 1)

  def body(_, carry):
    z, velocity = carry
    g = jax.grad(loss)(z)
    if cfg.momentum:
      velocity = cfg.momentum * velocity + g / (jnp.mean(jnp.abs(g)) + 1e-12)
    else:
      velocity = g
    return jnp.clip(z - cfg.step_size * jnp.sign(velocity), lo, hi), velocity

  # Unrolled: convolutions inside an XLA:CPU loop miss the fast kernels (jax-ml/jax#12868).
  z, _ = jax.lax.fori_loop(0, cfg.iterations, body, (x_HxWxC, jnp.zeros_like(x_HxWxC)), unroll=True)
  return z


def _perturb(variables, x_NxHxWxC, targets_NxHxWxC, *, model, cfg):
  return jax.vmap(perturb_one, in_axes=(None, None, 0, 0, None))(model, variables, x_NxHxWxC, targets_NxHxWxC, cfg)


_perturb_jit = ensemble.jit(_perturb, static_argnames=("model", "cfg"))


def perturb(
  model: nn.Module, variables: PyTree, x_NxHxWxC: jax.Array, targets_NxHxWxC: jax.Array, cfg: FSPConfig
) -> jax.Array:
  """:func:`perturb_one` over a batch: vmapped, jitted once per shape (with the CPU convolution
  options of ``ensemble.jit``)."""
  return _perturb_jit(variables, x_NxHxWxC, targets_NxHxWxC, model=model, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _batch_features(model, variables, x_NxHxWxC, layer):
  return jax.vmap(features, in_axes=(None, None, 0, None))(model, variables, x_NxHxWxC, layer)


def batch_features(
  model: nn.Module, variables: PyTree, x_NxHxWxC: np.ndarray, layer: str, batch: int = 256
) -> np.ndarray:
  """Features of many images, ``N x D`` on the host, in batches (the last one padded)."""
  out = []
  for lo in range(0, len(x_NxHxWxC), batch):
    chunk = np.asarray(x_NxHxWxC[lo : lo + batch])
    pad = batch - len(chunk) if len(x_NxHxWxC) > batch else 0
    padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
    out.append(np.asarray(_batch_features(model, variables, jnp.asarray(padded), layer))[: len(chunk)])
  return np.concatenate(out)


def choose_targets(
  seed: int,
  labels_N: np.ndarray,
  features_NxD: np.ndarray,
  num_classes: int,
  candidates: int,
  target_class: str = "random",
) -> np.ndarray:
  """Index of each image's target: the farthest (in features) of ``candidates`` random images of
  another class: a random one (``target_class="random"``) or the next present one (``"next"``).

  Raises:
    ValueError: fewer than two classes present.
  """
  labels = np.asarray(labels_N)
  present = np.unique(labels)
  if len(present) < 2:
    raise ValueError("FSP needs images of at least two classes to choose targets of another class")
  rng = np.random.default_rng(seed)
  n = len(labels)
  # A random other class among those present.
  others = np.stack([np.setdiff1d(present, [c]) for c in present])
  row = np.searchsorted(present, labels)
  pick = rng.integers(0, len(present) - 1, n)
  if target_class == "next":  # present[row + 1] (cyclically) sits at index row of others[row].
    pick = row % (len(present) - 1)
  cls = others[row, pick]
  by_class = {c: np.flatnonzero(labels == c) for c in present}
  out = np.empty(n, np.int64)
  for c in present:  # One vectorised draw per class, not per image.
    who = np.flatnonzero(cls == c)
    cand = by_class[c][rng.integers(0, len(by_class[c]), (len(who), candidates))]
    dist = np.sum((features_NxD[cand] - features_NxD[who][:, None]) ** 2, axis=-1)
    out[who] = cand[np.arange(len(who)), np.argmax(dist, axis=1)]
  return out


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[0, 1] floats to uint8 pixels (rounded)."""
  return np.clip(np.round(np.asarray(x, np.float32) * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SurrogateConfig:
  """Training of the FSP surrogate (a one-member stacked ensemble).

  Attributes:
    model: Architecture (``models.MODELS``).
    epochs: Training epochs.
    batch_size: Minibatch size.
    lr: Adam learning rate.
  """

  model: str = "resnet8"
  epochs: int = 15
  batch_size: int = 128
  lr: float = 1e-3


def train_surrogate(
  images: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  cfg: SurrogateConfig,
  *,
  seed: int,
  checkpoint_dir: str | os.PathLike | None = None,
  progress: bool = True,
) -> tuple[nn.Module, PyTree]:
  """Trains the surrogate with ``ensemble.EnsembleTrainer`` (M = 1); returns ``(model, variables)``
  of the one member. Resumes from ``checkpoint_dir`` if given."""
  model = models.get_model(cfg.model, num_classes)
  trainer = ensemble.EnsembleTrainer(model, optax.adam(cfg.lr), batch_size=min(cfg.batch_size, len(images)))
  ckpt = (
    None if checkpoint_dir is None else ensemble.Checkpointing(os.fspath(checkpoint_dir), fingerprint={"lr": cfg.lr})
  )
  keys = jax.random.split(jax.random.key(seed), 1)
  result = trainer.fit(keys, images, labels, epochs=cfg.epochs, checkpoint=ckpt, progress=progress, desc="surrogate")
  return model, jax.tree.map(lambda a: a[0], result.state.variables)


def fsp_images(
  model: nn.Module,
  variables: PyTree,
  images: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  cfg: FSPConfig,
  *,
  seed: int,
  batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
  """The FSP images of a set (uint8) and each one's target index."""
  feats = batch_features(model, variables, images, cfg.layer, batch)
  targets = choose_targets(seed, labels, feats, num_classes, cfg.candidates, cfg.target_class)
  out = []
  for lo in range(0, len(images), batch):
    x, t = images[lo : lo + batch], images[targets[lo : lo + batch]]
    pad = batch - len(x) if len(images) > batch else 0
    if pad:
      x, t = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x, t))
    out.append(np.asarray(perturb(model, variables, jnp.asarray(x), jnp.asarray(t), cfg))[: batch - pad])
  return to_uint8(np.concatenate(out)), targets
