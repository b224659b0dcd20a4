"""Ablation of the IPProtect sanitizer: a sweep of flags of experiments/ipprotect.py.

    python experiments/ipprotect_ablation.py --out runs/ablation --seeds 0 1 2

Every variant is a list of flags of the main job; variants of one seed share the trained sellers
and sample_models (``--cache_dir``), and every run directory resumes, so a killed sweep continues
where it stopped. Writes ``ablation.md`` and ``ablation.json`` (mean +- std over seeds of utility
MAE and its mean signed error (bias: sanitized - original) on the sellers, the MAE of fresh real
images (the sellers' utility on as many other test images: pure sampling error), the MAE and bias on Omega_V's
out-of-bag images (the buyer's own estimate, no seller needed), Spearman, compliance on Omega_Tr /
Omega_V, correlation and SSIM to the originals, images/s).
"""

import argparse
import os
import sys

import numpy as np

from jipguard import distributed, pipeline

# Common scale: 200 buyer images, 8 sellers x 4 models, |Omega_V| = 10. Every variant names its loss
# (the preset's default changed from probs to margin; a variant must not change with it).
BASE = ["--buyer_size", "200", "--steps", "500", "--quiet"]
VARIANTS = {
    "paper reading (logits, lr 0.01, zeta 0.5)": ["--omega_tr", "10", "--loss", "logits", "--lr", "0.01",
                                                  "--zeta", "0.5"],
    "logits, lr 0.1": ["--omega_tr", "10", "--loss", "logits", "--lr", "0.1", "--zeta", "0.5"],
    "probs, lr 0.1": ["--loss", "probs", "--omega_tr", "10"],
    "probs, temperature 4": ["--loss", "probs", "--omega_tr", "10", "--temperature", "4"],
    "probs, no stopping rule (T=500)": ["--loss", "probs", "--omega_tr", "10", "--no_val_stop"],
    "probs + input noise 1.0": ["--loss", "probs", "--omega_tr", "10", "--input_noise", "1.0"],
    "probs + hidden dropout 0.5": ["--loss", "probs", "--omega_tr", "10", "--hidden_dropout", "0.5"],
    "probs + noise 1.0 + dropout 0.5": ["--loss", "probs", "--omega_tr", "10", "--input_noise", "1.0", "--hidden_dropout", "0.5"],
    "probs, lambda 1, tau 0.8": ["--loss", "probs", "--omega_tr", "10", "--lam", "1.0", "--tau", "0.8"],
    "probs, |Omega_Tr| 50": ["--loss", "probs", "--omega_tr", "50"],
    "logits (paper), |Omega_Tr| 50": ["--omega_tr", "50", "--loss", "logits", "--lr", "0.01", "--zeta", "0.5"],
    "kl, lr 0.1": ["--omega_tr", "10", "--loss", "kl"],
    "probs, weight decay 1e-3 (sellers and sample_models)": ["--loss", "probs", "--omega_tr", "10", "--weight_decay", "1e-3"],
    "probs, weight decay 1e-2 (sellers and sample_models)": ["--loss", "probs", "--omega_tr", "10", "--weight_decay", "1e-2"],
    "probs, out-of-bag models only": ["--loss", "probs", "--omega_tr", "10", "--out_of_bag"],
    "probs, out-of-bag models only, |Omega_Tr| 50": ["--loss", "probs", "--omega_tr", "50", "--out_of_bag"],
    "margin 1, lr 0.1": ["--omega_tr", "10", "--loss", "margin"],
    "margin 5, lr 0.1": ["--omega_tr", "10", "--loss", "margin", "--margin", "5"],
    "margin 1, lr 0.1, |Omega_Tr| 50": ["--omega_tr", "50", "--loss", "margin"],
    "margin 1, sample_models 5 epochs": ["--omega_tr", "10", "--loss", "margin", "--omega_epochs", "5"],
    "margin 1, sample_models 10 epochs": ["--omega_tr", "10", "--loss", "margin", "--omega_epochs", "10"],
}
KEYS = ("utility_mae", "utility_bias", "utility_mae_fresh_images", "utility_mae_val_oob", "utility_bias_val_oob", "rank_correlation",
        "compliance_train", "compliance_val", "correlation_mean", "correlation_max", "ssim_mean", "images_per_second")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablation")
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--only", nargs="*", help="substrings of variant names to run")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every run")
  a = p.parse_args(argv)
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  results = {}
  for name, flags in VARIANTS.items():
    if a.only and not any(s in name for s in a.only):
      continue
    for seed in a.seeds:
      slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
      cfg, _, _ = pipeline.config_from_flags(BASE + flags + a.extra + [
          "--seed", str(seed), "--cache_dir", os.path.join(a.out, f"cache-s{seed}")])
      m = pipeline.run(cfg, os.path.join(a.out, f"{slug}-s{seed}"), progress=False)
      row = {k: np.nan if m.get(k) is None else m[k] for k in KEYS}  # None: not measurable for this run.
      results.setdefault(name, []).append(row)
      print(name, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
  summary = {name: {k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))] for k in KEYS}
             for name, rs in results.items()}
  pipeline.write_json(os.path.join(a.out, "ablation.json"), {"seeds": a.seeds, "base": BASE, "extra": a.extra,
                                                            "variants": VARIANTS, "summary": summary})
  head = ("| variant | utility MAE | bias | fresh images | Omega_V out-of-bag MAE | its bias | Spearman | compl. Tr | compl. V | "
          "corr. mean | corr. max | SSIM | img/s |")
  lines = [head, "|" + "---|" * (len(KEYS) + 1)]
  for name, s in summary.items():
    escaped = name.replace("|", "\\|")  # A pipe would split the markdown cell.
    lines.append(f"| {escaped} | " + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in KEYS[:-1])
                 + f" | {s['images_per_second'][0]:.1f} |")
  cmd = "python experiments/ipprotect_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
  text = f"# IPProtect sanitizer ablation\n\n`{cmd}`, seeds {a.seeds}, common flags `{' '.join(BASE)}`\n\n"
  pipeline.write_text(os.path.join(a.out, "ablation.md"), text + "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
