"""Human-readable outputs of an IPProtect run: report.md and PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jipguard import rundir  # noqa: E402


def image_grid(originals: np.ndarray, sanitized: np.ndarray, path: str, n: int = 10, title: str = "") -> None:
  """Fig. 4 style: originals (top row) over sanitized images (bottom row).

  Sanitized images are unbounded; each is min-max scaled for display only.
  """
  n = min(n, len(originals))
  fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.7), squeeze=False)
  for i in range(n):
    for row, img in ((0, originals[i]), (1, sanitized[i])):
      img = np.asarray(img, np.float32)
      lo, hi = img.min(), img.max()
      shown = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
      ax = axes[row, i]
      ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray" if shown.shape[-1] == 1 else None)
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel("original")
  axes[1, 0].set_ylabel("sanitized")
  if title:
    fig.suptitle(title, fontsize=9)
  rundir.save_figure(fig, path)


def seller_plot(m: dict[str, Any], path: str) -> None:
  """Each seller's utility on the original vs the sanitized buyer data."""
  u_o, u_s = np.asarray(m["seller_utility_original"]), np.asarray(m["seller_utility_sanitized"])
  fig, ax = plt.subplots(figsize=(4.2, 4))
  ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
  ax.scatter(u_o, u_s, zorder=3)
  for i, (a, b) in enumerate(zip(u_o, u_s)):
    ax.annotate(str(i + 1), (a, b), textcoords="offset points", xytext=(4, 2), fontsize=8)
  ax.set_xlabel("utility on original D_B")
  ax.set_ylabel("utility on sanitized D~_B")
  ax.set_title(f"sellers: MAE {m['utility_mae']:.3f}, Spearman {m['rank_correlation']:.2f}", fontsize=9)
  rundir.save_figure(fig, path)


def _schedule(s) -> str:
  if not s.val_stop:
    return "off (no Omega_V in the optimisation)"
  return f"on (every {s.val_every} steps from step {s.min_steps})"


def _loss_detail(s) -> str:
  if s.loss == "margin":
    return f" (kappa = {s.margin})"
  if s.loss in ("probs", "kl") and s.temperature != 1.0:
    return f" (temperature {s.temperature})"
  return ""


def _linkage(link: dict[str, float]) -> str:
  top, chance = f"{link['top1']:.3f} / {link['top5']:.3f}", f"{link['chance_top1']:.4f} / {link['chance_top5']:.4f}"
  return f"{top} (chance {chance})"


def write_ipprotect_report(workdir: str, cfg, m: dict[str, Any], buyer, result) -> None:
  """report.md, examples.png and sellers.png of an IPProtect run."""
  image_grid(
    buyer.images,
    result.images,
    os.path.join(workdir, "examples.png"),
    title=f"IPProtect |Omega_Tr|={cfg.omega_tr}: originals (top), sanitized (bottom)",
  )
  seller_plot(m, os.path.join(workdir, "sellers.png"))
  s = cfg.sanitizer
  rows = "\n".join(
    f"| {i + 1} | {n:g} | {100 * r:.1f}% | {pa:.1f} | {100 * uo:.1f} | {100 * us:.1f} | "
    f"{100 * abs(us - uo):.1f} | {100 * c:.1f} |"
    for i, (n, r, pa, uo, us, c) in enumerate(
      zip(
        m["table_i"]["noise"],
        m["table_i"]["resample_rate"],
        m["table_i"]["paper_accuracy"],
        m["seller_utility_original"],
        m["seller_utility_sanitized"],
        m["seller_compliance"],
      )
    )
  )
  t = m["timings"]
  ips = "unknown" if m["images_per_second"] is None else f"{m['images_per_second']:.1f}"
  text = f"""# IPProtect run

Dataset `{cfg.dataset}`: buyer {m["num_images"]} images ({m["data_source"]["buyer"]}),
sellers trained on {m["data_source"]["sellers"]}. Model `{cfg.model or "default"}`,
|Omega_Tr| = {cfg.omega_tr}, |Omega_V| = {cfg.omega_v}, lambda = {s.lam}, tau = {s.tau}, zeta = {s.zeta},
T = {s.steps}, B = {s.model_batch or "round(0.95 |Omega_Tr|)"}, B_D = {s.data_batch}, loss = {s.loss}{_loss_detail(s)},
lr = {s.learning_rate}, input noise = {s.input_noise}, hidden dropout = {s.hidden_dropout},
stopping rule {_schedule(s)}, seed {cfg.seed}.

## Utility preservation (lower MAE is better)

| metric | value |
|---|---|
| utility MAE over seller models (headline) | **{m["utility_mae"]:.4f}** |
| MAE of the per-seller mean utilities | {m["utility_mae_per_seller_mean"]:.4f} |
| Spearman rank correlation of the sellers | {m["rank_correlation"]:.3f} |
| compliance on Omega_Tr / Omega_V | {m["compliance_train"]:.3f} / {m["compliance_val"]:.3f} |
| Hoeffding 95% lower bound on an unseen model's compliance | {m["compliance_lower_bound"]:.3f} |
| estimated risk on Omega_Tr / Omega_V | {m["risk_train"]:.3f} / {m["risk_val"]:.3f} |
| utility MAE on Omega_Tr / Omega_V | {m["utility_mae_train"]:.4f} / {m["utility_mae_val"]:.4f} |

| seller | noise exp. | labels redrawn | paper acc. | acc. original | acc. sanitized | abs. diff | compliance |
|---|---|---|---|---|---|---|---|
{rows}

## Security (the sanitized images should not look like the originals)

| metric | value |
|---|---|
| Pearson correlation with the original, mean / max | {m["correlation_mean"]:.3f} / {m["correlation_max"]:.3f} |
| SSIM with the original (pixels clipped to [0, 1]) | {m["ssim_mean"]:.3f} |
| RMS pixel distance to the original | {m["rms_to_original_mean"]:.3f} |
| sanitized pixel range | [{m["sanitized_pixel_range"][0]:.2f}, {m["sanitized_pixel_range"][1]:.2f}] |
| linkage: the original is the most correlated buyer image, top 1 / top 5 | {_linkage(m["linkage"])} |

The linkage row is the cheapest attack (docs/ipprotect-attacks.md): far above chance, it says the
sanitized images are tied to their originals.

These are pixel-space stand-ins, not the paper's image IP exposure (the VGG conv5_1 perceptual
loss, which needs ImageNet-pretrained weights this run does not have).

## Cost

sellers {t["sellers_s"]:.1f} s, sample_models {t["sample_models_s"]:.1f} s, sanitize {t["sanitize_s"]:.1f} s
({ips} images/s; steps per image mean {m["steps_mean"]:.0f}, max {m["steps_max"]}).
Times of a resumed run count only the work it redid; images/s is the sanitization's own
throughput, from the batch times recorded in the checkpoints.

## How to read this

* Utility MAE: the sellers' accuracy on the sanitized set minus on the original, in absolute
  value, averaged over all seller models. The paper reports 0.01 on MNIST/FMNIST at
  |Omega_Tr| = 10.
* Compliance: the fraction of images whose predicted class is the same on x~ and x. Omega_Tr
  models were optimised against; Omega_V models were not (they only drive the stopping rule), so
  Omega_V's compliance estimates what unseen models see.
* `sanitized.npz` holds only the sanitized images and labels; `examples.png` shows originals over
  sanitized images (each sanitized image min-max scaled for display); `sellers.png` plots each
  seller's utility on original vs sanitized data.
"""
  rundir.write_text(os.path.join(workdir, "report.md"), text)
