"""Dense decoders ``H -> X``: the defenders of section VI-A1 and the inverse-network attackers.

The paper writes a decoder as a chain such as ``900 -> Tanh -> 900 -> ReLU -> 900 -> Sigmoid``.
We read each ``width -> activation`` pair as one dense layer with its activation and the last
pair as the output layer, whose width is the image's size (784 on MNIST: the paper's "900" there
cannot be an image) and whose activation maps to pixels (sigmoid: [0, 1]). ``Attack_8``
(``900 -> Sigmoid``) is then a single dense layer (a linear decoder with a sigmoid), and
``Defender_2`` likewise. ``Attack_7`` (a 1-D deconvolution) is a conv decoder and is left out.
``Defender_1`` and ``Defender_3`` are written identically in the paper; we keep both (two of the
four groups of owners then share a design, with their own weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "sigmoid": nn.sigmoid}
OUT = 0  # The width of the output layer: the image's size.

# Attack_1 .. Attack_8 of Table I (Attack_7, a conv decoder, left out): (width, activation) layers.
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
    x = h_BxD
    for i, (width, act) in enumerate(self.layers):
      x = ACTIVATIONS[act](nn.Dense(width or size)(x))
      if self.dropout > 0 and i < len(self.layers) - 1:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if x.shape[-1] != size:
      raise ValueError(f"a decoder's last layer must be the image's size {size}, got {x.shape[-1]}")
    return x.reshape(x.shape[0], *self.image_shape)


def attack(name: str, image_shape: Sequence[int]) -> Decoder:
  """The inverse network ``name`` of :data:`ATTACKS` (ValueError naming the choices)."""
  if name not in ATTACKS:
    raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
  layers, dropout = ATTACKS[name]
  return Decoder(layers=layers, image_shape=tuple(image_shape), dropout=dropout)


def defender(name: str, image_shape: Sequence[int]) -> Decoder:
  """The defender design ``name`` of :data:`DEFENDERS` (ValueError naming the choices)."""
  if name not in DEFENDERS:
    raise ValueError(f"unknown defender {name!r}; choose one of {sorted(DEFENDERS)}")
  return Decoder(layers=DEFENDERS[name], image_shape=tuple(image_shape))
