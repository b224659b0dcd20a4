"""IP exposure vs utility trade-off study (paper 000, section VI-C: Fig. 2 and Table III).

Run by ``experiments/tradeoff.py`` (``cli.tradeoff_main``). For each dataset and seed: IPProtect
at every |Omega_Tr| (``job.run``, sellers and sample_models cached under ``<out>/cache``), and
every baseline (identity, random, InstaHide k, DP-MERF sigma; ``baselines``) at every
parameter. Each point is scored with the same seller models (utility MAE) and ``exposure`` (image IP
exposure or its named stand-ins, training and inference statistical IP exposure over the
model set G, with D_X drawn from the train split) and written to its own file
``<out>/points/<dataset>/<method>-<param>-s<seed>.json``; a finished point is never
recomputed, so a killed sweep resumes. Then ``table3.md`` / ``table3.json`` (mean +- sample std
over parameters and seeds per method; 0-1 normalised harmonic means) and ``fig2.png`` (plus
``fig2_<image|training|inference>.png``) are written to ``<out>``.

Run times and results on a 2-core machine are in docs/exposure.md.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from jipguard import data as data_lib
from jipguard import ensemble, rundir
from jipguard.ipprotect import exposure, job, metrics

METHODS = ("ipprotect", "identity", "random", "instahide", "dp_merf")
HMEAN_METHODS = ("ipprotect", "dp_merf", "instahide")  # Table III's rows; Identity / Random are the two ends.
LABELS = {
  "ipprotect": "IPProtect",
  "identity": "Identity",
  "random": "Random",
  "instahide": "InstaHide",
  "dp_merf": "DP-MERF",
}
PARAM_TAGS = {"ipprotect": "Ω", "instahide": "k", "dp_merf": "σ"}  # Point labels in the figures.
KINDS = ("image", "training", "inference")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study's points depend on (written to ``study.json``)."""

  datasets: tuple[str, ...] = (data_lib.DEFAULT_DATASET,)  # Names or paths.
  data_dir: str | None = None  # Local copy of a named dataset.
  ipprotect_preset: str = "default"  # job.preset of the IPProtect points and sellers.
  buyer_size: int | None = None  # Override of the preset's buyer set size.
  seller_pool_size: int | None = None  # Override of the preset's seller pool size.
  omega_tr: tuple[int, ...] = (10, 50)  # IPProtect's |Omega_Tr| values.
  params: dict[str, tuple] = dataclasses.field(
    default_factory=lambda: {
      "identity": (None,),
      "random": (None,),
      "instahide": (4, 6, 10, 15),
      "dp_merf": (5, 10, 15, 30, 40),
    }
  )
  methods: tuple[str, ...] = METHODS  # Methods to run.
  seeds: tuple[int, ...] = (0, 1)  # Seeds (data draws, sellers, sanitizers, zoo).
  dx_size: int = 1000  # |D_X|, drawn from the train split.
  zoo: exposure.ZooConfig = exposure.ZooConfig()  # The model set G.
  dp_merf_steps: int | None = None  # Generator steps of DP-MERF; None = its default.
  vgg_weights: str | None = None  # VGG weights file (Def. 2); None = stand-ins only.
  vgg_size: int = 224  # VGG input size.


def preset(name: str) -> StudyConfig:
  """``smoke`` (CI, ~2-3 min on 2 cores), ``default`` (the embedded subset), ``paper``."""
  if name == "smoke":
    return StudyConfig(
      ipprotect_preset="smoke",
      omega_tr=(2, 6),
      seeds=(0,),
      dx_size=200,
      params={"identity": (None,), "random": (None,), "instahide": (4, 15), "dp_merf": (5, 40)},
      zoo=exposure.SMOKE_ZOO,
      dp_merf_steps=30,
    )
  if name == "default":
    return StudyConfig()
  if name == "paper":
    return StudyConfig(
      ipprotect_preset="paper",
      omega_tr=(1, 5, 10, 50, 100),
      seeds=(0, 1, 2),
      dx_size=10000,
      zoo=exposure.ZooConfig(
        n_estimators=100, max_iter=500, mlp_hidden=256, cnn_epochs=10, gradient_boosting_max_features=None
      ),
    )
  raise ValueError(f"unknown preset {name!r}; choose smoke, default or paper")


# What is swept does not change any one point: a study may be extended by more of them.
_SWEPT = ("methods", "seeds", "omega_tr", "params")  # Keys of config.json a study may change.


def _json(cfg: StudyConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _point_path(out: str, dataset: str, method: str, param, seed: int) -> str:
  name = os.path.basename(os.path.normpath(dataset))
  return os.path.join(out, "points", name, f"{method}-{param}-s{seed}.json")


def _fmt(v: float) -> float | str:
  """JSON-safe float: infinities become the strings "inf" / "-inf"."""
  return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _unfmt(v) -> float:
  return float(v)  # float("inf") reads _fmt's strings back.


class _Context:
  """What every point of one (dataset, seed) shares, built on first use."""

  def __init__(self, cfg: StudyConfig, out: str, dataset: str, seed: int, progress: bool):
    self.cfg, self.out, self.dataset, self.seed, self.progress = cfg, out, dataset, seed, progress
    name = os.path.basename(os.path.normpath(dataset))
    base = job.preset(cfg.ipprotect_preset, dataset)
    over = {k: getattr(cfg, k) for k in ("buyer_size", "seller_pool_size") if getattr(cfg, k) is not None}
    self.ipcfg = dataclasses.replace(
      base,
      data_dir=cfg.data_dir,
      seed=seed,
      cache_dir=os.path.abspath(os.path.join(out, "cache", f"{name}-s{seed}")),
      **over,
    )
    self._cache: dict[str, Any] = {}

  def get(self, what: str):
    if what not in self._cache:
      self._cache[what] = getattr(self, f"_make_{what}")()
    return self._cache[what]

  def _make_data(self):
    return job.load_data(self.ipcfg)

  def _make_model(self):
    buyer, _ = self.get("data")
    return job.run_model(self.ipcfg, buyer)

  def _make_dx(self) -> data_lib.Dataset:
    """D_X: ``dx_size`` images of the train split (the seller pool's split), fixed per seed."""
    _, pool = self.get("data")
    n = min(self.cfg.dx_size, len(pool))
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(self.seed), 20), len(pool)))
    return pool.subset(np.sort(perm[:n]))

  def _make_dx_zoo(self) -> exposure.FittedZoo:
    dx = self.get("dx")
    return exposure.fit_zoo(dx.images, dx.labels, dx.num_classes, dataclasses.replace(self.cfg.zoo, seed=self.seed))

  def sellers(self):
    """``job.run``'s sellers (same keys, labels and cache directory), restored when there."""
    if "sellers" not in self._cache:
      _, pool = self.get("data")
      self._cache["sellers"] = job.seller_models(
        self.ipcfg, self.get("model"), pool, self.ipcfg.cache_dir, progress=self.progress
      )
    return self._cache["sellers"]

  def utility_mae(self, images, labels) -> float:
    buyer, _ = self.get("data")
    model, variables = self.get("model"), self.sellers().variables
    if "u_original" not in self._cache:
      self._cache["u_original"] = metrics.utility(ensemble.predict(model, variables, buyer.images), buyer.labels)
    u_s = metrics.utility(ensemble.predict(model, variables, images), labels)
    return metrics.utility_mae(self._cache["u_original"], u_s)


def _sanitized(ctx: _Context, method: str, param) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """The method's sanitized buyer set and what its producer reported."""
  buyer, _ = ctx.get("data")
  if method == "ipprotect":
    name = os.path.basename(os.path.normpath(ctx.dataset))
    workdir = os.path.join(ctx.out, "ipprotect", f"{name}-tr{param}-s{ctx.seed}")
    m = job.run(dataclasses.replace(ctx.ipcfg, omega_tr=int(param)), workdir, progress=ctx.progress)
    with np.load(os.path.join(workdir, "sanitized.npz")) as z:
      images, labels = z["images"], z["labels"]
    return images, labels, {"utility_mae_pipeline": m["utility_mae"], "run_dir": workdir}
  from jipguard.ipprotect import baselines  # noqa: PLC0415 (imported only when a baseline runs)

  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ctx.seed), 30), METHODS.index(method))
  key = jax.random.fold_in(key, 0 if param is None else int(round(float(param) * 1000)))
  kwargs = {}
  if method == "dp_merf" and ctx.cfg.dp_merf_steps is not None:
    kwargs["dp_merf_config"] = baselines.DPMERFConfig(steps=ctx.cfg.dp_merf_steps)
  images, labels = baselines.sanitize(method, key, buyer.images, buyer.labels, buyer.num_classes, param, **kwargs)
  info = {}
  if method == "instahide":
    info["public_dataset"] = getattr(baselines, "PUBLIC_SOURCE", "baselines default")
  return np.asarray(images, np.float32), np.asarray(labels, np.int32), info


def run_point(ctx: _Context, method: str, param) -> dict[str, Any]:
  """Sanitizes with one method and parameter, scores it, writes its point file (or reads it)."""
  path = _point_path(ctx.out, ctx.dataset, method, param, ctx.seed)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t0 = time.perf_counter()
  images, labels, info = _sanitized(ctx, method, param)
  t_sanitize = time.perf_counter() - t0
  buyer, _ = ctx.get("data")
  dx, cfg = ctx.get("dx"), ctx.cfg
  vgg = exposure.load_vgg_weights(cfg.vgg_weights) if cfg.vgg_weights else None
  t1 = time.perf_counter()
  dx_zoo = ctx.get("dx_zoo")
  image = exposure.image_exposure(
    buyer.images,
    images,
    pair_randomly=(method == "dp_merf"),
    seed=ctx.seed,
    vgg=vgg,
    vgg_size=cfg.vgg_size,
    feature_zoo=dx_zoo,
  )
  zoo_cfg = dataclasses.replace(cfg.zoo, seed=ctx.seed)
  training = exposure.training_exposure(images, labels, dx.images, dx.labels, buyer.num_classes, zoo_cfg)
  inference = exposure.inference_exposure(dx_zoo, images, labels, zoo_cfg.n_jobs)
  point = {
    "dataset": ctx.dataset,
    "method": method,
    "param": param,
    "seed": ctx.seed,
    "num_images": int(len(images)),
    "dx_size": int(len(dx)),
    "utility_mae": ctx.utility_mae(images, labels),
    "image_exposure": {k: _fmt(v) for k, v in image.items()},
    "training_exposure": training.mean,
    "training_per_model": training.per_model,
    "inference_exposure": inference.mean,
    "inference_per_model": inference.per_model,
    "timings": {"sanitize_s": t_sanitize, "score_s": time.perf_counter() - t1},
    **info,
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rundir.write_json(path, point)
  return point


def image_metric(points: list[dict[str, Any]]) -> str:
  """The image exposure Table III reports: VGG when every point has it, else the CNN stand-in."""
  for name in ("vgg_conv5_1", "own_cnn_feature", "pixel_mse"):
    if points and all(name in p["image_exposure"] for p in points):
      return name
  raise ValueError("points share no image exposure metric")


def exposure_of(point: dict[str, Any], kind: str, image_name: str) -> float:
  if kind == "image":
    return _unfmt(point["image_exposure"][image_name])
  return float(point[f"{kind}_exposure"])


def table3(points: list[dict[str, Any]]) -> dict[str, Any]:
  """Table III: per dataset, exposure kind and method, mean +- sample std (ddof = 1) of MAE, exposure and HMean.

  The harmonic mean is computed per point, with each metric divided by its maximum over
  all points of the ``HMEAN_METHODS`` of that dataset (``exposure.normalized_harmonic_mean``),
  then averaged; Identity and Random are reported without it (Identity's MAE is 0, so its
  harmonic mean would be 0: the formula rewards doing nothing).
  """
  out: dict[str, Any] = {}
  image_name = image_metric(points)
  for dataset in sorted({p["dataset"] for p in points}):
    pts = [p for p in points if p["dataset"] == dataset]
    d = out[dataset] = {}
    for kind in KINDS:
      hm_pts = [p for p in pts if p["method"] in HMEAN_METHODS and math.isfinite(exposure_of(p, kind, image_name))]
      mae_max = max((p["utility_mae"] for p in hm_pts), default=0.0)
      exp_max = max((exposure_of(p, kind, image_name) for p in hm_pts), default=0.0)
      rows = d[kind] = {}
      for method in METHODS:
        mp = [p for p in pts if p["method"] == method]
        if not mp:
          continue
        mae = np.array([p["utility_mae"] for p in mp])
        exp = np.array([exposure_of(p, kind, image_name) for p in mp])
        exp_ms = [float(exp.mean()), _spread(exp)] if np.all(np.isfinite(exp)) else ["inf", "nan"]
        row = {
          "mae": [float(mae.mean()), _spread(mae)],
          "exposure": exp_ms,
          "hmean": None,
          "points": len(mp),
          "params": sorted({str(p["param"]) for p in mp}),
          "seeds": sorted({p["seed"] for p in mp}),
        }
        if method in HMEAN_METHODS and mae_max > 0 and exp_max > 0 and np.all(np.isfinite(exp)):
          hm = exposure.normalized_harmonic_mean(mae, exp, mae_max, exp_max)
          row["hmean"] = [float(hm.mean()), _spread(hm)]
        rows[method] = row
      d[f"{kind}_normalisation"] = {"mae_max": mae_max, "exposure_max": exp_max}
  return {"image_metric": image_name, "image_metric_name": exposure.IMAGE_METRIC_NAMES[image_name], "tables": out}


def _spread(values: np.ndarray) -> float | None:
  """Sample standard deviation (ddof = 1), or None for a single point."""
  s = metrics.sample_std(values)
  return s if math.isfinite(s) else None


def _ms(v) -> str:
  if v is None:
    return "—"
  m, s = v
  if isinstance(m, str):
    return m
  # A spread needs two points (sample std, ddof = 1): a single one shows its value alone.
  return f"{m:.2f} ± {s:.2f}" if isinstance(s, float) and math.isfinite(s) else f"{m:.2f}"


TABLE3_COLUMNS = (
  "dataset",
  "exposure",
  "method",
  "mae_mean",
  "mae_std",
  "exposure_mean",
  "exposure_std",
  "hmean_mean",
  "hmean_std",
)


def table3_rows(t: dict[str, Any]) -> list[dict[str, Any]]:
  """Table III as rows (``table3.csv``): one per dataset, exposure kind and method."""
  rows = []
  for d, kinds in t["tables"].items():
    for kind in KINDS:
      for method in METHODS:
        row = kinds[kind].get(method)
        if row is None:
          continue
        out = {"dataset": d, "exposure": kind, "method": LABELS[method]}
        for k in ("mae", "exposure", "hmean"):
          mean, std = row[k] if row[k] is not None else (None, None)
          out[f"{k}_mean"], out[f"{k}_std"] = mean, std
        rows.append(out)
  return rows


def table3_markdown(t: dict[str, Any]) -> str:
  datasets = list(t["tables"])
  head = "| IP | method | " + " | ".join(f"{d}: MAE | {d}: IP exp. | {d}: HMean" for d in datasets) + " |"
  lines = [head, "|" + "---|" * (2 + 3 * len(datasets))]
  for kind in KINDS:
    for method in METHODS:
      cells = []
      for d in datasets:
        row = t["tables"][d][kind].get(method)
        cells += ["", "", ""] if row is None else [_ms(row["mae"]), _ms(row["exposure"]), _ms(row["hmean"])]
      if any(cells):
        lines.append(f"| {kind} | {LABELS[method]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(points: list[dict[str, Any]], kinds: tuple[str, ...], path: str) -> None:
  """Fig. 2: exposure vs utility MAE, one row per exposure kind, one panel per dataset."""
  from jipguard.ipprotect import report  # noqa: PLC0415 (matplotlib only when a figure is drawn)

  plt = report.plt
  image_name = image_metric(points)
  datasets = sorted({p["dataset"] for p in points})
  fig, axes = plt.subplots(len(kinds), len(datasets), figsize=(4.6 * len(datasets), 3.6 * len(kinds)), squeeze=False)
  colors = dict(zip(METHODS, ("tab:red", "tab:gray", "black", "tab:blue", "tab:green")))
  for r, kind in enumerate(kinds):
    for c, dataset in enumerate(datasets):
      ax = axes[r, c]
      pts = [p for p in points if p["dataset"] == dataset]
      finite = [exposure_of(p, kind, image_name) for p in pts if math.isfinite(exposure_of(p, kind, image_name))]
      top = max(finite, default=1.0) * 1.15
      for method in METHODS:
        params = sorted({str(p["param"]) for p in pts if p["method"] == method}, key=lambda s: (len(s), s))
        for i, param in enumerate(params):
          group = [p for p in pts if p["method"] == method and str(p["param"]) == param]
          x = np.array([p["utility_mae"] for p in group])
          y = np.array([exposure_of(p, kind, image_name) for p in group])
          inf = not np.all(np.isfinite(y))
          ym = top if inf else y.mean()
          xerr, yerr = (np.nan_to_num(metrics.sample_std(v)) for v in (x, y))
          ax.errorbar(
            x.mean(),
            ym,
            xerr=xerr,
            yerr=0 if inf else yerr,
            fmt="*" if inf else "o",
            color=colors[method],
            ms=9 if inf else 5,
            capsize=2,
            label=LABELS[method] if i == 0 else None,
          )
          tag = "" if param == "None" else f"{PARAM_TAGS[method]}={param}"
          tag += " (inf)" if inf else ""
          if tag:
            ax.annotate(tag, (x.mean(), ym), textcoords="offset points", xytext=(4, 3), fontsize=7)
      ax.set_xlabel("utility MAE")
      ylabel = exposure.IMAGE_METRIC_NAMES[image_name] if kind == "image" else f"{kind} IP exposure"
      ax.set_ylabel(ylabel if len(ylabel) < 40 else ylabel.replace("stand-in: ", "stand-in:\n"), fontsize=8)
      ax.set_title(f"{os.path.basename(dataset)}: {kind} IP", fontsize=9)
      ax.grid(alpha=0.3)
      if r == 0 and c == 0:
        ax.legend(fontsize=7)
  fig.tight_layout()
  rundir.save_figure(fig, path)


def run_study(
  cfg: StudyConfig,
  out: str,
  *,
  progress: bool = True,
  log: Callable[[str], None] = print,
  report_only: bool = False,
  command: str = "",
) -> dict[str, Any]:
  """Runs (or resumes) every point, then writes table3.md / table3.json and the figures.

  Args:
    cfg: The study.
    out: Its directory (config.json, points/, ipprotect/, cache/, the tables and figures).
    progress: Progress bars.
    log: Receives one line per finished point.
    report_only: Compute nothing; tabulate the points already finished (of a killed sweep).
    command: The command line, written into table3.md.

  Raises:
    rundir.ConfigMismatch: ``out`` holds a study whose points depend on other settings
      (what is swept, ``_SWEPT``, may differ: a study may be extended).
  """
  unknown = sorted(set(cfg.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
  # The preset's content, not only its name: a finished point of an older preset is not reused.
  resolved = {d: job.config_to_json(job.preset(cfg.ipprotect_preset, d)) for d in cfg.datasets}
  rundir.write_config(out, {**_json(cfg), "ipprotect_configs": resolved}, ignore=_SWEPT)
  t0 = time.perf_counter()
  points = []
  for dataset in cfg.datasets:
    for seed in cfg.seeds:
      ctx = _Context(cfg, out, dataset, seed, progress)
      for method in cfg.methods:
        for param in cfg.omega_tr if method == "ipprotect" else cfg.params[method]:
          t = time.perf_counter()
          if report_only and not os.path.exists(_point_path(out, dataset, method, param, seed)):
            continue
          p = run_point(ctx, method, param)
          points.append(p)
          log(
            f"{os.path.basename(dataset)} s{seed} {method:9s} {str(param):5s} MAE {p['utility_mae']:.3f} "
            f"train {p['training_exposure']:.3f} infer {p['inference_exposure']:.3f} "
            f"image {p['image_exposure']} ({time.perf_counter() - t:.1f} s)"
          )
  if not points:
    raise ValueError(f"no finished points in {out}")
  t = table3(points)
  t["wall_s"] = time.perf_counter() - t0
  t["points"] = len(points)
  rundir.write_json(os.path.join(out, "table3.json"), t)
  text = (
    f"# Table III: IP exposure vs utility MAE\n\n`{command}`; datasets {list(cfg.datasets)}, seeds "
    f"{list(cfg.seeds)}, IPProtect preset `{cfg.ipprotect_preset}` at |Omega_Tr| in {list(cfg.omega_tr)}, "
    f"|D_X| = {cfg.dx_size}.\n\nImage IP exposure column: **{t['image_metric_name']}**. "
    "Mean ± sample std (ddof = 1) over "
    "every parameter and seed of a method. HMean: harmonic mean of utility MAE and exposure, each divided by "
    "its maximum over the IPProtect, DP-MERF and InstaHide points of the dataset (lower is better; not "
    "defined for the Identity / Random ends).\n\n" + table3_markdown(t) + "\n"
  )
  rundir.write_text(os.path.join(out, "table3.md"), text)
  rundir.write_csv(os.path.join(out, "table3.csv"), table3_rows(t), TABLE3_COLUMNS)
  figure(points, KINDS, os.path.join(out, "fig2.png"))
  for kind in KINDS:
    figure(points, (kind,), os.path.join(out, f"fig2_{kind}.png"))
  return t
