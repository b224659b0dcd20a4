"""IPProtect's models: the sellers (Table I label noise) and ``sample_models`` (Algorithm 1).

Sellers and sampled models are trained by the same platform learning algorithm
(:class:`TrainConfig`), each set as one stacked ensemble (``ensemble.EnsembleTrainer``):
the 8 sellers x ``models_per_seller`` models with their noisy labels, and the |Omega_Tr| +
|Omega_V| models on bootstraps of the buyer's data D_B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from jipguard import cli, ensemble, rundir
from jipguard import data as data_lib

# Table I of the paper: noise exponents of the 8 sellers and the accuracies they reached.
TABLE_I_NOISE = {
  "mnist": (0.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0),
  "fashion_mnist": (0.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0),
  "cifar10": (0.0, 0.75, 1.25, 1.5, 1.74, 1.9, 2.0, 2.25),
}
TABLE_I_ACCURACY = {
  "mnist": (95.9, 89.9, 87.2, 83.6, 78.9, 62.0, 45.1, 28.4),
  "fashion_mnist": (85.1, 79.1, 76.3, 72.9, 69.0, 55.9, 40.6, 28.8),
  "cifar10": (79.6, 72.5, 65.2, 60.5, 53.4, 48.3, 44.6, 31.9),
}


def table_i_family(dataset: str) -> str:
  """The Table I column a dataset uses (the embedded subset and digits use FMNIST's)."""
  return dataset if dataset in TABLE_I_NOISE else "fashion_mnist"


def resample_rate(noise_exponent: float) -> float:
  """Fraction of a seller's labels re-drawn uniformly at random, from Table I's exponent.

  Table I says "X% labels are flipped randomly, where X% is obtained by exponentiating 2
  with the noise exponent ... multiplied by 100", which read literally (2^noise %, at
  most 32%) leaves every seller near the clean one: with 10 classes the true label
  stays the plurality until ~90% of labels are redrawn. We read it as the fraction of
  labels *kept* being 2^-noise: X = 100 (1 - 2^-noise), each re-drawn label uniform over
  all classes (so it may coincide with the true one). Exponent 0 is the clean seller.
  """
  return 1.0 - 2.0 ** (-noise_exponent)


def seller_labels(
  key: jax.Array, labels: np.ndarray, noise_exponents: Sequence[float], models_per_seller: int, num_classes: int
) -> np.ndarray:
  """Labels of every seller model, shape (sellers * models_per_seller, N).

  The models of one seller share its noisy dataset (Table I: "10 models per seller
  trained from scratch with random initialization"). Re-drawing a fraction r uniformly
  over C classes changes exactly round(r (C - 1) / C N) labels to another class.
  """
  rows = []
  for s, noise in enumerate(noise_exponents):
    rate = resample_rate(noise) * (num_classes - 1) / num_classes
    noisy = data_lib.flip_labels(jax.random.fold_in(key, s), labels, rate, num_classes)
    rows += [noisy] * models_per_seller
  return np.stack(rows)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How the platform's learning algorithm trains one model (sellers and sample_models)."""

  epochs: int = 5  # Passes over the model's own training sample.
  batch_size: int = 128  # Minibatch size.
  learning_rate: float = 1e-3  # Adam step size.
  weight_decay: float = 0.0  # L2 coefficient added to the gradient (torch Adam's weight_decay).

  def __post_init__(self):
    cli.check_int("epochs", self.epochs, lo=1)
    cli.check_int("batch_size", self.batch_size, lo=1)
    cli.check_float("learning_rate", self.learning_rate, lo=0, lo_open=True)
    cli.check_float("weight_decay", self.weight_decay, lo=0)

  def optimizer(self) -> optax.GradientTransformation:
    """Adam; with ``weight_decay`` the coupled L2 of ``torch.optim.Adam(weight_decay=...)``.

    Coupled (added to the gradient before Adam's normalisation), so weights that the data
    never moves (first-layer weights of always-zero pixels) decay to zero at ~lr per step
    whatever the coefficient; AdamW's decoupled decay would shrink them only by lr * wd.
    """
    if self.weight_decay == 0:
      return optax.adam(self.learning_rate)
    return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.adam(self.learning_rate))

  def fingerprint(self) -> dict[str, Any]:
    """What must match to resume a training (weight_decay only when set: older runs resume)."""
    return rundir.fingerprint(self, weight_decay=0.0)


def train_models(
  model: nn.Module,
  cfg: TrainConfig,
  key: jax.Array,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_members: int,
  indices: np.ndarray | None = None,
  checkpoint_dir: str | None = None,
  desc: str = "train",
  mesh: jax.sharding.Mesh | None = None,
  progress: bool = True,
  checkpoint_interval_s: float = ensemble.CHECKPOINT_INTERVAL_S,
  on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> ensemble.EnsembleState:
  """Trains ``num_members`` models in one ensemble call (resumable via ``checkpoint_dir``,
  saved at most every ``checkpoint_interval_s`` seconds, on the last epoch and on the way out
  of an exception: ``EnsembleTrainer.fit``; ``on_epoch_end`` as there)."""
  trainer = ensemble.EnsembleTrainer(model, cfg.optimizer(), batch_size=cfg.batch_size, mesh=mesh)
  keys = jax.random.split(key, num_members)
  ckpt = (
    None
    if checkpoint_dir is None
    else ensemble.Checkpointing(checkpoint_dir, interval_s=checkpoint_interval_s, fingerprint=cfg.fingerprint())
  )
  result = trainer.fit(
    keys,
    images,
    labels,
    epochs=cfg.epochs,
    indices=indices,
    checkpoint=ckpt,
    desc=desc,
    progress=progress,
    on_epoch_end=on_epoch_end,
  )
  return result.state


def sample_models(
  model: nn.Module, cfg: TrainConfig, key: jax.Array, buyer: data_lib.Dataset, num_models: int, **kwargs
) -> ensemble.EnsembleState:
  """``sample_models`` of Algorithm 1: models trained on bootstraps of the buyer data.

  Each member has its own bootstrap of D_B (same size as D_B, :func:`sample_bootstraps`)
  and its own random initialisation; same architecture and training algorithm as the
  sellers.
  """
  _, init_key = jax.random.split(key)
  return train_models(
    model,
    cfg,
    init_key,
    buyer.images,
    buyer.labels,
    num_members=num_models,
    indices=sample_bootstraps(key, len(buyer), num_models),
    **kwargs,
  )


def sample_bootstraps(key: jax.Array, n: int, num_models: int) -> np.ndarray:
  """The bootstrap indices ``(num_models, n)`` that :func:`sample_models` trains on with ``key``."""
  return data_lib.bootstrap_indices(jax.random.split(key)[0], n, num_models)


def in_bag(indices_MxS: np.ndarray, n: int) -> np.ndarray:
  """``in_bag_NxM``: True where model m's bootstrap drew image i."""
  indices_MxS = np.asarray(indices_MxS)
  out = np.zeros((n, indices_MxS.shape[0]), bool)
  for m, idx in enumerate(indices_MxS):
    out[idx, m] = True
  return out


def out_of_bag_mask(indices_MxS: np.ndarray, n: int) -> np.ndarray:
  """``mask_NxM``: 1 where model m's bootstrap left image i out (see the module doc).

  Rows of images that every model was trained on are all ones (use every model).
  """
  mask = (~in_bag(indices_MxS, n)).astype(np.float32)
  mask[mask.sum(1) == 0] = 1.0
  return mask
