"""Protection and restoration: exact mode bit for bit, LSB mode's bound, every tampering refused."""

import numpy as np
import pytest

from jipguard.authorization import crypto, embed, mrit

CFG = mrit.MRITConfig()


@pytest.fixture(scope="module")
def key():
  return crypto.generate_key()


def _pair(shape, n=40, seed=0):
  rng = np.random.default_rng(seed)
  clean = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  clean[: n // 4] = 0  # flat images: many equal spreads
  clean[n // 4 : n // 2, ..., :1] = 255
  noise = rng.integers(-18, 19, clean.shape)
  target = np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)  # an FSP-like target
  return clean, target


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (16, 20, 3), (24, 24, 1)])
def test_exact_mode_restores_bit_for_bit(key, shape):
  clean, target = _pair(shape, seed=sum(shape))
  p = embed.protect(clean, target, key, dataset_id="ds", indices=np.arange(100, 140))
  assert p.images.shape == clean.shape and p.images.dtype == np.uint8
  assert not np.array_equal(p.images, clean)
  restored = embed.restore(p.images, key, dataset_id="ds", indices=np.arange(100, 140), sidecar=p.sidecar)
  np.testing.assert_array_equal(restored, clean)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_lsb_mode_error_is_within_the_documented_bound(key, shape):
  clean, target = _pair(shape, seed=7)
  p = embed.protect(clean, target, key, dataset_id="ds")
  restored = embed.restore(p.images, key, dataset_id="ds")
  diff = np.abs(restored.astype(int) - clean)
  max_err, max_pixels = embed.lsb_error_bound(shape, CFG)
  assert diff.max() <= max_err
  assert (diff > 0).reshape(len(clean), -1).sum(1).max() <= max_pixels
  assert diff.max() == 1  # the loss is real: the paper's mode is not exact


def test_protect_is_deterministic_and_close_to_its_target(key):
  rng = np.random.default_rng(3)
  smooth = lambda: np.clip(
    np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 8, 3)), 4, 1), 4, 2) + rng.integers(-6, 7, (8, 32, 32, 3)), 0, 255
  ).astype(np.uint8)
  clean, target = smooth(), smooth()
  a, b = (embed.protect(clean, target, key, dataset_id="ds") for _ in range(2))
  np.testing.assert_array_equal(a.images, b.images)
  assert np.all(embed.psnr(a.images, target) > embed.psnr(clean, target))


@pytest.mark.parametrize("change", ["key", "index", "dataset", "flip_payload_bit", "flip_other_bit", "sidecar_bit"])
def test_tampering_is_detected_and_names_the_image(key, change):
  clean, target = _pair((28, 28, 1), n=6)
  p = embed.protect(clean, target, key, dataset_id="ds")
  images, sidecar, args = p.images.copy(), p.sidecar.copy(), {"dataset_id": "ds", "indices": np.arange(6)}
  if change == "key":
    key = crypto.generate_key()
  elif change == "index":
    args["indices"] = np.array([0, 1, 2, 4, 3, 5])
  elif change == "dataset":
    args["dataset_id"] = "other"
  elif change == "flip_payload_bit":
    images[3, 0, 5, 0] ^= 1
  elif change == "flip_other_bit":
    images[3, 27, 27, 0] ^= 0x10
  else:
    sidecar[3, 2] ^= 4
  with pytest.raises(crypto.AuthenticationError, match=r"image (3|4|0):.*nothing was restored"):
    embed.restore(images, key, sidecar=sidecar, **args)


def test_a_truncated_sidecar_is_refused(key):
  clean, target = _pair((28, 28, 1), n=4)
  p = embed.protect(clean, target, key, dataset_id="ds")
  with pytest.raises(crypto.AuthenticationError, match="truncated"):
    embed.restore(p.images, key, dataset_id="ds", sidecar=p.sidecar[:, :-1])


def test_capacity_arithmetic_and_refusal():
  c = embed.capacity((28, 28, 1), CFG)
  assert (c.blocks, c.sequence_bits, c.payload_bits, c.available_bits) == (49, 539, 8 * (68 + 16), 784)
  c = embed.capacity((32, 32, 3), CFG)
  assert (c.blocks, c.sequence_bits, c.payload_bits, c.available_bits) == (192, 2112, 8 * (264 + 16), 3072)
  assert not embed.capacity((8, 8, 1), CFG).fits
  x = np.zeros((1, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="room for 64 payload bits, but its sequence needs 176"):
    embed.protect(x, x, crypto.generate_key(), dataset_id="ds")
