"""Attacks on a shared (sanitized) buyer set: the threat model of section III-C / V-B in code.

The adversary (a seller) holds

* the shared set :class:`Shared`: sanitized images and their labels (labels are not sanitized);
* the algorithm and its public settings :class:`PublicSettings` (architecture, training of
  ``sample_models``, :class:`SanitizerConfig`, |Omega_Tr|, |Omega_V|, the buyer-set size);
* an auxiliary set D_A from the buyer's distribution, disjoint from the buyer's images.

It does NOT hold the buyer's sampled models, its anchor secret or any original image. It
re-runs the public algorithm on D_A (:func:`prepare_ipprotect`: its own ``sample_models``
on D_A, its own anchor secret), which gives it pairs (sanitized D_A, D_A): the
:class:`Adversary`. Every attack below is a function of a :class:`Shared`, an
:class:`Adversary` and, for linkage, the candidate originals: their signatures admit no
buyer model and no anchor (tested).

Attacks:

* **Linkage** (:func:`linkage`): rank candidate originals (the buyer's images hidden among
  as many distractors) for each shared image by a score: pixel correlation
  (:func:`pixel_scores`), correlation after a Gaussian low-pass filter, correlation of
  magnitudes ``|x~|`` vs ``|2x - 1|`` (undoes InstaHide's sign mask, Carlini et al.), or
  correlation of the adversary's models' logits (:func:`feature_scores`). Top-1 / top-5
  against chance, overall and among candidates of the image's own class.
* **Learned inverse** (:func:`fit_ridge_inverse`): ridge regression from sanitized to original
  pixels (input features ``[x~, |x~|]``), fitted on D_A's pairs: the baseline a GAN must beat.
* **Optimisation attack** of section V-B (:func:`optimisation_attack`): from each shared image,
  minimise the projection loss ``mean_n ||f_n(x) - f_n(x~)||`` under the adversary's own
  models, regularised towards D_A's class-mean image (labels are public).
* **pix2pix** (``pix2pix``): the paper's Fig. 5 attack.

A reconstruction is scored against the original (:func:`reconstruction_scores`) and against
the trivial reconstruction, D_A's class-mean image of the shared label
(:func:`class_mean_images`): a reconstruction that only recovers its class is no leak.
Its linkage (rank of the true original when candidates are ranked by correlation with the
reconstruction) separates the two directly: the class mean links at within-class chance.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage
import sklearn.linear_model

from jipguard import data as data_lib
from jipguard import ensemble, rundir
from jipguard.ipprotect import defences, metrics, sanitizer, sellers
from jipguard.ipprotect.objective import SanitizerConfig
from jipguard.ipprotect.sellers import TrainConfig

# ----------------------------------------------------------------------------- threat model


@dataclasses.dataclass(frozen=True)
class Shared:
  """What the buyer shares: the sanitized images and their (unsanitized) labels."""

  images: np.ndarray  # Sanitized images, float32 NHWC.
  labels: np.ndarray  # int32 labels of D_B.

  def __post_init__(self):
    if self.images.ndim != 4 or len(self.images) != len(self.labels):
      raise ValueError(f"shared images must be NHWC with one label each, got {self.images.shape} / {self.labels.shape}")
    if not np.all(np.isfinite(self.images)):
      raise ValueError("shared images contain NaN or infinite values")


@dataclasses.dataclass(frozen=True)
class PublicSettings:
  """The algorithm's public settings: everything of the buyer's run but its models, anchors and data."""

  model: nn.Module  # The platform's architecture m_p.
  omega_train: TrainConfig  # The platform's learning algorithm, as sample_models runs it.
  sanitizer: SanitizerConfig  # Eq. 9 / Algorithm 1 parameters.
  omega_tr: int  # |Omega_Tr|.
  omega_v: int  # |Omega_V|.
  buyer_size: int  # |D_B| (the number of shared images).
  cross_fit_folds: int = 0  # > 0: the buyer sanitized with defences.cross_fit_sanitize (that many folds).


@dataclasses.dataclass(frozen=True)
class Adversary:
  """The adversary's knowledge once prepared: D_A, its sanitized version, optionally its own models."""

  aux: data_lib.Dataset  # D_A: the adversary's own real images, disjoint from D_B.
  aux_sanitized: np.ndarray  # D~_A: D_A sanitized by the adversary with the public algorithm.
  model: nn.Module | None = None  # Architecture of its own models (prepare_ipprotect, or attached for any method).
  params: Any = None  # Its own sample_models (stacked, leading member axis), trained on D_A.


def prepare_ipprotect(
  settings: PublicSettings,
  aux: data_lib.Dataset,
  *,
  seed: int,
  checkpoint_dir: str | None = None,
  sanitized_path: str | None = None,
  progress: bool = False,
) -> Adversary:
  """The adversary re-runs IPProtect on D_A with the public settings: its own models and anchors.

  D_A is cut into chunks of ``settings.buyer_size`` images (the size the buyer's models were
  trained on; a smaller last chunk is dropped); for each chunk it trains |Omega_Tr| + |Omega_V|
  ``sample_models`` on bootstraps of the chunk and sanitizes the chunk against them with an
  anchor secret of its own (``secrets``), exactly as the buyer did with D_B (with
  ``settings.cross_fit_folds``, through ``defences.cross_fit_sanitize`` as the buyer did). The
  models of the first chunk are the adversary's models (feature linkage, optimisation attack).
  ``checkpoint_dir`` keeps its trained models (a rerun restores them); ``sanitized_path`` (an
  ``.npz``) keeps D~_A, so that a rerun neither re-sanitizes nor draws new anchors.

  Guarantee: nothing of the buyer enters (the arguments are public settings and D_A).
  """
  n = settings.buyer_size
  chunks = len(aux) // n
  if chunks < 1:
    raise ValueError(f"D_A has {len(aux)} images, fewer than the buyer set's {n}")
  m = settings.omega_tr + settings.omega_v
  sanitized, params = [], None
  done = None
  if sanitized_path is not None and os.path.exists(sanitized_path):
    with np.load(sanitized_path) as z:
      done = z["images"]
    if done.shape != (chunks * n, *aux.image_shape):
      raise ValueError(f"{sanitized_path} holds {done.shape[0]} sanitized images, expected {chunks * n}")
  for c in range(chunks):
    part = aux.subset(np.arange(c * n, (c + 1) * n))
    key = jax.random.fold_in(jax.random.key(seed), c)
    tag = hashlib.sha256(
      json.dumps([repr(settings.model), settings.omega_train.fingerprint(), m, n, seed, c]).encode()
    ).hexdigest()[:16]
    state = None
    if c == 0 or (not settings.cross_fit_folds and done is None):
      state = sellers.sample_models(
        settings.model,
        settings.omega_train,
        key,
        part,
        m,
        checkpoint_dir=None if checkpoint_dir is None else os.path.join(checkpoint_dir, f"adversary-{tag}"),
        desc=f"adversary models {c + 1}/{chunks}",
        progress=progress,
      )
      params = state.variables if params is None else params
    if done is not None:
      break
    if settings.cross_fit_folds:
      images = defences.cross_fit_sanitize(
        settings.model,
        settings.omega_train,
        settings.sanitizer,
        settings.omega_tr,
        settings.omega_v,
        part,
        seed=seed + 1 + c,
        anchor_secrets=[sanitizer.anchor_secret() for _ in range(settings.cross_fit_folds)],
        folds=settings.cross_fit_folds,
        progress=progress,
      )
    else:
      p_tr = jax.tree.map(lambda a: a[: settings.omega_tr], state.variables)
      p_v = jax.tree.map(lambda a: a[settings.omega_tr :], state.variables)
      mask = None
      if settings.sanitizer.out_of_bag:
        mask = sellers.out_of_bag_mask(sellers.sample_bootstraps(key, n, m)[: settings.omega_tr], n)
      images = sanitizer.sanitize(
        settings.model,
        p_tr,
        p_v if settings.sanitizer.val_stop else None,
        part.images,
        settings.sanitizer,
        seed=seed + 1 + c,
        anchor_secret=sanitizer.anchor_secret(),
        progress=progress,
        member_mask=mask,
      ).images
    sanitized.append(images)
  if done is None:
    done = np.concatenate(sanitized)
    if sanitized_path is not None:
      rundir.write_npz(sanitized_path, images=done)
  return Adversary(aux.subset(np.arange(chunks * n)), done, settings.model, params)


def prepare_with(mechanism, aux: data_lib.Dataset) -> Adversary:
  """An adversary against a mechanism without models (Identity, InstaHide): ``mechanism(images,
  labels) -> sanitized`` is the public algorithm with the adversary's own randomness."""
  return Adversary(aux, np.asarray(mechanism(aux.images, aux.labels), np.float32))


# --------------------------------------------------------------------------------- linkage


def _rows(x: np.ndarray) -> np.ndarray:
  """Flattened rows, centred and scaled to unit norm (zero rows stay zero)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  x = x - x.mean(1, keepdims=True)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``scores_NxM``: Pearson correlation between every row of ``a`` and every row of ``b``."""
  return _rows(a) @ _rows(b).T


def lowpass(images_NxHxWxC: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of each image over its two spatial axes (``sigma`` in pixels)."""
  return scipy.ndimage.gaussian_filter(np.asarray(images_NxHxWxC, np.float64), sigma=(0, sigma, sigma, 0))


def pixel_scores(shared: np.ndarray, candidates: np.ndarray, kind: str = "pixel", sigma: float = 1.5) -> np.ndarray:
  """Linkage scores from pixels: ``pixel`` (correlation), ``lowpass`` (both sides blurred with
  ``sigma``), ``magnitude`` (correlation of |x~| with |2x - 1|: InstaHide's sign mask removed)."""
  if kind == "pixel":
    return correlation_matrix(shared, candidates)
  if kind == "lowpass":
    return correlation_matrix(lowpass(shared, sigma), lowpass(candidates, sigma))
  if kind == "magnitude":
    return correlation_matrix(np.abs(shared), np.abs(2 * np.asarray(candidates) - 1))
  raise ValueError(f"unknown pixel score {kind!r}: pixel, lowpass or magnitude")


def feature_scores(adversary: Adversary, shared: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Correlation of the adversary's models' logit vectors (all models concatenated)."""
  if adversary.params is None:
    raise ValueError("feature linkage needs the adversary's own models (prepare_ipprotect)")
  feats = lambda x: np.moveaxis(np.asarray(ensemble.predict(adversary.model, adversary.params, x)), 1, 0)
  return correlation_matrix(feats(shared), feats(candidates))


def ranks(scores_NxM: np.ndarray, true_N: np.ndarray, allowed_NxM: np.ndarray | None = None) -> np.ndarray:
  """Rank of each query's true candidate (0 = first): how many OTHER allowed candidates score at
  least as high. Ties count against the attack, so constant scores never beat chance."""
  scores_NxM = np.asarray(scores_NxM, np.float64)
  n, m = scores_NxM.shape
  true_N = np.asarray(true_N)
  if true_N.shape != (n,) or true_N.min(initial=0) < 0 or true_N.max(initial=0) >= m:
    raise ValueError(f"true_N must hold {n} indices into {m} candidates")
  allowed = np.ones((n, m), bool) if allowed_NxM is None else np.asarray(allowed_NxM, bool)
  if not allowed[np.arange(n), true_N].all():
    raise ValueError("every query's true candidate must be allowed")
  true_score = scores_NxM[np.arange(n), true_N][:, None]
  beats = (scores_NxM >= true_score) & allowed
  beats[np.arange(n), true_N] = False
  return beats.sum(1)


def linkage(
  scores_NxM: np.ndarray,
  true_N: np.ndarray,
  labels_N: np.ndarray,
  candidate_labels_M: np.ndarray,
  ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
  """Top-k linkage accuracy against chance, over all candidates and within the query's class.

  Returns ``top{k}``, ``chance_top{k}`` (k / M), ``within_class_top{k}`` and
  ``within_class_chance_top{k}`` (the mean over queries of min(k, M_c) / M_c, M_c the
  candidates of the query's class), and ``mean_rank``.
  """
  labels_N, candidate_labels_M = np.asarray(labels_N), np.asarray(candidate_labels_M)
  m = len(candidate_labels_M)
  same = labels_N[:, None] == candidate_labels_M[None]
  r_all, r_cls = ranks(scores_NxM, true_N), ranks(scores_NxM, true_N, same)
  out = {"mean_rank": float(r_all.mean())}
  for k in ks:
    out[f"top{k}"] = float(np.mean(r_all < k))
    out[f"chance_top{k}"] = min(k, m) / m
    out[f"within_class_top{k}"] = float(np.mean(r_cls < k))
    m_c = same.sum(1)
    out[f"within_class_chance_top{k}"] = float(np.mean(np.minimum(k, m_c) / m_c))
  return out


def self_linkage(originals: np.ndarray, sanitized: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The cheap figure for any run: link each sanitized image to its original among the buyer
  set itself by pixel correlation (chance 1 / N)."""
  n = len(originals)
  return linkage(correlation_matrix(sanitized, originals), np.arange(n), labels, labels)


# -------------------------------------------------------------------------- reconstructions


def class_mean_images(aux: data_lib.Dataset, labels_N: np.ndarray) -> np.ndarray:
  """The trivial reconstruction: D_A's mean image of each shared image's class."""
  means = np.stack(
    [
      aux.images[aux.labels == c].mean(0) if np.any(aux.labels == c) else aux.images.mean(0)
      for c in range(aux.num_classes)
    ]
  )
  return means[np.asarray(labels_N)].astype(np.float32)


def _inverse_features(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return np.concatenate([x, np.abs(x)], axis=1)


@dataclasses.dataclass(frozen=True)
class RidgeInverse:
  """A linear map from sanitized to original pixels, fitted on D_A's pairs."""

  model: sklearn.linear_model.Ridge
  image_shape: tuple[int, ...]

  def __call__(self, shared_images: np.ndarray) -> np.ndarray:
    out = self.model.predict(_inverse_features(shared_images))
    return np.clip(out, 0, 1).reshape(len(out), *self.image_shape).astype(np.float32)


def fit_ridge_inverse(adversary: Adversary, alpha: float = 100.0) -> RidgeInverse:
  """Ridge regression (features ``[x~, |x~|]``) from D~_A to D_A."""
  model = sklearn.linear_model.Ridge(alpha=alpha).fit(
    _inverse_features(adversary.aux_sanitized), adversary.aux.images.reshape(len(adversary.aux), -1)
  )
  return RidgeInverse(model, adversary.aux.image_shape)


@functools.partial(jax.jit, static_argnames=("model", "steps", "learning_rate", "weight"))
def _invert(params, targets_NxMxK, start_NxHxWxC, prior_NxHxWxC, *, model, steps, learning_rate, weight):
  tx = optax.adam(learning_rate)

  def loss(x, target_MxK, prior):
    logits_MxK = ensemble.apply(model, params, x[None], unroll=False)[:, 0]
    projection = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(logits_MxK - target_MxK), -1) + 1e-12))
    return projection + weight * jnp.mean(jnp.square(x - prior))

  def one(target_MxK, x0, prior):
    def body(carry, _):
      x, opt = carry
      updates, opt = tx.update(jax.grad(loss)(x, target_MxK, prior), opt)
      return (jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0), opt), None

    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
    return x

  return jax.vmap(one)(targets_NxMxK, start_NxHxWxC, prior_NxHxWxC)


def optimisation_attack(
  adversary: Adversary,
  shared: Shared,
  *,
  num_models: int = 20,
  steps: int = 100,
  learning_rate: float = 0.05,
  weight: float = 1.0,
  batch: int = 100,
) -> np.ndarray:
  """Section V-B's attack: ``argmin_x mean_n ||f_n(x) - f_n(x~)|| + weight * mean((x - mu_y)^2)``.

  ``f_n`` are the first ``num_models`` of the adversary's own models, ``mu_y`` D_A's mean image
  of the shared label (:func:`class_mean_images`), also the starting point; x stays in [0, 1].
  """
  if adversary.params is None:
    raise ValueError("the optimisation attack needs the adversary's own models (prepare_ipprotect)")
  params = jax.tree.map(lambda a: a[:num_models], adversary.params)
  prior = class_mean_images(adversary.aux, shared.labels)
  out = []
  for s in range(0, len(shared.images), batch):
    x_tilde = jnp.asarray(shared.images[s : s + batch])
    targets = jnp.swapaxes(ensemble.predict(adversary.model, params, x_tilde), 0, 1)
    p = jnp.asarray(prior[s : s + batch])
    out.append(
      np.asarray(
        _invert(params, targets, p, p, model=adversary.model, steps=steps, learning_rate=learning_rate, weight=weight)
      )
    )
  return np.concatenate(out).astype(np.float32)


def reconstruction_scores(
  recon: np.ndarray,
  originals: np.ndarray,
  labels: np.ndarray,
  candidates: np.ndarray,
  candidate_labels: np.ndarray,
  classify=None,
  true: np.ndarray | None = None,
) -> dict[str, float]:
  """How much of each original a reconstruction recovers.

  ``mse``, ``ssim``, ``correlation`` (means over images) against the originals; ``link_*``:
  :func:`linkage` of the originals (candidates ``true``, default the first N) among ``candidates`` ranked by
  correlation with the reconstruction; with ``classify`` (images -> class), ``agreement``: the
  fraction of images on which an independent classifier gives the reconstruction and the
  original the same class.
  """
  n = len(recon)
  out = {
    "mse": float(np.mean(np.square(recon - originals))),
    "ssim": float(metrics.ssim(originals, recon).mean()),
    "correlation": float(metrics.pixel_correlation(originals, recon).mean()),
  }
  true = np.arange(n) if true is None else true
  link = linkage(correlation_matrix(recon, candidates), true, labels, candidate_labels)
  out.update({f"link_{k}": v for k, v in link.items()})
  if classify is not None:
    out["agreement"] = float(np.mean(classify(recon) == classify(originals)))
  return out
