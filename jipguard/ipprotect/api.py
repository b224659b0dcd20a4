"""One call for notebooks: :func:`sanitize_dataset` sanitizes a buyer's own arrays.

    from jipguard import data, ipprotect
    ds = data.load("fashion_mnist_subset", "test")
    sanitized, report = ipprotect.sanitize_dataset(ds.images[:300], ds.labels[:300], preset="smoke")

It trains what the sanitizer needs (Omega_Tr + Omega_V: models on bootstraps of the images
given, ``sellers.sample_models``), runs Algorithm 1 (``sanitizer.sanitize``) and measures the
utility that a buyer can measure alone: Omega_V's accuracies on the originals and on the
sanitized images. No seller is involved; ``job.run`` is the full study with sellers.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from jipguard import data as data_lib
from jipguard import ensemble
from jipguard.ipprotect import job, metrics, sanitizer, sellers
from jipguard.ipprotect.objective import SanitizerConfig


@dataclasses.dataclass(frozen=True)
class SanitizeReport:
  """What :func:`sanitize_dataset` measured.

  Attributes:
    utility_mae_val: Mean over Omega_V's models of |accuracy on the sanitized set - on the
      originals|: the buyer's own estimate of the sellers' utility error (Omega_V also drives
      the stopping rule, so it is slightly optimistic; ``utility_mae_val_oob`` is not).
    utility_mae_val_oob: The same on the images outside each Omega_V model's bootstrap (None
      if some model drew every image).
    compliance_val: Mean over Omega_V of the fraction of images classified alike before and after.
    steps_mean: Mean optimisation steps per image.
    seconds: Wall time of the whole call (training included).
    num_images: Images sanitized.
    config: The resolved :class:`job.IPProtectConfig` (as JSON; a given anchor seed only as a
      salted commitment).
  """

  utility_mae_val: float
  utility_mae_val_oob: float | None
  compliance_val: float
  steps_mean: float
  seconds: float
  num_images: int
  config: dict[str, Any]


def sanitize_dataset(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  preset: str = "default",
  seed: int = 0,
  num_classes: int | None = None,
  model: str | None = None,
  omega_tr: int | None = None,
  omega_v: int | None = None,
  sanitizer_config: SanitizerConfig | None = None,
  workdir: str | os.PathLike | None = None,
  progress: bool = False,
) -> tuple[np.ndarray, SanitizeReport]:
  """Sanitizes ``images`` in one call; returns ``(sanitized images, report)``.

  Args:
    images: The buyer's images, NHWC or NHW, uint8 or float in [0, 1].
    labels: Their integer labels ``(N,)``.
    preset: ``smoke``, ``default`` (recommended) or ``paper``: the sampled models' training and
      the sanitizer (``job.preset``).
    seed: Seed of the models, starting noise and steps (the anchors come from a fresh 256-bit
      secret, kept in ``workdir`` when given and discarded otherwise).
    num_classes: Number of classes (default: 1 + the largest label).
    model: Architecture (default: mlp for grey images, cnn for colour).
    omega_tr: |Omega_Tr| (default: the preset's).
    omega_v: |Omega_V| (default: the preset's).
    sanitizer_config: Replaces the preset's sanitizer settings.
    workdir: Keep the trained models, finished batches and the anchor secret (0600) here, so
      a second call with the same arguments resumes; None keeps nothing.
    progress: Progress bars.

  Returns:
    ``(sanitized NHWC float32 images, SanitizeReport)``.

  Raises:
    data.DataError: Bad images or labels (shape, NaN, range, counts).
    ValueError: A setting outside its range.
  """
  t0 = time.perf_counter()
  images, labels = data_lib.validate(images, labels, num_classes=num_classes, what="images")
  k = num_classes or int(labels.max()) + 1
  buyer = data_lib.Dataset(images, labels, k, "arrays", "arrays given to sanitize_dataset")
  cfg = job.preset(preset)
  over = dict(omega_tr=omega_tr, omega_v=omega_v, model=model, sanitizer=sanitizer_config)
  cfg = dataclasses.replace(
    cfg, dataset="arrays", buyer_size=None, seed=seed, **{name: v for name, v in over.items() if v is not None}
  )
  net = job.run_model(cfg, buyer)
  ckpt = None if workdir is None else os.path.join(workdir, "checkpoints")
  if ckpt is not None:
    os.makedirs(ckpt, exist_ok=True)
  omega = job.sampled_models(cfg, net, buyer, ckpt, desc="sample_models", progress=progress)
  params_tr = omega.member(slice(0, cfg.omega_tr)).variables
  params_v = omega.member(slice(cfg.omega_tr, None)).variables
  boots = sellers.sample_bootstraps(job.omega_key(cfg), len(buyer), cfg.omega_tr + cfg.omega_v)
  mask = sellers.out_of_bag_mask(boots[: cfg.omega_tr], len(buyer)) if cfg.sanitizer.out_of_bag else None
  result = sanitizer.sanitize(
    net,
    params_tr,
    params_v if cfg.sanitizer.val_stop else None,
    images,
    cfg.sanitizer,
    seed=seed,
    anchor_secret=sanitizer.anchor_secret() if ckpt is None else job.anchor_secret_of(cfg, ckpt),
    checkpoint_dir=None if ckpt is None else os.path.join(ckpt, "sanitize"),
    progress=progress,
    member_mask=mask,
  )
  po, ps = ensemble.predict(net, params_v, images), ensemble.predict(net, params_v, result.images)
  oob = ~sellers.in_bag(boots[cfg.omega_tr :], len(buyer)).T
  report = SanitizeReport(
    utility_mae_val=metrics.utility_mae(metrics.utility(po, labels), metrics.utility(ps, labels)),
    utility_mae_val_oob=metrics.utility_mae(metrics.utility(po, labels, oob), metrics.utility(ps, labels, oob))
    if oob.any(axis=1).all()
    else None,
    compliance_val=float(metrics.compliance(po, ps).mean()),
    steps_mean=float(np.mean(result.steps)),
    seconds=time.perf_counter() - t0,
    num_images=len(images),
    config=job.config_to_json(cfg),
  )
  return result.images, report
