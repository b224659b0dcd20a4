"""Command lines of IPProtect's jobs: flags -> config -> library call.

``jipguard ipprotect``, ``jipguard tradeoff``, ``jipguard ablation`` and ``jipguard saturation``
run :func:`main`, :func:`tradeoff_main`, :func:`ablation_main` and :func:`saturation_main`;
``experiments/ipprotect.py``, ``tradeoff.py``, ``ipprotect_ablation.py`` and
``ipprotect_saturation.py`` are thin wrappers of them. Every flag is checked before any work;
errors are one line (``jipguard.cli``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import json
import os
import sys
from typing import Any

from jipguard import cli as jcli
from jipguard import data, distributed, models, sharding
from jipguard.ipprotect import ablation, job, objective, saturation, tradeoff


def _mesh_shape(text: str) -> tuple[int, int]:
  try:
    member, data = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh takes MEMBER,DATA (two integers), got {text!r}") from None
  if member < 1 or data < 1:
    raise argparse.ArgumentTypeError(f"--mesh takes two integers >= 1, got {text!r}")
  return member, data


# The main job's flags: (flag, type, config fields it sets, help, allowed range). --help shows each
# flag's default under the chosen --preset; a flag given replaces it.
_FLAGS = (
  ("buyer_size", int, ("buyer_size",), "buyer images taken from the test split", dict(lo=1)),
  ("seller_pool_size", int, ("seller_pool_size",), "seller images taken from the train split", dict(lo=1)),
  ("models_per_seller", int, ("models_per_seller",), "models trained per seller (Table I: 10)", dict(lo=1)),
  ("seller_epochs", int, ("seller_train.epochs",), "epochs of each seller model", dict(lo=1)),
  ("omega_epochs", int, ("omega_train.epochs",), "epochs of each sample_models model", dict(lo=1)),
  ("omega_tr", int, ("omega_tr",), "|Omega_Tr|: models the images are fitted to", dict(lo=1)),
  ("omega_v", int, ("omega_v",), "|Omega_V|: held-out models of the stopping rule", dict(lo=1)),
  ("lam", float, ("sanitizer.lam",), "lambda: weight of the security hinge", dict(lo=0)),
  ("tau", float, ("sanitizer.tau",), "radius of the ball around the anchor (per-pixel RMS)", dict(lo=0)),
  ("zeta", float, ("sanitizer.zeta",), "stop an image when its Omega_V loss changes less than this", dict(lo=0)),
  ("steps", int, ("sanitizer.steps",), "T: at most this many steps per image", dict(lo=1)),
  ("val_every", int, ("sanitizer.val_every",), "check the stopping rule every this many steps", dict(lo=1)),
  ("min_steps", int, ("sanitizer.min_steps",), "never stop an image before this step", dict(lo=0)),
  ("model_batch", int, ("sanitizer.model_batch",), "B: models per step", dict(lo=1)),
  ("data_batch", int, ("sanitizer.data_batch",), "B_D: images optimised together", dict(lo=1)),
  ("lr", float, ("sanitizer.learning_rate",), "Adam step size on the pixels", dict(lo=0, lo_open=True)),
  (
    "temperature",
    float,
    ("sanitizer.temperature",),
    "--loss probs / kl: softmax(logits / T)",
    dict(lo=0, lo_open=True),
  ),
  ("margin", float, ("sanitizer.margin",), "--loss margin: the logit margin of each model's class", dict(lo=0)),
  ("input_noise", float, ("sanitizer.input_noise",), "robust option: sigma of Gaussian noise on x~", dict(lo=0)),
  (
    "hidden_dropout",
    float,
    ("sanitizer.hidden_dropout",),
    "robust option: dropout of the sampled models' hidden units",
    dict(lo=0, hi=1, hi_open=True),
  ),
  ("seed", int, ("seed",), "seed of everything but the anchors", dict(lo=0)),
  (
    "anchor_seed",
    int,
    ("anchor_seed",),
    "integer the 256-bit anchor secret is derived from, for reproducible runs (without it: a fresh "
    "secret from `secrets`, kept 0600 in checkpoints/)",
    dict(lo=0),
  ),
  (
    "weight_decay",
    float,
    ("seller_train.weight_decay", "omega_train.weight_decay"),
    "L2 coefficient of the platform's training (sellers and sample_models)",
    dict(lo=0),
  ),
)
_PRESETS = ("smoke", "default", "paper")
# What a flag's None default means, for --help.
_NONE = {
  "buyer_size": "all",
  "seller_pool_size": "all",
  "model_batch": "round(0.95 |Omega_Tr|)",
  "anchor_seed": "none: a fresh secret",
}


def _get(cfg: Any, path: str) -> Any:
  for part in path.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _set(cfg: Any, path: str, value: Any) -> Any:
  head, _, rest = path.partition(".")
  return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})


def _preset_of(argv: Sequence[str] | None) -> tuple[str, str]:
  """``(--preset, --dataset)`` of ``argv`` (their defaults when absent or invalid), for --help."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--preset", default="default")
  p.add_argument("--dataset", default=data.DEFAULT_DATASET)
  a, _ = p.parse_known_args(argv)
  return (a.preset if a.preset in _PRESETS else "default"), a.dataset


def flag_parser(description: str | None = None, argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
  """The main job's flags (``jipguard ipprotect``; the ablation and diagnostics take them too).

  ``argv`` picks the preset whose values ``--help`` shows as the defaults.
  """
  preset_name, dataset = _preset_of(argv)
  base = job.preset(preset_name, dataset)
  p = jcli.ArgumentParser(description=description)
  p.add_argument(
    "--preset",
    default="default",
    choices=_PRESETS,
    help="smoke: seconds, for tests; default: the recommended setting, minutes on 2 cores; paper: Table II "
    "and the paper's reading of Eq. 9 (default: %(default)s)",
  )
  p.add_argument(
    "--dataset",
    default=data.DEFAULT_DATASET,
    help="fashion_mnist_subset (embedded), mnist, fashion_mnist, cifar10 (tfds, or --data_dir), or a path to "
    "IDX files / an .npz / class folders of images (default: %(default)s)",
  )
  p.add_argument("--data_dir", help="local copy of a named dataset (IDX / npz / image folder) or tfds data_dir")
  jcli.add_common_flags(p, workdir_help="run directory (default: runs/ipprotect-<dataset>-<preset>-tr<omega>-s<seed>)")
  p.add_argument(
    "--model",
    choices=sorted(models.MODELS),
    help="architecture of sellers and sample_models (default: mlp for grey images, cnn for colour)",
  )
  shown = f" (--preset {preset_name}" + ("" if dataset == data.DEFAULT_DATASET else f", {dataset}")
  for flag, typ, paths, help_, _ in _FLAGS:
    value = _get(base, paths[0])
    p.add_argument(f"--{flag}", type=typ, help=f"{help_}{shown}: {_NONE.get(flag) if value is None else value})")
  p.add_argument(
    "--loss",
    choices=list(objective.LOSSES),
    help="L: L2 of logits (paper), L2 of softmax probabilities, KL of the softmax outputs, or the hinge on the "
    f"logit margin of each model's class on the original (Carlini-Wagner){shown}: {base.sanitizer.loss})",
  )
  p.add_argument("--no_val_stop", action="store_true", help="run T steps; Omega_V unused by the optimisation")
  p.add_argument(
    "--out_of_bag", action="store_true", help="fit each image only to the Omega_Tr models whose bootstrap left it out"
  )
  p.add_argument("--cache_dir", help="share trained sellers / sample_models between runs (ablations)")
  p.add_argument(
    "--mesh",
    type=_mesh_shape,
    help="MEMBER,DATA device mesh over all devices of the job (e.g. 8,1 or 2,4); default: one device",
  )
  distributed.add_flags(p)
  return p


def config_from_flags(
  argv: list[str] | None = None, *, description: str | None = None
) -> tuple[job.IPProtectConfig, str, bool]:
  """``(config, run directory, quiet)`` from :func:`flag_parser`'s flags: the preset, then the flags set."""
  return config_from_args(flag_parser(description, argv).parse_args(argv))


def config_from_args(a: argparse.Namespace) -> tuple[job.IPProtectConfig, str, bool]:
  """:func:`config_from_flags` for flags already parsed by :func:`flag_parser`.

  Every flag is checked against its allowed range first (``cli.FlagError`` naming it).
  """
  for flag, typ, _, _, allowed in _FLAGS:
    (jcli.check_int if typ is int else jcli.check_float)(f"--{flag}", getattr(a, flag), **allowed)
  cfg = job.preset(a.preset, a.dataset)
  for flag, _, paths, _, _ in _FLAGS:
    if getattr(a, flag) is not None:
      for path in paths:
        cfg = _set(cfg, path, getattr(a, flag))
  for path, value in (
    ("data_dir", a.data_dir),
    ("model", a.model),
    ("sanitizer.loss", a.loss),
    ("cache_dir", a.cache_dir),
    ("sanitizer.val_stop", False if a.no_val_stop else None),
    ("sanitizer.out_of_bag", True if a.out_of_bag else None),
  ):
    if value is not None:
      cfg = _set(cfg, path, value)
  cfg = dataclasses.replace(cfg)  # Validates the combination (e.g. --model_batch <= --omega_tr).
  name = os.path.basename(os.path.normpath(a.dataset))
  workdir = a.workdir or os.path.join("runs", f"ipprotect-{name}-{a.preset}-tr{cfg.omega_tr}-s{cfg.seed}")
  return cfg, workdir, a.quiet


def tradeoff_parse(
  argv: list[str] | None = None, *, description: str | None = None
) -> tuple[tradeoff.StudyConfig, argparse.Namespace]:
  """``(study config, flags)`` of the trade-off study (``flags.workdir`` resolved)."""
  preset_name, _ = _preset_of(argv)
  base = tradeoff.preset(preset_name)
  shown = lambda v: f" (--preset {preset_name}: {v})"
  p = jcli.ArgumentParser(description=description)
  p.add_argument("--preset", default="default", choices=_PRESETS, help="study size (default: %(default)s)")
  p.add_argument("--dataset", nargs="+", help="datasets" + shown(" ".join(base.datasets)))
  p.add_argument("--data_dir", help="local copy of a named dataset")
  jcli.add_common_flags(p, workdir_help="study directory (default runs/tradeoff-<preset>)")
  p.add_argument("--omega_tr", type=int, nargs="+", help="IPProtect's |Omega_Tr| values" + shown(base.omega_tr))
  p.add_argument("--seeds", type=int, nargs="+", help="seeds" + shown(base.seeds))
  p.add_argument("--methods", nargs="+", choices=tradeoff.METHODS, help="methods" + shown(base.methods))
  p.add_argument("--instahide_k", type=int, nargs="+", help="InstaHide's k" + shown(base.params.get("instahide")))
  p.add_argument("--dp_merf_sigma", type=float, nargs="+", help="DP-MERF's sigma" + shown(base.params.get("dp_merf")))
  p.add_argument("--buyer_size", type=int, help="buyer images" + shown(base.buyer_size))
  p.add_argument("--seller_pool_size", type=int, help="seller images" + shown(base.seller_pool_size))
  p.add_argument("--dx_size", type=int, help="|D_X| drawn from the train split" + shown(base.dx_size))
  p.add_argument("--n_jobs", type=int, help="zoo models fitted in parallel" + shown(base.zoo.n_jobs))
  p.add_argument("--vgg_weights", help="VGG weights file (scripts/convert_vgg_weights.py); default: stand-ins")
  p.add_argument("--vgg_size", type=int, help="VGG input size" + shown(base.vgg_size))
  p.add_argument("--report_only", action="store_true", help="only tabulate the points already finished")
  distributed.add_compilation_cache_flag(p)
  a = p.parse_args(argv)
  for flag in ("buyer_size", "seller_pool_size", "dx_size", "n_jobs", "vgg_size"):
    jcli.check_int(f"--{flag}", getattr(a, flag), lo=1)
  for v in a.omega_tr or ():
    jcli.check_int("--omega_tr", v, lo=1)
  for v in a.seeds or ():
    jcli.check_int("--seeds", v, lo=0)
  for v in a.instahide_k or ():
    jcli.check_int("--instahide_k", v, lo=2)
  for v in a.dp_merf_sigma or ():
    jcli.check_float("--dp_merf_sigma", v, lo=0, lo_open=True)
  over = {
    k: getattr(a, k)
    for k in ("data_dir", "buyer_size", "seller_pool_size", "dx_size", "vgg_weights", "vgg_size")
    if getattr(a, k) is not None
  }
  for k, src in (("datasets", "dataset"), ("omega_tr", "omega_tr"), ("seeds", "seeds"), ("methods", "methods")):
    if getattr(a, src):
      over[k] = tuple(getattr(a, src))
  params = dict(base.params)
  if a.instahide_k:
    params["instahide"] = tuple(a.instahide_k)
  if a.dp_merf_sigma:  # 5.0 -> 5: one point file name per value.
    params["dp_merf"] = tuple(int(v) if float(v).is_integer() else v for v in a.dp_merf_sigma)
  cfg = dataclasses.replace(base, params=params, **over)
  if a.n_jobs:
    cfg = dataclasses.replace(cfg, zoo=dataclasses.replace(cfg.zoo, n_jobs=a.n_jobs))
  a.workdir = a.workdir or os.path.join("runs", f"tradeoff-{a.preset}")
  return cfg, a


@jcli.command
def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The main job: sanitize a buyer dataset and measure utility and security (``job.run``)."""
  a = flag_parser(description, argv).parse_args(argv)
  cfg, workdir, quiet = config_from_args(a)  # Every flag checked before any work.
  if a.print_config:
    return jcli.print_config(job.config_to_json(cfg))
  distributed.initialize_from_flags(a)  # Before any computation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  mesh = sharding.make_mesh(*a.mesh) if a.mesh else None
  m = job.run(cfg, workdir, progress=not quiet and distributed.is_main_process(), mesh=mesh)
  if not distributed.is_main_process():
    return 0
  keys = (
    "utility_mae",
    "rank_correlation",
    "compliance_train",
    "compliance_val",
    "compliance_lower_bound",
    "correlation_mean",
    "ssim_mean",
    "images_per_second",
  )
  print(json.dumps({k: m[k] for k in keys}, indent=2))
  print(f"run directory: {workdir} (report.md, metrics.json, metrics.jsonl, sanitized.npz, examples.png)")
  return 0


def _command(name: str, argv: list[str] | None) -> str:
  return " ".join(["jipguard", name, *(sys.argv[1:] if argv is None else argv)])


@jcli.command
def tradeoff_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The trade-off study (``tradeoff.run_study``)."""
  cfg, a = tradeoff_parse(argv, description=description)
  if a.print_config:
    return jcli.print_config(cfg)
  for name in cfg.datasets:  # Bad data fail before the study directory exists.
    data.load(name, "test", data_dir=cfg.data_dir)
  distributed.enable_compilation_cache(a.compilation_cache)  # Before any compilation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  t = tradeoff.run_study(
    cfg, a.workdir, progress=not a.quiet, report_only=a.report_only, command=_command("tradeoff", argv)
  )
  print(tradeoff.table3_markdown(t))
  print(f"study directory: {a.workdir} (table3.md / .csv / .json, fig2*.png, points/); {t['wall_s']:.0f} s")
  return 0


@jcli.command
def ablation_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The sanitizer ablation (``ablation.run``)."""
  p = jcli.ArgumentParser(description=description)
  jcli.add_common_flags(p, workdir_help="ablation directory (default: %(default)s)")
  p.set_defaults(workdir="runs/ablation")
  p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the repetitions (default: %(default)s)")
  p.add_argument("--only", nargs="*", help="substrings of variant names to run")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags of the main job added to every run")
  distributed.add_compilation_cache_flag(p)
  a = p.parse_args(argv)
  for v in a.seeds:
    jcli.check_int("--seeds", v, lo=0)
  config_from_flags(a.extra)  # The main job's flags, checked before any work.
  if a.print_config:
    return jcli.print_config({"seeds": a.seeds, "only": a.only, "extra": a.extra})
  distributed.enable_compilation_cache(a.compilation_cache)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  ablation.run(
    a.workdir,
    a.seeds,
    only=a.only,
    extra=a.extra,
    command=_command("ablation", argv),
    log=lambda s: print(s, flush=True),
  )
  with open(os.path.join(a.workdir, "ablation.md")) as f:
    print(f.read())
  return 0


@jcli.command
def saturation_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The saturation diagnostic (``saturation.run``): the main job's flags, ``--images`` and ``--checkpoints``."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--images", type=int, default=300, help="buyer images the trajectory follows")
  p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 300], help="steps to report")
  own, rest = p.parse_known_args(argv)
  jcli.check_int("--images", own.images, lo=1)
  for v in own.checkpoints:
    jcli.check_int("--checkpoints", v, lo=1)
  a = flag_parser(description, rest).parse_args(rest)
  cfg, workdir, _ = config_from_args(a)
  if a.print_config:
    return jcli.print_config(job.config_to_json(cfg))
  distributed.enable_compilation_cache(a.compilation_cache)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  saturation.run(cfg, workdir, images=own.images, checkpoints=own.checkpoints, log=lambda s: print(s, flush=True))
  return 0
