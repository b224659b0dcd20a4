"""How much of a JAX ensemble training epoch the optimiser takes: Adam vs SGD, same epoch.

    python benchmarks/optimizer_share.py --members 110 --n 300 --batch_size 32
    python benchmarks/optimizer_share.py --members 10 --n 10000 --batch_size 128

Both programs are compiled first and then called alternately (one epoch each, ``--epochs``
times), so a drifting host slows both alike; prints the median epoch of each. A program
without any update would not do: XLA drops the weight gradients nobody uses.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import kernels  # noqa: E402
from jipguard import data, ensemble  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--members", type=int, default=110)
  p.add_argument("--n", type=int, default=300, help="pool size (embedded Fashion-MNIST)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--epochs", type=int, default=7, help="timed epochs per optimiser")
  a = p.parse_args(argv)
  if min(a.members, a.n, a.batch_size, a.epochs) < 1 or a.batch_size > a.n:
    p.error("--members, --n, --batch_size and --epochs must be positive, --batch_size at most --n")
  images, labels = kernels._pool("mlp", a.n)
  keys = jax.random.split(jax.random.key(0), a.members)
  idx = jnp.asarray(data.bootstrap_indices(jax.random.key(1), a.n, a.members))
  x, y = jnp.asarray(images), jnp.asarray(labels)[idx]
  runs = {}
  for name, tx in {"adam": optax.adam(kernels.LR), "sgd": optax.sgd(kernels.LR)}.items():
    trainer = ensemble.EnsembleTrainer(kernels._flax_model("mlp"), tx, batch_size=a.batch_size)
    state, metrics = trainer.train_epoch(trainer.init(keys, x), x, idx, y, keys, 0)  # Compiles.
    jax.block_until_ready(metrics)
    runs[name] = [trainer, state, []]
  for epoch in range(1, a.epochs + 1):
    for run in runs.values():
      t0 = time.perf_counter()
      run[1], metrics = run[0].train_epoch(run[1], x, idx, y, keys, epoch)
      jax.block_until_ready((run[1], metrics))
      run[2].append(time.perf_counter() - t0)
  medians = {name: float(np.median(run[2])) for name, run in runs.items()}
  for name, run in runs.items():
    print(
      f"M={a.members} N={a.n} B={a.batch_size} {name}: median epoch {medians[name]:.3f} s "
      f"({', '.join(f'{t:.3f}' for t in run[2])})"
    )
  print(f"adam / sgd: {medians['adam'] / medians['sgd']:.3f}")
  return medians


if __name__ == "__main__":
  main()
