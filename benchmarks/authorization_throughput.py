"""Protect / restore throughput of dataset authorization control, in images per second.

    python benchmarks/authorization_throughput.py --workdir runs/bench-auth-throughput

Times ``authorization.embed.protect`` (mRIT, AES-SIV of each image's sequence, LSB embedding,
the encrypted sidecar) and ``authorization.embed.restore`` in both modes (``exact``: with the
sidecar; ``lsb``: the paper's) on N uint8 images of 28x28x1 and 32x32x3. The targets stand in
for FSP images: the clean image plus uniform noise of +-18/255 (the FSP budget), clipped. There
is no PyTorch reference: this is numpy and the ``cryptography`` package on the host, the same
code on every backend. Each figure is the median of ``--repeats`` calls; the first call is
also timed (nothing compiles). Writes ``results.json`` and ``results.md`` / ``.csv`` to
``--workdir``, with the machine's load average: take figures you report on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jipguard import rundir  # noqa: E402
from jipguard.authorization import crypto, embed  # noqa: E402

SHAPES = ((28, 28, 1), (32, 32, 3))
COLUMNS = ("shape", "images", "protect_img_s", "restore_exact_img_s", "restore_lsb_img_s")


def images(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` random uint8 images of ``shape`` and FSP-like targets (each within 18 of its image)."""
  rng = np.random.default_rng(seed)
  clean = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  noise = rng.integers(-18, 19, clean.shape)
  return clean, np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def row(shape: tuple[int, ...], n: int, repeats: int) -> dict:
  clean, target = images(shape, n)
  key, did = crypto.generate_key(), "benchmark"
  p = embed.protect(clean, target, key, dataset_id=did)
  if not np.array_equal(embed.restore(p.images, key, dataset_id=did, sidecar=p.sidecar), clean):
    raise AssertionError("exact restoration differs from the clean images")
  t_protect = median_seconds(lambda: embed.protect(clean, target, key, dataset_id=did), repeats)
  t_exact = median_seconds(lambda: embed.restore(p.images, key, dataset_id=did, sidecar=p.sidecar), repeats)
  t_lsb = median_seconds(lambda: embed.restore(p.images, key, dataset_id=did), repeats)
  return {
    "shape": "x".join(map(str, shape)),
    "images": n,
    "protect_img_s": n / t_protect,
    "restore_exact_img_s": n / t_exact,
    "restore_lsb_img_s": n / t_lsb,
  }


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="directory for results.json / .md / .csv")
  p.add_argument("--images", type=int, default=1000, help="images per shape (default 1000)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per operation (default 3)")
  args = p.parse_args(argv)
  if args.images < 1 or args.repeats < 1:
    p.error("--images and --repeats must be >= 1")
  load_start = os.getloadavg()
  rows = []
  for shape in SHAPES:
    rows.append(row(shape, args.images, args.repeats))
    print({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  machine = {
    "cores": os.cpu_count(),
    "loadavg_start": list(load_start),
    "loadavg_end": list(os.getloadavg()),
    "command": " ".join(["python", *sys.argv]),
  }
  rundir.write_json(os.path.join(args.workdir, "results.json"), {"rows": rows, "machine": machine})
  title = (
    f"Authorization protect / restore throughput (images/s; {machine['cores']} cores, "
    f"load average at start {load_start[0]:.2f}; `{machine['command']}`)"
  )
  rundir.write_table(os.path.join(args.workdir, "results"), rows, COLUMNS, title=title, fmt=".4g")
  return 0


if __name__ == "__main__":
  sys.exit(main())
