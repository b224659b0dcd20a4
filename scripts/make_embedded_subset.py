"""Builds jipguard/_data/fashion_mnist_subset.npz from Debian's Fashion-MNIST.

Command (from the repository root, after `apt-get install dataset-fashion-mnist`):

  python scripts/make_embedded_subset.py

It reads the IDX files in /usr/share/datasets/fashion-mnist with
`jipguard.data.read_idx`, draws a class-stratified random subset with a fixed
seed (1,000 images per class from train, 100 per class from t10k), and writes
an npz with x_train, y_train, x_test, y_test (uint8, images 28x28) and the
chosen source indices train_indices, test_indices (int32, ascending, into the
original files). The zip is written with fixed timestamps and permissions, so
two runs give byte-identical files; the script prints the SHA-256.
"""

import argparse
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jipguard import data  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 20240601
PER_CLASS = {"train": 1000, "test": 100}
NUM_CLASSES = 10
DEFAULT_OUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jipguard", "_data", "fashion_mnist_subset.npz"
)


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  """Ascending indices of `per_class` examples of each class, drawn without replacement."""
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(NUM_CLASSES)]
  return np.sort(np.concatenate(chosen)).astype(np.int32)


def write_npz_deterministic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Like np.savez_compressed, with fixed zip metadata (byte-reproducible)."""
  with zipfile.ZipFile(path, "w") as zf:
    for name, array in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default=data.DEBIAN_FASHION_MNIST, help="folder with the Fashion-MNIST IDX files")
  parser.add_argument("--out", default=DEFAULT_OUT, help="npz file to write")
  args = parser.parse_args()
  if not os.path.isdir(args.source):
    raise SystemExit(f"{args.source} not found: `apt-get install dataset-fashion-mnist`")
  rng = np.random.default_rng(SEED)
  arrays = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images = data.read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
    labels = data.read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
    idx = stratified_indices(labels, PER_CLASS[split], rng)
    arrays[f"x_{split}"] = images[idx]
    arrays[f"y_{split}"] = labels[idx]
    arrays[f"{split}_indices"] = idx
  write_npz_deterministic(args.out, arrays)
  with open(args.out, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes, sha256 {digest}")
  for split in ("train", "test"):
    print(
      f"  {split}: {len(arrays[f'y_{split}'])} images, per class "
      f"{np.bincount(arrays[f'y_{split}'], minlength=NUM_CLASSES).tolist()}"
    )


if __name__ == "__main__":
  main()
