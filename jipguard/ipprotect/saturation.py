"""Where the sanitizer gets stuck: saturation of the sampled models, and the fit per image.

Run by ``experiments/ipprotect_saturation.py`` (``cli.saturation_main``), which takes the flags of
the main job plus ``--images`` and ``--checkpoints``. :func:`run` restores the run's sellers and
Omega_Tr / Omega_V (trained if absent, with ``cache_dir`` as in the run) and reports:

1. At each softmax temperature: the mean largest softmax probability of Omega_Tr on N(0, 1) noise
   images and on buyer images, the fraction of (model, noise image) pairs above 0.999, and the
   median norm of the probability loss's gradient at the noise, taken towards the buyer images'
   targets.
2. The sanitizer with the run's loss and parameters, run without the stopping rule on the first
   ``--images`` buyer images to each of ``--checkpoints`` steps (a fresh run each; the run's starting
   noise and step keys, anchors from a fixed public seed instead of the run's secret): the
   fraction of (Omega_Tr model, image) pairs that predict the model's class on the original
   (compliance), the fraction of images fewer than half of Omega_Tr agree on ("stuck"), Omega_Tr's
   mean largest softmax probability on them, and the sellers' accuracy on them vs on the originals;
   then the same split by images at least 90% of Omega_Tr agree on ("fitted") and the rest.
"""

from collections.abc import Callable, Sequence
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jipguard import ensemble
from jipguard.ipprotect import job, sanitizer

_TEMPERATURES = (1.0, 4.0)
_NOISE_IMAGES = 500


def run(
  cfg: job.IPProtectConfig,
  workdir: str,
  *,
  images: int = 300,
  checkpoints: Sequence[int] = (50, 300),
  log: Callable[[str], None] = print,
) -> None:
  """Reports (through ``log``) saturation at each temperature and the trajectory of ``images``
  buyer images to each of ``checkpoints`` steps; the run's ensembles come from ``cfg.cache_dir``,
  else ``<workdir>/checkpoints`` (trained there if absent)."""
  if images < 1 or not checkpoints or min(checkpoints) < 1:
    raise ValueError("images and every checkpoint must be >= 1")
  buyer, pool = job.load_data(cfg)
  model = job.run_model(cfg, buyer)
  root = cfg.cache_dir or os.path.join(workdir, "checkpoints")
  omega = job.sampled_models(cfg, model, buyer, root, progress=False)
  sellers = job.seller_models(cfg, model, pool, root, progress=False)
  tr = jax.tree.map(lambda a: a[: cfg.omega_tr], omega.variables)
  apply = jax.jit(lambda variables, x: ensemble.apply(model, variables, x))

  n = min(_NOISE_IMAGES, len(buyer))
  noise = jax.random.normal(jax.random.key(0), (n, *buyer.image_shape))
  for t in _TEMPERATURES:
    probs = lambda x, t=t: jax.nn.softmax(apply(tr, x) / t, -1)
    target = probs(buyer.images[:n])
    loss = lambda x, target=target, probs=probs: jnp.sum(jnp.sqrt(jnp.sum((probs(x) - target) ** 2, -1) + 1e-12))
    grad_norm = jnp.sqrt(jnp.sum(jax.grad(loss)(noise) ** 2, axis=(1, 2, 3)))
    top = probs(noise).max(-1)
    log(
      f"temperature {t:g}: max softmax on noise {float(top.mean()):.3f} (> 0.999: {float((top > 0.999).mean()):.2f}), "
      f"on buyer images {float(target.max(-1).mean()):.3f}; "
      f"median |grad| at the noise {float(jnp.median(grad_norm)):.2f}"
    )

  n = min(images, len(buyer))
  x, y = buyer.images[:n], buyer.labels[:n]
  want_tr = np.asarray(apply(tr, x).argmax(-1))  # M x N
  sellers_orig = np.asarray(apply(sellers.variables, x).argmax(-1))
  log(
    f"sanitizer ({cfg.sanitizer.loss} loss, lr {cfg.sanitizer.learning_rate:g}) on {n} images, "
    f"no stopping rule, seller accuracy on the originals {float((sellers_orig == y).mean()):.3f}:"
  )
  for steps in sorted(set(checkpoints)):
    san = dataclasses.replace(cfg.sanitizer, steps=steps, val_stop=False, data_batch=n)
    out = sanitizer.sanitize_batch(model, tr, None, x, san, start=0, seed=cfg.seed, anchor_secret=0).images
    logits = np.asarray(apply(tr, out))
    agree = (logits.argmax(-1) == want_tr).mean(0)  # Per image.
    top = np.asarray(jax.nn.softmax(logits, -1)).max(-1).mean()
    pred = np.asarray(apply(sellers.variables, out).argmax(-1))
    fitted = agree >= 0.9
    parts = []
    for name, sel in (("fitted", fitted), ("rest", ~fitted)):
      if sel.any():
        parts.append(
          f"{name} {sel.mean():.2f} of images: sellers agree {(pred[:, sel] == sellers_orig[:, sel]).mean():.3f}, "
          f"accuracy {(pred[:, sel] == y[sel]).mean():.3f} vs {(sellers_orig[:, sel] == y[sel]).mean():.3f}"
        )
    log(
      f"  step {steps}: compliance Omega_Tr {agree.mean():.3f}, stuck {(agree < 0.5).mean():.2f}, "
      f"max softmax {top:.3f}, seller accuracy {(pred == y).mean():.3f}; " + "; ".join(parts)
    )
