"""One process of the multi-process test (tests/test_distributed.py); also runs alone.

    python tests/distributed_worker.py --out r.npz                                 # one process
    python tests/distributed_worker.py --out r.npz --coordinator_address localhost:PORT \\
        --num_processes 2 --process_id {0,1}                                       # two processes

Trains a small ensemble and sanitizes a few images on a (member=2, data=2) mesh of the
job's 4 devices (2 per process in the 2-process run), and writes the results from
process 0.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jipguard import data, distributed, ensemble, models, sharding  # noqa: E402
from jipguard.ipprotect import objective, sanitizer  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  distributed.add_flags(p)
  args = p.parse_args(argv)
  distributed.initialize_from_flags(args)
  if jax.device_count() != 4:
    raise SystemExit(f"expected 4 devices in the job, got {jax.device_count()}")
  mesh = sharding.make_mesh(member=2, data=2)

  ds = data.load("digits", "train")
  x, y = ds.images[:256], ds.labels[:256]
  model = models.MLP(num_classes=10, hidden=(32,))
  trainer = ensemble.EnsembleTrainer(model, optax.sgd(0.1), batch_size=32, mesh=mesh)
  keys = jax.random.split(jax.random.key(0), 6)  # 6 members, 3 per member shard.
  indices = data.bootstrap_indices(jax.random.key(1), len(x), 6)
  fit = trainer.fit(keys, x, y, indices=indices, epochs=2, progress=False)
  params = distributed.to_host(fit.state.params)
  variables = fit.state.variables
  cfg = objective.SanitizerConfig(
    steps=20, data_batch=8, loss="probs", learning_rate=0.1, zeta=0.02, val_every=5, min_steps=10
  )
  tr = jax.tree.map(lambda a: a[:4], variables)
  va = jax.tree.map(lambda a: a[4:6], variables)
  san = sanitizer.sanitize(model, tr, va, x[:8], cfg, seed=3, anchor_secret=11, progress=False, mesh=mesh)
  if distributed.is_main_process():
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(
      args.out,
      loss=np.asarray([h["loss"] for h in fit.history]),
      images=san.images,
      steps=san.steps,
      process_count=jax.process_count(),
      **flat,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
