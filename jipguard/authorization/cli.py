"""``jipguard authorization keygen | protect | restore | study``: the command line.

    jipguard authorization keygen --key owner.key
    jipguard authorization protect --images my.npz --key owner.key --workdir protected/ [--png]
    jipguard authorization restore --protected protected/ --key owner.key --output restored.npz
    jipguard authorization study [--colour] [--preset smoke] [--workdir runs/...]

``experiments/authorization.py`` is a thin wrapper of :func:`main`. Every flag is checked before
any work; a wrong key, a modified image or a damaged file is one line ``error: ...`` naming the
image or file, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import typing

import numpy as np

from jipguard import cli, models, rundir
from jipguard.authorization import crypto, embed, files, fsp, mrit, study

_STUDY_HELP = {
  "dataset": "fashion_mnist_subset (embedded), fashion_mnist (Debian IDX), cifar10 (tfds), digits, or a path",
  "data_dir": "local copy / tfds data_dir of a named dataset",
  "colour": "make a 32x32x3 colour set of grey images (padded, tinted per image)",
  "train_size": "training images",
  "test_size": "clean test images",
  "model": "architecture of the models and the surrogate",
  "epochs": "epochs of each model",
  "batch_size": "minibatch size",
  "lr": "Adam learning rate",
  "seeds": "models per set",
  "surrogate_epochs": "epochs of the FSP surrogate",
  "epsilon": "FSP L_inf radius on [0, 1] pixels (Inkawhich: 0.07)",
  "iterations": "FSP steps (Inkawhich: 10)",
  "momentum": "FSP momentum decay, 0 = off (Inkawhich: 1.0)",
  "layer": "FSP feature layer (a sub-module name of the surrogate)",
  "candidates": "FSP target candidates per image (the farthest is taken)",
  "target_class": "FSP target class: next (y + 1 mod K, class-consistent) or random (a random other class)",
  "block": "mRIT block side",
  "classes": "mRIT SD classes",
  "shift_step": "mRIT mean-shift quantum (even)",
  "countermeasures": "comma-separated subset of " + ",".join(study.COUNTERMEASURES),
  "seed": "seed of the subset, surrogate, targets and models",
}


def _add_fields(p: argparse.ArgumentParser, cls: type, names: typing.Iterable[str], helps: dict[str, str]) -> None:
  """One ``--<field>`` per named field of the frozen config ``cls``, with its default."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for name in names:
    f, kind = fields[name], hints[name]
    if kind is bool:
      p.add_argument(f"--{name}", action="store_true", help=helps[name] + " (default: off)")
      continue
    typ = int if kind is int else float if kind is float else str
    p.add_argument(f"--{name}", type=typ, default=f.default, help=helps[name] + " (default: %(default)s)")


_FSP_FIELDS = ("epsilon", "iterations", "momentum", "layer", "candidates", "target_class")
_MRIT_FIELDS = ("block", "classes", "shift_step")


def _add_key_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--key", help="key file made by `keygen` (mode 0600)")
  p.add_argument("--passphrase_file", help="file holding a passphrase (mode 0600); scrypt with a stored salt")


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="jipguard authorization", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  q = sub.add_parser("keygen", help="write a fresh 256-bit key file (mode 0600)")
  q.add_argument("--key", required=True, help="the key file to create (never overwritten)")
  cli.add_common_flags(q)
  q = sub.add_parser("protect", help="protect an image set (.npz or class folders)")
  q.add_argument("--images", required=True, help=".npz (images/labels or x_train/y_train) or a class-folder of images")
  _add_key_flags(q)
  q.add_argument("--workdir", required=True, help="folder of the protected dataset")
  q.add_argument("--dataset_id", help="the dataset's id bound into every payload (default: random)")
  q.add_argument("--png", action="store_true", help="also write the protected images as uint8 PNGs (default: off)")
  q.add_argument("--no_sidecar", action="store_true", help="no sidecar: LSB restoration only (default: off)")
  q.add_argument("--surrogate_model", default="resnet8", help="FSP surrogate architecture (default: %(default)s)")
  q.add_argument("--surrogate_epochs", type=int, default=15, help="FSP surrogate epochs (default: %(default)s)")
  q.add_argument("--seed", type=int, default=0, help="seed of the surrogate and the targets (default: %(default)s)")
  _add_fields(q, study.StudyConfig, _FSP_FIELDS + _MRIT_FIELDS, _STUDY_HELP)
  cli.add_common_flags(q)
  q = sub.add_parser("restore", help="restore a protected dataset with the key")
  q.add_argument("--protected", required=True, help="folder written by `protect`")
  _add_key_flags(q)
  q.add_argument("--output", required=True, help="restored .npz (images uint8, labels)")
  q.add_argument("--mode", default="exact", help="exact (with the sidecar) or lsb (the paper's) (default: %(default)s)")
  q.add_argument("--png", action="store_true", help="read the PNG copy instead of protected.npz (default: off)")
  cli.add_common_flags(q)
  q = sub.add_parser("study", help="Table 1, the ablation and the countermeasures in one run directory")
  q.add_argument("--preset", default="default", help=f"one of {', '.join(study.PRESETS)} (default: %(default)s)")
  _add_fields(q, study.StudyConfig, [f.name for f in dataclasses.fields(study.StudyConfig)], _STUDY_HELP)
  cli.add_common_flags(q, workdir_help="run directory (default: runs/auth-<dataset>[-colour]-<model>-s<seed>)")
  return p


def _keygen(a: argparse.Namespace) -> int:
  if a.print_config:
    return cli.print_config({"key": a.key})
  crypto.write_key_file(a.key, crypto.generate_key())
  print(f"wrote a 256-bit key to {a.key} (mode 0600); keep it secret")
  return 0


def _protect(a: argparse.Namespace) -> int:
  cli.check_int("--surrogate_epochs", a.surrogate_epochs, lo=0, hi=1000)
  cli.check_int("--seed", a.seed, lo=0)
  cli.check_choice("--surrogate_model", a.surrogate_model, sorted(models.MODELS))
  keys = files.KeySource(a.key, a.passphrase_file)
  fcfg = fsp.FSPConfig(**{k: getattr(a, k) for k in _FSP_FIELDS})
  mcfg = mrit.MRITConfig(**{k: getattr(a, k) for k in _MRIT_FIELDS})
  scfg = fsp.SurrogateConfig(model=a.surrogate_model, epochs=a.surrogate_epochs)
  resolved = {"fsp": dataclasses.asdict(fcfg), "mrit": dataclasses.asdict(mcfg), "surrogate": dataclasses.asdict(scfg)}
  if a.print_config:
    return cli.print_config(resolved)
  if os.path.exists(os.path.join(a.workdir, files.MANIFEST)):
    raise FileExistsError(f"{a.workdir} already holds a protected dataset; choose another --workdir")
  if a.dataset_id is not None and not a.dataset_id.strip():
    raise cli.FlagError("--dataset_id must be a non-empty string")
  clean, labels = files.read_images(a.images)
  embed.check_capacity(clean.shape[1:], mcfg)
  num_classes = int(labels.max()) + 1
  fsp.check_layer(models.get_model(scfg.model, num_classes), clean.shape[1:], fcfg.layer)
  salt = crypto.new_salt() if a.passphrase_file else None
  key = keys.key(salt)
  x = clean.astype(np.float32) / 255
  model, variables = fsp.train_surrogate(x, labels, num_classes, scfg, seed=a.seed, progress=not a.quiet)
  adv, _ = fsp.fsp_images(model, variables, x, labels, num_classes, fcfg, seed=a.seed)
  dataset_id = a.dataset_id or secrets.token_hex(8)
  prot = embed.protect(clean, adv, key, dataset_id=dataset_id, cfg=mcfg)
  manifest = {
    "dataset_id": dataset_id,
    "count": len(clean),
    "shape": list(clean.shape[1:]),
    "salt": salt.hex() if salt else None,
    **resolved,
  }
  files.write_protected(a.workdir, prot.images, labels, None if a.no_sidecar else prot.sidecar, manifest, png=a.png)
  psnr = float(np.mean(embed.psnr(prot.images, adv)))
  print(f"protected {len(clean)} images -> {a.workdir} (dataset id {dataset_id}; PSNR to the FSP images {psnr:.1f} dB)")
  return 0


def _restore(a: argparse.Namespace) -> int:
  cli.check_choice("--mode", a.mode, embed.MODES)
  keys = files.KeySource(a.key, a.passphrase_file)
  if a.print_config:
    return cli.print_config({"protected": a.protected, "mode": a.mode, "png": a.png})
  images, labels = files.restore_dataset(a.protected, keys, mode=a.mode, use_png=a.png)
  rundir.write_npz(a.output, images=images, labels=labels)
  print(f"restored {len(images)} images ({a.mode} mode) -> {a.output}")
  return 0


def default_workdir(cfg: study.StudyConfig) -> str:
  name = os.path.basename(os.path.normpath(cfg.dataset))
  return os.path.join("runs", f"auth-{name}{'-colour' if cfg.colour else ''}-{cfg.model}-s{cfg.seed}")


def _study(a: argparse.Namespace, argv: list[str]) -> int:
  cli.check_choice("--preset", a.preset, list(study.PRESETS))
  values = {f.name: getattr(a, f.name) for f in dataclasses.fields(study.StudyConfig)}
  flags = {s.split("=")[0] for s in argv}
  given = {f.name for f in dataclasses.fields(study.StudyConfig) if f"--{f.name}" in flags}
  values.update({k: v for k, v in study.PRESETS[a.preset].items() if k not in given})  # Flags win over a preset.
  cfg = study.StudyConfig(**values)
  if a.print_config:
    return cli.print_config(cfg)
  workdir = a.workdir or default_workdir(cfg)
  m = study.run(cfg, workdir, progress=not a.quiet)
  acc = m["accuracy"]
  print(
    f"test accuracy: clean {acc['clean']['test_accuracy']:.3f}, protected {acc['protected']['test_accuracy']:.3f}, "
    f"restored {acc['restored_exact']['test_accuracy']:.3f} (exact) / {acc['restored_lsb']['test_accuracy']:.3f} "
    f"(lsb) -> {workdir}/report.md"
  )
  return 0


@cli.command
def main(argv: list[str] | None = None) -> int:
  """Runs ``keygen``, ``protect``, ``restore`` or ``study``; returns the exit status."""
  argv = list(argv or [])
  a = parser().parse_args(argv)
  if a.cmd == "keygen":
    return _keygen(a)
  if a.cmd == "protect":
    return _protect(a)
  if a.cmd == "restore":
    return _restore(a)
  return _study(a, argv)
