"""Human-readable outputs of the watermark studies: report.md, points tables, PNG figures."""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jipguard import rundir  # noqa: E402


def loss_plot(path: str, curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], tau: float, title: str) -> None:
  """Fig-2-style plot: mean loss vs signature distance ``k - k*``, match region shaded.

  ``curves``: ``(label, signatures, mean losses, k*)`` per line.
  """
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for label, sigs, losses, k_star in curves:
    d = (sigs - k_star + 180) % 360 - 180
    order = np.argsort(d)
    (line,) = ax.plot(d[order], losses[order], label=label, lw=1.2)
    i = int(np.argmin(losses))
    ax.plot(d[i], losses[i], "s", color=line.get_color())
  ax.axvspan(-tau, tau, color="tab:green", alpha=0.15, label="match |k - k*| < tau")
  ax.set_xlabel("k - k* (degrees)")
  ax.set_ylabel("mean loss of the user's images")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.legend(fontsize=6, ncol=2)
  rundir.save_figure(fig, path)


def loss_histogram(path: str, member_losses: np.ndarray, heldout_losses: np.ndarray, threshold: float) -> None:
  """The learner's per-image losses on member and held-out users' images, and an MIA threshold."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.hist(member_losses, 40, alpha=0.6, label="learner loss, member users")
  ax.hist(heldout_losses, 40, alpha=0.6, label="learner loss, held-out users")
  ax.axvline(threshold, color="k", ls="--", label="a shadow-model threshold (MIA-std)")
  ax.set_xlabel("cross-entropy")
  ax.legend(fontsize=6)
  rundir.save_figure(fig, path)


def write_report(workdir: str, title: str, config: dict[str, Any], m: dict[str, Any], figures: Sequence[str]) -> None:
  """report.md (configuration, scalar results, the points table, figures) and, for studies with
  points, ``points.md`` / ``points.csv``."""
  lines = [
    f"# {title}",
    "",
    "## Configuration",
    "",
    "```json",
    rundir.dumps(config).rstrip(),
    "```",
    "",
    "## Results",
    "",
  ]
  for k, v in m.items():
    if k == "points":
      columns = [c for c in v[0] if not isinstance(v[0][c], list)]
      lines.append(rundir.markdown_table(v, columns))
      rundir.write_table(os.path.join(workdir, "points"), v, columns, title=title)
    elif not isinstance(v, list):
      lines.append(f"- **{k}**: {v:.4g}" if isinstance(v, float) else f"- **{k}**: {v}")
  lines += [""] + [f"![{f}]({f})" for f in figures]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")
