"""Command line of anti-neuron watermarking: the studies, and the mark / verify tools.

``jipguard watermark`` runs :func:`main`; ``experiments/watermark.py`` is a thin wrapper of it.
The study sub-commands take one flag per field of their config (``studies.MultiuserConfig``,
``SweepConfig``, ``DefencesConfig``), with the config's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing

import jax
import numpy as np

from jipguard import cli as jcli
from jipguard import data, distributed, models, rundir
from jipguard.watermark import lct, learner, report, studies, verifier

# Help of the studies' flags (one per config field).
_HELP = {
  "dataset": "fashion_mnist (Debian IDX), fashion_mnist_subset, mnist, digits, cifar10, or a path; grey images "
  "are tinted",
  "data_dir": "local copy / tfds data_dir of a named dataset",
  "train_size": "learner's training images",
  "model": "mlp, cnn, resnet8, resnet20",
  "epochs": "learner epochs",
  "batch_size": "learner minibatch",
  "lr": "peak Adam learning rate (cosine decay)",
  "augment": "learner augmentation (crop_flip is the paper's default for its ResNets; random crops defeat a "
  "pixel-aligned MLP's memorisation, see docs/watermark.md)",
  "per_user": "images per user (1%% of 10,000)",
  "heldout_users": "held-out users (test split)",
  "heldout_per_user": "images per held-out user",
  "grid_step": "grid over [0, 360) in this step (deg)",
  "tau": "match if |k^ - k*| < tau",
  "signature": "k* of the single-user studies",
  "seed": "seed of users, signatures and learners",
  "num_users": "marked users",
  "lct": "T_YIQ for all users (same), or T_u ~ U(-1, 1) per user",
  "gradient": "also gradient search for every member user",
  "mia_users": "member + held-out users given shadow models (0: skip)",
  "shadow_epochs": "epochs of the shadow models",
  "vary": "the factor the sweep varies",
  "finetune_epochs": "epochs of fine-tuning on clean data",
}
_CHOICES = {
  "augment": sorted(learner.NAMED_AUGMENTS),
  "lct": list(studies.LCT_KINDS),
  "vary": sorted(studies.SWEEPS),
  "model": sorted(models.MODELS),
}
# Allowed ranges of the studies' numeric flags (cli.check_int / check_float keywords).
_RANGES = {
  "seed": dict(lo=0),
  "mia_users": dict(lo=0),
  "heldout_users": dict(lo=0),
  "finetune_epochs": dict(lo=0),
  "lr": dict(lo=0, lo_open=True),
  "grid_step": dict(lo=0, hi=360, lo_open=True, hi_open=True),
  "tau": dict(lo=0, hi=180, lo_open=True),
  "signature": dict(lo=0, hi=360, hi_open=True),
}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
  """One ``--<field>`` per field of the frozen config ``cls``, with its default and type."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    kind = hints[f.name]
    if kind is bool:
      parser.add_argument(f"--{f.name}", action="store_true", help=_HELP[f.name])
      continue
    typ = {int: int, float: float}.get(kind, str)
    parser.add_argument(
      f"--{f.name}",
      type=typ,
      default=f.default,
      choices=_CHOICES.get(f.name),
      required=f.name == "vary",
      help=_HELP[f.name] + " (default: %(default)s)",
    )


def _study_config(a: argparse.Namespace) -> studies.StudyConfig:
  """The study's config from its flags, each checked against its allowed range first."""
  return jcli.config_from_flags(a, studies.STUDIES[a.cmd], ranges=_RANGES, int_range=dict(lo=1), float_range={})


def default_workdir(cfg: studies.StudyConfig) -> str:
  """``runs/wm-<study>-<dataset>-<model>-s<seed>``, with the LCT kind or the swept factor."""
  tag = studies.study_name(cfg)
  if isinstance(cfg, studies.MultiuserConfig):
    tag += f"-{cfg.lct}"
  elif isinstance(cfg, studies.SweepConfig):
    tag += f"-{cfg.vary}"
  return os.path.join("runs", f"wm-{tag}-{os.path.basename(os.path.normpath(cfg.dataset))}-{cfg.model}-s{cfg.seed}")


def load_images(path: str) -> data.Dataset:
  """An ``.npz`` (``images``/``labels`` or ``x_train``/``y_train``) or a class-folder of images."""
  return data.load_local(path, "train")


def cmd_mark(a: argparse.Namespace) -> int:
  """``mark``: writes a copy of an image set with every image marked."""
  jcli.check_float("--signature", a.signature, **_RANGES["signature"])
  jcli.check_int("--transform_seed", a.transform_seed, lo=0)
  if not a.output.endswith(".npz"):
    raise jcli.FlagError(f"--output must name an .npz file, got {a.output!r}")
  if a.input.endswith(".npz") and os.path.isfile(a.input):
    arrays = data.read_npz(a.input)
    key = "images" if "images" in arrays else "x_train"
    if key not in arrays:
      raise data.DataError(f"{a.input}: expected an 'images' (or 'x_train') array, found {sorted(arrays)}")
    images = arrays[key].astype(np.float32)
    if arrays[key].dtype == np.uint8:
      images /= 255.0
  else:
    ds = load_images(a.input)
    arrays, key, images = {"labels": ds.labels}, "images", ds.images
  if images.ndim != 4 or images.shape[-1] != 3:
    raise data.DataError(f"{a.input}: need RGB images N x H x W x 3, got shape {images.shape}")
  if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
    raise data.DataError(f"{a.input}: pixels must be finite and in [0, 1] (uint8 or float)")
  t = None if a.transform_seed is None else lct.user_transform(jax.random.key(a.transform_seed))
  arrays[key] = lct.mark(images, a.signature, lct.Watermark.hue(t))
  rundir.write_npz(a.output, **arrays)
  print(f"marked {len(images)} images with signature {a.signature} deg -> {a.output}")
  return 0


def cmd_verify(a: argparse.Namespace) -> int:
  """``verify``: recovers the signature from a saved model and the owner's unmarked images; prints a verdict."""
  jcli.check_float("--signature", a.signature, **_RANGES["signature"])
  jcli.check_float("--tau", a.tau, **_RANGES["tau"])
  jcli.check_float("--grid_step", a.grid_step, **_RANGES["grid_step"])
  jcli.check_int("--transform_seed", a.transform_seed, lo=0)
  if not os.path.isdir(a.model):
    raise FileNotFoundError(f"--model {a.model}: no saved model directory there (learner.save_model)")
  model, v, meta = learner.load_model(a.model)
  ds = load_images(a.images)
  if ds.image_shape != tuple(meta["image_shape"]):
    raise data.DataError(f"{a.images}: images are {ds.image_shape}, the model takes {tuple(meta['image_shape'])}")
  t = None if a.transform_seed is None else lct.user_transform(jax.random.key(a.transform_seed))
  verdict = verifier.verify(
    model,
    v,
    ds.images,
    ds.labels,
    signature=a.signature,
    tau=a.tau,
    grid_step=a.grid_step,
    gradient=a.gradient,
    watermark=lct.Watermark.hue(t),
  )
  r = verdict.grid
  every = max(1, int(15 / a.grid_step))
  print("signature (deg) -> mean loss")
  for s, l in zip(r.signatures[::every], r.losses[::every]):
    print(f"  {s:6.1f}  {l:.4f}  " + "#" * int(40 * (l - r.losses.min()) / max(np.ptp(r.losses), 1e-9)))
  print(f"recovered signature (grid): {r.recovered:.1f} deg")
  if a.gradient:
    print(f"recovered signature (gradient search): {verdict.recovered:.1f} deg")
  if a.signature is not None:
    ok = verdict.matched
    print(
      f"verdict: {'MATCH' if ok else 'NO MATCH'}: |k^ - k*| = {verdict.distance:.1f} "
      f"{'<' if ok else '>='} tau = {a.tau}: the model was {'very likely' if ok else 'not shown to be'} "
      "trained on the marked images"
    )
  elif not verdict.matched:
    print("verdict: the recovered signature is the null one: no sign of a watermark")
  else:
    print(f"verdict: a non-null signature ({verdict.recovered:.1f} deg) was recovered: compare it with the owner's")
  if a.plot:
    report.loss_plot(
      a.plot,
      [("user images", r.signatures, r.losses, 0.0 if a.signature is None else a.signature)],
      a.tau,
      "loss vs signature",
    )
  return 0


def parser(description: str | None = None) -> argparse.ArgumentParser:
  """The flags of ``jipguard watermark``: one sub-command per study, ``mark`` and ``verify``."""
  p = jcli.ArgumentParser(description=description)
  sub = p.add_subparsers(dest="cmd", required=True, metavar="{mark,verify," + ",".join(studies.STUDIES) + "}")
  q = sub.add_parser("mark", help="mark images with a signature")
  q.add_argument("--input", required=True, help=".npz (images[, labels]) or an image folder")
  q.add_argument("--output", required=True, help="output .npz")
  q.add_argument("--signature", type=float, required=True, help="k* in degrees, in [0, 360)")
  q.add_argument("--transform_seed", type=int, help="use a user transform T_u drawn from this seed")
  jcli.add_common_flags(q)
  q = sub.add_parser("verify", help="recover the signature from a saved model and unmarked images")
  q.add_argument("--model", required=True, help="a saved model directory (learner.save_model)")
  q.add_argument("--images", required=True, help="the owner's unmarked images with labels (.npz or folder)")
  q.add_argument("--signature", type=float, help="the owner's private signature (for the verdict)")
  q.add_argument("--transform_seed", type=int, help="the owner's T_u seed, if marked with one")
  q.add_argument("--tau", type=float, default=lct.PAPER_TAU, help="match if |k^ - k*| < tau (default: %(default)s)")
  q.add_argument("--grid_step", type=float, default=1.0, help="grid step in degrees (default: %(default)s)")
  q.add_argument("--gradient", action="store_true", help="refine with gradient search")
  q.add_argument("--plot", help="write the loss-vs-signature plot here (PNG)")
  jcli.add_common_flags(q)
  helps = {
    "multiuser": "many users with random signatures, held-out users, MIA baselines",
    "sweep": "one marked user; vary one factor",
    "defences": "magnitude pruning and fine-tuning",
  }
  for name, cls in studies.STUDIES.items():
    q = sub.add_parser(name, help=helps[name])
    jcli.add_common_flags(q, workdir_help="run directory (default: runs/wm-<study>-<dataset>-<model>-s<seed>)")
    _add_config_flags(q, cls)
  for q in sub.choices.values():
    distributed.add_compilation_cache_flag(q)
  return p


@jcli.command
def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """Runs a study, ``mark`` or ``verify``; returns the exit status."""
  a = parser(description).parse_args(argv)
  cfg = None if a.cmd in ("mark", "verify") else _study_config(a)  # Flags checked before any work.
  if a.print_config:
    return jcli.print_config(cfg if cfg is not None else {k: v for k, v in vars(a).items() if k != "print_config"})
  distributed.enable_compilation_cache(a.compilation_cache)  # Before any compilation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  if a.cmd == "mark":
    return cmd_mark(a)
  if a.cmd == "verify":
    return cmd_verify(a)
  data.load(cfg.dataset, "train", data_dir=cfg.data_dir)  # Bad data fail before the run directory exists.
  workdir = a.workdir or default_workdir(cfg)
  m = {"multiuser": studies.multiuser, "sweep": studies.sweep, "defences": studies.defences}[a.cmd](
    cfg, workdir, progress=not a.quiet
  )
  print(json.dumps({k: v for k, v in m.items() if not isinstance(v, list)}, indent=2))
  print(f"run directory: {workdir}")
  return 0
