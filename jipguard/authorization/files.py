"""A protected dataset on disk: what ``jipguard authorization protect`` writes and ``restore`` reads.

A protected dataset is a folder:

* ``protected.npz``: ``images`` (uint8 N x H x W x C, the protected images) and ``labels``;
* ``png/<label>/<index>.png`` (with ``png=True``): the same images as lossless uint8 PNGs, which
  :func:`read_protected` accepts instead of the npz;
* ``sidecar.npz``: ``sidecar``, the encrypted displaced bits for exact restoration (only the
  key holder can use it; leave it out to publish the paper's LSB mode only);
* ``manifest.json``: the dataset id, shape, count, mRIT and FSP parameters, and the scrypt salt
  when the key came from a passphrase (the salt is not secret).

Every file is written atomically (``rundir``), the manifest last, so a folder with a manifest
is complete. :func:`restore_dataset` authenticates every image before it returns any.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any
import zipfile

import numpy as np
from PIL import Image

from jipguard import data, rundir
from jipguard.authorization import crypto, embed, mrit

MANIFEST = "manifest.json"
_FORMAT = "jipguard.authorization.protected/v1"


@dataclasses.dataclass(frozen=True)
class KeySource:
  """Where the key comes from: a key file, or a passphrase file (scrypt with a stored salt).

  Attributes:
    key_file: Path of a ``keygen`` key file (mode 0600).
    passphrase_file: Path of a file holding a passphrase (mode 0600).
  """

  key_file: str | None = None
  passphrase_file: str | None = None

  def __post_init__(self):
    if (self.key_file is None) == (self.passphrase_file is None):
      raise ValueError("give exactly one of --key and --passphrase_file")

  def key(self, salt: bytes | None) -> crypto.Key:
    if self.key_file is not None:
      return crypto.read_key_file(self.key_file)
    if salt is None:
      raise ValueError("this dataset was protected with a key file, not a passphrase; use --key")
    return crypto.derive_key(crypto.read_passphrase_file(self.passphrase_file), salt)


def read_images(path: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images and labels of an ``.npz`` or a class-folder of images (``data.load_local``)."""
  ds = data.load_local(path, "train")
  u8 = np.clip(np.round(ds.images * 255), 0, 255).astype(np.uint8)
  return u8, ds.labels


def write_protected(
  out: str,
  images: np.ndarray,
  labels: np.ndarray,
  sidecar: np.ndarray | None,
  manifest: dict[str, Any],
  *,
  png: bool = False,
) -> None:
  """Writes a protected dataset folder (refuses a folder that already holds one)."""
  if os.path.exists(os.path.join(out, MANIFEST)):
    raise FileExistsError(f"{out} already holds a protected dataset; choose another --workdir")
  os.makedirs(out, exist_ok=True)
  rundir.write_npz(os.path.join(out, "protected.npz"), images=images, labels=labels)
  if sidecar is not None:
    rundir.write_npz(os.path.join(out, "sidecar.npz"), sidecar=sidecar)
  if png:
    for i, (img, y) in enumerate(zip(images, labels)):
      folder = os.path.join(out, "png", str(int(y)))
      os.makedirs(folder, exist_ok=True)
      pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
      rundir.write_atomic(os.path.join(folder, f"{i:06d}.png"), lambda tmp, p=pil: p.save(tmp, format="PNG"))
  rundir.write_json(os.path.join(out, MANIFEST), {"format": _FORMAT, **manifest})


def read_manifest(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder} is not a protected dataset (no {MANIFEST})")
  m = rundir.read_json(path)
  if not isinstance(m, dict) or m.get("format") != _FORMAT:
    raise ValueError(f"{path} is not a jipguard protected-dataset manifest")
  return m


def _read_png_folder(folder: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Images ``png/<label>/<index>.png`` in index order; DataError if any index is missing or repeated."""
  found = {}
  for label in sorted(os.listdir(folder)):
    for name in sorted(os.listdir(os.path.join(folder, label))):
      m = re.fullmatch(r"(\d+)\.png", name)
      if m is None or not label.isdigit():
        raise data.DataError(f"{folder}/{label}/{name}: not a protected image name (<label>/<index>.png)")
      if int(m.group(1)) in found:
        raise data.DataError(f"{folder}: image {int(m.group(1))} appears twice")
      with Image.open(os.path.join(folder, label, name)) as img:
        arr = np.asarray(img)
      if arr.dtype != np.uint8:
        raise data.DataError(f"{folder}/{label}/{name}: not a uint8 PNG")
      found[int(m.group(1))] = (arr[..., None] if arr.ndim == 2 else arr, int(label))
  missing = sorted(set(range(n)) - set(found))
  if missing or len(found) != n:
    raise data.DataError(f"{folder}: {len(missing)} images missing (first: {missing[:5]}), or extra ones")
  return np.stack([found[i][0] for i in range(n)]), np.array([found[i][1] for i in range(n)], np.int32)


def read_protected(folder: str, *, use_png: bool = False) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """``(manifest, images, labels)`` of a protected dataset folder (its npz, or its PNGs)."""
  manifest = read_manifest(folder)
  n = int(manifest["count"])
  if use_png:
    images, labels = _read_png_folder(os.path.join(folder, "png"), n)
  else:
    path = os.path.join(folder, "protected.npz")
    try:
      with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
      raise data.DataError(
        f"{path}: cannot read the protected images ({err}); the file is missing or truncated"
      ) from None
  if images.dtype != np.uint8 or images.shape != (n, *manifest["shape"]):
    raise data.DataError(
      f"{folder}: expected {n} uint8 images of shape {manifest['shape']}, found {images.dtype} {images.shape}"
    )
  return manifest, images, labels


def read_sidecar(folder: str) -> np.ndarray:
  path = os.path.join(folder, "sidecar.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no sidecar; exact restoration needs it (or use --mode lsb)")
  try:
    with np.load(path, allow_pickle=False) as z:
      return z["sidecar"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
    raise data.DataError(f"{path}: cannot read the sidecar ({err}); the file is truncated or damaged") from None


def restore_dataset(folder: str, keys: KeySource, *, mode: str = "exact", use_png: bool = False):
  """The restored uint8 images and labels of a protected dataset folder.

  Raises:
    crypto.AuthenticationError: wrong key, or any modified / truncated image or sidecar (names the image).
    FileNotFoundError, data.DataError: missing or damaged files.
  """
  if mode not in embed.MODES:
    raise ValueError(f"--mode must be one of {embed.MODES}, got {mode!r}")
  manifest, images, labels = read_protected(folder, use_png=use_png)
  salt = bytes.fromhex(manifest["salt"]) if manifest.get("salt") else None
  key = keys.key(salt)
  sidecar = read_sidecar(folder) if mode == "exact" else None
  cfg = mrit.MRITConfig(**manifest["mrit"])
  restored = embed.restore(images, key, dataset_id=manifest["dataset_id"], cfg=cfg, sidecar=sidecar)
  return restored, labels
