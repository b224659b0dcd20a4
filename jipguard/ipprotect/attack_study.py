"""IPProtect under attack: the study behind ``jipguard attacks`` (``experiments/ipprotect_attacks.py``).

Three parts, one run directory (``attack_report`` writes its tables, figures and report.md):

1. **Attack x method** at the main point (the victim preset, e.g. the main job's default):
   every attack of ``attacks`` (linkage by pixel / low-pass / magnitude / model-feature
   correlation; reconstruction by class mean, ridge, the V-B optimisation, pix2pix) against
   Identity, InstaHide, DP-MERF, IPProtect and IPProtect with each defence, with each method's
   utility MAE on the sellers.
2. **The grid** along |Omega_Tr| x buyer size (x seeds): the buyer's run for each point
   (``job.run``, Fig. 1's protocol: no validation stop by default), its risk, compliance and
   MAE on Omega_Tr / Omega_V with the Hoeffding bound (Fig. 1), the sellers' MAE next to
   InstaHide's and DP-MERF's at each buyer size (Fig. 3), and pixel / low-pass linkage.
3. **The defence trade-off**: utility MAE against linkage top-1 and pix2pix SSIM (part 1's
   IPProtect rows).

The victims are real ``job.run`` directories under ``victims/`` (their anchor secrets stay in
their own ``checkpoints/``; the attacks read only ``sanitized.npz``), trained ensembles are
shared through ``cache/``, and every finished piece is kept in ``pieces/`` as JSON: a rerun of
the same command skips them.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import numpy as np

from jipguard import cli, ensemble, rundir
from jipguard import data as data_lib
from jipguard.ipprotect import attacks, baselines, defences, job, metrics, pix2pix, sanitizer, sellers
from jipguard.ipprotect.pix2pix import GANConfig
from jipguard.ipprotect.sellers import TrainConfig

BASELINES = ("identity", "instahide", "dp_merf")
# IPProtect and its defences: the sanitizer options each changes (cross_fit: defences.cross_fit_sanitize).
VARIANTS = ("ipprotect", "out_of_bag", "input_noise", "anchor", "cross_fit")
METHODS = BASELINES + VARIANTS
LINK_ATTACKS = ("pixel", "lowpass", "magnitude", "feature")
RECON_ATTACKS = ("class_mean", "ridge", "optimisation", "pix2pix")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study depends on (config.json)."""

  victim: str = "default"  # job.preset of the buyer's run at the main point.
  dataset: str = data_lib.DEFAULT_DATASET  # The buyer's dataset (job.load_data's test split).
  seed: int = 0  # Seed of the victims, the adversary and the attacks.
  aux_chunks: int = 2  # |D_A| = this many buyer sets, from the train split (disjoint from D_B).
  classifier_size: int = 2000  # Train images (not in D_A) of the independent classifier.
  methods: tuple[str, ...] = METHODS  # Rows of the attack x method table (none: the grid only).
  instahide_k: int = 4  # InstaHide's k (the paper's most useful setting).
  dp_merf_sigma: float = 5.0  # DP-MERF's sigma (the paper's most useful setting).
  input_noise: float = 0.5  # Defence input_noise: sigma of the noise on x~ per step.
  anchor_lam: float = 1.0  # Defence anchor: lambda ...
  anchor_tau: float = 1.0  # ... and tau of the security hinge.
  cross_fit_folds: int = 2  # Defence cross_fit: folds of D_B.
  lowpass_sigma: float = 1.5  # Gaussian sigma (pixels) of the low-pass linkage.
  ridge_alpha: float = 100.0  # Ridge inverse's L2 weight.
  opt_models: int = 20  # V-B optimisation attack: adversary models used ...
  opt_steps: int = 100  # ... Adam steps ...
  opt_weight: float = 1.0  # ... and weight of the pull towards D_A's class mean.
  gan: GANConfig = GANConfig(features=(16, 32), epochs=10)  # pix2pix.
  omega_tr_grid: tuple[int, ...] = (1, 10, 30, 100)  # Grid (none if either is empty): |Omega_Tr| values ...
  buyer_size_grid: tuple[int, ...] = (100, 300)  # ... buyer-set sizes ...
  seeds: tuple[int, ...] = (0,)  # ... and seeds.
  grid_val_stop: bool = False  # Grid victims use Omega_V's stopping rule (Fig. 1: no).

  def __post_init__(self):
    job.preset(self.victim, self.dataset)  # ValueError naming an unknown preset.
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f"--methods must be some of {', '.join(METHODS)}, got {', '.join(self.methods) or 'none'}")
    if self.aux_chunks < 1 or self.classifier_size < 1:
      raise ValueError("--aux_chunks and --classifier_size must be >= 1")
    if min(self.omega_tr_grid, default=1) < 1:
      raise ValueError(f"--omega_tr_grid must hold integers >= 1, got {self.omega_tr_grid}")
    if min(self.buyer_size_grid, default=2) < 2:
      raise ValueError(f"--buyer_size_grid must hold integers >= 2, got {self.buyer_size_grid}")
    if not self.seeds:
      raise ValueError("--seeds needs at least one seed")
    if self.cross_fit_folds < 2 or self.instahide_k < 2 or self.dp_merf_sigma < 0:
      raise ValueError("--cross_fit_folds and --instahide_k must be >= 2, --dp_merf_sigma >= 0")
    if self.opt_models < 1 or self.opt_steps < 1:
      raise ValueError("--opt_models and --opt_steps must be >= 1")

  def victim_config(self) -> job.IPProtectConfig:
    return dataclasses.replace(job.preset(self.victim, self.dataset), seed=self.seed)


def preset(name: str) -> StudyConfig:
  """``smoke``: the smoke victim, tiny grid and GAN (tests, a minute); ``default``: the main job."""
  if name == "smoke":
    return StudyConfig(
      victim="smoke",
      classifier_size=500,
      gan=GANConfig(features=(8, 16), epochs=2, batch_size=16),
      opt_models=4,
      opt_steps=20,
      omega_tr_grid=(2, 6),
      buyer_size_grid=(16, 24),
    )
  if name == "default":
    return StudyConfig()
  raise ValueError(f"unknown preset {name!r}; choose smoke or default")


def config_to_json(cfg: StudyConfig) -> dict[str, Any]:
  d = dataclasses.asdict(cfg)
  d["victim_config"] = job.config_to_json(cfg.victim_config())
  return d


# ----------------------------------------------------------------------------- the setting


@dataclasses.dataclass
class Setting:
  """The main point's data, the sellers and the adversary's fixed pieces."""

  cfg: StudyConfig
  vcfg: job.IPProtectConfig  # The buyer's run.
  buyer: data_lib.Dataset  # D_B.
  candidates: data_lib.Dataset  # D_B followed by as many distractors (other test images).
  aux_pool: data_lib.Dataset  # The adversary's train-split images (D_A is a prefix per size).
  classify: Callable[[np.ndarray], np.ndarray]  # The independent classifier.
  sellers: Any  # Seller ensemble variables.
  model: Any  # The platform's architecture.
  workdir: str
  progress: bool

  @property
  def cache(self) -> str:
    return os.path.join(self.workdir, "cache")

  def aux(self, buyer_size: int) -> data_lib.Dataset:
    return self.aux_pool.subset(np.arange(self.cfg.aux_chunks * buyer_size))

  def utility_mae(self, buyer: data_lib.Dataset, images: np.ndarray, labels: np.ndarray) -> float:
    """The sellers' utility MAE between (images, labels) and the buyer set."""
    u_o = metrics.utility(ensemble.predict(self.model, self.sellers, buyer.images), buyer.labels)
    u_s = metrics.utility(ensemble.predict(self.model, self.sellers, images), labels)
    return metrics.utility_mae(u_o, u_s)


def make_setting(cfg: StudyConfig, workdir: str, progress: bool) -> Setting:
  vcfg = dataclasses.replace(cfg.victim_config(), cache_dir=os.path.join(workdir, "cache"))
  buyer, pool = job.load_data(vcfg)
  distractors = job.reference_set(vcfg, len(buyer))
  if distractors is None:
    raise ValueError(f"the test split of {cfg.dataset} has fewer than 2 x {len(buyer)} images for the distractors")
  candidates = dataclasses.replace(
    buyer,
    images=np.concatenate([buyer.images, distractors.images]),
    labels=np.concatenate([buyer.labels, distractors.labels]),
  )
  train = data_lib.load(vcfg.dataset, "train", data_dir=vcfg.data_dir)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(cfg.seed), 21), len(train)))
  n_aux = cfg.aux_chunks * len(buyer)
  if n_aux + cfg.classifier_size > len(train):
    raise ValueError(
      f"the train split has {len(train)} images; D_A and the classifier need {n_aux + cfg.classifier_size}"
    )
  aux_pool = train.subset(order[:n_aux])
  model = job.run_model(vcfg, buyer)
  clf_data = train.subset(order[n_aux : n_aux + cfg.classifier_size])
  clf = sellers.train_models(
    model,
    TrainConfig(epochs=10, batch_size=64),
    jax.random.fold_in(jax.random.key(cfg.seed), 22),
    clf_data.images,
    clf_data.labels[None],
    num_members=1,
    checkpoint_dir=os.path.join(workdir, "cache", "classifier"),
    desc="independent classifier",
    progress=progress,
  ).variables
  classify = lambda x: np.asarray(ensemble.predict(model, clf, x)[0].argmax(-1))
  seller_vars = job.seller_models(vcfg, model, pool, vcfg.cache_dir, progress=progress).variables
  return Setting(cfg, vcfg, buyer, candidates, aux_pool, classify, seller_vars, model, workdir, progress)


# ------------------------------------------------------------------------------- methods


def _variant_config(cfg: StudyConfig, vcfg: job.IPProtectConfig, variant: str) -> job.IPProtectConfig:
  s = vcfg.sanitizer
  changes = {
    "ipprotect": {},
    "cross_fit": {},
    "out_of_bag": {"out_of_bag": True},
    "input_noise": {"input_noise": cfg.input_noise},
    "anchor": {"lam": cfg.anchor_lam, "tau": cfg.anchor_tau},
  }[variant]
  return dataclasses.replace(vcfg, sanitizer=dataclasses.replace(s, **changes))


def public_settings(cfg: StudyConfig, vcfg: job.IPProtectConfig, variant: str, model) -> attacks.PublicSettings:
  """What the adversary knows of the buyer's run: its public settings, nothing else."""
  v = _variant_config(cfg, vcfg, variant)
  return attacks.PublicSettings(
    model=model,
    omega_train=v.omega_train,
    sanitizer=v.sanitizer,
    omega_tr=v.omega_tr,
    omega_v=v.omega_v,
    buyer_size=v.buyer_size,
    cross_fit_folds=cfg.cross_fit_folds if variant == "cross_fit" else 0,
  )


def _pair_by_label(key: jax.Array, labels_a: np.ndarray, labels_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Random pairs (i, j) with labels_a[i] == labels_b[j], as many per class as both sides allow
  (the paper's random association of DP-MERF's samples with originals)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  ia, ib = [], []
  for c in np.union1d(labels_a, labels_b):
    a, b = rng.permutation(np.flatnonzero(labels_a == c)), rng.permutation(np.flatnonzero(labels_b == c))
    k = min(len(a), len(b))
    ia.append(a[:k])
    ib.append(b[:k])
  return np.concatenate(ia), np.concatenate(ib)


def share(st: Setting, method: str, cfg_v: job.IPProtectConfig | None = None, seed: int | None = None):
  """The buyer's side: (shared images, their labels, index of each one's original in D_B, utility MAE)."""
  cfg, vcfg = st.cfg, cfg_v or st.vcfg
  seed = cfg.seed if seed is None else seed
  buyer = job.load_data(vcfg)[0]
  key = jax.random.fold_in(jax.random.key(seed), 30)
  if method in ("identity", "instahide"):
    param = cfg.instahide_k if method == "instahide" else None
    images, labels = baselines.sanitize(method, key, buyer.images, buyer.labels, buyer.num_classes, param)
    return images, labels, np.arange(len(buyer)), st.utility_mae(buyer, images, labels)
  if method == "dp_merf":
    images, labels = baselines.sanitize(method, key, buyer.images, buyer.labels, buyer.num_classes, cfg.dp_merf_sigma)
    mae = st.utility_mae(buyer, images, labels)
    i_gen, i_buyer = _pair_by_label(jax.random.fold_in(key, 1), labels, buyer.labels)
    return images[i_gen], labels[i_gen], i_buyer, mae
  v = _variant_config(cfg, vcfg, method)
  name = f"{method}-tr{v.omega_tr}-b{v.buyer_size}-s{seed}-{'stop' if v.sanitizer.val_stop else 'nostop'}"
  out = os.path.join(st.workdir, "victims", name)
  if method == "cross_fit":
    path = os.path.join(out, "sanitized.npz")
    if not os.path.exists(path):
      os.makedirs(out, exist_ok=True)
      secret = os.path.join(out, "anchor_secret.json")
      if not os.path.exists(secret):
        fresh = [sanitizer.anchor_secret().hex() for _ in range(cfg.cross_fit_folds)]
        rundir.write_secret(secret, {"anchor_secrets": fresh})
      images = defences.cross_fit_sanitize(
        st.model,
        v.omega_train,
        v.sanitizer,
        v.omega_tr,
        v.omega_v,
        buyer,
        seed=v.seed,
        anchor_secrets=[bytes.fromhex(h) for h in rundir.read_secret(secret)["anchor_secrets"]],
        folds=cfg.cross_fit_folds,
        progress=st.progress,
      )
      rundir.write_npz(path, images=images, labels=buyer.labels)
    images = np.load(path)["images"]
    return images, buyer.labels, np.arange(len(buyer)), st.utility_mae(buyer, images, buyer.labels)
  job.run(v, out, progress=st.progress)
  with np.load(os.path.join(out, "sanitized.npz")) as z:
    images, labels = z["images"], z["labels"]
  return images, labels, np.arange(len(buyer)), st.utility_mae(buyer, images, labels)


def adversary(st: Setting, method: str, feature_adv: attacks.Adversary | None) -> attacks.Adversary:
  """The adversary's preparation against ``method``: public settings and D_A only."""
  cfg = st.cfg
  aux = st.aux(len(st.buyer))
  key = jax.random.fold_in(jax.random.key(cfg.seed), 40)  # The adversary's own randomness.
  if method in VARIANTS:
    return attacks.prepare_ipprotect(
      public_settings(cfg, st.vcfg, method, st.model),
      aux,
      seed=cfg.seed + 1000,
      checkpoint_dir=st.cache,
      sanitized_path=os.path.join(st.workdir, "pieces", f"adversary-{method}.npz"),
      progress=st.progress,
    )
  if method == "identity":
    adv = attacks.prepare_with(lambda x, y: x, aux)
  elif method == "instahide":
    public = baselines.public_dataset(aux.image_shape)
    adv = attacks.prepare_with(lambda x, y: baselines.instahide_mix(key, x, public, cfg.instahide_k)[0], aux)
  else:
    images, labels = baselines.sanitize("dp_merf", key, aux.images, aux.labels, aux.num_classes, cfg.dp_merf_sigma)
    i_gen, i_aux = _pair_by_label(jax.random.fold_in(key, 1), labels, aux.labels)
    adv = attacks.Adversary(aux.subset(i_aux), images[i_gen])
  if feature_adv is not None:
    adv = dataclasses.replace(adv, model=feature_adv.model, params=feature_adv.params)
  return adv


def attack_method(st: Setting, method: str, feature_adv: attacks.Adversary, log) -> dict[str, Any]:
  """Every attack on one method at the main point: linkage and reconstruction rows, examples."""
  cfg = st.cfg
  t0 = time.perf_counter()
  images, labels, true, mae = share(st, method)
  shared = attacks.Shared(np.asarray(images, np.float32), np.asarray(labels, np.int32))
  adv = feature_adv if method == "ipprotect" else adversary(st, method, feature_adv)
  cands, cl = st.candidates.images, st.candidates.labels
  originals = st.buyer.images[true]
  link_rows = []
  for name in LINK_ATTACKS:
    if name == "feature":
      scores = attacks.feature_scores(adv, shared.images, cands)
    else:
      scores = attacks.pixel_scores(shared.images, cands, name, cfg.lowpass_sigma)
    link_rows.append({"method": method, "attack": name, **attacks.linkage(scores, true, shared.labels, cl)})
  recons = {"class_mean": attacks.class_mean_images(adv.aux, shared.labels)}
  recons["ridge"] = attacks.fit_ridge_inverse(adv, cfg.ridge_alpha)(shared.images)
  recons["optimisation"] = attacks.optimisation_attack(
    adv, shared, num_models=cfg.opt_models, steps=cfg.opt_steps, weight=cfg.opt_weight
  )
  gan = pix2pix.fit(
    jax.random.fold_in(jax.random.key(cfg.seed), 50),
    adv.aux_sanitized,
    adv.aux.images,
    cfg.gan,
    log=lambda r: log({"piece": f"pix2pix-{method}", **r}),
  )
  recons["pix2pix"] = gan(shared.images)
  recon_rows = []
  for name, rec in recons.items():
    scores = attacks.reconstruction_scores(rec, originals, shared.labels, cands, cl, classify=st.classify, true=true)
    recon_rows.append({"method": method, "attack": name, **scores})
  # Fig. 5's columns: the first 8 shared images, their originals and reconstructions.
  ex = {"original": originals[:8], "sanitized": shared.images[:8], **{k: v[:8] for k, v in recons.items()}}
  rundir.write_npz(os.path.join(st.workdir, "pieces", f"examples-{method}.npz"), **ex)
  return {
    "method": method,
    "utility_mae": mae,
    "link": link_rows,
    "recon": recon_rows,
    "seconds": time.perf_counter() - t0,
  }


def grid_point(st: Setting, omega_tr: int, buyer_size: int, seed: int) -> dict[str, Any]:
  """One victim of the grid: Fig. 1's metrics, Fig. 3's MAE (with the baselines'), linkage."""
  cfg = st.cfg
  v = dataclasses.replace(
    st.vcfg,
    omega_tr=omega_tr,
    buyer_size=buyer_size,
    seed=seed,
    sanitizer=dataclasses.replace(st.vcfg.sanitizer, val_stop=cfg.grid_val_stop),
  )
  name = f"ipprotect-tr{omega_tr}-b{buyer_size}-s{seed}-{'stop' if cfg.grid_val_stop else 'nostop'}"
  out = job.run(v, os.path.join(st.workdir, "victims", name), progress=st.progress)
  buyer = job.load_data(v)[0]
  with np.load(os.path.join(st.workdir, "victims", name, "sanitized.npz")) as z:
    shared = z["images"]
  distractors = job.reference_set(v, buyer_size)
  cand = np.concatenate([buyer.images, distractors.images])
  cl = np.concatenate([buyer.labels, distractors.labels])
  row = {"omega_tr": omega_tr, "buyer_size": buyer_size, "seed": seed}
  for k in ("utility_mae", "utility_mae_train", "utility_mae_val", "risk_train", "risk_val", "compliance_train"):
    row[k] = out[k]
  row["compliance_val"], row["compliance_lower_bound"] = out["compliance_val"], out["compliance_lower_bound"]
  for kind in ("pixel", "lowpass"):
    link = attacks.linkage(
      attacks.pixel_scores(shared, cand, kind, cfg.lowpass_sigma), np.arange(buyer_size), buyer.labels, cl
    )
    row.update({f"{kind}_{k}": link[k] for k in ("top1", "top5", "chance_top1", "within_class_top1")})
  for method in ("instahide", "dp_merf"):
    row[f"{method}_utility_mae"] = share(st, method, v, seed)[3]
  return row


# ------------------------------------------------------------------------------------ run


def _piece(path: str, fn: Callable[[], dict[str, Any]], log) -> dict[str, Any]:
  """A finished piece from ``path``, else computed, written, and logged to metrics.jsonl."""
  if os.path.exists(path):
    return rundir.read_json(path)
  result = fn()
  rundir.write_json(path, result)
  log({"piece": os.path.basename(path), "finished": True})
  return result


def run(
  cfg: StudyConfig, workdir: str, *, progress: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
  """Runs (or resumes) the study into ``workdir``; returns metrics.json's dict."""
  from jipguard.ipprotect import attack_report  # noqa: PLC0415 (matplotlib only when writing the report)

  rundir.write_config(workdir, config_to_json(cfg))
  os.makedirs(os.path.join(workdir, "pieces"), exist_ok=True)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  log = lambda row: rundir.append_jsonl(jsonl, row)
  t0 = time.perf_counter()
  st = make_setting(cfg, workdir, progress)
  echo(f"setting ready ({time.perf_counter() - t0:.0f} s): |D_B| {len(st.buyer)}, |D_A| {len(st.aux(len(st.buyer)))}")
  feature_adv = adversary(st, "ipprotect", None) if cfg.methods else None
  main = []
  for method in cfg.methods:
    path = os.path.join(workdir, "pieces", f"main-{method}.json")
    piece = _piece(path, functools.partial(attack_method, st, method, feature_adv, log), log)
    echo(f"{method}: utility MAE {piece['utility_mae']:.3f}, pixel top-1 {piece['link'][0]['top1']:.3f}")
    main.append(piece)
  if main:
    attack_report.write(workdir, cfg, st, main, [])  # The main table now; the grid's figures when it is done.
  grid = []
  for seed in cfg.seeds:
    for b in cfg.buyer_size_grid:
      for m in cfg.omega_tr_grid:
        path = os.path.join(workdir, "pieces", f"grid-tr{m}-b{b}-s{seed}.json")
        grid.append(_piece(path, functools.partial(grid_point, st, m, b, seed), log))
        echo(f"grid |Omega_Tr| {m}, buyer {b}, seed {seed}: pixel top-1 {grid[-1]['pixel_top1']:.3f}")
  out = attack_report.write(workdir, cfg, st, main, grid)
  out["seconds"] = time.perf_counter() - t0
  rundir.write_json(os.path.join(workdir, "metrics.json"), out)  # Last: its presence means "finished".
  return out


# -------------------------------------------------------------------------------- command


def _ints(flag: str, text: str | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  if text == "none":
    return ()
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise cli.FlagError(f"{flag} must be comma-separated integers, got {text!r}") from None
  for v in values:
    cli.check_int(flag, v, lo=1)
  return values


@cli.command
def main(argv: list[str] | None = None) -> int:
  """``jipguard attacks``: the attack study (module docstring)."""
  p = cli.ArgumentParser(prog="jipguard attacks", description=__doc__)
  p.add_argument("--preset", default="default", help="smoke (tests, about a minute) or default (default: %(default)s)")
  p.add_argument("--dataset", default=data_lib.DEFAULT_DATASET, help="the buyer's dataset (default: %(default)s)")
  p.add_argument("--methods", help=f"comma-separated rows of the attack table, or none (default: {','.join(METHODS)})")
  p.add_argument(
    "--omega_tr_grid", help="comma-separated |Omega_Tr| of the grid, or none (default: 1,10,30,100; smoke 2,6)"
  )
  p.add_argument("--buyer_size_grid", help="comma-separated buyer sizes of the grid (default: 100,300; smoke 16,24)")
  p.add_argument("--seeds", help="comma-separated seeds of the grid (default: 0)")
  p.add_argument("--aux_chunks", type=int, help="|D_A| in buyer sets (default: 2)")
  p.add_argument("--gan_epochs", type=int, help="pix2pix epochs (default: 10; smoke 2)")
  p.add_argument("--opt_steps", type=int, help="steps of the V-B optimisation attack (default: 100; smoke 20)")
  p.add_argument(
    "--seed", type=int, default=0, help="seed of the victims, adversary and attacks (default: %(default)s)"
  )
  cli.add_common_flags(p, workdir_help="run directory (default: runs/attacks-<dataset>-<preset>-s<seed>)")
  a = p.parse_args(argv)
  cli.check_choice("--preset", a.preset, ("smoke", "default"))
  cli.check_int("--aux_chunks", a.aux_chunks, lo=1, hi=20)
  cli.check_int("--gan_epochs", a.gan_epochs, lo=1, hi=1000)
  cli.check_int("--opt_steps", a.opt_steps, lo=1, hi=100000)
  cli.check_int("--seed", a.seed, lo=0)
  methods = None if a.methods is None else tuple(m.strip() for m in a.methods.split(",") if a.methods != "none")
  if methods is not None:
    for m in methods:
      cli.check_choice("--methods", m, METHODS)
  seeds = None if a.seeds is None else tuple(int(s) for s in a.seeds.split(",") if s.strip().lstrip("-").isdigit())
  if a.seeds is not None and (not seeds or len(seeds) != len(a.seeds.split(",")) or min(seeds) < 0):
    raise cli.FlagError(f"--seeds must be comma-separated integers >= 0, got {a.seeds!r}")
  base = preset(a.preset)
  changes = {
    "dataset": a.dataset,
    "seed": a.seed,
    "methods": methods,
    "omega_tr_grid": _ints("--omega_tr_grid", a.omega_tr_grid),
    "buyer_size_grid": _ints("--buyer_size_grid", a.buyer_size_grid),
    "seeds": seeds,
    "aux_chunks": a.aux_chunks,
    "opt_steps": a.opt_steps,
    "gan": None if a.gan_epochs is None else dataclasses.replace(base.gan, epochs=a.gan_epochs),
  }
  cfg = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})  # Validates (ValueError).
  if a.print_config:
    return cli.print_config(config_to_json(cfg))
  workdir = a.workdir or os.path.join("runs", f"attacks-{cfg.dataset}-{a.preset}-s{cfg.seed}")
  out = run(cfg, workdir, progress=not a.quiet, echo=lambda s: print(s, flush=True))
  summary = {m: v["best_link"] | {"utility_mae": v["utility_mae"]} for m, v in out["main"].items()}
  print(
    rundir.dumps({"strongest_linkage": summary, "chosen_default": out["chosen_default"], "workdir": workdir}), end=""
  )
  return 0
