"""Tables, figures and report.md of the attack study (``attack_study``); matplotlib, Agg backend."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jipguard import rundir  # noqa: E402

LINK_COLUMNS = [
  "method",
  "attack",
  "top1",
  "chance_top1",
  "top5",
  "chance_top5",
  "within_class_top1",
  "within_class_chance_top1",
]
RECON_COLUMNS = [
  "method",
  "attack",
  "mse",
  "ssim",
  "correlation",
  "agreement",
  "link_top1",
  "link_chance_top1",
  "link_within_class_top1",
  "link_within_class_chance_top1",
]
GRID_COLUMNS = [
  "omega_tr",
  "buyer_size",
  "seed",
  "utility_mae",
  "utility_mae_train",
  "utility_mae_val",
  "risk_train",
  "risk_val",
  "compliance_train",
  "compliance_val",
  "compliance_lower_bound",
  "pixel_top1",
  "pixel_chance_top1",
  "pixel_within_class_top1",
  "lowpass_top1",
  "instahide_utility_mae",
  "dp_merf_utility_mae",
]
DEFENCES = ("ipprotect", "out_of_bag", "input_noise", "anchor", "cross_fit")


def best_link(piece: dict[str, Any]) -> dict[str, Any]:
  """The strongest linkage (highest top-1) over every linkage and reconstruction attack of a method
  (the class-mean image is the trivial reference, not an attack)."""
  rows = [(r["top1"], r["attack"], r["within_class_top1"]) for r in piece["link"]]
  rows += [
    (r["link_top1"], r["attack"], r["link_within_class_top1"]) for r in piece["recon"] if r["attack"] != "class_mean"
  ]
  top1, attack, within = max(rows)
  return {"top1": top1, "attack": attack, "within_class_top1": within}


def _by(rows, key, value):
  return next(r for r in rows if r[key] == value)


def tradeoff_rows(main: list[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for piece in main:
    if piece["method"] not in DEFENCES:
      continue
    best = best_link(piece)
    rows.append(
      {
        "method": piece["method"],
        "utility_mae": piece["utility_mae"],
        "pixel_top1": _by(piece["link"], "attack", "pixel")["top1"],
        "lowpass_top1": _by(piece["link"], "attack", "lowpass")["top1"],
        "best_link_top1": best["top1"],
        "best_link_attack": best["attack"],
        "best_within_class_top1": best["within_class_top1"],
        "pix2pix_ssim": _by(piece["recon"], "attack", "pix2pix")["ssim"],
        "class_mean_ssim": _by(piece["recon"], "attack", "class_mean")["ssim"],
      }
    )
  return rows


def choose_default(rows: list[dict[str, Any]], slack: float = 0.02) -> dict[str, Any] | None:
  """The variant with the weakest best linkage among those whose utility MAE is within ``slack``
  of plain IPProtect's (never buy security with more utility than that)."""
  if not rows:
    return None
  base = next((r for r in rows if r["method"] == "ipprotect"), rows[0])
  ok = [r for r in rows if r["utility_mae"] <= base["utility_mae"] + slack]
  return min(ok, key=lambda r: (r["best_link_top1"], r["utility_mae"]))


def _show(ax, img):
  img = np.asarray(img, np.float32)
  lo, hi = img.min(), img.max()
  shown = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
  ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def fig5(workdir: str, methods: list[str]) -> None:
  """Fig. 5: per method, rows original / sanitized / pix2pix / ridge reconstruction."""
  rows = []
  for m in methods:
    path = os.path.join(workdir, "pieces", f"examples-{m}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        rows += [(f"{m}\n{k}", z[k]) for k in ("original", "sanitized", "pix2pix", "ridge")]
  if not rows:
    return
  n = min(8, len(rows[0][1]))
  fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.15 * len(rows)), squeeze=False)
  for i, (name, imgs) in enumerate(rows):
    for j in range(n):
      _show(axes[i, j], imgs[j])
    axes[i, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
  fig.suptitle("Fig. 5: original / sanitized / pix2pix / ridge (each image min-max scaled)", fontsize=8)
  rundir.save_figure(fig, os.path.join(workdir, "fig5_reconstructions.png"))


def _mean_over_seeds(grid, x_key, fixed_key, fixed_value, y_key):
  xs = sorted({r[x_key] for r in grid if r[fixed_key] == fixed_value})
  ys = [[r[y_key] for r in grid if r[fixed_key] == fixed_value and r[x_key] == x] for x in xs]
  return np.array(xs), np.array([np.mean(y) for y in ys]), np.array([np.std(y) for y in ys])


def fig1(workdir: str, grid: list[dict[str, Any]]) -> None:
  """Fig. 1 (risk, compliance with the Hoeffding bound, MAE on Omega_Tr / Omega_V) and linkage, vs |Omega_Tr|."""
  b = max(r["buyer_size"] for r in grid)
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
  for ax, (key, title) in zip(
    axes, (("risk", "estimated risk"), ("compliance", "compliance"), ("utility_mae", "utility MAE"))
  ):
    for split in ("train", "val"):
      x, y, e = _mean_over_seeds(grid, "omega_tr", "buyer_size", b, f"{key}_{split}")
      ax.errorbar(x, y, yerr=e, marker="o", label=f"Omega_{'Tr' if split == 'train' else 'V'}")
    if key == "compliance":
      x, y, _ = _mean_over_seeds(grid, "omega_tr", "buyer_size", b, "compliance_lower_bound")
      ax.plot(x, y, ls="--", color="gray", label="Hoeffding 95% bound (V)")
    ax.set_xscale("log")
    ax.set_xlabel("|Omega_Tr|")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  for bs in sorted({r["buyer_size"] for r in grid}):
    x, y, e = _mean_over_seeds(grid, "omega_tr", "buyer_size", bs, "pixel_top1")
    axes[3].errorbar(x, y, yerr=e, marker="o", label=f"buyer {bs} (chance {1 / (2 * bs):.4f})")
  axes[3].set_xscale("log")
  axes[3].set_xlabel("|Omega_Tr|")
  axes[3].set_title("pixel-correlation linkage top-1", fontsize=9)
  axes[3].legend(fontsize=7)
  fig.suptitle(f"Fig. 1 (buyer set {b}, no validation stop unless configured)", fontsize=9)
  rundir.save_figure(fig, os.path.join(workdir, "fig1_generalisation.png"))


def fig3(workdir: str, grid: list[dict[str, Any]]) -> None:
  """Fig. 3: sellers' utility MAE vs buyer-set size, IPProtect (largest |Omega_Tr|) and baselines."""
  m = max(r["omega_tr"] for r in grid)
  fig, ax = plt.subplots(figsize=(4.8, 3.6))
  for key, name in (
    ("utility_mae", f"IPProtect |Omega_Tr|={m}"),
    ("instahide_utility_mae", "InstaHide"),
    ("dp_merf_utility_mae", "DP-MERF"),
  ):
    x, y, e = _mean_over_seeds(grid, "buyer_size", "omega_tr", m, key)
    ax.errorbar(x, y, yerr=e, marker="o", label=name)
  ax.set_xlabel("buyer-set size |D_B|")
  ax.set_ylabel("utility MAE (sellers)")
  ax.set_title("Fig. 3: utility MAE vs buyer-set size", fontsize=9)
  ax.legend(fontsize=7)
  rundir.save_figure(fig, os.path.join(workdir, "fig3_buyer_size.png"))


def tradeoff_plot(workdir: str, rows: list[dict[str, Any]]) -> None:
  if not rows:
    return
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, label in (
    (axes[0], "best_link_top1", "strongest linkage top-1"),
    (axes[1], "pix2pix_ssim", "pix2pix SSIM"),
  ):
    for r in rows:
      ax.scatter(r["utility_mae"], r[key], zorder=3)
      ax.annotate(r["method"], (r["utility_mae"], r[key]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    ax.set_xlabel("utility MAE (sellers)")
    ax.set_ylabel(label)
  axes[1].axhline(rows[0]["class_mean_ssim"], color="gray", ls="--", lw=0.8, label="class-mean image")
  axes[1].legend(fontsize=7)
  fig.suptitle("Defences: utility vs linkage and reconstruction", fontsize=9)
  rundir.save_figure(fig, os.path.join(workdir, "tradeoff.png"))


def write(workdir: str, cfg, st, main: list[dict[str, Any]], grid: list[dict[str, Any]]) -> dict[str, Any]:
  """Writes tables (md + csv), figures and report.md; returns metrics.json's dict."""
  link_rows = [r for p in main for r in p["link"]]
  recon_rows = [r for p in main for r in p["recon"]]
  mae = [{"method": p["method"], "utility_mae": p["utility_mae"], "seconds": p["seconds"]} for p in main]
  trade = tradeoff_rows(main)
  chosen = choose_default(trade)
  rundir.write_table(
    os.path.join(workdir, "linkage"), link_rows, LINK_COLUMNS, title="Linkage: attack x method", fmt=".3f"
  )
  rundir.write_table(
    os.path.join(workdir, "reconstruction"),
    recon_rows,
    RECON_COLUMNS,
    title="Reconstruction: attack x method",
    fmt=".3f",
  )
  rundir.write_table(
    os.path.join(workdir, "utility"), mae, ["method", "utility_mae", "seconds"], title="Utility MAE", fmt=".3f"
  )
  rundir.write_table(os.path.join(workdir, "grid"), grid, GRID_COLUMNS, title="|Omega_Tr| x buyer size", fmt=".3f")
  trade_cols = [
    "method",
    "utility_mae",
    "pixel_top1",
    "lowpass_top1",
    "best_link_top1",
    "best_link_attack",
    "pix2pix_ssim",
  ]
  rundir.write_table(os.path.join(workdir, "tradeoff"), trade, trade_cols, title="Defence trade-off", fmt=".3f")
  fig5(workdir, [p["method"] for p in main])
  if grid:
    fig1(workdir, grid)
    fig3(workdir, grid)
  tradeoff_plot(workdir, trade)
  base = next((p for p in main if p["method"] == "ipprotect"), None)
  out = {
    "main": {p["method"]: {"utility_mae": p["utility_mae"], "best_link": best_link(p)} for p in main},
    "linkage": link_rows,
    "reconstruction": recon_rows,
    "grid": grid,
    "tradeoff": trade,
    "chosen_default": chosen,
    "num_buyer": len(st.buyer),
    "num_candidates": len(st.candidates),
    "num_aux": len(st.aux(len(st.buyer))),
  }
  lines = [
    "# IPProtect under attack",
    "",
    f"Victim preset `{cfg.victim}` on `{cfg.dataset}`: |D_B| = {len(st.buyer)} buyer images hidden among "
    f"{len(st.candidates) - len(st.buyer)} distractors (other test images); the adversary holds the shared set, "
    f"the labels, the public settings and D_A = {out['num_aux']} train-split images (disjoint from D_B), and "
    "re-runs the algorithm on D_A with its own models and anchor secrets. It never sees the buyer's models or anchors.",
    "",
  ]
  if base is not None:
    b = best_link(base)
    lines += [
      f"**Default IPProtect's linkage**: the strongest attack ({b['attack']}) links {b['top1']:.1%} of the shared "
      f"images to their originals at rank 1 (chance {1 / len(st.candidates):.2%}), {b['within_class_top1']:.1%} "
      f"within their class; utility MAE {base['utility_mae']:.3f}.",
      "",
    ]
  if chosen is not None:
    lines += [
      "**Defence chosen** (weakest strongest-linkage within 0.02 utility MAE of plain IPProtect): "
      f"`{chosen['method']}`: linkage top-1 {chosen['best_link_top1']:.1%} ({chosen['best_link_attack']}), "
      f"utility MAE {chosen['utility_mae']:.3f}, "
      f"pix2pix SSIM {chosen['pix2pix_ssim']:.3f} (class-mean image: {chosen['class_mean_ssim']:.3f}).",
      "",
    ]
  for stem, title in (
    ("utility", "Utility MAE of each method (sellers)"),
    ("linkage", "Linkage (top-k against chance)"),
    ("reconstruction", "Reconstruction (against the originals; class_mean is the trivial reconstruction)"),
    ("tradeoff", "Defence trade-off"),
    ("grid", "Grid: |Omega_Tr| x buyer size"),
  ):
    with open(os.path.join(workdir, f"{stem}.md")) as f:
      body = f.read().split("\n", 2)[-1]
    lines += [f"## {title}", "", body, ""]
  lines += [
    "How to read: linkage ranks the buyer's originals among all candidates by a score against each shared image;"
    " `within_class` ranks only candidates of the shared label (labels are public). A reconstruction counts as a leak"
    " only where it beats `class_mean` (D_A's mean image of the label): its `link_*` columns rank the original among"
    " the candidates by correlation with the reconstruction. `agreement`: an independent classifier (trained on other"
    " train images) gives the reconstruction and the original the same class. SSIM, MSE and correlation are"
    " pixel-space stand-ins; no VGG perceptual loss is used.",
    "",
    "Figures: `fig1_generalisation.png`, `fig3_buyer_size.png`, `fig5_reconstructions.png`, `tradeoff.png`.",
  ]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")
  return out
