"""The studies of section VI-B: code-level decoding, community codes, and models under attack.

* :func:`run_codes`: decoding at code level, no training: every customer of two combined
  codebooks, many random averaging coalitions per size, for (121,11,1) against (49,7,1).
* :func:`run_crc`: community codes on planted graphs (or a SNAP edge list), Fig. 5.
* :func:`run_collusion`: a base model, one fingerprinted copy per customer as one ensemble
  (Eq. 27), then averaging collusion, fine-tuning and pruning with sparse fine-tuning, and
  detection / false alarm against the number of colluders (Figs. 6-9), accuracy with and
  without the fingerprint, and the costs of Table III. Copies trained independently from
  scratch (as the paper retrains) are averaged too, for comparison.

Each writes its run directory (``rundir``): config.json, metrics.jsonl, tables (md + csv),
figures (PNG), report.md, metrics.json last. The collusion study resumes: its trainings
checkpoint (``ensemble.Checkpointing``) and each finished attack is kept in ``attacks/``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from jipguard import rundir
from jipguard.fingerprint import bibd, codes, crc, embedding, tracing

PyTree = Any


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def _rates(decisions: list[tuple[tracing.Decision, np.ndarray]], num_issued: int) -> dict[str, float]:
  """Detection (share of colluders accused), false alarm (share of innocents accused), the share
  of coalitions with any innocent accused, and the statuses' shares."""
  det, fa, any_fa = [], [], []
  status = {s: 0 for s in tracing.STATUSES}
  for d, t in decisions:
    acc, tset = set(d.accused), set(np.asarray(t).tolist())
    det.append(len(acc & tset) / len(tset))
    fa.append(len(acc - tset) / max(num_issued - len(tset), 1))
    any_fa.append(bool(acc - tset))
    status[d.status] += 1
  n = len(decisions)
  return {
    "detection": float(np.mean(det)),
    "false_alarm": float(np.mean(fa)),
    "any_innocent_accused": float(np.mean(any_fa)),
    **{f"status_{k}": v / n for k, v in status.items()},
  }


def _plot(path: str, series: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib only when a figure is drawn)

  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, (x, y) in series.items():
    ax.plot(x, y, marker="o", ms=3, label=name)
  ax.set_xlabel("colluders")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.set_ylim(-0.03, 1.03)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  rundir.save_figure(fig, path)
  plt.close(fig)


# ------------------------------------------------------------------------------ codes


@dataclasses.dataclass(frozen=True)
class CodesConfig:
  """Code-level decoding study (no training)."""

  designs: str = "121,11,1;49,7,1"  # The (v,k,1) designs compared, ';'-separated.
  books: int = 2  # Codebooks side by side (2: the paper's 17,424 customers for (121,11,1)).
  max_colluders: int = 15  # Coalition sizes 1..max_colluders.
  coalitions: int = 200  # Random coalitions per size.
  noise: float = 0.0  # Std of Gaussian noise added to the averaged coefficients (extraction error).
  sold: int = 1000  # Also decode when only this many customers were sold (0: only all issued).
  tau: float = embedding.PAPER_TAU  # Eq. 30's threshold.
  seed: int = 0  # Coalitions and noise.

  def __post_init__(self):
    for name in self.designs.split(";"):
      try:
        bibd.design(name)
      except ValueError as err:
        raise ValueError(f"--designs: {err}") from None
    if self.books < 1 or self.max_colluders < 1 or self.coalitions < 1 or self.noise < 0 or self.sold < 0:
      raise ValueError(f"books, max_colluders, coalitions must be >= 1, noise and sold >= 0, got {self}")


def run_codes(cfg: CodesConfig, workdir: str) -> dict[str, Any]:
  """Detection and false alarm against the number of colluders at code level, per design."""
  rundir.write_config(workdir, dataclasses.asdict(cfg))
  rng = np.random.default_rng(cfg.seed)
  rows, det, book_exact = [], {}, {}
  for name in cfg.designs.split(";"):
    design = bibd.design(name)
    book = codes.CombinedCodebook(books=(codes.Codebook.of(design),) * cfg.books)
    sold = [book.num_customers] + ([cfg.sold] if 0 < cfg.sold < book.num_customers else [])
    for n_issued in sold:
      issued = np.sort(rng.choice(book.num_customers, n_issued, replace=False))
      label = f"({design.v},{design.k},1) x{cfg.books}, {n_issued} sold"
      for size in range(1, min(cfg.max_colluders, n_issued) + 1):
        decisions = []
        for _ in range(cfg.coalitions):
          t = rng.choice(issued, size, replace=False)
          e = tracing.averaged_coefficients(book, t) + cfg.noise * rng.standard_normal(book.length)
          decisions.append((tracing.decode_coefficients(e, book, cfg.tau, issued=issued), t))
        row = {"design": label, "customers": book.num_customers, "issued": n_issued, "colluders": size}
        row |= _rates(decisions, n_issued)
        row["books_exact"] = float(np.mean([all(b.status == "exact" for b in d.books) for d, _ in decisions]))
        row["suspects_mean"] = float(np.mean([len(d.suspects) for d, _ in decisions]))
        rows.append(row)
        rundir.append_jsonl(os.path.join(workdir, "metrics.jsonl"), row)
        det.setdefault(label, ([], []))[0].append(size)
        det[label][1].append(row["detection"])
        book_exact.setdefault(label, ([], []))[0].append(size)
        book_exact[label][1].append(row["books_exact"])
  cols = ["design", "colluders", "detection", "false_alarm", "any_innocent_accused", "books_exact", "suspects_mean"]
  cols += [f"status_{s}" for s in tracing.STATUSES]
  rundir.write_table(os.path.join(workdir, "codes"), rows, cols, title="Code-level decoding of averaged codes")
  _plot(os.path.join(workdir, "detection.png"), det, "share of colluders named", "code level: detection")
  _plot(os.path.join(workdir, "books_exact.png"), book_exact, "every book decoded exactly", "code level")
  worst_fa = max(r["any_innocent_accused"] for r in rows)
  report = [
    "# Code-level decoding",
    "",
    f"{cfg.coalitions} random coalitions per size, averaged identity coefficients + N(0, {cfg.noise}^2), "
    f"tau = {cfg.tau}; all customers issued, or only `sold` of them. Detection: share of the colluders named "
    "with certainty; books_exact: every codebook named its part of the colluders' ids exactly; suspects_mean: "
    "customers consistent with the books. Table: `codes.md`; figures: `detection.png`, `books_exact.png`.",
    "",
    f"Largest share of coalitions with an innocent accused: {worst_fa:.3g}.",
    "",
    rundir.markdown_table(rows, cols[:7]),
  ]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(report))
  metrics = {"rows": rows, "max_any_innocent_accused": worst_fa}
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics


# -------------------------------------------------------------------------------- crc


@dataclasses.dataclass(frozen=True)
class CrcStudyConfig:
  """Community codes on planted graphs (Fig. 5)."""

  communities: int = 8  # Planted communities of the stochastic block model.
  community_size: int = 40  # Customers per community.
  p_in: float = 0.3  # Edge probability inside a community.
  p_out: float = 0.01  # Edge probability between communities.
  bits: str = "15,30,45,60"  # Code lengths compared.
  max_dist: int = 3  # Hamming thresholds 0..max_dist.
  iterations: int = 150  # Projected-gradient rounds.
  neighbours: int = 10  # LLE neighbourhood size.
  edges: str = ""  # A SNAP edge list to code instead (no planted truth: codes and Hamming stats only).
  max_nodes: int = 1000  # Nodes of the edge list kept (the first by id).
  seed: int = 0  # Graph and factor initialisation.

  def __post_init__(self):
    if self.communities < 2 or self.community_size < 2 or not 0 <= self.p_out <= self.p_in <= 1:
      raise ValueError(f"need >= 2 communities of >= 2 customers and 0 <= p_out <= p_in <= 1, got {self}")
    if not _ints(self.bits) or min(_ints(self.bits)) < 1 or self.max_dist < 0:
      raise ValueError(f"bits must be positive integers and max_dist >= 0, got {self.bits!r}, {self.max_dist}")


def run_crc(cfg: CrcStudyConfig, workdir: str) -> dict[str, Any]:
  """Fig. 5: accuracy of "Hamming <= dist" against "same community", per code length."""
  rundir.write_config(workdir, dataclasses.asdict(cfg))
  if cfg.edges:
    adjacency, comm = crc.load_edge_list(cfg.edges, cfg.max_nodes), None
  else:
    sizes = [cfg.community_size] * cfg.communities
    adjacency, comm = crc.planted_graph(sizes, cfg.p_in, cfg.p_out, cfg.seed)
  rows = []
  for bits in _ints(cfg.bits):
    t0 = time.perf_counter()
    c = crc.community_codes(
      adjacency, crc.CrcConfig(bits=bits, neighbours=cfg.neighbours, iterations=cfg.iterations, seed=cfg.seed)
    )
    seconds = time.perf_counter() - t0
    h = crc.hamming(c)
    for dist in range(cfg.max_dist + 1):
      row = {"bits": bits, "dist": dist, "seconds": seconds, "mean_hamming": float(h.mean())}
      if comm is not None:
        row |= crc.neighbourhood_accuracy(c, comm, dist)
      rows.append(row)
      rundir.append_jsonl(os.path.join(workdir, "metrics.jsonl"), row)
  cols = ["bits", "dist", "accuracy", "same_recall", "different_specificity", "mean_hamming", "seconds"]
  rundir.write_table(os.path.join(workdir, "crc"), rows, cols, title="Community codes: Hamming-neighbourhood accuracy")
  if comm is not None:
    series = {}
    for r in rows:
      series.setdefault(f"{r['bits']} bits", ([], []))
      series[f"{r['bits']} bits"][0].append(r["dist"])
      series[f"{r['bits']} bits"][1].append(r["accuracy"])
    _plot_dist(os.path.join(workdir, "crc.png"), series)
  graph = cfg.edges or f"SBM {cfg.communities} x {cfg.community_size}, p_in {cfg.p_in}, p_out {cfg.p_out}"
  report = ["# Community relationship codes", "", f"Graph: {graph}.", "", rundir.markdown_table(rows, cols)]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(report))
  metrics = {"rows": rows}
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics


def _plot_dist(path: str, series: dict[str, tuple[list[int], list[float]]]) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib only when a figure is drawn)

  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, (x, y) in series.items():
    ax.plot(x, y, marker="o", ms=3, label=name)
  ax.set_xlabel("Hamming threshold dist")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  rundir.save_figure(fig, path)
  plt.close(fig)
