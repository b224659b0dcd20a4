"""How saturated a run's sampled models are on the sanitizer's starting noise.

    python experiments/ipprotect_saturation.py --dataset fashion_mnist --buyer_size 3000 --omega_tr 10 \\
        --cache_dir runs/fmnist-cache

Takes the flags of experiments/ipprotect.py, restores the run's Omega_Tr (trained if absent, with
``--cache_dir`` as in the run) and prints, at each softmax temperature: the mean largest softmax
probability on N(0, 1) noise images and on buyer images, the fraction of (model, noise image)
pairs above 0.999, and the median norm of the probability loss's gradient at the noise, taken
towards the buyer images' targets (the sanitizer's first step).
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

from jipguard import ensemble, pipeline

_TEMPERATURES = (1.0, 4.0)
_IMAGES = 500


def main(argv=None) -> int:
  spec = importlib.util.spec_from_file_location(
      "ipprotect_main", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ipprotect.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg, workdir, _ = mod.parse(argv)
  buyer, _ = pipeline.load_data(cfg)
  model = pipeline.run_model(cfg, buyer)
  omega = pipeline.sampled_models(cfg, model, buyer, cfg.cache_dir or os.path.join(workdir, "checkpoints"),
                                  progress=False)
  tr = jax.tree.map(lambda a: a[:cfg.omega_tr], omega.variables)
  n = min(_IMAGES, len(buyer))
  noise = jax.random.normal(jax.random.key(0), (n, *buyer.image_shape))
  for t in _TEMPERATURES:
    probs = lambda x, t=t: jax.nn.softmax(ensemble.apply(model, tr, x) / t, -1)
    target = probs(buyer.images[:n])
    loss = lambda x, target=target, probs=probs: jnp.sum(jnp.sqrt(jnp.sum((probs(x) - target) ** 2, -1) + 1e-12))
    grad_norm = jnp.sqrt(jnp.sum(jax.grad(loss)(noise) ** 2, axis=(1, 2, 3)))
    top = probs(noise).max(-1)
    print(f"temperature {t:g}: max softmax on noise {float(top.mean()):.3f} (> 0.999: {float((top > 0.999).mean()):.2f}), "
          f"on buyer images {float(target.max(-1).mean()):.3f}; median |grad| at the noise {float(jnp.median(grad_norm)):.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
