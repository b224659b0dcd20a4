"""Defences against linkage of sanitized images to their originals (``attacks``).

With the margin loss the only route from an original x to its sanitized x~ is the vector of
decisions of the Omega_Tr models on x. Those models were trained on bootstraps of D_B itself,
so they memorise their in-bag images: which models err on x, and how confidently the rest are
right, is specific to x. The defences here change where that vector comes from; the
sanitizer's own options (``SanitizerConfig.out_of_bag``, ``input_noise``, ``lam`` / ``tau``)
are the others the attack study measures.

* :func:`cross_fit_sanitize`: D_B is split into ``folds`` parts; the images of each part are
  sanitized against |Omega_Tr| + |Omega_V| models trained (``sample_models``) on bootstraps of
  the other parts only, so no model that fixes an image's targets has seen that image.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jipguard import data as data_lib
from jipguard.ipprotect import sanitizer, sellers
from jipguard.ipprotect.objective import SanitizerConfig
from jipguard.ipprotect.sellers import TrainConfig


def fold_of(n: int, folds: int, key: jax.Array) -> np.ndarray:
  """``fold_N``: a random balanced assignment of n images to ``folds`` parts."""
  if not 2 <= folds <= n:
    raise ValueError(f"folds must be in [2, {n}], got {folds}")
  return np.asarray(jax.random.permutation(key, n)) % folds


def cross_fit_sanitize(
  model,
  omega_train: TrainConfig,
  cfg: SanitizerConfig,
  omega_tr: int,
  omega_v: int,
  dataset: data_lib.Dataset,
  *,
  seed: int,
  anchor_secrets: list[bytes | int],
  folds: int = 2,
  progress: bool = False,
) -> np.ndarray:
  """Sanitizes each fold of ``dataset`` against models trained on the other folds.

  Guarantee: the models that sanitize an image never trained on it (tested through the
  bootstrap indices, which index the other folds only). ``anchor_secrets`` holds one anchor
  secret (``sanitizer.anchor_secret``) per fold (anchors are keyed by the image's index inside
  its fold). The models train with ``omega_train``, its batch size capped at the other folds'
  size. Returns the sanitized images in the dataset's order.
  """
  if len(anchor_secrets) != folds:
    raise ValueError(f"need one anchor secret per fold ({folds}), got {len(anchor_secrets)}")
  key = jax.random.key(seed)
  fold = fold_of(len(dataset), folds, jax.random.fold_in(key, 0))
  out = np.zeros(dataset.images.shape, np.float32)
  for f in range(folds):
    inside, outside = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
    state = sellers.sample_models(
      model,
      dataclasses.replace(omega_train, batch_size=min(omega_train.batch_size, len(outside))),
      jax.random.fold_in(key, 1 + f),
      dataset.subset(outside),
      omega_tr + omega_v,
      desc=f"cross-fit models {f + 1}/{folds}",
      progress=progress,
    )
    p_tr = jax.tree.map(lambda a: a[:omega_tr], state.variables)
    p_v = jax.tree.map(lambda a: a[omega_tr:], state.variables)
    res = sanitizer.sanitize(
      model,
      p_tr,
      p_v if cfg.val_stop else None,
      dataset.images[inside],
      cfg,
      seed=seed + 1 + f,
      anchor_secret=anchor_secrets[f],
      progress=progress,
    )
    out[inside] = res.images
  return out
