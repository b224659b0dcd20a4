"""Keys and AES-SIV: round trip, refusal of wrong keys / data, key files."""

import os

import pytest

from jipguard.authorization import crypto


def _ad(index=3):
  return [crypto.associated_data(purpose="sequence", dataset_id="d", index=index, shape=(4, 4, 1), params={})]


def test_round_trip_and_overhead():
  key = crypto.generate_key()
  ct = crypto.encrypt(key, b"sequence", _ad())
  assert len(ct) == len(b"sequence") + crypto.TAG_BYTES
  assert crypto.decrypt(key, ct, _ad()) == b"sequence"


@pytest.mark.parametrize("change", ["key", "index", "flip", "truncate", "short"])
def test_every_change_is_refused(change):
  key = crypto.generate_key()
  ct = crypto.encrypt(key, b"sequence bytes", _ad())
  ad = _ad()
  if change == "key":
    key = crypto.generate_key()
  elif change == "index":
    ad = _ad(index=4)
  elif change == "flip":
    ct = bytes([ct[0] ^ 1]) + ct[1:]
  elif change == "truncate":
    ct = ct[:-1]
  else:
    ct = ct[:5]
  with pytest.raises(crypto.AuthenticationError, match="image 7"):
    crypto.decrypt(key, ct, ad, what="image 7")


def test_key_file_is_private_and_never_overwritten(tmp_path):
  key = crypto.generate_key()
  path = tmp_path / "owner.key"
  crypto.write_key_file(path, key)
  assert os.stat(path).st_mode & 0o777 == 0o600
  assert key.raw.hex() not in repr(key)
  assert crypto.read_key_file(path) == key
  with pytest.raises(FileExistsError):
    crypto.write_key_file(path, crypto.generate_key())
  os.chmod(path, 0o644)
  with pytest.raises(PermissionError, match="chmod 600"):
    crypto.read_key_file(path)


def test_a_file_that_is_not_a_key_is_refused(tmp_path):
  path = tmp_path / "not.key"
  path.write_text('{"kind": "other"}')
  os.chmod(path, 0o600)
  with pytest.raises(ValueError, match="not a jipguard authorization key file"):
    crypto.read_key_file(path)


def test_passphrase_keys_depend_on_passphrase_and_salt():
  salt = crypto.new_salt()
  k1 = crypto.derive_key(b"correct horse", salt)
  assert crypto.derive_key(b"correct horse", salt) == k1
  assert crypto.derive_key(b"correct horsf", salt) != k1
  assert crypto.derive_key(b"correct horse", crypto.new_salt()) != k1
  with pytest.raises(ValueError, match="empty"):
    crypto.derive_key(b"", salt)
