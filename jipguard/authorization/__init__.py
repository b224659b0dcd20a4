"""Dataset authorization control (Xue et al., paper 001): protected images, restored with a key.

A dataset owner publishes protected images: each clean image is hidden, by a reversible block
transformation, inside a feature-space adversarial version of itself, and the encrypted record
of the transformation is embedded in the image's lowest bits. A model trained on the protected
images performs badly; the owner's platform restores the clean images with the secret key.

* ``crypto``: keys (raw 256-bit key files, scrypt passphrases) and AES-SIV with associated data.
* ``mrit``: the reversible block transformation (SD classes, pairing, mean shift, rotation,
  the packed sequence).
* ``embed``: :func:`protect` / :func:`restore`, the LSB embedding, the exact and the paper's
  LSB restoration modes, and the capacity arithmetic.

Shape suffixes (``source_NxL``):

| letter | meaning |
|---|---|
| N | images |
| H, W, C | image height, width, channels |
| L | blocks of one image (all channels) |
| B | block side (in ``NxLxBxB``) |
| K | classes (SD classes in mrit; labels elsewhere) |
| S | bytes of a packed sequence |
"""

from jipguard.authorization.crypto import AuthenticationError, Key, derive_key, generate_key, read_key_file
from jipguard.authorization.embed import MODES, Capacity, Protected, capacity, protect, restore
from jipguard.authorization.mrit import MRITConfig

__all__ = [
  "MODES",
  "AuthenticationError",
  "Capacity",
  "Key",
  "MRITConfig",
  "Protected",
  "capacity",
  "derive_key",
  "generate_key",
  "protect",
  "read_key_file",
  "restore",
]
