"""mRIT: the reversible block transformation that hides a clean image inside a target image.

After Zhang, Wang, Hou & Yu's reversible image transformation (RIT, the paper's ref. [12]),
which the paper modifies only in how the *Sequence* is protected (AES + LSB, ``embed``):

1. **Blocks.** Both images (uint8, H x W x C) are cut into b x b blocks, each channel on its
   own, ``L = C * (H / b) * (W / b)`` blocks in all (channel-major, then raster order).
2. **SD classes.** Each block's spread is the exact integer ``b^2 * sum(m^2) - (sum m)^2`` of
   its pixels' 7 high bits ``m = x >> 1`` (b^4 times the variance of ``m``). The clean
   ("secret") blocks are sorted by it and cut into ``classes`` classes of about equal size;
   each cut is moved up to the next change of value, so equal spreads never straddle two
   classes (classes may be empty). The target's blocks, sorted by their own spread, are cut
   into classes of the same sizes.
3. **Pairing.** The j-th secret block of class k (raster order) goes to the position of the j-th
   target block of class k.
4. **Transformation.** The secret block is shifted by ``delta``, the difference of the two
   blocks' means rounded to a multiple of ``shift_step`` and clipped so that no pixel leaves
   [0, 255] (the overflow handling: clipping to the largest feasible multiple, so ``delta = 0``
   is always feasible), then rotated by the multiple of 90 degrees that minimises the squared
   error to the target block.
5. **Sequence.** Per secret block: its class (``ceil(log2 classes)`` bits), its rotation (2 bits)
   and ``delta / shift_step`` (``shift_bits`` bits). :func:`pack` makes it bytes.

**Why the receiver can invert it.** A shift by an even ``delta`` adds ``delta / 2`` to every
``m`` and a rotation permutes pixels, so a transformed block has exactly its secret block's
spread: the transformed image's spreads are the secret image's, and, sorted and cut with the
class sizes the sequence gives, they reproduce each position's class. Within a class, the
positions in raster order are the target's positions of that class, in pairing order. Since the
spread ignores the lowest bit plane, LSB embedding of the encrypted sequence (``embed``) leaves
the pairing recoverable, and restoration is then off by at most one in the lowest bit.

Guarantees (tests/authorization/test_mrit.py): ``inverse(*transform(s, t)) == s`` bit for bit
for every uint8 image whose sides are multiples of ``block``; ``unpack(pack(seq)) == seq``;
changing only the lowest bit plane of a transformed image changes the restored image only in
the lowest bit plane.

Everything is vectorised over images and blocks in numpy (no loop over pixels or blocks).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

ROTATIONS = 4  # Multiples of 90 degrees.


@dataclasses.dataclass(frozen=True)
class MRITConfig:
  """Parameters of the block transformation.

  Attributes:
    block: Side b of the square blocks; must divide the image's height and width.
    classes: Number of SD classes (RIT's K).
    shift_step: Mean shifts are multiples of this even number (RIT's quantisation of the shift):
      larger steps need fewer bits per block but match the target's means less closely.
  """

  block: int = 4
  classes: int = 4
  shift_step: int = 4

  def __post_init__(self):
    if not isinstance(self.block, int) or self.block < 2:
      raise ValueError(f"--block must be an integer >= 2, got {self.block!r}")
    if not isinstance(self.classes, int) or not 1 <= self.classes <= 256:
      raise ValueError(f"--classes must be an integer in [1, 256], got {self.classes!r}")
    if not isinstance(self.shift_step, int) or self.shift_step < 2 or self.shift_step % 2 or self.shift_step > 128:
      raise ValueError(f"--shift_step must be an even integer in [2, 128], got {self.shift_step!r}")

  @property
  def max_shift(self) -> int:
    """The largest ``|delta| / shift_step``."""
    return 255 // self.shift_step

  @property
  def class_bits(self) -> int:
    return (self.classes - 1).bit_length()

  @property
  def shift_bits(self) -> int:
    return (2 * self.max_shift).bit_length()

  @property
  def bits_per_block(self) -> int:
    """Sequence bits per block: class + rotation + shift."""
    return self.class_bits + 2 + self.shift_bits


@dataclasses.dataclass(frozen=True)
class Sequence:
  """What restoration needs, per image and secret block (raster order of the secret's blocks).

  Attributes:
    classes_NxL: SD class of each secret block.
    rotations_NxL: Quarter turns applied to it.
    shifts_NxL: Its mean shift, in units of ``shift_step``.
  """

  classes_NxL: np.ndarray
  rotations_NxL: np.ndarray
  shifts_NxL: np.ndarray


def check_shape(shape: tuple[int, ...], cfg: MRITConfig) -> None:
  """ValueError unless ``shape`` is (H, W, C) with H and W multiples of ``cfg.block``."""
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"images must be H x W x C, got shape {tuple(shape)}")
  h, w, _ = shape
  if h % cfg.block or w % cfg.block:
    raise ValueError(f"image size {h}x{w} is not a multiple of the block size {cfg.block} (--block)")


def num_blocks(shape: tuple[int, ...], cfg: MRITConfig) -> int:
  """L: the number of blocks of an (H, W, C) image."""
  check_shape(shape, cfg)
  h, w, c = shape
  return c * (h // cfg.block) * (w // cfg.block)


def sequence_bits(shape: tuple[int, ...], cfg: MRITConfig) -> int:
  """Bits of one image's sequence: ``L * bits_per_block``."""
  return num_blocks(shape, cfg) * cfg.bits_per_block


def sequence_bytes(shape: tuple[int, ...], cfg: MRITConfig) -> int:
  """Bytes of one image's packed sequence (:func:`pack`)."""
  return math.ceil(sequence_bits(shape, cfg) / 8)


def to_blocks(x_NxHxWxC: np.ndarray, b: int) -> np.ndarray:
  """``N x L x b x b`` blocks (channel-major, then raster order of blocks)."""
  n, h, w, c = x_NxHxWxC.shape
  x = x_NxHxWxC.reshape(n, h // b, b, w // b, b, c)
  return x.transpose(0, 5, 1, 3, 2, 4).reshape(n, c * (h // b) * (w // b), b, b)


def from_blocks(blocks_NxLxBxB: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`to_blocks` for images of ``shape`` (H, W, C)."""
  h, w, c = shape
  n, _, b, _ = blocks_NxLxBxB.shape
  x = blocks_NxLxBxB.reshape(n, c, h // b, w // b, b, b)
  return x.transpose(0, 2, 4, 3, 5, 1).reshape(n, h, w, c)


def spread(blocks_NxLxBxB: np.ndarray) -> np.ndarray:
  """The exact integer spread of each block's 7 high bits (see the module docstring)."""
  m = (blocks_NxLxBxB.astype(np.int64) >> 1).reshape(*blocks_NxLxBxB.shape[:2], -1)
  return m.shape[-1] * np.sum(m * m, axis=-1) - np.sum(m, axis=-1) ** 2


def secret_classes(spread_NxL: np.ndarray, classes: int) -> np.ndarray:
  """SD class of each block: equal-count cuts of the sorted spreads, each moved up to the next
  change of value (so that a class is a range of values)."""
  n, l = spread_NxL.shape
  sorted_NxL = np.sort(spread_NxL, axis=1)
  # change[:, r]: a cut before rank r separates different values (r = 0 and r = L always do).
  change = np.ones((n, l + 1), bool)
  change[:, 1:l] = sorted_NxL[:, 1:] != sorted_NxL[:, :-1]
  ranks = np.where(change, np.arange(l + 1), l)
  next_change = np.minimum.accumulate(ranks[:, ::-1], axis=1)[:, ::-1]  # smallest cut >= r
  nominal = np.round(np.arange(1, classes) * l / classes).astype(np.int64)
  cuts_NxK1 = next_change[:, nominal]
  # A block's class: how many cuts lie at or below its value's first rank.
  first_rank = _row_searchsorted(sorted_NxL, spread_NxL)
  return np.sum(first_rank[:, :, None] >= cuts_NxK1[:, None, :], axis=-1).astype(np.int64)


def _row_searchsorted(sorted_NxL: np.ndarray, values_NxL: np.ndarray) -> np.ndarray:
  """``np.searchsorted(sorted_NxL[i], values_NxL[i])`` for every row i, as one call (rows offset
  so that they do not overlap)."""
  n, l = sorted_NxL.shape
  offset = (np.arange(n, dtype=np.int64) * (int(sorted_NxL.max(initial=0)) + 1))[:, None]
  found = np.searchsorted((sorted_NxL + offset).ravel(), (values_NxL + offset).ravel()).reshape(n, l)
  return found - np.arange(n)[:, None] * l


def _classes_by_rank(spread_NxL: np.ndarray, counts_NxK: np.ndarray) -> np.ndarray:
  """Classes of the given sizes over blocks sorted by spread (ties in raster order)."""
  n, l = spread_NxL.shape
  rank = np.empty((n, l), np.int64)
  np.put_along_axis(rank, np.argsort(spread_NxL, axis=1, kind="stable"), np.arange(l)[None].repeat(n, 0), axis=1)
  cuts = np.cumsum(counts_NxK, axis=1)[:, :-1]
  return np.sum(rank[:, :, None] >= cuts[:, None, :], axis=-1)


def pairing(secret_classes_NxL: np.ndarray, target_spread_NxL: np.ndarray, classes: int) -> np.ndarray:
  """``source_NxL``: the secret block that goes to each target position.

  The target's blocks are cut into classes of the secret's class sizes by their spread; the
  j-th secret block of class k (raster order) goes to the j-th target position of class k.
  """
  n, l = secret_classes_NxL.shape
  counts = np.stack([np.sum(secret_classes_NxL == k, axis=1) for k in range(classes)], axis=1)
  target_classes = _classes_by_rank(target_spread_NxL, counts)
  pos = np.arange(l)
  secret_order = np.argsort(secret_classes_NxL * l + pos, axis=1, kind="stable")
  target_order = np.argsort(target_classes * l + pos, axis=1, kind="stable")
  source = np.empty((n, l), np.int64)
  np.put_along_axis(source, target_order, secret_order, axis=1)
  return source


def _rotate(blocks: np.ndarray, quarter_turns: np.ndarray) -> np.ndarray:
  """Each block (``... x b x b``) turned counter-clockwise ``quarter_turns`` (same leading shape) times."""
  turned = np.stack([np.rot90(blocks, r, axes=(-2, -1)) for r in range(ROTATIONS)])  # 4 x ... x b x b
  return np.take_along_axis(turned, quarter_turns[None, ..., None, None] % ROTATIONS, axis=0)[0]


def transform(secret_NxHxWxC: np.ndarray, target_NxHxWxC: np.ndarray, cfg: MRITConfig) -> tuple[np.ndarray, Sequence]:
  """Transforms each secret (clean) image towards its target image.

  Args:
    secret_NxHxWxC: uint8 clean images.
    target_NxHxWxC: uint8 target images (the FSP images), same shape.
    cfg: Block size, classes and shift step.

  Returns:
    ``(transformed_NxHxWxC, sequence)``: uint8 images that look like the targets, and the
    sequence that :func:`inverse` restores the secret images from.

  Raises:
    ValueError: the arrays are not uint8 of one shape, or the sides are not multiples of the block.
  """
  secret, target = np.asarray(secret_NxHxWxC), np.asarray(target_NxHxWxC)
  if secret.dtype != np.uint8 or target.dtype != np.uint8 or secret.shape != target.shape or secret.ndim != 4:
    raise ValueError(
      f"transform takes two uint8 N x H x W x C arrays of one shape, got {secret.dtype} {secret.shape} and "
      f"{target.dtype} {target.shape}"
    )
  check_shape(secret.shape[1:], cfg)
  b, step = cfg.block, cfg.shift_step
  s_blocks, t_blocks = to_blocks(secret, b).astype(np.int64), to_blocks(target, b).astype(np.int64)
  classes = secret_classes(spread(s_blocks), cfg.classes)
  source = pairing(classes, spread(t_blocks), cfg.classes)
  # Secret blocks in target order (the block that lands at each position), and their moves.
  moved = np.take_along_axis(s_blocks, source[:, :, None, None], axis=1)
  area = b * b
  diff = (t_blocks.sum((-2, -1)) - moved.sum((-2, -1))) / area
  q = np.round(diff / step).astype(np.int64)
  q = np.clip(q, -(moved.min((-2, -1)) // step), (255 - moved.max((-2, -1))) // step)
  shifted = moved + (q * step)[..., None, None]
  turned = np.stack([np.rot90(shifted, r, axes=(-2, -1)) for r in range(ROTATIONS)])
  err = np.sum((turned - t_blocks[None]) ** 2, axis=(-2, -1))
  r = np.argmin(err, axis=0)
  out = np.take_along_axis(turned, r[None, ..., None, None], axis=0)[0]
  # The sequence is indexed by secret block: scatter each position's move to its source.
  rotations, shifts = np.empty_like(r), np.empty_like(q)
  np.put_along_axis(rotations, source, r, axis=1)
  np.put_along_axis(shifts, source, q, axis=1)
  transformed = from_blocks(out.astype(np.uint8), secret.shape[1:])
  return transformed, Sequence(classes_NxL=classes, rotations_NxL=rotations, shifts_NxL=shifts)


def inverse(transformed_NxHxWxC: np.ndarray, seq: Sequence, cfg: MRITConfig) -> np.ndarray:
  """The secret images of :func:`transform`, from the transformed images and the sequence.

  Exact when ``transformed`` is :func:`transform`'s output. If only the lowest bit plane of
  ``transformed`` was changed (LSB embedding), the result differs from the secret images only
  in the lowest bit plane (by at most 1 per pixel).
  """
  x = np.asarray(transformed_NxHxWxC)
  check_shape(x.shape[1:], cfg)
  blocks = to_blocks(x, cfg.block).astype(np.int64)
  source = pairing(seq.classes_NxL, spread(blocks), cfg.classes)
  position = np.empty_like(source)  # Where each secret block went.
  np.put_along_axis(position, source, np.arange(source.shape[1])[None].repeat(len(source), 0), axis=1)
  back = np.take_along_axis(blocks, position[:, :, None, None], axis=1)
  back = _rotate(back, -seq.rotations_NxL) - (seq.shifts_NxL * cfg.shift_step)[..., None, None]
  return from_blocks(np.clip(back, 0, 255).astype(np.uint8), x.shape[1:])


def pack(seq: Sequence, cfg: MRITConfig) -> np.ndarray:
  """The sequences as bytes, ``N x sequence_bytes`` uint8 (fields MSB first, zero-padded)."""
  fields = (
    (seq.classes_NxL, cfg.class_bits),
    (seq.rotations_NxL, 2),
    (seq.shifts_NxL + cfg.max_shift, cfg.shift_bits),
  )
  bits = [(v[..., None] >> np.arange(w - 1, -1, -1)) & 1 for v, w in fields if w]
  bits_NxLxF = np.concatenate(bits, axis=-1).astype(np.uint8)
  return np.packbits(bits_NxLxF.reshape(len(bits_NxLxF), -1), axis=1)


def unpack(packed_NxS: np.ndarray, shape: tuple[int, ...], cfg: MRITConfig) -> Sequence:
  """Inverse of :func:`pack` for images of ``shape``.

  Raises:
    ValueError: the bytes have the wrong length or hold an impossible field.
  """
  l, nbytes = num_blocks(shape, cfg), sequence_bytes(shape, cfg)
  packed = np.asarray(packed_NxS, np.uint8)
  if packed.ndim != 2 or packed.shape[1] != nbytes:
    raise ValueError(f"a packed sequence of a {shape} image has {nbytes} bytes, got shape {packed.shape}")
  bits = np.unpackbits(packed, axis=1)[:, : l * cfg.bits_per_block].reshape(len(packed), l, -1).astype(np.int64)
  out, at = [], 0
  for w in (cfg.class_bits, 2, cfg.shift_bits):
    out.append(np.sum(bits[..., at : at + w] << np.arange(w - 1, -1, -1), axis=-1))
    at += w
  classes, rotations, shifts = out[0], out[1], out[2] - cfg.max_shift
  if classes.max(initial=0) >= cfg.classes or np.abs(shifts).max(initial=0) > cfg.max_shift:
    raise ValueError("the sequence holds an impossible class or shift")
  return Sequence(classes_NxL=classes, rotations_NxL=rotations, shifts_NxL=shifts)
