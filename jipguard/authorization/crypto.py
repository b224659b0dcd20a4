"""Keys and authenticated encryption of the mRIT sequences, with the ``cryptography`` package.

The paper encrypts its *Sequence* with AES and a secret key. Here:

* **Key.** A raw 256-bit key drawn with :mod:`secrets` and kept in a file of mode 0600
  (:func:`write_key_file`, through ``rundir.write_secret``), or derived from a passphrase with
  scrypt (n=2**15, r=8, p=1) and a random 16-byte salt that is stored next to the protected
  data (:func:`derive_key`; the salt is not secret).
* **Cipher.** AES-SIV (RFC 5297), AES-256 in both halves: the 512-bit SIV key is expanded from
  the 256-bit key by HKDF-SHA256 with a fixed label (domain separation). SIV needs no nonce,
  which matters here: a protected 28x28 image carries at most 784 payload bits, and a 96-bit GCM
  nonce would take an eighth of them. SIV is deterministic, which reveals only that two
  payloads *with equal associated data* are equal; the associated data holds the image index, so
  it reveals nothing across images.
* **Associated data.** Each payload is bound to the dataset id, the image index, the image
  shape, the mRIT parameters and the payload's purpose (:func:`associated_data`), and, by the
  caller, to every pixel bit that does not carry the payload (``embed``). A payload moved to
  another image, another dataset or another shape, or any modified bit, fails authentication.

Guarantees (tested in tests/authorization/test_crypto.py):

* ``decrypt(key, encrypt(key, m, ad), ad) == m``.
* A wrong key, a changed or truncated ciphertext, or different associated data raise
  :class:`AuthenticationError`; nothing is returned.
* Key files are 0600 from creation, never overwritten, and refused when others may read them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from jipguard import rundir

KEY_BYTES = 32  # The secret key: 256 bits.
TAG_BYTES = 16  # AES-SIV's synthetic IV, its only overhead.
SALT_BYTES = 16  # scrypt salt of a passphrase-derived key.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # scrypt cost (RFC 7914's interactive-login order).
_HKDF_INFO = b"jipguard.authorization v1 AES-SIV-512"
_KEY_FILE_KIND = "jipguard.authorization.key"


class AuthenticationError(ValueError):
  """A payload failed authentication: wrong key, wrong image / dataset, or modified data."""


@dataclasses.dataclass(frozen=True)
class Key:
  """A 256-bit secret key; its ``repr`` never shows the bytes.

  Attributes:
    raw: The 32 key bytes.
  """

  raw: bytes = dataclasses.field(repr=False)

  def __post_init__(self):
    if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
      raise ValueError(
        f"a key is {KEY_BYTES} bytes, got {len(self.raw) if isinstance(self.raw, bytes) else self.raw!r}"
      )

  def _siv(self) -> AESSIV:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_HKDF_INFO)
    return AESSIV(hkdf.derive(self.raw))


def generate_key() -> Key:
  """A fresh key from the operating system's CSPRNG (:mod:`secrets`)."""
  return Key(secrets.token_bytes(KEY_BYTES))


def write_key_file(path: str | os.PathLike, key: Key) -> None:
  """Writes ``key`` to ``path`` (mode 0600 from creation; an existing file is never replaced)."""
  rundir.write_secret(path, {"kind": _KEY_FILE_KIND, "key": base64.b64encode(key.raw).decode("ascii")})


def read_key_file(path: str | os.PathLike) -> Key:
  """The key in a :func:`write_key_file` file.

  Raises:
    PermissionError: others may read the file.
    ValueError: the file is not a jipguard key file.
  """
  try:
    doc = rundir.read_secret(path)
  except ValueError:
    raise ValueError(f"{path} is not a jipguard authorization key file") from None
  if not isinstance(doc, dict) or doc.get("kind") != _KEY_FILE_KIND or not isinstance(doc.get("key"), str):
    raise ValueError(f"{path} is not a jipguard authorization key file")
  try:
    raw = base64.b64decode(doc["key"], validate=True)
  except ValueError:
    raise ValueError(f"{path}: the key is not valid base64") from None
  if len(raw) != KEY_BYTES:
    raise ValueError(f"{path}: the key has {len(raw)} bytes, expected {KEY_BYTES}")
  return Key(raw)


def new_salt() -> bytes:
  """A fresh random scrypt salt."""
  return secrets.token_bytes(SALT_BYTES)


def derive_key(passphrase: bytes, salt: bytes) -> Key:
  """The key scrypt derives from ``passphrase`` and ``salt`` (n=2**15, r=8, p=1).

  Raises:
    ValueError: an empty passphrase, or a salt of the wrong length.
  """
  if not passphrase:
    raise ValueError("the passphrase is empty")
  if len(salt) != SALT_BYTES:
    raise ValueError(f"the scrypt salt has {len(salt)} bytes, expected {SALT_BYTES}")
  kdf = Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
  return Key(kdf.derive(passphrase))


def read_passphrase_file(path: str | os.PathLike) -> bytes:
  """The passphrase in ``path`` (one trailing newline stripped); refused if others may read it."""
  st = os.stat(path)
  if st.st_mode & 0o077:
    raise PermissionError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); restrict it with chmod 600")
  with open(path, "rb") as f:
    text = f.read()
  return text[:-1] if text.endswith(b"\n") else text


def associated_data(*, purpose: str, dataset_id: str, index: int, shape: tuple[int, ...], params: dict) -> bytes:
  """The canonical bytes that bind one payload to its image (JSON, sorted keys).

  Args:
    purpose: What the payload is (``"sequence"`` or ``"sidecar"``): a sidecar can never pass as
      a sequence.
    dataset_id: The protected dataset's id.
    index: The image's index in the dataset.
    shape: The image's (H, W, C).
    params: The mRIT and embedding parameters the payload was made with.
  """
  doc = {
    "v": 1,
    "purpose": purpose,
    "dataset_id": dataset_id,
    "index": int(index),
    "shape": [int(s) for s in shape],
    "params": params,
  }
  return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encrypt(key: Key, plaintext: bytes, associated: list[bytes]) -> bytes:
  """AES-SIV ciphertext of ``plaintext`` (``len(plaintext) + TAG_BYTES`` bytes), bound to ``associated``."""
  return key._siv().encrypt(plaintext, associated)


def decrypt(key: Key, ciphertext: bytes, associated: list[bytes], *, what: str = "payload") -> bytes:
  """The plaintext of :func:`encrypt`'s ``ciphertext``.

  Raises:
    AuthenticationError: wrong key, other associated data, or a changed / truncated ciphertext
      (the message names ``what``).
  """
  if len(ciphertext) < TAG_BYTES:
    raise AuthenticationError(f"{what}: the payload is truncated ({len(ciphertext)} bytes)")
  try:
    return key._siv().decrypt(ciphertext, associated)
  except InvalidTag:
    raise AuthenticationError(
      f"{what}: authentication failed (wrong key, wrong image index or dataset, or the image / payload was modified)"
    ) from None
