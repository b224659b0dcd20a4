"""DPD_aux: the stand-in for the paper's Deep Perceptual Distance (section VI-A, [47]).

DPD compares two images by the internal activations of a network trained for image inference
(Zhang et al.'s LPIPS uses a pretrained AlexNet / VGG). No pretrained network exists offline,
so DPD_aux takes the features of a classifier trained from scratch on the attacker-independent
auxiliary images: ``models.CNN`` (four 3x3 conv layers with batch norm), trained by
``ensemble.EnsembleTrainer.fit``. The distance is LPIPS's form without its learned channel
weights (its "baseline" variant): with ``phi_l`` the ReLU of the l-th conv block's batch-normed
output, unit-normalised over channels,

    DPD_aux(x, y) = sum_l mean_{h, w} || phi_l(x)_hw - phi_l(y)_hw ||^2,

so it is 0 for identical images, symmetric, and at most 4 per layer (16 in all). Higher means
more different (the paper: "the higher value indicates lower indistinguishability"). Its values
are NOT comparable with the paper's DPD: another network, trained on other (and far fewer) images.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import ensemble, models

PyTree = Any
EPS = 1e-10  # LPIPS's epsilon in the channel normalisation.


@dataclasses.dataclass(frozen=True)
class PerceptualConfig:
  """The DPD_aux feature network's training."""

  epochs: int = 10  # Passes over the auxiliary images.
  batch_size: int = 64  # Images per step.
  lr: float = 1e-3  # Adam learning rate.
  widths: tuple[int, ...] = (16, 32)  # Channels of the CNN's two conv blocks (two layers each).
  seed: int = 0  # Initialisation and batches.


@functools.partial(jax.jit, static_argnames=("model",))
def _features(model, variables, x):
  """Each conv layer's ``relu(BatchNorm(conv(.)))``, unit-normalised over channels."""
  _, state = model.apply(
    variables, x, capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm), mutable=["intermediates"]
  )
  layers = state["intermediates"]
  out = []
  for name in sorted(layers, key=lambda k: int(k.split("_")[-1])):
    f = nn.relu(layers[name]["__call__"][0])
    out.append(f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + EPS))
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _distance(model, variables, x, y):
  fx, fy = _features(model, variables, x), _features(model, variables, y)
  return sum(jnp.mean(jnp.sum((a - b) ** 2, axis=-1), axis=(1, 2)) for a, b in zip(fx, fy))


@dataclasses.dataclass(frozen=True, eq=False)
class PerceptualDistance:
  """DPD_aux with a trained feature network: ``distance(x, y)`` per image pair.

  Attributes:
    model: The feature network (``models.CNN``).
    variables: Its trained Flax variables (``params``, ``batch_stats``).
    train_accuracy: Its accuracy on the images it was trained on (a sanity figure).
  """

  model: models.CNN
  variables: PyTree
  train_accuracy: float

  def __call__(self, x_NxHxWxC: np.ndarray, y_NxHxWxC: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """``DPD_aux(x_n, y_n)`` for every n (float64, shape (N,)).

    Raises:
      ValueError: Shapes differ, or an image is not finite.
    """
    x, y = np.asarray(x_NxHxWxC, np.float32), np.asarray(y_NxHxWxC, np.float32)
    if x.shape != y.shape or x.ndim != 4:
      raise ValueError(f"DPD_aux compares NHWC images of one shape, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
      raise ValueError("DPD_aux: images are not finite")
    parts = [_distance(self.model, self.variables, x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate([np.asarray(p, np.float64) for p in parts]) if parts else np.zeros(0)


def train(
  images: np.ndarray, labels: np.ndarray, *, num_classes: int, cfg: PerceptualConfig = PerceptualConfig()
) -> PerceptualDistance:
  """DPD_aux's feature network: a ``models.CNN`` classifier trained on ``images`` (NHWC in [0, 1]).

  Raises:
    ValueError: Fewer images than one batch, or images and labels that disagree.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f"images must be NHWC with one label each, got {images.shape} and {labels.shape}")
  if len(images) < cfg.batch_size:
    raise ValueError(f"{len(images)} images, fewer than batch_size={cfg.batch_size}")
  model = models.CNN(num_classes=num_classes, widths=cfg.widths, dense=128)
  trainer = ensemble.EnsembleTrainer(model, optax.adam(cfg.lr), batch_size=cfg.batch_size)
  keys = jax.random.split(jax.random.key(cfg.seed), 1)
  result = trainer.fit(keys, images, labels, epochs=cfg.epochs, progress=False)
  acc = float(ensemble.accuracy(model, result.state.variables, images, labels)[0])
  variables = jax.tree.map(lambda a: a[0], result.state.variables)
  return PerceptualDistance(model=model, variables=variables, train_accuracy=acc)
