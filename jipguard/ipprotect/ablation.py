"""Ablation of the IPProtect sanitizer: variants of the main job's flags, over seeds.

Run by ``experiments/ipprotect_ablation.py`` (``cli.ablation_main``). Every variant is a list of
flags of the main job (``experiments/ipprotect.py``); variants of one seed share the trained
sellers and sample_models (``--cache_dir``), and every run directory resumes, so a killed sweep
continues where it stopped. Writes ``ablation.md`` / ``ablation.csv`` and ``ablation.json``:
mean +- sample standard deviation over seeds of utility MAE and its mean signed error (bias:
sanitized - original) on the sellers, the MAE of fresh real images (the sellers' utility on as
many other test images: pure sampling error), the MAE and bias on Omega_V's out-of-bag images
(the buyer's own estimate, no seller needed), Spearman, compliance on Omega_Tr / Omega_V,
correlation and SSIM to the originals, images/s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
from typing import Any

import numpy as np

from jipguard import rundir
from jipguard.ipprotect import job, metrics

# Common scale: 200 buyer images, 8 sellers x 4 models, |Omega_V| = 10. Every variant names its loss
# (the preset's default changed from probs to margin; a variant must not change with it).
BASE = ("--buyer_size", "200", "--steps", "500", "--quiet")
VARIANTS = {
  "paper reading (logits, lr 0.01, zeta 0.5)": [
    "--omega_tr",
    "10",
    "--loss",
    "logits",
    "--lr",
    "0.01",
    "--zeta",
    "0.5",
  ],
  "logits, lr 0.1": ["--omega_tr", "10", "--loss", "logits", "--lr", "0.1", "--zeta", "0.5"],
  "probs, lr 0.1": ["--loss", "probs", "--omega_tr", "10"],
  "probs, temperature 4": ["--loss", "probs", "--omega_tr", "10", "--temperature", "4"],
  "probs, no stopping rule (T=500)": ["--loss", "probs", "--omega_tr", "10", "--no_val_stop"],
  "probs + input noise 1.0": ["--loss", "probs", "--omega_tr", "10", "--input_noise", "1.0"],
  "probs + hidden dropout 0.5": ["--loss", "probs", "--omega_tr", "10", "--hidden_dropout", "0.5"],
  "probs + noise 1.0 + dropout 0.5": [
    "--loss",
    "probs",
    "--omega_tr",
    "10",
    "--input_noise",
    "1.0",
    "--hidden_dropout",
    "0.5",
  ],
  "probs, lambda 1, tau 0.8": ["--loss", "probs", "--omega_tr", "10", "--lam", "1.0", "--tau", "0.8"],
  "probs, |Omega_Tr| 50": ["--loss", "probs", "--omega_tr", "50"],
  "logits (paper), |Omega_Tr| 50": ["--omega_tr", "50", "--loss", "logits", "--lr", "0.01", "--zeta", "0.5"],
  "kl, lr 0.1": ["--omega_tr", "10", "--loss", "kl"],
  "probs, weight decay 1e-3 (sellers and sample_models)": [
    "--loss",
    "probs",
    "--omega_tr",
    "10",
    "--weight_decay",
    "1e-3",
  ],
  "probs, weight decay 1e-2 (sellers and sample_models)": [
    "--loss",
    "probs",
    "--omega_tr",
    "10",
    "--weight_decay",
    "1e-2",
  ],
  "probs, out-of-bag models only": ["--loss", "probs", "--omega_tr", "10", "--out_of_bag"],
  "probs, out-of-bag models only, |Omega_Tr| 50": ["--loss", "probs", "--omega_tr", "50", "--out_of_bag"],
  "margin 1, lr 0.1": ["--omega_tr", "10", "--loss", "margin"],
  "margin 5, lr 0.1": ["--omega_tr", "10", "--loss", "margin", "--margin", "5"],
  "margin 1, lr 0.1, |Omega_Tr| 50": ["--omega_tr", "50", "--loss", "margin"],
  "margin 1, sample_models 5 epochs": ["--omega_tr", "10", "--loss", "margin", "--omega_epochs", "5"],
  "margin 1, sample_models 10 epochs": ["--omega_tr", "10", "--loss", "margin", "--omega_epochs", "10"],
}
# metrics.json key -> column of the table.
COLUMNS = {
  "utility_mae": "utility MAE",
  "utility_bias": "bias",
  "utility_mae_fresh_images": "fresh images",
  "utility_mae_val_oob": "Omega_V out-of-bag MAE",
  "utility_bias_val_oob": "its bias",
  "rank_correlation": "Spearman",
  "compliance_train": "compl. Tr",
  "compliance_val": "compl. V",
  "correlation_mean": "corr. mean",
  "correlation_max": "corr. max",
  "ssim_mean": "SSIM",
  "images_per_second": "img/s",
}


def select(only: Sequence[str] | None) -> dict[str, list[str]]:
  """The variants whose names contain one of ``only`` (all of them for None or empty)."""
  chosen = {n: f for n, f in VARIANTS.items() if not only or any(s in n for s in only)}
  if not chosen:
    raise ValueError(f"no variant name contains any of {list(only)}; variants: {list(VARIANTS)}")
  return chosen


def variant_config(flags: Sequence[str], seed: int, out: str) -> job.IPProtectConfig:
  """The main job's config of one variant and seed (the seed's sellers cached under ``out``)."""
  from jipguard.ipprotect import cli  # noqa: PLC0415 (the variants are flags of the main job)

  cfg, _, _ = cli.config_from_flags(
    [*BASE, *flags, "--seed", str(seed), "--cache_dir", os.path.join(out, f"cache-s{seed}")]
  )
  return cfg


def run(
  out: str,
  seeds: Sequence[int],
  *,
  only: Sequence[str] | None = None,
  extra: Sequence[str] = (),
  command: str = "",
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) every selected variant at every seed; writes the tables; returns the summary.

  Args:
    out: The ablation's directory (one run directory per variant and seed, shared caches).
    seeds: Seeds of the repetitions.
    only: Substrings of variant names to run (default: all).
    extra: Flags added to every variant.
    command: The command line, written into ablation.md.
    log: Receives one line per finished run.

  Returns:
    ``{variant: {metric: [mean, sample std]}}`` (std NaN with one seed).
  """
  results: dict[str, list[dict[str, float]]] = {}
  for name, flags in select(only).items():
    for seed in seeds:
      slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
      m = job.run(variant_config([*flags, *extra], seed, out), os.path.join(out, f"{slug}-s{seed}"), progress=False)
      row = {k: np.nan if m.get(k) is None else m[k] for k in COLUMNS}  # None: not measurable for this run.
      results.setdefault(name, []).append(row)
      log(f"{name} s{seed} " + str({k: round(v, 4) for k, v in row.items()}))
  summary = {
    name: {k: [float(np.mean([r[k] for r in rs])), metrics.sample_std([r[k] for r in rs])] for k in COLUMNS}
    for name, rs in results.items()
  }
  rundir.write_json(
    os.path.join(out, "ablation.json"),
    {"seeds": list(seeds), "base": list(BASE), "extra": list(extra), "variants": VARIANTS, "summary": summary},
  )
  rows = [{"variant": name, **{col: _mean_std(s[k]) for k, col in COLUMNS.items()}} for name, s in summary.items()]
  rundir.write_table(
    os.path.join(out, "ablation"),
    rows,
    ["variant", *COLUMNS.values()],
    title=f"IPProtect sanitizer ablation\n\n`{command}`, seeds {list(seeds)}, common flags `{' '.join(BASE)}`",
  )
  return summary


def _mean_std(v: list[float]) -> str:
  mean, std = v
  return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"
