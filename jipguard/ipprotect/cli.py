"""Command lines of IPProtect's jobs: flags -> config -> library call.

``experiments/ipprotect.py``, ``tradeoff.py``, ``ipprotect_ablation.py`` and
``ipprotect_saturation.py`` are thin wrappers of :func:`main`, :func:`tradeoff_main`,
:func:`ablation_main` and :func:`saturation_main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from jipguard import distributed, sharding
from jipguard.ipprotect import ablation, job, objective, saturation, tradeoff


def _mesh_shape(text: str) -> tuple[int, int]:
  try:
    member, data = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh takes MEMBER,DATA (two integers), got {text!r}") from None
  return member, data


def flag_parser(description: str | None = None) -> argparse.ArgumentParser:
  """The main job's flags (``experiments/ipprotect.py``; the ablation and diagnostics take them too)."""
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
  p.add_argument(
    "--dataset",
    default="fashion_mnist_subset",
    help="fashion_mnist_subset (embedded), mnist, fashion_mnist, cifar10, or a path",
  )
  p.add_argument("--data_dir", help="local copy of a named dataset (IDX / npz / image folder) or tfds data_dir")
  p.add_argument("--workdir", help="run directory (default runs/ipprotect-...)")
  p.add_argument("--model", help="architecture: mlp, cnn, resnet8, resnet20 (default mlp/cnn by channels)")
  add = lambda name, typ, help_: p.add_argument(f"--{name}", type=typ, help=help_)
  add("buyer_size", int, "buyer images taken from the test split")
  add("seller_pool_size", int, "seller images taken from the train split")
  add("models_per_seller", int, "models trained per seller (Table I: 10)")
  add("seller_epochs", int, "epochs of each seller model")
  add("omega_epochs", int, "epochs of each sample_models model")
  add("omega_tr", int, "|Omega_Tr|: models the images are fitted to")
  add("omega_v", int, "|Omega_V|: held-out models of the stopping rule")
  add("lam", float, "lambda: weight of the security hinge")
  add("tau", float, "radius of the ball around the anchor (per-pixel RMS)")
  add("zeta", float, "stop an image when its Omega_V loss changes less than this")
  add("steps", int, "T: at most this many steps per image")
  add("val_every", int, "check the stopping rule every this many steps")
  add("min_steps", int, "never stop an image before this step")
  add("model_batch", int, "B: models per step (default 0.95 |Omega_Tr|)")
  add("data_batch", int, "B_D: images optimised together")
  add("lr", float, "Adam step size on the pixels")
  add("temperature", float, "with --loss probs: compare softmax(logits / temperature)")
  add("margin", float, "with --loss margin: the logit margin each sampled model's class must win by")
  add("input_noise", float, "robust option: sigma of Gaussian noise on x~ per step")
  add("hidden_dropout", float, "robust option: dropout of the sampled models' hidden units")
  add("seed", int, "seed of everything but the anchors")
  add("anchor_seed", int, "64-bit anchor secret (default: drawn once, kept in checkpoints/)")
  p.add_argument(
    "--loss",
    choices=list(objective.LOSSES),
    help="L: L2 of logits (paper), L2 of softmax probabilities, KL of the softmax outputs, or the "
    "hinge on the logit margin of each model's class on the original (Carlini-Wagner)",
  )
  add("weight_decay", float, "L2 coefficient of the platform's training (sellers and sample_models)")
  p.add_argument("--no_val_stop", action="store_true", help="run T steps; Omega_V unused by the optimisation")
  p.add_argument(
    "--out_of_bag", action="store_true", help="fit each image only to the Omega_Tr models whose bootstrap left it out"
  )
  p.add_argument("--cache_dir", help="share trained sellers / sample_models between runs (ablations)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
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
  return config_from_args(flag_parser(description).parse_args(argv))


def config_from_args(a: argparse.Namespace) -> tuple[job.IPProtectConfig, str, bool]:
  """:func:`config_from_flags` for flags already parsed by :func:`flag_parser`."""
  cfg = job.preset(a.preset, a.dataset)
  top = {
    k: getattr(a, k)
    for k in (
      "data_dir",
      "model",
      "buyer_size",
      "seller_pool_size",
      "models_per_seller",
      "omega_tr",
      "omega_v",
      "seed",
      "anchor_seed",
      "cache_dir",
    )
    if getattr(a, k) is not None
  }
  san = {
    k: getattr(a, src)
    for k, src in (
      ("lam", "lam"),
      ("tau", "tau"),
      ("zeta", "zeta"),
      ("steps", "steps"),
      ("val_every", "val_every"),
      ("min_steps", "min_steps"),
      ("model_batch", "model_batch"),
      ("data_batch", "data_batch"),
      ("learning_rate", "lr"),
      ("loss", "loss"),
      ("temperature", "temperature"),
      ("margin", "margin"),
      ("input_noise", "input_noise"),
      ("hidden_dropout", "hidden_dropout"),
    )
    if getattr(a, src) is not None
  }
  if a.no_val_stop:
    san["val_stop"] = False
  if a.out_of_bag:
    san["out_of_bag"] = True
  cfg = dataclasses.replace(cfg, **top, sanitizer=dataclasses.replace(cfg.sanitizer, **san))
  if a.seller_epochs is not None:
    cfg = dataclasses.replace(cfg, seller_train=dataclasses.replace(cfg.seller_train, epochs=a.seller_epochs))
  if a.omega_epochs is not None:
    cfg = dataclasses.replace(cfg, omega_train=dataclasses.replace(cfg.omega_train, epochs=a.omega_epochs))
  if a.weight_decay is not None:  # The platform's `learn`: the same for sellers and sample_models.
    cfg = dataclasses.replace(
      cfg,
      seller_train=dataclasses.replace(cfg.seller_train, weight_decay=a.weight_decay),
      omega_train=dataclasses.replace(cfg.omega_train, weight_decay=a.weight_decay),
    )
  name = os.path.basename(os.path.normpath(a.dataset))
  workdir = a.workdir or os.path.join("runs", f"ipprotect-{name}-{a.preset}-tr{cfg.omega_tr}-s{cfg.seed}")
  return cfg, workdir, a.quiet


def tradeoff_parse(
  argv: list[str] | None = None, *, description: str | None = None
) -> tuple[tradeoff.StudyConfig, str, bool, bool, str]:
  """``(study config, study directory, quiet, report_only, compilation cache)`` from the trade-off study's flags."""
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
  p.add_argument("--dataset", nargs="+", help="datasets (default: the embedded fashion_mnist_subset)")
  p.add_argument("--data_dir", help="local copy of a named dataset")
  p.add_argument("--out", help="study directory (default runs/tradeoff-<preset>)")
  p.add_argument("--omega_tr", type=int, nargs="+", help="IPProtect's |Omega_Tr| values")
  p.add_argument("--seeds", type=int, nargs="+")
  p.add_argument("--methods", nargs="+", choices=tradeoff.METHODS)
  p.add_argument("--instahide_k", type=int, nargs="+", help="InstaHide's k values")
  p.add_argument("--dp_merf_sigma", type=float, nargs="+", help="DP-MERF's sigma values")
  p.add_argument("--buyer_size", type=int)
  p.add_argument("--seller_pool_size", type=int)
  p.add_argument("--dx_size", type=int, help="|D_X| drawn from the train split")
  p.add_argument("--n_jobs", type=int, help="zoo models fitted in parallel")
  p.add_argument("--vgg_weights", help="VGG weights file (scripts/convert_vgg_weights.py); default: stand-ins")
  p.add_argument("--vgg_size", type=int)
  p.add_argument("--report_only", action="store_true", help="only tabulate the points already finished")
  p.add_argument("--quiet", action="store_true")
  distributed.add_compilation_cache_flag(p)
  a = p.parse_args(argv)
  cfg = tradeoff.preset(a.preset)
  over = {
    k: getattr(a, k)
    for k in ("data_dir", "buyer_size", "seller_pool_size", "dx_size", "vgg_weights", "vgg_size")
    if getattr(a, k) is not None
  }
  for k, src in (("datasets", "dataset"), ("omega_tr", "omega_tr"), ("seeds", "seeds"), ("methods", "methods")):
    if getattr(a, src):
      over[k] = tuple(getattr(a, src))
  params = dict(cfg.params)
  if a.instahide_k:
    params["instahide"] = tuple(a.instahide_k)
  if a.dp_merf_sigma:  # 5.0 -> 5: one point file name per value.
    params["dp_merf"] = tuple(int(v) if float(v).is_integer() else v for v in a.dp_merf_sigma)
  cfg = dataclasses.replace(cfg, params=params, **over)
  if a.n_jobs:
    cfg = dataclasses.replace(cfg, zoo=dataclasses.replace(cfg.zoo, n_jobs=a.n_jobs))
  return cfg, a.out or os.path.join("runs", f"tradeoff-{a.preset}"), a.quiet, a.report_only, a.compilation_cache


def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The main job: sanitize a buyer dataset and measure utility and security (``job.run``)."""
  a = flag_parser(description).parse_args(argv)
  distributed.initialize_from_flags(a)  # Before any computation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  cfg, workdir, quiet = config_from_args(a)
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
  print(f"run directory: {workdir} (report.md, metrics.json, sanitized.npz, examples.png)")
  return 0


def _command(script: str, argv: list[str] | None) -> str:
  return " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def tradeoff_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The trade-off study (``tradeoff.run_study``)."""
  cfg, out, quiet, report_only, compilation_cache = tradeoff_parse(argv, description=description)
  distributed.enable_compilation_cache(compilation_cache)  # Before any compilation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  t = tradeoff.run_study(
    cfg, out, progress=not quiet, report_only=report_only, command=_command("experiments/tradeoff.py", argv)
  )
  print(tradeoff.table3_markdown(t))
  print(f"study directory: {out} (table3.md, table3.json, fig2*.png, points/); {t['wall_s']:.0f} s")
  return 0


def ablation_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The sanitizer ablation (``ablation.run``)."""
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablation", help="ablation directory")
  p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the repetitions")
  p.add_argument("--only", nargs="*", help="substrings of variant names to run")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags of the main job added to every run")
  distributed.add_compilation_cache_flag(p)
  a = p.parse_args(argv)
  distributed.enable_compilation_cache(a.compilation_cache)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  ablation.run(
    a.out,
    a.seeds,
    only=a.only,
    extra=a.extra,
    command=_command("experiments/ipprotect_ablation.py", argv),
    log=lambda s: print(s, flush=True),
  )
  with open(os.path.join(a.out, "ablation.md")) as f:
    print(f.read())
  return 0


def saturation_main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """The saturation diagnostic (``saturation.run``): the main job's flags, ``--images`` and ``--checkpoints``."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--images", type=int, default=300, help="buyer images the trajectory follows")
  p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 300], help="steps to report")
  own, rest = p.parse_known_args(argv)
  a = flag_parser(description).parse_args(rest)
  distributed.enable_compilation_cache(a.compilation_cache)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  cfg, workdir, _ = config_from_args(a)
  saturation.run(cfg, workdir, images=own.images, checkpoints=own.checkpoints, log=lambda s: print(s, flush=True))
  return 0
