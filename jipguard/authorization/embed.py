"""Protection and restoration of images: mRIT, the encrypted sequence, and its LSB embedding.

:func:`protect` transforms each clean image towards its target (``mrit.transform``), encrypts
its packed sequence (``crypto``, AES-SIV) and writes the ciphertext's bits, MSB first, into the
lowest bit of the first P pixels of the transformed image (flattened H x W x C order), as the
paper does with LSB steganography. The associated data of each ciphertext binds it to the
dataset id, the image index, shape and parameters, and to every other bit of the protected
image (the image with those P lowest bits zeroed), so any change to any bit is detected.

Two restoration modes (``MODES``):

* ``"exact"`` (the default): :func:`protect` also returns a *sidecar*, the P lowest bits that the
  embedding displaced, encrypted and bound to the protected image. With it, :func:`restore`
  first puts those bits back, so restoration is bit for bit.
* ``"lsb"`` (the paper's): no sidecar. The displaced bits are lost; since mRIT's pairing ignores
  the lowest bit plane and its shifts are even, the restored image differs from the clean image
  only in the lowest bit of the (at most P) pixels whose blocks landed on the payload pixels:
  ``|restored - clean| <= 1`` everywhere, nonzero in at most P pixels per image.

The protected images are the same in both modes; the sidecar is what the owner's platform keeps
(or publishes: it is encrypted) for exact restoration.

Capacity (:func:`capacity`): the payload takes ``P = 8 * (ceil(L * bits_per_block / 8) + 16)``
bits (sequence plus the 16-byte SIV tag) of the ``H * W * C`` available. With the defaults
(4x4 blocks, 4 classes, shift step 4: 2 + 2 + 7 = 11 bits per block): 28x28x1 has L = 49
blocks, 539 bits -> 68 bytes + 16 = 672 payload bits of 784; 32x32x3 has L = 192 blocks,
2,112 bits -> 264 bytes + 16 = 2,240 of 3,072. An image whose payload does not fit is refused
(ValueError naming both numbers).

Guarantees (tests/authorization/test_embed.py): exact mode restores bit for bit; LSB mode obeys
the bound above; a wrong key, a wrong index or dataset id, any flipped bit of a protected image
or sidecar, and a truncated payload raise ``crypto.AuthenticationError`` naming the image, and
nothing is returned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jipguard.authorization import crypto, mrit

MODES = ("exact", "lsb")
DEFAULT_MRIT = mrit.MRITConfig()
_CHUNK = 512  # Images per vectorised mRIT call (bounds the block arrays' memory).


@dataclasses.dataclass(frozen=True)
class Capacity:
  """The capacity arithmetic of one image shape.

  Attributes:
    shape: (H, W, C).
    blocks: L, blocks per image.
    sequence_bits: ``L * bits_per_block``.
    payload_bits: P, bits embedded: the packed sequence and the SIV tag.
    available_bits: ``H * W * C`` (one bit per pixel).
  """

  shape: tuple[int, int, int]
  blocks: int
  sequence_bits: int
  payload_bits: int
  available_bits: int

  @property
  def fits(self) -> bool:
    return self.payload_bits <= self.available_bits


def capacity(shape: tuple[int, ...], cfg: mrit.MRITConfig) -> Capacity:
  """The :class:`Capacity` of images of ``shape`` (H, W, C) under ``cfg``."""
  mrit.check_shape(tuple(shape), cfg)
  h, w, c = shape
  payload = 8 * (mrit.sequence_bytes(shape, cfg) + crypto.TAG_BYTES)
  return Capacity(
    shape=(h, w, c),
    blocks=mrit.num_blocks(shape, cfg),
    sequence_bits=mrit.sequence_bits(shape, cfg),
    payload_bits=payload,
    available_bits=h * w * c,
  )


def check_capacity(shape: tuple[int, ...], cfg: mrit.MRITConfig) -> Capacity:
  """:func:`capacity`, or ValueError when the payload does not fit."""
  cap = capacity(shape, cfg)
  if not cap.fits:
    raise ValueError(
      f"a {'x'.join(map(str, cap.shape))} image has room for {cap.available_bits} payload bits, but its "
      f"sequence needs {cap.payload_bits} ({cap.blocks} blocks x {cfg.bits_per_block} bits + the 128-bit tag); "
      "use larger images, a larger --block or a larger --shift_step"
    )
  return cap


def params(cfg: mrit.MRITConfig) -> dict:
  """The parameters a payload is bound to (part of its associated data)."""
  return {"mrit": dataclasses.asdict(cfg), "embedding": "lsb1-raster"}


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{what} must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
  return images


def _check_indices(indices, n: int) -> np.ndarray:
  indices = np.arange(n) if indices is None else np.asarray(indices)
  if indices.shape != (n,) or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be {n} integers, got {indices.dtype} {indices.shape}")
  return indices


def _ad(purpose: str, dataset_id: str, index: int, shape, cfg: mrit.MRITConfig) -> bytes:
  return crypto.associated_data(purpose=purpose, dataset_id=dataset_id, index=index, shape=shape, params=params(cfg))


def _lsb_bytes(images_NxHxWxC: np.ndarray, payload_bits: int) -> np.ndarray:
  """The lowest bits of the first ``payload_bits`` pixels as bytes, ``N x payload_bits / 8``."""
  flat = images_NxHxWxC.reshape(len(images_NxHxWxC), -1)
  return np.packbits(flat[:, :payload_bits] & 1, axis=1)


def _set_lsb(images_NxHxWxC: np.ndarray, payload_NxP8: np.ndarray) -> np.ndarray:
  """A copy of the images with the first P pixels' lowest bits set to the payload's bits."""
  out = images_NxHxWxC.copy()
  flat = out.reshape(len(out), -1)
  bits = np.unpackbits(payload_NxP8, axis=1)
  p = bits.shape[1]
  flat[:, :p] = (flat[:, :p] & 0xFE) | bits
  return out


def _zero_lsb(images_NxHxWxC: np.ndarray, payload_bits: int) -> np.ndarray:
  out = images_NxHxWxC.copy()
  flat = out.reshape(len(out), -1)
  flat[:, :payload_bits] &= 0xFE
  return out


@dataclasses.dataclass(frozen=True)
class Protected:
  """The output of :func:`protect`.

  Attributes:
    images: uint8 protected images, N x H x W x C.
    sidecar: N x (P / 8 + 16) uint8: the encrypted displaced bits, for exact restoration.
  """

  images: np.ndarray
  sidecar: np.ndarray


def protect(
  clean_NxHxWxC: np.ndarray,
  target_NxHxWxC: np.ndarray,
  key: crypto.Key,
  *,
  dataset_id: str,
  cfg: mrit.MRITConfig = DEFAULT_MRIT,
  indices: np.ndarray | None = None,
) -> Protected:
  """Hides each clean image in (a block-wise approximation of) its target image.

  Args:
    clean_NxHxWxC: uint8 clean images.
    target_NxHxWxC: uint8 targets (the FSP images), same shape.
    key: The secret key.
    dataset_id: The dataset's id (bound into every payload).
    cfg: mRIT parameters.
    indices: Each image's index in the dataset (default ``0 .. N-1``).

  Returns:
    The protected images and their sidecar (:class:`Protected`).

  Raises:
    ValueError: wrong dtypes or shapes, or an image too small for its payload.
  """
  clean = _check_images(clean_NxHxWxC, "clean images")
  target = _check_images(target_NxHxWxC, "target images")
  if clean.shape != target.shape:
    raise ValueError(f"clean images {clean.shape} and targets {target.shape} differ in shape")
  shape = clean.shape[1:]
  cap = check_capacity(shape, cfg)
  indices = _check_indices(indices, len(clean))
  out, sidecars = [], []
  for lo in range(0, len(clean), _CHUNK):
    transformed, seq = mrit.transform(clean[lo : lo + _CHUNK], target[lo : lo + _CHUNK], cfg)
    plain = mrit.pack(seq, cfg)
    masked = _zero_lsb(transformed, cap.payload_bits)
    displaced = _lsb_bytes(transformed, cap.payload_bits)
    payload = np.stack(
      [
        np.frombuffer(
          crypto.encrypt(key, plain[i].tobytes(), [_ad("sequence", dataset_id, idx, shape, cfg), masked[i].tobytes()]),
          np.uint8,
        )
        for i, idx in enumerate(indices[lo : lo + _CHUNK])
      ]
    )
    protected = _set_lsb(masked, payload)
    sidecars += [
      np.frombuffer(
        crypto.encrypt(
          key, displaced[i].tobytes(), [_ad("sidecar", dataset_id, idx, shape, cfg), protected[i].tobytes()]
        ),
        np.uint8,
      )
      for i, idx in enumerate(indices[lo : lo + _CHUNK])
    ]
    out.append(protected)
  return Protected(images=np.concatenate(out), sidecar=np.stack(sidecars))


def _refuse(failures: list[tuple[int, str]]) -> None:
  if failures:
    idx, msg = failures[0]
    more = f" (and {len(failures) - 1} more images: {[i for i, _ in failures[1:6]]}...)" if len(failures) > 1 else ""
    raise crypto.AuthenticationError(f"image {idx}: {msg}{more}; nothing was restored")


def restore(
  protected_NxHxWxC: np.ndarray,
  key: crypto.Key,
  *,
  dataset_id: str,
  cfg: mrit.MRITConfig = DEFAULT_MRIT,
  indices: np.ndarray | None = None,
  sidecar: np.ndarray | None = None,
) -> np.ndarray:
  """The clean images of :func:`protect`: exact with the sidecar, within one LSB without it.

  Every image is authenticated before any is returned: one failure refuses the whole call.

  Args:
    protected_NxHxWxC: uint8 protected images.
    key: The secret key.
    dataset_id: The dataset's id.
    cfg: The mRIT parameters used to protect them.
    indices: Each image's index in the dataset (default ``0 .. N-1``).
    sidecar: :attr:`Protected.sidecar` for exact restoration; None: the paper's LSB mode.

  Returns:
    uint8 restored images, N x H x W x C.

  Raises:
    crypto.AuthenticationError: a wrong key, index or dataset id, a modified bit, or a truncated
      payload or sidecar; the message names the (first) image.
    ValueError: wrong dtypes or shapes, or an image too small for its payload.
  """
  protected = _check_images(protected_NxHxWxC, "protected images")
  shape = protected.shape[1:]
  cap = check_capacity(shape, cfg)
  indices = _check_indices(indices, len(protected))
  if sidecar is not None:
    sidecar = np.asarray(sidecar)
    want = (len(protected), cap.payload_bits // 8 + crypto.TAG_BYTES)
    if sidecar.dtype != np.uint8 or sidecar.shape != want:
      raise crypto.AuthenticationError(
        f"the sidecar must be uint8 of shape {want}, got {sidecar.dtype} {sidecar.shape} (truncated or of other images)"
      )
  payload = _lsb_bytes(protected, cap.payload_bits)
  masked = _zero_lsb(protected, cap.payload_bits)
  plain, displaced, failures = [], [], []
  for i, idx in enumerate(indices):
    try:
      ad = [_ad("sequence", dataset_id, idx, shape, cfg), masked[i].tobytes()]
      plain.append(np.frombuffer(crypto.decrypt(key, payload[i].tobytes(), ad, what=f"image {idx}"), np.uint8))
      if sidecar is not None:
        ad = [_ad("sidecar", dataset_id, idx, shape, cfg), protected[i].tobytes()]
        displaced.append(np.frombuffer(crypto.decrypt(key, sidecar[i].tobytes(), ad), np.uint8))
    except crypto.AuthenticationError as err:
      failures.append((int(idx), str(err).removeprefix(f"image {idx}: ").removeprefix("payload: ")))
  _refuse(failures)
  transformed = protected if sidecar is None else _set_lsb(masked, np.stack(displaced))
  plain = np.stack(plain)
  out = []
  for lo in range(0, len(protected), _CHUNK):
    seq = mrit.unpack(plain[lo : lo + _CHUNK], shape, cfg)
    out.append(mrit.inverse(transformed[lo : lo + _CHUNK], seq, cfg))
  return np.concatenate(out)


def lsb_error_bound(shape: tuple[int, ...], cfg: mrit.MRITConfig) -> tuple[int, int]:
  """The documented bound of LSB mode: ``(max |restored - clean|, max pixels that differ)`` per image."""
  return 1, capacity(shape, cfg).payload_bits


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of two uint8 batches (inf where equal)."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=tuple(range(1, a.ndim)))
  with np.errstate(divide="ignore"):
    return 10 * np.log10(255.0**2 / mse)
