"""The command: keygen / protect / restore round trips (npz and PNG), one-line errors, nothing half-written."""

import os

import numpy as np
import pytest

from jipguard import data
from jipguard.authorization import cli

FAST = ["--surrogate_model", "mlp", "--layer", "Dense_0", "--surrogate_epochs", "0", "--iterations", "1", "--quiet"]


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
  """A key, an image set and its protected folder (with PNGs and sidecar)."""
  root = tmp_path_factory.mktemp("owner")
  ds = data.load("fashion_mnist_subset", "test")
  images = np.round(ds.images[:24] * 255).astype(np.uint8)
  np.savez(root / "my.npz", images=images, labels=ds.labels[:24])
  assert cli.main(["keygen", "--key", str(root / "owner.key")]) == 0
  key = str(root / "owner.key")
  args = ["protect", "--images", str(root / "my.npz"), "--key", key, "--workdir", str(root / "prot")]
  assert cli.main([*args, "--png", *FAST]) == 0
  return root, images


def _restore(root, *extra, key=None, src=None):
  out = root / f"restored-{len(os.listdir(root))}.npz"
  key, src = key or root / "owner.key", src or root / "prot"
  code = cli.main(["restore", "--protected", str(src), "--key", str(key), "--output", str(out), *extra])
  return code, out


def test_round_trip_npz_and_png_exact_and_lsb(owner):
  root, images = owner
  assert os.stat(root / "owner.key").st_mode & 0o777 == 0o600
  protected = np.load(root / "prot" / "protected.npz")["images"]
  assert protected.dtype == np.uint8 and not np.array_equal(protected, images)
  for extra in ([], ["--png"]):
    code, out = _restore(root, *extra)
    assert code == 0
    np.testing.assert_array_equal(np.load(out)["images"], images)
  code, out = _restore(root, "--mode", "lsb")
  assert code == 0 and np.abs(np.load(out)["images"].astype(int) - images).max() <= 1


def _one_error(capsys, *words):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert all(w in err[0] for w in words), err[0]


def test_wrong_key_is_one_error_and_writes_nothing(owner, capsys, tmp_path):
  root, _ = owner
  assert cli.main(["keygen", "--key", str(tmp_path / "other.key")]) == 0
  capsys.readouterr()
  out = tmp_path / "r.npz"
  args = ["restore", "--protected", str(root / "prot"), "--key", str(tmp_path / "other.key"), "--output", str(out)]
  assert cli.main(args) == 2
  _one_error(capsys, "image 0", "authentication failed")
  assert not out.exists()


def test_a_flipped_pixel_and_a_truncated_file_are_detected(owner, capsys, tmp_path):
  root, _ = owner
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in ("manifest.json", "sidecar.npz"):
    (bad / name).write_bytes((root / "prot" / name).read_bytes())
  z = np.load(root / "prot" / "protected.npz")
  images = z["images"].copy()
  images[5, 20, 20, 0] ^= 0x40
  np.savez(bad / "protected.npz", images=images, labels=z["labels"])
  code, out = _restore(tmp_path, key=root / "owner.key", src=bad)
  assert code == 2 and not out.exists()
  _one_error(capsys, "image 5")
  raw = (root / "prot" / "sidecar.npz").read_bytes()
  (bad / "sidecar.npz").write_bytes(raw[: len(raw) // 2])
  np.savez(bad / "protected.npz", images=z["images"], labels=z["labels"])
  code, _ = _restore(tmp_path, key=root / "owner.key", src=bad)
  assert code == 2
  _one_error(capsys, "sidecar")


def test_passphrase_round_trip(owner, tmp_path):
  root, images = owner
  pw = tmp_path / "pass.txt"
  pw.write_text("a long passphrase\n")
  os.chmod(pw, 0o600)
  args = ["protect", "--images", str(root / "my.npz"), "--passphrase_file", str(pw), "--workdir", str(tmp_path / "p")]
  assert cli.main([*args, *FAST]) == 0
  out = tmp_path / "r.npz"
  restore = ["restore", "--protected", str(tmp_path / "p"), "--passphrase_file", str(pw), "--output", str(out)]
  assert cli.main(restore) == 0
  np.testing.assert_array_equal(np.load(out)["images"], images)


@pytest.mark.parametrize(
  "args, words",
  [
    (["--epsilon", "2"], ["--epsilon"]),
    (["--shift_step", "3"], ["--shift_step"]),
    (["--surrogate_epochs", "-1"], ["--surrogate_epochs"]),
    (["--block", "3"], ["multiple of the block size 3"]),
    (["--layer", "Dense_9"], ["--layer"]),
  ],
)
def test_bad_flags_fail_before_any_output(owner, capsys, tmp_path, args, words):
  root, _ = owner
  out = tmp_path / "never"
  base = ["protect", "--images", str(root / "my.npz"), "--key", str(root / "owner.key"), "--workdir", str(out)]
  assert cli.main([*base, *FAST, *args]) == 2
  _one_error(capsys, *words)
  assert not out.exists()


def test_keygen_never_overwrites_and_study_flags_are_checked(owner, capsys):
  root, _ = owner
  assert cli.main(["keygen", "--key", str(root / "owner.key")]) == 2
  _one_error(capsys, "never overwritten")
  assert cli.main(["study", "--countermeasures", "jpeg90,paint"]) == 2
  _one_error(capsys, "--countermeasures")
  assert cli.main(["study", "--dataset", "no_such_set", "--workdir", str(root / "w")]) == 2
  _one_error(capsys, "no_such_set")
  assert not (root / "w").exists()
  assert cli.main(["study", "--preset", "smoke", "--print_config"]) == 0
  assert '"epsilon": 0.15' in capsys.readouterr().out
