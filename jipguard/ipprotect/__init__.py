"""IPProtect (Singh et al., paper 000): secure data valuation by per-image sanitization.

A buyer shares a sanitized copy of its dataset D_B so that sellers can measure their models'
utility on it while the images are worthless as images or training data.

* ``sellers``: Table I's label-noised sellers and ``sample_models`` (bootstrapped models).
* ``objective``: Eq. 9 and one optimisation step (:class:`SanitizerConfig`, ``sanitize_step``);
  ``sanitizer``: Algorithm 1 around it (:func:`sanitize`, :func:`sanitize_batch`).
* ``api``: :func:`sanitize_dataset`, one call for a notebook (the buyer's own arrays in,
  sanitized images and a :class:`SanitizeReport` out).
* ``job``: the main job (:func:`run`, :class:`IPProtectConfig`, presets); ``cli``: its flags.
* ``metrics``: utility MAE, compliance, risk, ranks, bounds, pixel-space similarity.
* ``exposure`` (with ``vgg``): image, training and inference IP exposure (Defs. 2-4).
* ``baselines``: Identity, Random, InstaHide, DP-MERF.
* ``attacks`` (with ``pix2pix``): the threat model and the linkage / reconstruction attacks;
  ``defences``: cross-fitted sample_models; ``attack_study`` (with ``attack_report``): the
  attack study, ``jipguard attacks``.
* ``tradeoff``: Table III / Fig. 2; ``ablation``: the sanitizer ablation; ``saturation``: a
  diagnostic of where the sanitizer gets stuck; ``report``: report.md and figures.

Shape suffixes (``targets_BxMxK``):

| letter | meaning |
|---|---|
| N | images of a dataset (the buyer set D_B, D_X) |
| B | images of one sanitized batch |
| M | models of Omega_Tr (or sellers' models, in metrics) |
| V | models of Omega_V |
| K | classes (logits) |
| H, W, C | image height, width, channels |
| D | flattened image size, or features of a random-feature map (baselines) |
| F | random features (DP-MERF) |
| P | public images (InstaHide) |
| J, Q | images mixed per encoding (InstaHide's k), the public ones among them (k - 2) |
| S | bootstrap samples per model |
| Z | generator code size (DP-MERF) |
"""

from jipguard.ipprotect.api import SanitizeReport, sanitize_dataset
from jipguard.ipprotect.job import IPProtectConfig, preset, run
from jipguard.ipprotect.objective import LOSSES, SanitizerConfig
from jipguard.ipprotect.sanitizer import BatchResult, sanitize, sanitize_batch
from jipguard.ipprotect.sellers import TrainConfig, sample_models, train_models

__all__ = [
  "LOSSES",
  "BatchResult",
  "IPProtectConfig",
  "SanitizeReport",
  "SanitizerConfig",
  "TrainConfig",
  "preset",
  "run",
  "sample_models",
  "sanitize",
  "sanitize_batch",
  "sanitize_dataset",
  "train_models",
]
