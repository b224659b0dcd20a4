"""Tests for jipguard.data: loaders, the IDX parser, validation and sampling."""

import gzip
import hashlib
import importlib.resources
import os
import struct

import jax
import numpy as np
from PIL import Image
import pytest

from jipguard import data

DEBIAN = data.DEBIAN_FASHION_MNIST
_CODES = {
  np.dtype("u1"): 0x08,
  np.dtype("i1"): 0x09,
  np.dtype("i2"): 0x0B,
  np.dtype("i4"): 0x0C,
  np.dtype("f4"): 0x0D,
  np.dtype("f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
  """Encodes `array` in the IDX format (big-endian)."""
  array = np.asarray(array)
  header = bytes([0, 0, _CODES[array.dtype], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, compress=None) -> str:
  payload = idx_bytes(array)
  compress = str(path).endswith(".gz") if compress is None else compress
  with open(path, "wb") as f:
    f.write(gzip.compress(payload, mtime=0) if compress else payload)
  return str(path)


def write_idx_dir(folder, n_train=12, n_test=6, size=(5, 4), num_classes=3):
  rng = np.random.default_rng(0)
  out = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    x = rng.integers(0, 256, (n, *size), dtype=np.uint8)
    y = (np.arange(n) % num_classes).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    out[prefix] = (x, y)
  return out


def embedded_npz():
  resource = importlib.resources.files("jipguard") / "_data" / "fashion_mnist_subset.npz"
  with resource.open("rb") as f, np.load(f) as z:
    return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- embedded


@pytest.mark.parametrize("split,n", [("train", 1000), ("test", 100)])
def test_embedded_subset_shapes_range_and_balance(split, n):
  ds = data.load(split=split)
  assert ds.name == "fashion_mnist_subset" and "fashion_mnist_subset.npz" in ds.source
  assert ds.images.shape == (10 * n, 28, 28, 1) and ds.images.dtype == np.float32
  assert ds.labels.shape == (10 * n,) and ds.labels.dtype == np.int32
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and ds.images.max() > 0.9
  np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [n] * 10)
  assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
  alias = data.load("embedded", split)
  np.testing.assert_array_equal(alias.images, ds.images)


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason=f"{DEBIAN} absent")
def test_embedded_subset_equals_debian_originals():
  z = embedded_npz()
  for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
    idx = z[f"{split}_indices"]
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n
    images = data.read_idx(os.path.join(DEBIAN, f"{prefix}-images-idx3-ubyte.gz"))
    labels = data.read_idx(os.path.join(DEBIAN, f"{prefix}-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(z[f"x_{split}"], images[idx])
    np.testing.assert_array_equal(z[f"y_{split}"], labels[idx])


def test_embedded_subset_sha256_matches_readme():
  folder = importlib.resources.files("jipguard") / "_data"
  digest = hashlib.sha256((folder / "fashion_mnist_subset.npz").read_bytes()).hexdigest()
  assert digest in (folder / "README.md").read_text()


# --------------------------------------------------------------------------- digits


def test_digits_shapes_stratified_disjoint_split():
  from sklearn.datasets import load_digits

  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert train.images.shape[1:] == test.images.shape[1:] == (8, 8, 1)
  assert len(train) + len(test) == 1797 and train.images.max() <= 1.0
  full = load_digits()
  # Train and test together are exactly the full set (so disjoint, nothing lost).
  rows = lambda x, y: sorted(zip(map(bytes, (x * 16).round().astype(np.uint8).reshape(len(x), -1)), y, strict=True))
  assert rows(np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])) == rows(
    full.images / 16, full.target
  )
  per_class = np.bincount(full.target)
  np.testing.assert_array_equal(np.bincount(test.labels), [round(0.2 * c) for c in per_class])
  np.testing.assert_array_equal(data.load("digits", "test").labels, test.labels)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
  rng = np.random.default_rng(1)
  array = (rng.normal(size=(3, 5, 2)) * 100).astype(dtype)
  out = data.read_idx(write_idx(tmp_path / f"a-idx3-ubyte{suffix}", array))
  assert out.dtype == np.dtype(dtype) and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
  "content,message",
  [
    (b"\x00\x00", "truncated IDX header"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "wrong IDX magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "has 2 bytes but .* imply 4 bytes"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "has 2 bytes but .* imply 1 bytes"),
    (b"\x00\x00\x08\x00", "rank 0"),
  ],
)
def test_idx_errors(tmp_path, content, message):
  path = tmp_path / "bad-idx1-ubyte"
  path.write_bytes(content)
  with pytest.raises(data.DataError, match=message):
    data.read_idx(path)


def test_idx_truncated_payload_and_corrupt_gzip(tmp_path):
  payload = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
  (tmp_path / "t-idx3-ubyte").write_bytes(payload[:-7])
  with pytest.raises(data.DataError, match="53 bytes but dimensions .* imply 60 bytes"):
    data.read_idx(tmp_path / "t-idx3-ubyte")
  zipped = gzip.compress(payload)
  (tmp_path / "t-idx3-ubyte.gz").write_bytes(zipped[:-10])
  with pytest.raises(data.DataError, match="corrupt gzip"):
    data.read_idx(tmp_path / "t-idx3-ubyte.gz")
  (tmp_path / "u-idx3-ubyte.gz").write_bytes(payload)
  with pytest.raises(data.DataError, match="not gzip"):
    data.read_idx(tmp_path / "u-idx3-ubyte.gz")
  with pytest.raises(data.DataError, match="cannot read"):
    data.read_idx(tmp_path / "missing-idx3-ubyte")


def test_idx_fuzz_returns_declared_shape_or_raises_data_error(tmp_path):
  rng = np.random.default_rng(1234)
  raw = idx_bytes(np.arange(120, dtype=np.uint8).reshape(2, 6, 10))
  bases = [raw, gzip.compress(raw, mtime=0), idx_bytes(np.ones((3, 2), "f4"))]
  outcomes = {"ok": 0, "error": 0}
  for i in range(200):
    base = bytearray(bases[i % len(bases)])
    kind = i % 4
    if kind == 0:  # byte flips
      for pos in rng.integers(0, len(base), rng.integers(1, 4)):
        base[pos] = int(rng.integers(0, 256))
    elif kind == 1:  # truncation or extension
      base = base[: rng.integers(0, len(base))] if i % 8 == 1 else base + rng.bytes(3)
    elif kind == 2:  # garbage, sometimes with a plausible prefix
      base = bytearray([b"", b"\x1f\x8b", b"\x00\x00\x08\x01"][i % 3] + rng.bytes(rng.integers(0, 64)))
    else:  # header fields set to random values
      base[int(rng.integers(2, 8))] = int(rng.integers(0, 256))
    path = tmp_path / f"f{i}-idx-ubyte"
    path.write_bytes(bytes(base))
    try:
      out = data.read_idx(path)
    except data.DataError:
      outcomes["error"] += 1
      continue
    content = gzip.decompress(bytes(base)) if base[:2] == b"\x1f\x8b" else bytes(base)
    dims = struct.unpack(f">{content[3]}I", content[4 : 4 + 4 * content[3]])
    assert isinstance(out, np.ndarray) and out.shape == dims
    outcomes["ok"] += 1
  assert outcomes["ok"] > 0 and outcomes["error"] > 100, outcomes


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
  "images,labels,kwargs,message",
  [
    (np.zeros((2, 3, 3)), np.zeros(3, int), {}, "2 images but 3 labels"),
    (np.full((2, 3, 3), np.nan), np.zeros(2, int), {}, "18 pixel values are NaN"),
    (np.array([[[0.5, np.inf]]]), np.zeros(1, int), {}, "1 pixel values are NaN or infinite"),
    (np.array([[[-0.5, 2.0]]]), np.zeros(1, int), {}, "min -0.5 and max 2.0"),
    (np.zeros((4, 4)), np.zeros(4, int), {}, r"rank 3 .* got shape \(4, 4\)"),
    (np.zeros((1, 2, 2, 1, 1)), np.zeros(1, int), {}, r"got shape \(1, 2, 2, 1, 1\)"),
    (np.zeros((0, 2, 2)), np.zeros(0, int), {}, "empty"),
    (np.zeros((2, 2, 2)), np.array([0.0, 1.0]), {}, "labels must be integers"),
    (np.zeros((2, 2, 2)), np.array([0, -1]), {}, "labels must be >= 0"),
    (np.zeros((2, 2, 2)), np.array([0, 3]), {"num_classes": 3}, "labels must be < num_classes=3"),
    (np.zeros((2, 2, 2), np.int64), np.array([0, 1]), {}, "uint8 or float"),
  ],
)
def test_validate_errors(images, labels, kwargs, message):
  with pytest.raises(data.DataError, match=message):
    data.validate(images, labels, **kwargs)


def test_validate_scales_uint8_and_adds_channel():
  images, labels = data.validate(np.array([[[0, 255]]], np.uint8), np.array([1], np.int64))
  assert images.shape == (1, 1, 2, 1) and images.dtype == np.float32 and labels.dtype == np.int32
  np.testing.assert_allclose(images[0, 0, :, 0], [0.0, 1.0])
  rgb, _ = data.validate(np.full((1, 2, 2, 3), 0.5), [0])
  assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.float32


def test_dataset_subset_and_structure_checks():
  ds = data.load("digits", "test")
  sub = ds.subset(np.arange(5))
  assert len(sub) == 5 and sub.image_shape == (8, 8, 1) and sub.source == ds.source
  with pytest.raises(data.DataError, match="NHWC"):
    data.Dataset(np.zeros((2, 8, 8), np.float32), np.zeros(2, np.int32), 10, "x", "y")
  with pytest.raises(data.DataError, match=r"labels must lie in \[0, 2\)"):
    data.Dataset(np.zeros((1, 2, 2, 1), np.float32), np.array([5], np.int32), 2, "x", "y")


# --------------------------------------------------------------------------- load errors


def test_unknown_name_and_split():
  with pytest.raises(data.DataError, match="unknown dataset 'imagenet'.*fashion_mnist_subset"):
    data.load("imagenet")
  with pytest.raises(data.DataError, match="unknown split 'validation'"):
    data.load("digits", "validation")
  with pytest.raises(data.DataError, match="unknown split"):
    data.load_local("whatever", "val")


def test_missing_local_files_say_what_was_looked_for(tmp_path):
  with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
    data.load_local(tmp_path)
  with pytest.raises(data.DataError, match="no such file"):
    data.load_local(tmp_path / "nope.npz")
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(data.DataError, match="missing IDX files .*train-labels-idx1-ubyte"):
    data.load_local(tmp_path)


def test_missing_named_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DataError) as err:
    data.load("mnist", data_dir=tmp_path)
  text = str(err.value)
  assert "'mnist'" in text and str(tmp_path) in text
  assert "download=True" in text and "tfds build mnist" in text and "IDX" in text
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", "test", data_dir=tmp_path)


def test_embedded_rejects_data_dir(tmp_path):
  with pytest.raises(data.DataError, match="does not read data_dir"):
    data.load(data_dir=tmp_path)


# --------------------------------------------------------------------------- local files


def test_idx_folder_loads_both_splits_and_via_load(tmp_path):
  arrays = write_idx_dir(tmp_path)
  for split, prefix in (("train", "train"), ("test", "t10k")):
    ds = data.load_local(tmp_path, split)
    np.testing.assert_allclose(ds.images[..., 0], arrays[prefix][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.labels, arrays[prefix][1])
    assert ds.num_classes == 3 and str(tmp_path) in ds.source
  ds = data.load("mnist", "test", data_dir=tmp_path)
  assert ds.name == "mnist" and ds.source == f"IDX files in {tmp_path}" and len(ds) == 6


def test_idx_folder_with_mismatched_counts(tmp_path):
  write_idx_dir(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
  with pytest.raises(data.DataError, match="12 images but 5 labels"):
    data.load_local(tmp_path)


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason=f"{DEBIAN} absent")
def test_fashion_mnist_from_debian():
  ds = data.load("fashion_mnist", "test")
  assert ds.images.shape == (10000, 28, 28, 1) and ds.source == f"IDX files in {DEBIAN}"


def test_npz_loader(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "two.npz", x_train=x, y_train=np.arange(6) % 4, x_test=x[:2], y_test=np.array([0, 1]))
  train, test = data.load_local(tmp_path / "two.npz"), data.load(str(tmp_path / "two.npz"), "test")
  assert train.image_shape == (4, 4, 3) and len(test) == 2 and train.num_classes == 4
  np.testing.assert_allclose(train.images, x / 255.0, rtol=1e-6)
  np.savez(tmp_path / "one.npz", images=x[..., 0] / 255.0, labels=np.arange(6) % 2)
  one = data.load_local(tmp_path / "one.npz")
  assert one.image_shape == (4, 4, 1) and one.num_classes == 2
  with pytest.raises(data.DataError, match="no 'test' split"):
    data.load_local(tmp_path / "one.npz", "test")
  np.savez(tmp_path / "bad.npz", pixels=x)
  with pytest.raises(data.DataError, match=r"expected keys x_train/y_train.*found none"):
    data.load_local(tmp_path / "bad.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(data.DataError, match="cannot read npz"):
    data.load_local(tmp_path / "junk.npz")
  # A truncated archive (zip magic, cut short) and a plain .npy under an .npz name.
  whole = (tmp_path / "two.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
  with pytest.raises(data.DataError, match="cannot read npz"):
    data.load_local(tmp_path / "cut.npz")
  np.save(tmp_path / "array.npy", x)
  (tmp_path / "array.npy").rename(tmp_path / "array.npz")
  with pytest.raises(data.DataError, match="not an .npz"):
    data.load_local(tmp_path / "array.npz")


def test_npz_sanitized_sets_may_leave_the_unit_range(tmp_path):
  """IPProtect's sanitized.npz says what it is; other float sets outside [0, 1] are refused."""
  x = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype(np.float32)
  np.savez(tmp_path / "plain.npz", images=x, labels=np.arange(5))
  with pytest.raises(data.DataError, match=r"must lie in \[0, 1\]"):
    data.load_local(tmp_path / "plain.npz")
  np.savez(tmp_path / "sanitized.npz", images=x, labels=np.arange(5), sanitized=np.array(True))
  np.testing.assert_array_equal(data.load_local(tmp_path / "sanitized.npz").images, x)
  x[0, 0, 0, 0] = np.nan  # Still finite only.
  np.savez(tmp_path / "nan.npz", images=x, labels=np.arange(5), sanitized=np.array(True))
  with pytest.raises(data.DataError, match="NaN"):
    data.load_local(tmp_path / "nan.npz")


def _save_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_image_folder_loader(tmp_path):
  rng = np.random.default_rng(0)
  for cls, n in (("cat", 3), ("ant", 2)):
    for i in range(n):
      _save_png(tmp_path / "gray" / cls / f"{i}.png", rng.integers(0, 256, (6, 5), dtype=np.uint8))
  (tmp_path / "gray" / "cat" / "notes.txt").write_text("ignored")
  ds = data.load_local(tmp_path / "gray")
  assert ds.images.shape == (5, 6, 5, 1) and ds.class_names == ("ant", "cat")
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
  first = np.asarray(Image.open(tmp_path / "gray" / "ant" / "0.png"))
  np.testing.assert_allclose(ds.images[0, ..., 0], first / 255.0, rtol=1e-6)
  with pytest.raises(data.DataError, match="single 'train' split"):
    data.load_local(tmp_path / "gray", "test")
  for split in ("train", "test"):
    for cls in ("a", "b"):
      _save_png(tmp_path / "rgb" / split / cls / "x.png", rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
  test = data.load_local(tmp_path / "rgb", "test")
  assert test.image_shape == (3, 3, 3) and test.num_classes == 2 and list(test.labels) == [0, 1]
  _save_png(tmp_path / "gray" / "cat" / "odd.png", np.zeros((7, 5), np.uint8))
  with pytest.raises(data.DataError, match=r"odd\.png: image shape \(7, 5, 1\).*differs from \(6, 5, 1\)"):
    data.load_local(tmp_path / "gray")
  (tmp_path / "gray" / "cat" / "odd.png").write_bytes(b"not a png")
  with pytest.raises(data.DataError, match=r"odd\.png: cannot read image"):
    data.load_local(tmp_path / "gray")


# --------------------------------------------------------------------------- tfds


def test_tfds_path_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=9):
    mnist = data.load("mnist", "train", data_dir=tmp_path)
    cifar = data.load("cifar10", "test", data_dir=tmp_path)
  assert mnist.images.shape == (9, 28, 28, 1) and mnist.images.dtype == np.float32
  assert mnist.labels.dtype == np.int32 and mnist.num_classes == 10
  assert mnist.source.startswith("tfds:mnist") and mnist.name == "mnist"
  assert cifar.images.shape == (9, 32, 32, 3) and cifar.class_names[0] == "airplane"
  assert 0 <= cifar.images.min() and cifar.images.max() <= 1


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_flip_labels_exact_count_and_different_classes(rate):
  labels = np.arange(101) % 7
  flipped = data.flip_labels(jax.random.key(3), labels, rate, 7)
  assert flipped.dtype == np.int32 and flipped.shape == labels.shape
  changed = flipped != labels
  assert changed.sum() == round(rate * 101)
  assert flipped.min() >= 0 and flipped.max() < 7
  np.testing.assert_array_equal(flipped, data.flip_labels(jax.random.key(3), labels, rate, 7))
  if rate == 0:
    np.testing.assert_array_equal(flipped, labels)


def test_flip_labels_errors_and_spread():
  with pytest.raises(data.DataError, match="rate"):
    data.flip_labels(jax.random.key(0), [0, 1], 1.5, 2)
  with pytest.raises(data.DataError, match="labels must lie"):
    data.flip_labels(jax.random.key(0), [0, 4], 0.5, 2)
  flipped = data.flip_labels(jax.random.key(0), np.zeros(3000, int), 1.0, 4)
  counts = np.bincount(flipped, minlength=4)
  assert counts[0] == 0 and counts[1:].min() > 900  # uniform over the other classes


def test_bootstrap_indices():
  key = jax.random.key(5)
  idx = data.bootstrap_indices(key, 50, 4)
  assert idx.shape == (4, 50) and idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < 50
  np.testing.assert_array_equal(idx, data.bootstrap_indices(key, 50, 4))
  assert data.bootstrap_indices(key, 50, 3, size=7).shape == (3, 7)
  assert all(not np.array_equal(idx[0], idx[m]) for m in range(1, 4))
  assert len(np.unique(idx[0])) < 50  # with replacement: duplicates are (almost) certain
  member2 = jax.random.randint(jax.random.fold_in(key, 2), (50,), 0, 50)
  np.testing.assert_array_equal(idx[2], member2)
  with pytest.raises(data.DataError):
    data.bootstrap_indices(key, 0, 4)


def test_train_test_split_stratified_and_deterministic():
  ds = data.load("digits", "train")
  train, test = data.train_test_split(ds, 0.25, jax.random.key(1))
  assert len(train) + len(test) == len(ds)
  np.testing.assert_array_equal(np.bincount(test.labels), [round(0.25 * c) for c in np.bincount(ds.labels)])
  again = data.train_test_split(ds, 0.25, jax.random.key(1))[1]
  np.testing.assert_array_equal(again.images, test.images)
  other = data.train_test_split(ds, 0.25, jax.random.key(2))[1]
  assert not np.array_equal(other.images, test.images)
  with pytest.raises(data.DataError, match="test_fraction"):
    data.train_test_split(ds, 1.0, jax.random.key(1))
