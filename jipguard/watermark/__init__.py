"""Anti-neuron watermarking (Zou, Gong & Wang, paper 003): LCT watermarks, learners, verification.

A user marks their images with a secret hue rotation ``k*`` before sharing them; a learner
trains a classifier on a dataset of which the user's images are a small part; an arbitrator,
given the model and the user's *unmarked* images, recovers the signature as the one of lowest
loss (Eq. 6) and declares a match when ``|k^ - k*| < tau``.

* ``lct``: the watermarks (``lct.lct``, :func:`blue_shift`, :class:`Watermark`, :func:`mark`)
  and the tinted offline colour data (:func:`colorize`).
* ``learner``: :func:`train_learners` (augmented, one stacked ensemble), saving, pruning.
* ``verifier``: :func:`verify` (one call: a model and the owner's unmarked images -> a
  :class:`Verdict`), :func:`signature_losses`, :func:`grid_search`, :func:`gradient_search`,
  the matching rule and adv^P, the MIA baselines.
* ``studies``: multi-user, sweeps, defences (configs and runs); ``cli``: the command line;
  ``report``: report.md and figures.

Shape suffixes (``losses_KxN``):

| letter | meaning |
|---|---|
| N | images |
| K | candidate signatures |
| R | restarts of the gradient search |
| U | users |
| P | images per user |
| M | learners (ensemble members) |
| S | samples of the pool per learner |
| H, W | image height, width (the trailing 3 or C: channels) |
| I, J, B | in signature_losses: image chunks, signatures per chunk, images per chunk |
"""

from jipguard.watermark.lct import PAPER_SPACE, PAPER_TAU, Watermark, blue_shift, colorize, mark, mark_users
from jipguard.watermark.learner import Augment, LearnerConfig, load_model, prune, save_model, train_learners
from jipguard.watermark.verifier import (
  GridResult,
  Verdict,
  adv_p,
  gradient_search,
  grid_search,
  match,
  signature_losses,
  verify,
)

__all__ = [
  "PAPER_SPACE",
  "PAPER_TAU",
  "Augment",
  "GridResult",
  "LearnerConfig",
  "Watermark",
  "adv_p",
  "blue_shift",
  "colorize",
  "gradient_search",
  "grid_search",
  "load_model",
  "mark",
  "mark_users",
  "match",
  "prune",
  "save_model",
  "signature_losses",
  "train_learners",
  "Verdict",
  "verify",
]
