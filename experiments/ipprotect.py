"""IPProtect main job: sanitize a buyer dataset and measure utility and security.

    python experiments/ipprotect.py --omega_tr 100                 # embedded Fashion-MNIST subset
    python experiments/ipprotect.py --preset smoke --workdir /tmp/s # seconds
    python experiments/ipprotect.py --dataset fashion_mnist --preset paper
    python experiments/ipprotect.py --mesh 1,8                     # images over 8 devices
    python experiments/ipprotect.py --distributed auto --mesh 4,16 # every host of a TPU pod / SLURM job

Writes a run directory (default runs/ipprotect-<dataset>-<preset>-tr<omega_tr>-s<seed>):
config.json, metrics.json, report.md, sanitized.npz, examples.png, sellers.png, checkpoints/.
Rerunning the same command resumes: trained ensembles are reused and sanitization continues
at the next unfinished batch. Run time and results of the default preset are in README.
"""

import argparse
import dataclasses
import json
import os
import sys

from jipguard import distributed, ipprotect, pipeline, sharding


def _mesh_shape(text: str) -> tuple[int, int]:
  try:
    member, data = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh takes MEMBER,DATA (two integers), got {text!r}") from None
  return member, data


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
  p.add_argument("--dataset", default="fashion_mnist_subset",
                 help="fashion_mnist_subset (embedded), mnist, fashion_mnist, cifar10, or a path")
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
  p.add_argument("--loss", choices=list(ipprotect.LOSSES),
                 help="L: L2 of logits (paper), L2 of softmax probabilities, KL of the softmax outputs, or the "
                      "hinge on the logit margin of each model's class on the original (Carlini-Wagner)")
  add("weight_decay", float, "L2 coefficient of the platform's training (sellers and sample_models)")
  p.add_argument("--no_val_stop", action="store_true", help="run T steps; Omega_V unused by the optimisation")
  p.add_argument("--out_of_bag", action="store_true",
                 help="fit each image only to the Omega_Tr models whose bootstrap left it out")
  p.add_argument("--cache_dir", help="share trained sellers / sample_models between runs (ablations)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--mesh", type=_mesh_shape,
                 help="MEMBER,DATA device mesh over all devices of the job (e.g. 8,1 or 2,4); default: one device")
  distributed.add_flags(p)
  return p


def parse(argv=None) -> tuple[pipeline.IPProtectConfig, str, bool]:
  a = _parser().parse_args(argv)

  cfg = pipeline.preset(a.preset, a.dataset)
  top = {k: getattr(a, k) for k in ("data_dir", "model", "buyer_size", "seller_pool_size", "models_per_seller",
                                    "omega_tr", "omega_v", "seed", "anchor_seed", "cache_dir") if getattr(a, k) is not None}
  san = {k: getattr(a, src) for k, src in (("lam", "lam"), ("tau", "tau"), ("zeta", "zeta"), ("steps", "steps"),
                                           ("val_every", "val_every"), ("min_steps", "min_steps"),
                                           ("model_batch", "model_batch"), ("data_batch", "data_batch"),
                                           ("learning_rate", "lr"), ("loss", "loss"), ("temperature", "temperature"),
                                           ("margin", "margin"), ("input_noise", "input_noise"),
                                           ("hidden_dropout", "hidden_dropout")) if getattr(a, src) is not None}
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
    cfg = dataclasses.replace(cfg, seller_train=dataclasses.replace(cfg.seller_train, weight_decay=a.weight_decay),
                              omega_train=dataclasses.replace(cfg.omega_train, weight_decay=a.weight_decay))
  name = os.path.basename(os.path.normpath(a.dataset))
  workdir = a.workdir or os.path.join("runs", f"ipprotect-{name}-{a.preset}-tr{cfg.omega_tr}-s{cfg.seed}")
  return cfg, workdir, a.quiet


def main(argv=None) -> int:
  a = _parser().parse_args(argv)
  distributed.initialize_from_flags(a)  # Before any computation.
  cfg, workdir, quiet = parse(argv)
  mesh = sharding.make_mesh(*a.mesh) if a.mesh else None
  m = pipeline.run(cfg, workdir, progress=not quiet and distributed.is_main_process(), mesh=mesh)
  if not distributed.is_main_process():
    return 0
  keys = ("utility_mae", "rank_correlation", "compliance_train", "compliance_val", "compliance_lower_bound",
          "correlation_mean", "ssim_mean", "images_per_second")
  print(json.dumps({k: m[k] for k in keys}, indent=2))
  print(f"run directory: {workdir} (report.md, metrics.json, sanitized.npz, examples.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
