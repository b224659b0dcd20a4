"""Where the sanitizer gets stuck: saturation of the sampled models, and the fit per image.

    python experiments/ipprotect_saturation.py --dataset fashion_mnist --buyer_size 3000 --omega_tr 10 \\
        --cache_dir runs/fmnist-cache --loss probs [--images 300 --checkpoints 50 300 1000]

Takes the flags of experiments/ipprotect.py (plus ``--images`` and ``--checkpoints``), restores the
run's sellers and Omega_Tr / Omega_V (trained if absent, with ``--cache_dir`` as in the run) and prints:

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

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jipguard import distributed, ensemble, ipprotect, pipeline

_TEMPERATURES = (1.0, 4.0)
_NOISE_IMAGES = 500


def main(argv=None) -> int:
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--images", type=int, default=300, help="buyer images the trajectory follows")
  p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 300], help="steps to report")
  own, rest = p.parse_known_args(argv)
  if own.images < 1 or min(own.checkpoints) < 1:
    raise ValueError("--images and --checkpoints must be >= 1")
  cfg, workdir, _ = pipeline.config_from_flags(rest)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  buyer, pool = pipeline.load_data(cfg)
  model = pipeline.run_model(cfg, buyer)
  root = cfg.cache_dir or os.path.join(workdir, "checkpoints")
  omega = pipeline.sampled_models(cfg, model, buyer, root, progress=False)
  sellers = pipeline.seller_models(cfg, model, pool, root, progress=False)
  tr = jax.tree.map(lambda a: a[:cfg.omega_tr], omega.variables)
  apply = jax.jit(lambda variables, x: ensemble.apply(model, variables, x))

  n = min(_NOISE_IMAGES, len(buyer))
  noise = jax.random.normal(jax.random.key(0), (n, *buyer.image_shape))
  for t in _TEMPERATURES:
    probs = lambda x, t=t: jax.nn.softmax(apply(tr, x) / t, -1)
    target = probs(buyer.images[:n])
    loss = lambda x, target=target, probs=probs: jnp.sum(jnp.sqrt(jnp.sum((probs(x) - target) ** 2, -1) + 1e-12))
    grad_norm = jnp.sqrt(jnp.sum(jax.grad(loss)(noise) ** 2, axis=(1, 2, 3)))
    top = probs(noise).max(-1)
    print(f"temperature {t:g}: max softmax on noise {float(top.mean()):.3f} (> 0.999: {float((top > 0.999).mean()):.2f}), "
          f"on buyer images {float(target.max(-1).mean()):.3f}; median |grad| at the noise {float(jnp.median(grad_norm)):.2f}")

  n = min(own.images, len(buyer))
  x, y = buyer.images[:n], buyer.labels[:n]
  want_tr = np.asarray(apply(tr, x).argmax(-1))               # M x N
  sellers_orig = np.asarray(apply(sellers.variables, x).argmax(-1))
  print(f"sanitizer ({cfg.sanitizer.loss} loss, lr {cfg.sanitizer.learning_rate:g}) on {n} images, "
        f"no stopping rule, seller accuracy on the originals {float((sellers_orig == y).mean()):.3f}:")
  for steps in sorted(set(own.checkpoints)):
    san = dataclasses.replace(cfg.sanitizer, steps=steps, val_stop=False, data_batch=n)
    out = ipprotect.sanitize_batch(model, tr, None, x, san, start=0, seed=cfg.seed, anchor_seed=0).images
    logits = np.asarray(apply(tr, out))
    agree = (logits.argmax(-1) == want_tr).mean(0)              # Per image.
    top = np.asarray(jax.nn.softmax(logits, -1)).max(-1).mean()
    pred = np.asarray(apply(sellers.variables, out).argmax(-1))
    fitted = agree >= 0.9
    parts = []
    for name, sel in (("fitted", fitted), ("rest", ~fitted)):
      if sel.any():
        parts.append(f"{name} {sel.mean():.2f} of images: sellers agree {(pred[:, sel] == sellers_orig[:, sel]).mean():.3f}, "
                     f"accuracy {(pred[:, sel] == y[sel]).mean():.3f} vs {(sellers_orig[:, sel] == y[sel]).mean():.3f}")
    print(f"  step {steps}: compliance Omega_Tr {agree.mean():.3f}, stuck {(agree < 0.5).mean():.2f}, "
          f"max softmax {top:.3f}, seller accuracy {(pred == y).mean():.3f}; " + "; ".join(parts), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
