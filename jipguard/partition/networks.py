"""Decoders ``H -> X``: the defenders of section VI-A and the inverse-network attackers.

The paper writes a decoder as a chain such as ``900 -> Tanh -> 900 -> ReLU -> 900 -> Sigmoid``.
We read each ``width -> activation`` pair as one dense layer with its activation and the last
pair as the output layer, whose width is the image's size (784 on MNIST: the paper's "900" there
cannot be an image) and whose activation maps to pixels (sigmoid: [0, 1]). ``Attack_8``
(``900 -> Sigmoid``) is then a single dense layer (a linear decoder with a sigmoid), and
``Defender_2`` likewise. ``Attack_7`` (``1-Dconv -> Tanh -> 900 -> Sigmoid``) is
:class:`Conv1DDecoder`: the hidden vector read as a 1-channel sequence, one transposed 1-D
convolution (kernel 5, 4 channels; neither is printed) with tanh, then the dense output layer.
``Defender_1`` and ``Defender_3`` are written identically in the paper; we keep both (two of the
four groups of owners then share a design, with their own weights).

Conv settings (section VI-A2): "the defender will be the reversed form of local layers"
(:class:`ConvDecoder`, built by :func:`mirror` from the local part): each local stage, deepest
first, undone by transposed convolutions of that stage's kernel, the first of stride 2 (undoing
its pool), ending in the image's channels. The LFW CNN's stages have two convolutions and get two
transposed ones (at pool2: deconv 5x5 s2, deconv 5x5, deconv 8x8 s2, deconv 8x8 -> image: the
paper's four layers); VGG's get one per stage plus a stride-1 output layer (at pool2: the
paper's three deconv 3x3). The paper's batch norms inside these decoders are left out (no
batch statistics in the defenders' and attackers' ensembles); the output activation is a
sigmoid (pixels in [0, 1]) where the paper ends in tanh or a batch norm. Attacks: ``lfw_attack1``
and ``cifar_attack1`` are mirrors (the latter with a tanh in its second layer, as printed),
``*_attack2`` / ``*_attack3`` dense ``4090`` (LFW) or ``1024`` (CIFAR) units then the image,
``*_attack3`` with dropout 0.15 (LFW: tanh).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from jipguard.partition import split as split_lib

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "sigmoid": nn.sigmoid}
OUT = 0  # The width of the output layer: the image's size.

# Attack_1 .. Attack_8 of Table I (Attack_7: see CONV1D_ATTACKS): (width, activation) layers.
ATTACKS: dict[str, tuple[tuple[tuple[int, str], ...], float]] = {
  "attack1": (((900, "tanh"), (900, "relu"), (OUT, "sigmoid")), 0.0),
  "attack2": (((900, "relu"), (OUT, "sigmoid")), 0.15),
  "attack3": (((900, "tanh"), (OUT, "sigmoid")), 0.0),
  "attack4": (((900, "tanh"), (900, "sigmoid"), (OUT, "sigmoid")), 0.0),
  "attack5": (((600, "relu"), (OUT, "sigmoid")), 0.0),
  "attack6": (((1024, "relu"), (OUT, "sigmoid")), 0.0),
  "attack8": (((OUT, "sigmoid"),), 0.0),
}
# The single defender ("a two-layer ReLU-based neural network") and Defender_1 .. Defender_4.
DEFENDERS: dict[str, tuple[tuple[int, str], ...]] = {
  "single": ((900, "relu"), (OUT, "sigmoid")),
  "defender1": ((900, "tanh"), (OUT, "sigmoid")),
  "defender2": ((OUT, "sigmoid"),),
  "defender3": ((900, "tanh"), (OUT, "sigmoid")),
  "defender4": ((900, "sigmoid"), (OUT, "sigmoid")),
}
MULTIPLE = ("defender1", "defender2", "defender3", "defender4")  # Table II's four designs.
CONV1D_ATTACKS = ("attack7",)  # Table I's Attack_7: a 1-D deconvolution on the hidden vector.
# Conv settings: mirrors of the local part, by their hidden activations (last: the image's sigmoid).
CONV_DEFENDERS: dict[str, tuple[str, ...]] = {"mirror": ("relu",), "mirror_tanh": ("tanh",)}
MULTIPLE_CONV = ("mirror", "mirror_tanh")  # Two designs dealt over the owners of a conv setting.
CONV_ATTACKS: dict[str, tuple[str, Any]] = {  # ("mirror", hidden activations) or ("dense", (layers, dropout)).
  "lfw_attack1": ("mirror", ("relu",)),
  "lfw_attack2": ("dense", (((4090, "relu"), (OUT, "sigmoid")), 0.0)),
  "lfw_attack3": ("dense", (((4090, "tanh"), (OUT, "sigmoid")), 0.15)),
  "cifar_attack1": ("mirror", ("relu", "tanh")),
  "cifar_attack2": ("dense", (((1024, "relu"), (OUT, "sigmoid")), 0.0)),
  "cifar_attack3": ("dense", (((1024, "relu"), (OUT, "sigmoid")), 0.15)),
}


class Decoder(nn.Module):
  """Dense layers ``h_BxD -> x_BxHxWxC``, the last one of the image's size.

  Attributes:
    layers: ``(width, activation)`` per layer; width ``OUT`` (0) is the image's size.
    image_shape: (H, W, C) of the output.
    dropout: Dropout after each hidden layer in training mode.
  """

  layers: tuple[tuple[int, str], ...]
  image_shape: tuple[int, int, int]
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h_BxD: jax.Array, train: bool = False) -> jax.Array:
    size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
    x = h_BxD.reshape(h_BxD.shape[0], -1)  # A conv state is flattened.
    for i, (width, act) in enumerate(self.layers):
      x = ACTIVATIONS[act](nn.Dense(width or size)(x))
      if self.dropout > 0 and i < len(self.layers) - 1:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if x.shape[-1] != size:
      raise ValueError(f"a decoder's last layer must be the image's size {size}, got {x.shape[-1]}")
    return x.reshape(x.shape[0], *self.image_shape)


class Conv1DDecoder(nn.Module):
  """Attack_7: ``h_BxD`` as a 1-channel sequence -> transposed 1-D conv -> tanh -> dense -> sigmoid.

  Attributes:
    image_shape: (H, W, C) of the output.
    features: Channels of the transposed convolution.
    kernel: Its kernel length.
  """

  image_shape: tuple[int, int, int]
  features: int = 4
  kernel: int = 5

  @nn.compact
  def __call__(self, h_BxD: jax.Array, train: bool = False) -> jax.Array:
    x = h_BxD.reshape(h_BxD.shape[0], -1, 1)
    x = nn.tanh(nn.ConvTranspose(self.features, (self.kernel,), padding="SAME")(x))
    size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
    x = nn.sigmoid(nn.Dense(size)(x.reshape(x.shape[0], -1)))
    return x.reshape(x.shape[0], *self.image_shape)


class ConvDecoder(nn.Module):
  """Transposed convolutions ``h_BxHxWxC -> x_BxHxWxC`` (SAME padding), the last one sigmoid.

  Attributes:
    layers: ``(channels, kernel, stride, activation)`` per layer; channels 0 is the image's.
    image_shape: (H, W, C) of the output.
  """

  layers: tuple[tuple[int, int, int, str], ...]
  image_shape: tuple[int, int, int]

  @nn.compact
  def __call__(self, h_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    x = h_BxHxWxC
    for width, kernel, stride, act in self.layers:
      x = nn.ConvTranspose(width or self.image_shape[-1], (kernel, kernel), strides=(stride, stride), padding="SAME")(x)
      x = ACTIVATIONS[act](x)
    if x.shape[1:] != tuple(self.image_shape):
      raise ValueError(f"a conv decoder must output images of shape {self.image_shape}, got {x.shape[1:]}")
    return x


def mirror(local: split_lib.ConvNet, image_shape: Sequence[int], activations: Sequence[str]) -> ConvDecoder:
  """The reversed form of a conv net's local part (module docstring); hidden layer i uses
  ``activations[i % len(activations)]``."""
  stages = local.stages[: local.stop]
  layers = []
  for i in reversed(range(len(stages))):
    kernel = stages[i][1]
    before = stages[i - 1][0][-1] if i > 0 else 0  # The channels entering stage i (0: the image's).
    if local.norm_first:  # VGG: one transposed conv per stage, then the output layer.
      layers.append((stages[i][0][0] if i == 0 else before, kernel, 2, ""))
    else:  # LFW CNN: two per stage, as its two convolutions.
      layers += [(stages[i][0][-1], kernel, 2, ""), (before, kernel, 1, "")]
  if local.norm_first:
    layers.append((0, stages[0][1], 1, ""))
  acts = [activations[i % len(activations)] for i in range(len(layers) - 1)] + ["sigmoid"]
  return ConvDecoder(
    layers=tuple((w, k, s, a) for (w, k, s, _), a in zip(layers, acts)), image_shape=tuple(image_shape)
  )


def attack(name: str, image_shape: Sequence[int], local: Any = None) -> nn.Module:
  """The inverse network ``name`` of :data:`ATTACKS`, :data:`CONV1D_ATTACKS` or
  :data:`CONV_ATTACKS` (the last need the conv ``local`` part they mirror or decode).

  Raises:
    ValueError: Unknown name (naming the choices), or a conv attack on a dense state.
  """
  if name in ATTACKS:
    layers, dropout = ATTACKS[name]
    return Decoder(layers=layers, image_shape=tuple(image_shape), dropout=dropout)
  if name in CONV1D_ATTACKS:
    return Conv1DDecoder(image_shape=tuple(image_shape))
  if name in CONV_ATTACKS:
    if not isinstance(local, split_lib.ConvNet):
      raise ValueError(f"attack {name!r} decodes a conv net's state; pass the conv local part")
    kind, spec = CONV_ATTACKS[name]
    if kind == "mirror":
      return mirror(local, image_shape, spec)
    return Decoder(layers=spec[0], image_shape=tuple(image_shape), dropout=spec[1])
  raise ValueError(f"unknown attack {name!r}; choose one of {sorted({*ATTACKS, *CONV1D_ATTACKS, *CONV_ATTACKS})}")


def defender(name: str, image_shape: Sequence[int], local: Any = None) -> nn.Module:
  """The defender design ``name`` of :data:`DEFENDERS` or :data:`CONV_DEFENDERS` (the latter
  mirror the conv ``local`` part).

  Raises:
    ValueError: Unknown name (naming the choices), or a conv design without a conv local part.
  """
  if name in DEFENDERS:
    return Decoder(layers=DEFENDERS[name], image_shape=tuple(image_shape))
  if name in CONV_DEFENDERS:
    if not isinstance(local, split_lib.ConvNet):
      raise ValueError(f"defender {name!r} mirrors a conv net's local part; pass it")
    return mirror(local, image_shape, CONV_DEFENDERS[name])
  raise ValueError(f"unknown defender {name!r}; choose one of {sorted({*DEFENDERS, *CONV_DEFENDERS})}")
