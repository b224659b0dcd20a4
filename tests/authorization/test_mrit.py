"""mRIT: exact inversion over many random images, pairing by SD classes, packing."""

import numpy as np
import pytest

from jipguard.authorization import mrit

SHAPES = [(28, 28, 1), (32, 32, 3), (8, 12, 2), (16, 16, 1)]


def _images(rng, n, shape):
  """Random images with the hard cases: flat blocks (equal spreads), saturated pixels."""
  x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  x[: n // 4] = 0
  x[n // 4 : n // 2, : shape[0] // 2] = 255
  x[n // 2 : 3 * n // 4] = (x[n // 2 : 3 * n // 4] // 64) * 64  # few distinct spreads
  return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [mrit.MRITConfig(), mrit.MRITConfig(block=2, classes=8, shift_step=2)])
def test_inverse_of_transform_is_exact(shape, cfg):
  rng = np.random.default_rng(hash((shape, cfg.block)) % 2**32)
  secret, target = _images(rng, 64, shape), rng.permutation(_images(rng, 64, shape))
  transformed, seq = mrit.transform(secret, target, cfg)
  assert transformed.dtype == np.uint8 and transformed.shape == secret.shape
  np.testing.assert_array_equal(mrit.inverse(transformed, seq, cfg), secret)


def test_transform_moves_towards_the_target():
  rng = np.random.default_rng(1)
  low = rng.integers(0, 256, (2, 32, 7, 7, 1))  # smooth images: 4x4 blocks of one level, plus noise
  smooth = np.repeat(np.repeat(low, 4, 2), 4, 3) + rng.integers(-8, 9, (2, 32, 28, 28, 1))
  secret, target = np.clip(smooth, 0, 255).astype(np.uint8)
  transformed, _ = mrit.transform(secret, target, mrit.MRITConfig())
  err = lambda a: np.abs(a.astype(int) - target).mean()
  assert err(transformed) < 0.3 * err(secret)


def test_spread_is_invariant_to_even_shifts_rotations_and_the_lowest_bit():
  rng = np.random.default_rng(2)
  blocks = rng.integers(0, 200, (5, 7, 4, 4))
  base = mrit.spread(blocks)
  np.testing.assert_array_equal(mrit.spread(blocks + 46), base)
  np.testing.assert_array_equal(mrit.spread(np.rot90(blocks, 1, axes=(-2, -1))), base)
  np.testing.assert_array_equal(mrit.spread(blocks ^ 1), base)


def test_classes_never_split_equal_spreads_and_pairing_is_a_permutation():
  rng = np.random.default_rng(3)
  spread = rng.integers(0, 5, (20, 49))
  classes = mrit.secret_classes(spread, 4)
  for s, c in zip(spread, classes):
    for v in np.unique(s):
      assert len(np.unique(c[s == v])) == 1
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(c[order]) >= 0)  # classes are ranges of spread
  source = mrit.pairing(classes, rng.integers(0, 100, (20, 49)), 4)
  np.testing.assert_array_equal(np.sort(source, axis=1), np.arange(49)[None].repeat(20, 0))
  # Each target position receives a secret block of its own class.
  target_classes = np.take_along_axis(classes, source, axis=1)
  assert np.all(np.bincount(target_classes.ravel(), minlength=4) == np.bincount(classes.ravel(), minlength=4))


def test_a_target_equal_to_the_secret_is_the_identity():
  rng = np.random.default_rng(4)
  x = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  transformed, seq = mrit.transform(x, x, mrit.MRITConfig())
  np.testing.assert_array_equal(transformed, x)
  assert not seq.shifts_NxL.any() and not seq.rotations_NxL.any()


def test_pack_unpack_round_trip_and_lengths():
  cfg = mrit.MRITConfig()
  assert (cfg.class_bits, cfg.shift_bits, cfg.bits_per_block) == (2, 7, 11)
  assert mrit.sequence_bits((28, 28, 1), cfg) == 49 * 11
  assert mrit.sequence_bits((32, 32, 3), cfg) == 192 * 11
  rng = np.random.default_rng(5)
  x, t = rng.integers(0, 256, (2, 10, 32, 32, 3), dtype=np.uint8)
  _, seq = mrit.transform(x, t, cfg)
  packed = mrit.pack(seq, cfg)
  assert packed.shape == (10, mrit.sequence_bytes((32, 32, 3), cfg))
  back = mrit.unpack(packed, (32, 32, 3), cfg)
  for f in ("classes_NxL", "rotations_NxL", "shifts_NxL"):
    np.testing.assert_array_equal(getattr(back, f), getattr(seq, f))
  with pytest.raises(ValueError, match="bytes"):
    mrit.unpack(packed[:, :-1], (32, 32, 3), cfg)


def test_bad_configs_and_shapes_are_refused():
  with pytest.raises(ValueError, match="--shift_step"):
    mrit.MRITConfig(shift_step=3)
  with pytest.raises(ValueError, match="--block"):
    mrit.MRITConfig(block=1)
  with pytest.raises(ValueError, match="multiple of the block size 4"):
    mrit.num_blocks((30, 28, 1), mrit.MRITConfig())
  x = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    mrit.transform(x.astype(np.float32), x, mrit.MRITConfig())
