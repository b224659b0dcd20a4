"""Every console script, run as a user runs it: ``jipguard <command>`` in a subprocess.

Bad input (a flag out of range, a missing / corrupt / malformed data file, an unknown dataset
or command) exits with status 2 and exactly one line ``error: ...`` naming the problem, no
traceback, and leaves no run directory behind. ``--help`` shows the preset's defaults and
``--print_config`` the resolved config.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jipguard import cli

_BIN = os.path.join(os.path.dirname(sys.executable), "jipguard")
_SCRIPT = _BIN if os.path.exists(_BIN) else shutil.which("jipguard")


def _run(args, cwd, timeout=240):
  """``jipguard <args>`` from the installed package (run from ``cwd``, outside the checkout)."""
  assert _SCRIPT, "the jipguard console script is not installed (pip install -e .)"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JIPGUARD_COMPILATION_CACHE": "off"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([_SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Data files with one defect each (npz with train and test splits, as the main job reads them)."""
  d = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
  y = np.arange(12) % 3

  def save(name, **over):
    arrays = dict(x_train=x, y_train=y, x_test=x, y_test=y)
    np.savez(d / name, **{**arrays, **over})
    return str(d / name)

  out = {
    "rank": save("rank.npz", x_test=x[:, :, 0]),
    "nan": save("nan.npz", x_test=np.where(x > 250, np.nan, x / 255.0)),
    "count": save("count.npz", y_test=y[:-1]),
    "range": save("range.npz", x_test=x * 2.0),
  }
  whole = (d / "rank.npz").read_bytes()
  (d / "corrupt.npz").write_bytes(whole[: len(whole) // 2])
  out["corrupt"] = str(d / "corrupt.npz")
  grey = d / "grey.npz"
  np.savez(grey, images=x / 255.0, labels=y)
  out["grey"] = str(grey)
  return out


# (command line, a fragment the error line must contain). {f[...]} are the files above.
_IPPROTECT = [
  (["--omega_tr", "0"], "--omega_tr must be an integer >= 1, got 0"),
  (["--omega_tr", "-5"], "--omega_tr must be an integer >= 1, got -5"),
  (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
  (["--model_batch", "200"], "model_batch must be <= omega_tr = 100, got 200"),
  (["--model", "vgg99"], "argument --model: invalid choice"),
  (["--buyer_size", "5000"], "buyer_size must be <= 1000 (the test split of fashion_mnist_subset), got 5000"),
  (["--dataset", "imagenet21k"], "imagenet21k"),
  (["--dataset", "{missing}"], "missing.npz"),
  (["--dataset", "{corrupt}"], "cannot read npz file"),
  (["--dataset", "{rank}"], "images must have rank 3"),
  (["--dataset", "{nan}"], "NaN or infinite"),
  (["--dataset", "{count}"], "12 images but 11 labels"),
]
# More ranges, checked in-process through the same entry point (jipguard.__main__.main).
_IPPROTECT_IN_PROCESS = [
  (["--omega_v", "0"], "--omega_v must be"),
  (["--lr", "-0.1"], "--lr must be a finite number > 0"),
  (["--tau", "inf"], "--tau must be a finite number >= 0"),
  (["--hidden_dropout", "1"], "--hidden_dropout must be a finite number >= 0 and < 1"),
  (["--steps", "0"], "--steps must be"),
  (["--seed", "-1"], "--seed must be"),
  (["--anchor_seed", "-3"], "--anchor_seed must be"),
  (["--omega_tr", "x"], "argument --omega_tr: invalid int value: 'x'"),
  (["--mesh", "0,1"], "--mesh takes two integers >= 1"),
  (["--dataset", "{range}"], "float pixels must lie in [0, 1]"),
]
_OTHERS = [
  (["tradeoff", "--omega_tr", "0"], "--omega_tr must be an integer >= 1, got 0"),
  (["tradeoff", "--seeds", "-1"], "--seeds must be"),
  (["tradeoff", "--dataset", "nope_dataset"], "nope_dataset"),
  (["tradeoff", "--dp_merf_sigma", "0"], "--dp_merf_sigma must be a finite number > 0"),
  (["ablation", "--seeds", "-2"], "--seeds must be"),
  (["ablation", "--extra", "--lr", "nan"], "--lr must be a finite number > 0"),
  (["saturation", "--images", "0"], "--images must be"),
  (["watermark", "multiuser", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
  (["watermark", "multiuser", "--grid_step", "400"], "--grid_step must be a finite number > 0 and < 360"),
  (["watermark", "sweep", "--vary", "colour"], "argument --vary: invalid choice"),
  (["watermark", "defences", "--dataset", "nope_dataset"], "nope_dataset"),
  (["watermark", "mark", "--input", "{missing}", "--signature", "60", "--output", "{out}.npz"], "missing.npz"),
  (["watermark", "mark", "--input", "{corrupt}", "--signature", "60", "--output", "{out}.npz"], "cannot read npz"),
  (["watermark", "mark", "--input", "{grey}", "--signature", "60", "--output", "{out}.npz"], "need RGB images"),
  (["watermark", "mark", "--input", "{grey}", "--signature", "nan", "--output", "{out}.npz"], "--signature must be"),
  (["watermark", "mark", "--input", "{grey}", "--signature", "60", "--output", "{out}.png"], "--output must name"),
  (["watermark", "verify", "--model", "{missing}", "--images", "{grey}"], "no saved model directory"),
  (["watermark", "verify", "--model", "{missing}", "--images", "{grey}", "--tau", "0"], "--tau must be"),
  (["sweep", "--workdir", "{out}", "--command", "nope"], "--command must be a script path or one of"),
  (["sweep", "--workdir", "{out}", "--grid", "seed"], "--grid takes NAME=V1,V2"),
  (["fingerprint", "codes", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
  (["fingerprint", "collusion", "--customers", "0"], "customers must be in [2, 17424]"),
  (["fingerprint", "trace", "--workdir", "{missing}", "--model", "{missing}"], "No such file or directory"),
  (["authorization", "protect", "--images", "{missing}", "--key", "{missing}", "--workdir", "{out}"], "missing"),
  (["authorization", "protect", "--images", "{corrupt}", "--key", "{missing}", "--workdir", "{out}"], "read npz"),
  (["authorization", "restore", "--protected", "{missing}", "--key", "{missing}", "--output", "{out}.npz"], "missing"),
  (["attacks", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
  (["attacks", "--methods", "nope"], "--methods must be one of identity"),
  (["partition", "tables", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
  (["partition", "tables", "--dataset", "nope_dataset"], "nope_dataset"),
  (["nope"], "unknown command 'nope'"),
]


def _fill(args, files, tmp_path):
  names = {**files, "missing": str(tmp_path / "missing.npz"), "out": str(tmp_path / "run")}
  return [a.format(**names) for a in args]


def _assert_one_error_line(proc, fragment, tmp_path):
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and len(lines) == 1, proc.stderr
  assert fragment in errors[0], errors[0]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert not (tmp_path / "run").exists()  # No run directory was started.


@pytest.mark.parametrize("args,fragment", _IPPROTECT, ids=[" ".join(a) for a, _ in _IPPROTECT])
def test_ipprotect_bad_input_is_one_error_line(args, fragment, files, tmp_path):
  argv = ["ipprotect", "--preset", "default", *_fill(args, files, tmp_path), "--workdir", str(tmp_path / "run")]
  _assert_one_error_line(_run(argv, cwd=tmp_path), fragment, tmp_path)


@pytest.mark.parametrize("args,fragment", _IPPROTECT_IN_PROCESS, ids=[" ".join(a) for a, _ in _IPPROTECT_IN_PROCESS])
def test_ipprotect_more_bad_flags_in_process(args, fragment, files, tmp_path, capsys, monkeypatch):
  from jipguard import __main__ as entry

  monkeypatch.chdir(tmp_path)
  argv = ["ipprotect", *_fill(args, files, tmp_path), "--workdir", str(tmp_path / "run")]
  try:
    rc = entry.main(argv)
  except SystemExit as e:  # argparse's usage errors.
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2 and err.count("error:") == 1 and fragment in err, err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,fragment", _OTHERS, ids=[" ".join(a) for a, _ in _OTHERS])
def test_other_commands_bad_input_is_one_error_line(args, fragment, files, tmp_path):
  argv = _fill(args, files, tmp_path)
  workdir = ["--workdir", str(tmp_path / "run")]
  if argv[0] in ("tradeoff", "ablation", "saturation", "attacks"):
    argv = [argv[0], *workdir, *argv[1:]]
  elif argv[:2] in (
    ["watermark", "multiuser"],
    ["watermark", "sweep"],
    ["watermark", "defences"],
    ["fingerprint", "codes"],
    ["fingerprint", "collusion"],
    ["partition", "tables"],
  ):
    argv = [*argv[:2], *workdir, *argv[2:]]
  _assert_one_error_line(_run(argv, cwd=tmp_path), fragment, tmp_path)


def test_debug_shows_the_traceback(tmp_path):
  proc = _run(["ipprotect", "--omega_tr", "0", "--debug"], cwd=tmp_path)
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "FlagError" in proc.stderr


def test_help_lists_commands_and_shows_the_presets_defaults(tmp_path):
  top = _run(["--help"], cwd=tmp_path)
  assert top.returncode == 0
  for name in ("ipprotect", "tradeoff", "attacks", "watermark", "fingerprint", "partition", "authorization", "sweep"):
    assert f"\n  {name} " in top.stdout
  smoke = _run(["ipprotect", "--preset", "smoke", "--help"], cwd=tmp_path).stdout
  default = _run(["ipprotect", "--help"], cwd=tmp_path).stdout
  flat = lambda text: " ".join(text.split())
  assert "|Omega_Tr|: models the images are fitted to (--preset smoke: 6)" in flat(smoke)
  assert "|Omega_Tr|: models the images are fitted to (--preset default: 100)" in flat(default)
  assert "None)" not in flat(default).replace("(--preset default: None)", "")
  for args in (["tradeoff"], ["watermark", "mark"], ["watermark", "multiuser"], ["sweep"]):
    proc = _run([*args, "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "--debug" in proc.stdout, args


def test_print_config_prints_the_resolved_config_and_does_nothing_else(tmp_path):
  proc = _run(["ipprotect", "--preset", "smoke", "--lr", "0.5", "--print_config"], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  cfg = json.loads(proc.stdout)
  assert cfg["omega_tr"] == 6 and cfg["sanitizer"]["learning_rate"] == 0.5 and cfg["sanitizer"]["loss"] == "margin"
  assert os.listdir(tmp_path) == []  # Nothing written.
  wm = json.loads(_run(["watermark", "multiuser", "--epochs", "3", "--print_config"], cwd=tmp_path).stdout)
  assert wm["epochs"] == 3 and wm["num_users"] == 24


def test_check_functions_name_the_flag_and_range():
  with pytest.raises(cli.FlagError, match=r"--k must be an integer in \[1, 3\], got 4"):
    cli.check_int("--k", 4, lo=1, hi=3)
  with pytest.raises(cli.FlagError, match="got True"):
    cli.check_int("--k", True, lo=0)
  with pytest.raises(cli.FlagError, match=r"--x must be a finite number > 0 and <= 1, got 0"):
    cli.check_float("--x", 0, lo=0, hi=1, lo_open=True)
  with pytest.raises(cli.FlagError, match="one of a, b"):
    cli.check_choice("--c", "z", ["a", "b"])
  cli.check_int("--k", None, lo=1)  # Unset flags are not checked.
  cli.check_float("--x", 1.0, lo=0, hi=1)
