"""Datasets: the embedded default, local files, and named datasets via tfds.

Data strategy (docs/scaling.md, "Data"):

* **Embedded default.** `load()` returns a small real, class-balanced subset of Fashion-MNIST
  (10,000 train + 1,000 test, 28x28x1) shipped as `jipguard/_data/fashion_mnist_subset.npz`; it
  always works offline. `scripts/make_embedded_subset.py` rebuilds it byte-identically from
  Debian's `dataset-fashion-mnist` IDX files.
* **Local files are first-class**, because a buyer's data is their own: `load_local` reads a
  folder of IDX files, an `.npz`, or an image folder with one sub-folder per class.
* **Named datasets** (`mnist`, `fashion_mnist`, `cifar10`) come from local files in `data_dir`;
  else, for `fashion_mnist`, from Debian's IDX files; else from tensorflow-datasets: `tfds.load`
  when TensorFlow is installed, `tfds.data_source` (ArrayRecord, no TensorFlow) otherwise.
* `digits` (scikit-learn's bundled 8x8 digits) serves the fastest tests.
* **No silent fallback.** Missing data is a `DataError` that says how to get it; one dataset is
  never replaced by another, and `Dataset.source` says where the data was found.

Everything returned is host numpy: images float32 NHWC in [0, 1], labels int32.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import gzip
import importlib.resources
import importlib.util
import math
import os
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist_subset", "digits", "mnist", "fashion_mnist", "cifar10")
DEFAULT_DATASET = "fashion_mnist_subset"
# A field of an .npz that marks its images as a sanitized set (pixels outside [0, 1] allowed).
SANITIZED_KEY = "sanitized"
SPLITS = ("train", "test")

_ALIASES = {"embedded": "fashion_mnist_subset"}
_EMBEDDED_FILE = "fashion_mnist_subset.npz"
_EMBEDDED_SOURCE = "embedded subset jipguard/_data/fashion_mnist_subset.npz"
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0

_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CLASS_NAMES = {
  "fashion_mnist_subset": _FASHION,
  "fashion_mnist": _FASHION,
  "mnist": tuple("0123456789"),
  "digits": tuple("0123456789"),
  "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
  0x08: np.dtype("u1"),
  0x09: np.dtype("i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_IDX_MAX_NDIM = 32  # numpy's array rank limit (1.x); real IDX files use 1-3.
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_EXTENSIONS = frozenset(
  {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


class DataError(ValueError):
  """A dataset is missing, malformed, or was asked for in an invalid way."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory labelled image dataset.

  Attributes:
    images: float32 array (N, H, W, C) with values in [0, 1].
    labels: int32 array (N,) with values in [0, num_classes).
    num_classes: number of classes (labels may not use all of them).
    name: dataset name, e.g. "fashion_mnist_subset" or a folder's name.
    source: human-readable provenance: which file, folder or loader.
    class_names: optional class names, indexed by label (empty if unknown).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  source: str
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    """Checks structure (cheaply; `validate` checks pixel values)."""
    im, lab, what = self.images, self.labels, f"Dataset {self.name!r}"
    if not (isinstance(im, np.ndarray) and im.dtype == np.float32 and im.ndim == 4):
      raise DataError(
        f"{what}: images must be a float32 NHWC numpy array, got "
        f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}"
      )
    if not (isinstance(lab, np.ndarray) and lab.dtype == np.int32 and lab.shape == im.shape[:1]):
      raise DataError(
        f"{what}: labels must be an int32 numpy array of shape {im.shape[:1]}, "
        f"got {getattr(lab, 'dtype', type(lab))} {getattr(lab, 'shape', '')}"
      )
    if self.num_classes < 1 or (lab.size and not 0 <= lab.min() <= lab.max() < self.num_classes):
      raise DataError(f"{what}: labels must lie in [0, {self.num_classes})")
    if self.class_names and len(self.class_names) != self.num_classes:
      raise DataError(f"{what}: {len(self.class_names)} class names for {self.num_classes} classes")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(int(d) for d in self.images.shape[1:])

  def subset(self, idx) -> Dataset:
    """Returns the examples at `idx` (index array, boolean mask or slice)."""
    return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


def validate(
  images, labels, *, num_classes: int | None = None, what: str = "dataset", unit_range: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Checks and normalises an image/label pair.

  Args:
    images: uint8 (scaled by 1/255) or float array, (N, H, W) (a channel axis is added) or
      (N, H, W, C).
    labels: integer array (N,), values >= 0 (and < num_classes if given).
    num_classes: if given, the exclusive upper bound for labels.
    what: names the data in error messages, e.g. a file path.
    unit_range: float pixels must lie in [0, 1]; False for sets whose pixels are not images'
      (IPProtect's sanitized sets: finite, any range).

  Returns:
    (images, labels): float32 NHWC images in [0, 1], int32 labels.

  Raises:
    DataError: wrong rank or dtype; empty; NaN/inf pixels (says how many); float pixels outside
      [0, 1] (says the min/max found); image and label counts that differ (says both); labels
      that are not integers, negative, or >= num_classes.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim not in (3, 4):
    raise DataError(f"{what}: images must have rank 3 (N, H, W) or 4 (N, H, W, C), got shape {images.shape}")
  if labels.ndim != 1:
    raise DataError(f"{what}: labels must have shape (N,), got shape {labels.shape}")
  if len(images) != len(labels):
    raise DataError(f"{what}: {len(images)} images but {len(labels)} labels")
  if len(images) == 0:
    raise DataError(f"{what}: is empty (0 images)")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / np.float32(255)
  elif np.issubdtype(images.dtype, np.floating):
    bad = images.size - np.count_nonzero(np.isfinite(images))
    if bad:
      raise DataError(f"{what}: {bad} pixel values are NaN or infinite")
    lo, hi = float(images.min()), float(images.max())
    if unit_range and (lo < 0 or hi > 1):
      raise DataError(
        f"{what}: float pixels must lie in [0, 1], found min {lo} and max {hi} (scale uint8 data by 1/255)"
      )
    images = images.astype(np.float32)
  else:
    raise DataError(f"{what}: images must be uint8 or float, got {images.dtype}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{what}: labels must be integers, got dtype {labels.dtype}")
  if labels.min() < 0:
    raise DataError(f"{what}: labels must be >= 0, found {labels.min()}")
  if num_classes is not None and labels.max() >= num_classes:
    raise DataError(f"{what}: labels must be < num_classes={num_classes}, found {labels.max()}")
  return (images[..., None] if images.ndim == 3 else images), labels.astype(np.int32)


def load(
  name: str = DEFAULT_DATASET,
  split: str = "train",
  *,
  data_dir: str | os.PathLike | None = None,
  download: bool = False,
) -> Dataset:
  """Loads a dataset split by name or path, with no fallback between datasets.

  * `fashion_mnist_subset` (alias `embedded`): the embedded npz.
  * `digits`: `sklearn.datasets.load_digits`, 8x8x1 scaled by 1/16; test is a class-stratified
    20% drawn with a fixed seed, train the rest.
  * `mnist`, `fashion_mnist`, `cifar10`: local data (see `load_local`) in `data_dir/<name>/`,
    `data_dir/<name>.npz` or `data_dir` itself, the first that holds some; else, for
    `fashion_mnist` without `data_dir`, the IDX files in `DEBIAN_FASHION_MNIST` if present; else
    tensorflow-datasets' prepared copy in `data_dir` (tfds's default if None), downloaded first
    if `download=True`. Without the `tensorflow` package tfds can read an ArrayRecord copy but
    cannot prepare one, so `download` is then not attempted and a missing copy is a DataError.
  * any other `name` that is an existing file or folder: `load_local(name, split)`.

  Args:
    name: one of `DATASETS`, "embedded", or a path.
    split: "train" or "test".
    data_dir: folder with local files or a tfds data directory; not accepted for the embedded and
      digits datasets (pass your own files' path as `name` instead).
    download: let tensorflow-datasets download and prepare a missing dataset.

  Returns:
    The split as a `Dataset` whose `source` says where it was found.

  Raises:
    DataError: unknown name or split; missing data (the message says how to get it); malformed
      data.
  """
  _check_split(split)
  key = _ALIASES.get(name, name)
  if key not in DATASETS:
    if isinstance(name, (str, os.PathLike)) and os.path.exists(name):
      return load_local(name, split)
    raise DataError(
      f"unknown dataset {name!r}: expected one of {DATASETS} (or 'embedded'), or the path of an existing file or folder"
    )
  if key in ("fashion_mnist_subset", "digits") and data_dir is not None:
    raise DataError(
      f"dataset {key!r} does not read data_dir={os.fspath(data_dir)!r}; to load "
      "your own files pass their path as the name, or use load_local"
    )
  if key == "fashion_mnist_subset":
    return _load_embedded(split)
  if key == "digits":
    return _load_digits(split)
  local = None
  if data_dir is not None:
    candidates = (os.path.join(data_dir, key), os.path.join(data_dir, key + ".npz"), data_dir)
    local = next((p for p in candidates if _layout(p) is not None), None)
  elif key == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
    local = DEBIAN_FASHION_MNIST
  if local is None:
    return _load_tfds(key, split, data_dir, download)
  ds = load_local(local, split)
  names = _CLASS_NAMES[key] if ds.num_classes == len(_CLASS_NAMES[key]) else ds.class_names
  return dataclasses.replace(ds, name=key, class_names=names)


def load_local(path: str | os.PathLike, split: str = "train") -> Dataset:
  """Loads a split from local files.

  Layouts:

  * A folder of IDX files, MNIST naming: `train-images-idx3-ubyte[.gz]`,
    `train-labels-idx1-ubyte[.gz]`, and `t10k-...` for "test" (`.idx3` for `-idx3` is fine too).
  * An `.npz` (or a folder holding exactly one): keys `x_train`, `y_train`, `x_test`, `y_test`;
    or `images`, `labels` for a single split, returned as "train" (then "test" is a DataError:
    use `train_test_split`). Other keys are ignored.
  * An image folder with one sub-folder per class (label ids follow the sorted class names),
    optionally inside `train/` and `test/` (without them the folder is the "train" split only).
    Read with Pillow: grayscale gives 1 channel, colour 3 (alpha dropped); all images must share
    one shape. Files without an image extension are ignored.

  `num_classes` is 1 + the largest label of either split; for image folders, the class count.

  Args:
    path: the folder or `.npz` file.
    split: "train" or "test".

  Returns:
    The split as a `Dataset` named after the file or folder.

  Raises:
    DataError: missing files (naming what was looked for) or malformed data.
  """
  _check_split(split)
  path = os.fspath(path)
  layout = _layout(path)
  if layout is None:
    if not os.path.exists(path):
      raise DataError(f"{path}: no such file or folder")
    raise DataError(
      f"{path}: holds no local dataset: looked for IDX files "
      "(train-images-idx3-ubyte[.gz], ...), an .npz file, or class sub-folders of "
      "images"
    )
  return {"idx": _load_idx_dir, "npz": _load_npz, "images": _load_image_folder}[layout](path, split)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzip-compressed (detected from content) or raw.

  Format: bytes 0x00 0x00, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
  float32, 0x0E float64), the rank; one big-endian uint32 per dimension; the big-endian payload.

  Args:
    path: the file.

  Returns:
    The array in native byte order, with the shape the header declares.

  Raises:
    DataError: unreadable file, corrupt gzip, wrong magic, unknown type code, truncated header,
      or a payload shorter or longer than the dimensions imply (says expected and found bytes).
      No other exception, and no hang, on any input.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as err:
    raise DataError(f"{path}: cannot read IDX file: {err}") from err
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
      raise DataError(f"{path}: corrupt gzip data: {err}") from err
  elif path.endswith(".gz"):
    raise DataError(f"{path}: named .gz but is not gzip data (starts with {raw[:2]!r})")
  if len(raw) < 4:
    raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need 4)")
  if raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path}: wrong IDX magic: expected bytes 00 00, found {raw[:2].hex(' ')}")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise DataError(f"{path}: unknown IDX type code 0x{code:02X}")
  if not 1 <= ndim <= _IDX_MAX_NDIM:
    raise DataError(f"{path}: IDX rank {ndim} is not in [1, {_IDX_MAX_NDIM}]")
  start = 4 + 4 * ndim
  if len(raw) < start:
    raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {start})")
  dims = struct.unpack(f">{ndim}I", raw[4:start])
  dtype, count = _IDX_DTYPES[code], math.prod(dims)
  expected, found = count * dtype.itemsize, len(raw) - start
  if found != expected:
    raise DataError(
      f"{path}: IDX payload has {found} bytes but dimensions {dims} of {dtype.name} imply {expected} bytes"
    )
  array = np.frombuffer(raw, dtype, count, start) if count else np.zeros(0, dtype)
  return array.reshape(dims).astype(dtype.newbyteorder("="))


def bootstrap_indices(key: jax.Array, n: int, num_members: int, size: int | None = None) -> np.ndarray:
  """Bootstrap resamples (with replacement), one row per ensemble member.

  Args:
    key: PRNG key; member m draws with `jax.random.fold_in(key, m)`.
    n: number of examples to sample from (< 2**31).
    num_members: number of rows.
    size: samples per member (default n).

  Returns:
    int32 numpy array (num_members, size) of indices in [0, n).
  """
  size = n if size is None else size
  if min(n, num_members, size) < 1 or n >= 2**31:
    raise DataError(
      f"bootstrap_indices needs 1 <= n < 2**31, num_members >= 1, size >= 1; got "
      f"n={n}, num_members={num_members}, size={size}"
    )
  draw = lambda m: jax.random.randint(jax.random.fold_in(key, m), (size,), 0, n, jnp.int32)
  return np.asarray(jax.vmap(draw)(jnp.arange(num_members)), dtype=np.int32)


def flip_labels(key: jax.Array, labels, rate: float, num_classes: int) -> np.ndarray:
  """Label noise: exactly `round(rate * N)` random labels become a random different class.

  Positions are drawn without replacement; each new class is uniform over the other
  `num_classes - 1`. `round` is Python's (ties to even). The input is not modified.

  Args:
    key: PRNG key.
    labels: integer labels (N,) in [0, num_classes).
    rate: fraction of labels to change, in [0, 1]; anything else is a DataError.
    num_classes: number of classes (>= 2 unless nothing is flipped).

  Returns:
    The new int32 numpy labels.
  """
  if not 0 <= rate <= 1:
    raise DataError(f"flip_labels: rate must lie in [0, 1], got {rate}")
  labels = np.array(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"flip_labels: labels must be integer (N,), got {labels.dtype} {labels.shape}")
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    raise DataError(f"flip_labels: labels must lie in [0, {num_classes})")
  labels, k = labels.astype(np.int32), int(round(rate * len(labels)))
  if k and num_classes < 2:
    raise DataError(f"flip_labels: cannot change labels with num_classes={num_classes}")
  if k:
    key_idx, key_shift = jax.random.split(key)
    chosen = np.asarray(jax.random.permutation(key_idx, len(labels)))[:k]
    shift = np.asarray(jax.random.randint(key_shift, (k,), 1, num_classes))
    labels[chosen] = (labels[chosen] + shift) % num_classes
  return labels


def train_test_split(ds: Dataset, test_fraction: float, key) -> tuple[Dataset, Dataset]:
  """Class-stratified split, deterministic in `key`.

  Each class gives `round(test_fraction * its count)` random examples to the test part; both
  parts keep the original order, name and source. A fraction outside (0, 1) or an empty part is
  a DataError.

  Returns:
    (train, test) datasets.
  """
  if not 0 < test_fraction < 1:
    raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  train_idx, test_idx = _stratified_indices(ds.labels, test_fraction, key)
  if not len(train_idx) or not len(test_idx):
    raise DataError(f"splitting {len(ds)} examples with test_fraction={test_fraction} leaves a part empty")
  return ds.subset(train_idx), ds.subset(test_idx)


def colourise(images_NxHxWx1: np.ndarray, seed: int, size: int = 32) -> np.ndarray:
  """Grey images padded to ``size`` x ``size`` and tinted: ``g * fg + (1 - g) * bg`` with a random
  bright foreground and dark background colour per image (a coloured Fashion-MNIST, an offline
  32x32x3 colour set). float32 in [0, 1]; deterministic in ``seed``.

  Raises:
    ValueError: Images larger than ``size``.
  """
  x = np.asarray(images_NxHxWx1, np.float32)
  ph, pw = size - x.shape[1], size - x.shape[2]
  if ph < 0 or pw < 0:
    raise ValueError(f"cannot pad {x.shape[1:3]} images to {size}x{size}")
  x = np.pad(x, [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)])
  rng = np.random.default_rng(seed)
  fg = rng.uniform(0.5, 1.0, (len(x), 1, 1, 3)).astype(np.float32)
  bg = rng.uniform(0.0, 0.35, (len(x), 1, 1, 3)).astype(np.float32)
  return x * fg + (1 - x) * bg


# Helpers. ------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}: expected one of {SPLITS}")


def _stratified_indices(labels: np.ndarray, fraction: float, key) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (rest, chosen) indices; chosen holds round(fraction * n_c) of each class c."""
  perm = np.asarray(jax.random.permutation(key, len(labels)))
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    members = perm[labels[perm] == c]  # class c in random order
    mask[members[: int(round(fraction * len(members)))]] = True
  return np.flatnonzero(~mask), np.flatnonzero(mask)


def _load_embedded(split: str) -> Dataset:
  resource = importlib.resources.files("jipguard") / "_data" / _EMBEDDED_FILE
  if not resource.is_file():
    raise DataError(
      f"the embedded subset {_EMBEDDED_FILE} is missing from this installation: "
      "reinstall jipguard, or rebuild it with scripts/make_embedded_subset.py "
      "(after `apt-get install dataset-fashion-mnist`)"
    )
  with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
    images, labels = validate(z[f"x_{split}"], z[f"y_{split}"], num_classes=10, what=_EMBEDDED_SOURCE)
  return Dataset(images, labels, 10, "fashion_mnist_subset", _EMBEDDED_SOURCE, _FASHION)


def _load_digits(split: str) -> Dataset:
  from sklearn import datasets as sk_datasets  # noqa: PLC0415 (sklearn only for digits)

  digits = sk_datasets.load_digits()
  parts = _stratified_indices(digits.target, _DIGITS_TEST_FRACTION, jax.random.key(_DIGITS_SEED))
  idx = parts[SPLITS.index(split)]
  images, labels = validate(digits.images[idx] / 16.0, digits.target[idx], num_classes=10, what="sklearn digits")
  return Dataset(images, labels, 10, "digits", "sklearn.datasets.load_digits", _CLASS_NAMES["digits"])


def _idx_names(split: str, kind: str) -> list[str]:
  """Candidate file names of `kind` ("images" or "labels") for `split`."""
  rank = "idx3" if kind == "images" else "idx1"
  return [f"{_IDX_PREFIX[split]}-{kind}{sep}{rank}-ubyte{gz}" for sep in "-." for gz in (".gz", "")]


def _find_idx(path: str, split: str, kind: str) -> str | None:
  return next((os.path.join(path, n) for n in _idx_names(split, kind) if os.path.isfile(os.path.join(path, n))), None)


def _is_image(name: str) -> bool:
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in _IMAGE_EXTENSIONS


def _class_dirs(path: str) -> list[str]:
  """Sorted non-hidden sub-folders of `path` holding at least one image file."""
  if not os.path.isdir(path):
    return []
  return [
    e
    for e in sorted(os.listdir(path))
    if not e.startswith(".")
    and os.path.isdir(os.path.join(path, e))
    and any(_is_image(f) for f in os.listdir(os.path.join(path, e)))
  ]


def _layout(path: str | os.PathLike) -> str | None:
  """ "idx", "npz" or "images": the kind of local dataset at `path`; None if none."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return "npz" if path.endswith(".npz") else None
  if not os.path.isdir(path):
    return None
  if any(_find_idx(path, s, "images") for s in SPLITS):
    return "idx"
  if any(f.endswith(".npz") for f in os.listdir(path)):
    return "npz"
  if _class_dirs(path) or any(_class_dirs(os.path.join(path, s)) for s in SPLITS):
    return "images"
  return None


def _load_idx_dir(path: str, split: str) -> Dataset:
  images_file, labels_file = _find_idx(path, split, "images"), _find_idx(path, split, "labels")
  if images_file is None or labels_file is None:
    wanted = ", ".join(_idx_names(split, "images") + _idx_names(split, "labels"))
    raise DataError(f"{path}: missing IDX files for split {split!r}: looked for {wanted}")
  images, labels = read_idx(images_file), read_idx(labels_file)
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"{path}: IDX images must be (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
  num_classes = int(labels.max(initial=0)) + 1
  other = _find_idx(path, SPLITS[1 - SPLITS.index(split)], "labels")
  if other is not None:
    num_classes = max(num_classes, int(read_idx(other).max(initial=0)) + 1)
  images, labels = validate(images, labels, what=images_file)
  return Dataset(images, labels, num_classes, os.path.basename(os.path.normpath(path)), f"IDX files in {path}")


def read_npz(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file (those named in ``keys``, or all), without pickles.

  Raises:
    DataError: The file is missing, truncated or corrupt, or a plain ``.npy``, naming it.
  """
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz archive")
    with z:
      return {k: z[k] for k in z.files if keys is None or k in keys}
  except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
    raise DataError(f"{path}: cannot read npz file ({type(err).__name__}: {err})") from err


def _load_npz(path: str, split: str) -> Dataset:
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    if len(found) != 1:
      raise DataError(f"{path}: holds {len(found)} .npz files {found}; pass one file's path")
    path = os.path.join(path, found[0])
  arrays = read_npz(path, ("x_train", "y_train", "x_test", "y_test", "images", "labels", SANITIZED_KEY))
  if f"x_{split}" in arrays and f"y_{split}" in arrays:
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
  elif "images" in arrays and "labels" in arrays and split == "train":
    images, labels = arrays["images"], arrays["labels"]
  else:
    raise DataError(
      f"{path}: no {split!r} split: expected keys x_{split}/y_{split} (or "
      f"images/labels, a single train split), found {sorted(arrays) or 'none'}"
    )
  # A sanitized set (IPProtect's sanitized.npz says so) has pixels outside [0, 1].
  sanitized = bool(arrays.get(SANITIZED_KEY, False))
  images, labels = validate(images, labels, what=path, unit_range=not sanitized)
  num_classes = 1 + max(int(np.max(y, initial=0)) for k, y in arrays.items() if k in ("y_train", "y_test", "labels"))
  return Dataset(images, labels, num_classes, os.path.splitext(os.path.basename(path))[0], f"npz file {path}")


def _read_image(file: str) -> np.ndarray:
  """uint8 (H, W, 1) for grayscale, (H, W, 3) for colour (alpha dropped)."""
  from PIL import Image  # noqa: PLC0415 (Pillow only for image folders)

  try:
    with Image.open(file) as img:
      mode = img.mode
      if mode in ("1", "L", "LA"):
        img = img.convert("L")
      elif mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
      pixels = np.asarray(img)
  except (OSError, ValueError, Image.DecompressionBombError) as err:
    raise DataError(f"{file}: cannot read image: {err}") from err
  if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
    raise DataError(f"{file}: unsupported image mode {mode!r}; use 8-bit grayscale or RGB")
  return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def _load_image_folder(path: str, split: str) -> Dataset:
  train_dir = os.path.join(path, "train")
  if os.path.isdir(train_dir):
    root = os.path.join(path, split)
    if not _class_dirs(root):
      raise DataError(f"{path}: has train/ but no {split}/ with class sub-folders of images")
    classes = sorted(set(_class_dirs(train_dir)) | set(_class_dirs(root)))
  elif split == "test":
    raise DataError(
      f"{path}: an image folder without train/ and test/ sub-folders is a single "
      "'train' split; split it with train_test_split"
    )
  else:
    root, classes = path, _class_dirs(path)
  images, labels = [], []
  for label, cls in enumerate(classes):
    folder = os.path.join(root, cls)
    files = sorted(f for f in os.listdir(folder) if _is_image(f)) if os.path.isdir(folder) else []
    for file in (os.path.join(folder, f) for f in files):
      images.append(_read_image(file))
      labels.append(label)
      if images[-1].shape != images[0].shape:
        raise DataError(
          f"{file}: image shape {images[-1].shape} (H, W, C) differs from "
          f"{images[0].shape} of the first image; all images must share one shape"
        )
  if not images:
    raise DataError(f"{root}: no class sub-folders of images")
  images, labels = validate(np.stack(images), np.asarray(labels), what=root)
  return Dataset(
    images, labels, len(classes), os.path.basename(os.path.normpath(path)), f"image folder {path}", tuple(classes)
  )


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _missing_message(name: str, split: str, data_dir: str | None, err: Exception) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets (tfds's default)")
  no_tf = (
    ""
    if _has_tensorflow()
    else " Without the `tensorflow` package, tfds reads only a "
    "copy prepared in ArrayRecord format, and cannot prepare one."
  )
  lines = [
    f"dataset {name!r} (split {split!r}) is not available offline: tensorflow-datasets "
    f"has no prepared copy in {where}.{no_tf}",
    f"  (tfds: {type(err).__name__}: {str(err).strip()[:400]})",
    "To get it, either:",
  ]
  if name == "fashion_mnist":
    lines.append(
      f"  - `apt-get install dataset-fashion-mnist` (IDX files in "
      f"{DEBIAN_FASHION_MNIST}, used automatically when data_dir is None);"
    )
  lines += [
    "  - pass data_dir= (--data_dir) a folder holding IDX files (train-images-idx3-ubyte.gz, "
    "...), an .npz (x_train, y_train, x_test, y_test) or an image folder with one sub-folder "
    "per class;",
    f"  - online, after `pip install tensorflow`: load({name!r}, download=True) once, or "
    f"`tfds build {name} --data_dir DIR` and pass data_dir=DIR;",
    f"  - without tensorflow: copy in a version prepared elsewhere with `tfds build {name} "
    "--file_format=array_record --data_dir DIR` and pass data_dir=DIR.",
  ]
  return "\n".join(lines)


def _load_tfds(name: str, split: str, data_dir, download: bool) -> Dataset:
  """Reads a prepared tfds copy: tfds.load with TensorFlow, tfds.data_source without."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (tfds is slow to import; named datasets only)

  data_dir = None if data_dir is None else os.fspath(data_dir)
  if _has_tensorflow():
    try:
      (images, labels), info = tfds.load(
        name, split=split, data_dir=data_dir, batch_size=-1, as_supervised=True, download=download, with_info=True
      )
      images, labels = tfds.as_numpy(images), tfds.as_numpy(labels)
    except Exception as err:  # tfds raises many types (AssertionError, KeyError, ...) for this.
      raise DataError(_missing_message(name, split, data_dir, err)) from err
    backend = "tfds.load"
  else:  # tfds needs TensorFlow to encode images when preparing: read only, never download.
    try:
      source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False, builder_kwargs={"file_format": "array_record"}
      )
      examples = [source[i] for i in range(len(source))]
    except Exception as err:  # tfds raises many types (KeyError, NotImplementedError, ...).
      raise DataError(_missing_message(name, split, data_dir, err)) from err
    if not examples:
      raise DataError(f"tfds:{name}: split {split!r} in {data_dir or 'tfds default'} is empty")
    images = np.stack([np.asarray(ex["image"]) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples])
    info, backend = source.dataset_info, "tfds.data_source, ArrayRecord"
  num_classes = int(info.features["label"].num_classes)
  images, labels = validate(images, labels, num_classes=num_classes, what=f"tfds:{name}")
  names = _CLASS_NAMES[name] if num_classes == len(_CLASS_NAMES[name]) else ()
  return Dataset(
    images, labels, num_classes, name, f"tfds:{name} (data_dir={data_dir or 'tfds default'}, {backend})", names
  )
