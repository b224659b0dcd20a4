"""The IPProtect main job: sellers, sample_models, sanitize, evaluate, write a run directory.

``experiments/ipprotect.py`` (``ipprotect.cli``) parses flags into an :class:`IPProtectConfig`
and calls :func:`run`. The run directory (docs/scaling.md) holds ``config.json``, ``metrics.json``,
``report.md``, ``sanitized.npz`` (sanitized images and labels only), ``examples.png``
(originals over sanitized images, Fig. 4 style) and ``checkpoints/`` (orbax): trained
ensembles are reused and a killed sanitization resumes at the next unfinished batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

from jipguard import cli, distributed, ensemble, models, rundir
from jipguard import data as data_lib
from jipguard.ipprotect import attacks, metrics, sanitizer, sellers
from jipguard.ipprotect.objective import SanitizerConfig
from jipguard.ipprotect.sellers import TrainConfig


@dataclasses.dataclass(frozen=True)
class IPProtectConfig:
  """Everything a run depends on (written to config.json)."""

  dataset: str = data_lib.DEFAULT_DATASET  # Name, or a path (IDX folder / .npz / image folder).
  data_dir: str | None = None  # Local copy of a named dataset, or a tfds data_dir.
  model: str | None = None  # Architecture; default mlp (grayscale) / cnn (colour).
  buyer_size: int | None = None  # Buyer images from the test split; None = all.
  seller_pool_size: int | None = None  # Seller images from the train split; None = all.
  models_per_seller: int = 10  # Table I: 10 models per seller.
  seller_train: TrainConfig = TrainConfig(epochs=5, batch_size=128)
  omega_train: TrainConfig = TrainConfig(epochs=30, batch_size=32)
  omega_tr: int = 100  # |Omega_Tr|.
  omega_v: int = 10  # |Omega_V| (Table II).
  sanitizer: SanitizerConfig = SanitizerConfig()
  seed: int = 0  # Seed of everything but the anchors.
  # Integer the 256-bit anchor secret is derived from (reproducible runs); None = a fresh secret
  # drawn once and kept private. config.json records a given seed only as a salted commitment.
  anchor_seed: int | None = None
  cache_dir: str | None = None  # Share trained ensembles between runs (ablations); None = checkpoints/.

  def __post_init__(self):
    cli.check_int("omega_tr", self.omega_tr, lo=1)
    cli.check_int("omega_v", self.omega_v, lo=1)
    cli.check_int("models_per_seller", self.models_per_seller, lo=1)
    cli.check_int("buyer_size", self.buyer_size, lo=1)
    cli.check_int("seller_pool_size", self.seller_pool_size, lo=1)
    cli.check_int("seed", self.seed, lo=0)
    cli.check_int("anchor_seed", self.anchor_seed, lo=0)
    if self.model is not None:
      cli.check_choice("model", self.model, sorted(models.MODELS))
    if self.sanitizer.model_batch is not None and self.sanitizer.model_batch > self.omega_tr:
      raise ValueError(f"model_batch must be <= omega_tr = {self.omega_tr}, got {self.sanitizer.model_batch}")


def preset(name: str, dataset: str = data_lib.DEFAULT_DATASET) -> IPProtectConfig:
  """``smoke`` (seconds, for tests), ``default`` (minutes on 2 cores), ``paper`` (Table II)."""
  family = sellers.table_i_family(dataset)
  table2 = dict(
    zeta={"cifar10": 0.2}.get(family, 0.5),
    tau={"mnist": 1.3, "cifar10": 1.65}.get(family, 1.5),
    omega_v={"cifar10": 50}.get(family, 10),
    data_batch={"cifar10": 256}.get(family, 5000),
  )
  if name == "smoke":
    return IPProtectConfig(
      dataset=dataset,
      buyer_size=24,
      seller_pool_size=1024,
      models_per_seller=2,
      seller_train=TrainConfig(epochs=1, batch_size=64),
      omega_train=TrainConfig(epochs=5, batch_size=16),
      omega_tr=6,
      omega_v=3,
      sanitizer=SanitizerConfig(
        steps=40,
        data_batch=16,
        val_every=10,
        min_steps=20,
        loss="margin",
        learning_rate=0.1,
        zeta=0.01,
        tau=table2["tau"],
      ),
    )
  if name == "default":
    return IPProtectConfig(
      dataset=dataset,
      buyer_size=300,
      models_per_seller=4,
      seller_train=TrainConfig(epochs=3, batch_size=128),
      omega_train=TrainConfig(epochs=30, batch_size=32),
      omega_tr=100,
      omega_v=table2["omega_v"],
      sanitizer=SanitizerConfig(
        steps=300,
        data_batch=300,
        loss="margin",
        learning_rate=0.1,
        zeta=0.01,
        val_every=10,
        min_steps=50,
        tau=table2["tau"],
        lam=0.1,
      ),
    )
  if name == "paper":
    return IPProtectConfig(
      dataset=dataset,
      models_per_seller=10,
      omega_tr=100,
      omega_v=table2["omega_v"],
      sanitizer=SanitizerConfig.paper(data_batch=table2["data_batch"], zeta=table2["zeta"], tau=table2["tau"], lam=0.1),
    )
  raise ValueError(f"unknown preset {name!r}; choose smoke, default or paper")


def config_to_json(cfg: IPProtectConfig, *, anchor_salt: str | None = None) -> dict[str, Any]:
  """The config as JSON. A given ``anchor_seed`` is recorded only as a salted commitment
  ``{"scrypt": scrypt(seed, salt), "salt": salt}`` (``anchor_salt``: hex; a fresh one if None),
  never as the seed or a plain hash of it."""
  d = dataclasses.asdict(cfg)
  d["seller_train"], d["omega_train"] = cfg.seller_train.fingerprint(), cfg.omega_train.fingerprint()
  d["sanitizer"] = cfg.sanitizer.fingerprint()
  if cfg.anchor_seed is not None:
    salt = anchor_salt or secrets.token_hex(16)
    d["anchor_seed"] = {"scrypt": _seed_commitment(cfg.anchor_seed, salt), "salt": salt}
  return d


def _seed_commitment(seed: int, salt_hex: str) -> str:
  return sanitizer.seed_digest(seed, bytes.fromhex(salt_hex)).hex()


def config_from_json(d: dict[str, Any]) -> IPProtectConfig:
  """Inverse of :func:`config_to_json` (an anchor commitment comes back as None)."""
  d = dict(d)
  if not isinstance(d.get("anchor_seed"), int):
    d["anchor_seed"] = None
  d["seller_train"] = TrainConfig(**d["seller_train"])
  d["omega_train"] = TrainConfig(**d["omega_train"])
  d["sanitizer"] = SanitizerConfig(**d["sanitizer"])
  return IPProtectConfig(**d)


def _saved_anchor_salt(workdir: str) -> str | None:
  """The salt of the anchor-seed commitment in ``workdir``'s config.json, if it has one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  saved = rundir.read_json(path)
  anchor = saved.get("config", {}).get("anchor_seed") if isinstance(saved, dict) else None
  return anchor.get("salt") if isinstance(anchor, dict) else None


def load_data(cfg: IPProtectConfig) -> tuple[data_lib.Dataset, data_lib.Dataset]:
  """Buyer (test split, first ``buyer_size`` of a fixed permutation) and seller pool (train)."""
  test = data_lib.load(cfg.dataset, "test", data_dir=cfg.data_dir)
  train = data_lib.load(cfg.dataset, "train", data_dir=cfg.data_dir)

  for what, n, ds, split in (
    ("buyer_size", cfg.buyer_size, test, "test"),
    ("seller_pool_size", cfg.seller_pool_size, train, "train"),
  ):
    if n is not None and n > len(ds):
      raise data_lib.DataError(f"{what} must be <= {len(ds)} (the {split} split of {ds.name}), got {n}")

  def take(ds, n, k):
    if n is None or n == len(ds):
      return ds
    return ds.subset(np.sort(_order(cfg, k, len(ds))[:n]))

  return take(test, cfg.buyer_size, _BUYER), take(train, cfg.seller_pool_size, _SELLERS)


_BUYER, _SELLERS = 10, 11  # Keys (folded into the seed) of the buyer's and the sellers' draws.


def _order(cfg: IPProtectConfig, k: int, n: int) -> np.ndarray:
  return np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(cfg.seed), k), n))


def reference_set(cfg: IPProtectConfig, buyer_size: int) -> data_lib.Dataset | None:
  """``buyer_size`` other test images (the next ones of the buyer's permutation), or None.

  The sellers' utility MAE between them and the buyer set is the error of a sanitizer that
  returned fresh real images of the same distribution (pure sampling error). It is a
  reference, not a bound: sanitized images tied to their originals can do better.
  """
  test = data_lib.load(cfg.dataset, "test", data_dir=cfg.data_dir)
  if 2 * buyer_size > len(test):
    return None
  return test.subset(np.sort(_order(cfg, _BUYER, len(test))[buyer_size : 2 * buyer_size]))


def run_model(cfg: IPProtectConfig, buyer: data_lib.Dataset) -> nn.Module:
  """The run's architecture: ``cfg.model``, else an MLP for grey images and a CNN for colour."""
  return models.get_model(cfg.model or ("mlp" if buyer.image_shape[-1] == 1 else "cnn"), buyer.num_classes)


def _ensemble_dir(cfg: IPProtectConfig, model: nn.Module, root: str | None, kind: str, *parts: Any) -> str | None:
  if root is None:
    return None
  tag = hashlib.sha256(
    json.dumps([cfg.dataset, cfg.data_dir, repr(model), cfg.seed, *parts], sort_keys=True, default=str).encode()
  ).hexdigest()[:16]
  return os.path.join(root, f"{kind}-{tag}")


def omega_key(cfg: IPProtectConfig) -> jax.Array:
  """The key of the run's sample_models (their bootstraps: ``sellers.sample_bootstraps``)."""
  return jax.random.fold_in(jax.random.key(cfg.seed), 3)


def sampled_models(
  cfg: IPProtectConfig, model: nn.Module, buyer: data_lib.Dataset, root: str | None, **kwargs: Any
) -> ensemble.EnsembleState:
  """The run's Omega_Tr + Omega_V (in that order), trained or restored from ``root``.

  ``root`` is where :func:`run` keeps ensembles: ``cfg.cache_dir`` if set, else the run
  directory's ``checkpoints`` (None: trained and kept nowhere). ``kwargs`` go to :func:`sellers.sample_models`.
  """
  return sellers.sample_models(
    model,
    cfg.omega_train,
    omega_key(cfg),
    buyer,
    cfg.omega_tr + cfg.omega_v,
    checkpoint_dir=_ensemble_dir(
      cfg, model, root, "omega", cfg.buyer_size, cfg.omega_tr, cfg.omega_v, cfg.omega_train.fingerprint()
    ),
    **kwargs,
  )


def seller_models(
  cfg: IPProtectConfig, model: nn.Module, pool: data_lib.Dataset, root: str, **kwargs: Any
) -> ensemble.EnsembleState:
  """The run's sellers (Table I label noise, ``cfg.models_per_seller`` models each), trained or
  restored from ``root`` (as :func:`sampled_models`); ``kwargs`` go to :func:`sellers.train_models`."""
  key = jax.random.key(cfg.seed)
  noise = sellers.TABLE_I_NOISE[sellers.table_i_family(pool.name)]
  labels = sellers.seller_labels(
    jax.random.fold_in(key, 1), pool.labels, noise, cfg.models_per_seller, pool.num_classes
  )
  return sellers.train_models(
    model,
    cfg.seller_train,
    jax.random.fold_in(key, 2),
    pool.images,
    labels,
    num_members=len(labels),
    checkpoint_dir=_ensemble_dir(
      cfg, model, root, "sellers", cfg.seller_pool_size, cfg.models_per_seller, cfg.seller_train.fingerprint()
    ),
    desc="sellers",
    **kwargs,
  )


def _shared_token(n: int) -> bytes:
  """``n`` random bytes from ``secrets``; with several processes, process 0's (broadcast)."""
  token = secrets.token_bytes(n)
  if jax.process_count() > 1:
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8)).astype(np.uint8).tobytes()
  return token


def anchor_secret_of(cfg: IPProtectConfig, ckpt: str) -> bytes:
  """The run's 256-bit anchor secret: derived from a given ``anchor_seed``, or drawn once and kept
  in the private checkpoints (``anchor_secret.json``, 0600)."""
  if cfg.anchor_seed is not None:
    return sanitizer.anchor_secret(cfg.anchor_seed)
  path = os.path.join(ckpt, "anchor_secret.json")
  if os.path.exists(path):
    saved = rundir.read_secret(path)
    if "anchor_secret" not in saved:
      raise rundir.ConfigMismatch(
        f"{path} holds a 64-bit anchor secret of an older jipguard, whose sanitization cannot resume; "
        "use a new --workdir"
      )
    return bytes.fromhex(saved["anchor_secret"])
  secret = _shared_token(sanitizer.ANCHOR_SECRET_BYTES)
  if distributed.is_main_process():
    rundir.write_secret(path, {"anchor_secret": secret.hex(), "note": "private to the buyer: never share"})
  return secret


def batch_summary(res: sanitizer.BatchResult) -> dict[str, Any]:
  """A sanitized batch's line of ``metrics.jsonl``: images, mean steps, losses, seconds."""
  mean = lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else None
  return {
    "images": len(res.images),
    "steps_mean": float(np.mean(res.steps)),
    "val_loss_mean": mean(res.val_loss),
    "train_loss_mean": mean(res.train_loss),
    "seconds": float(np.sum(res.seconds)),
  }


def run(
  cfg: IPProtectConfig, workdir: str, *, progress: bool = True, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
  """Runs (or resumes) the whole IPProtect job into ``workdir``; returns metrics.json's dict.

  With a ``mesh`` (``sharding.make_mesh``), ensembles are trained with members over its
  member axis and batches over its data axis, and images are sanitized over its data
  axis; it may span hosts (``jipguard.distributed``), in which case every process runs
  this function and process 0 writes the run directory (a shared filesystem holds the
  checkpoints).
  """
  main = distributed.is_main_process()
  buyer, pool = load_data(cfg)  # Bad data fail here, before the run directory exists.
  model = run_model(cfg, buyer)
  salt = _saved_anchor_salt(workdir)
  if salt is None and cfg.anchor_seed is not None:
    salt = _shared_token(16).hex()
  cfg_json = config_to_json(cfg, anchor_salt=salt)
  cfg_json.pop("cache_dir")  # Where ensembles are cached does not change the results.
  rundir.write_config(workdir, cfg_json, write=main)
  ckpt = os.path.join(workdir, "checkpoints")
  os.makedirs(ckpt, exist_ok=True)
  log = os.path.join(workdir, "metrics.jsonl")

  def epoch_log(phase: str):
    def write(epoch: int, record: dict[str, Any]) -> None:
      if main:
        rundir.append_jsonl(log, {"phase": phase, "epoch": epoch, **record})

    return write

  def batch_log(i: int, res: sanitizer.BatchResult) -> None:
    if main:
      rundir.append_jsonl(log, {"phase": "sanitize", "batch": i, **batch_summary(res)})

  noise = sellers.TABLE_I_NOISE[sellers.table_i_family(buyer.name)]
  timings = {}

  ens_dir = cfg.cache_dir or ckpt

  t = time.perf_counter()
  seller_ens = seller_models(cfg, model, pool, ens_dir, progress=progress, mesh=mesh, on_epoch_end=epoch_log("sellers"))
  timings["sellers_s"] = time.perf_counter() - t

  t = time.perf_counter()
  omega = sampled_models(
    cfg,
    model,
    buyer,
    ens_dir,
    desc="sample_models",
    progress=progress,
    mesh=mesh,
    on_epoch_end=epoch_log("sample_models"),
  )
  # Host copies (small): evaluation runs locally; the sanitizer places them on the mesh.
  omega_vars, seller_vars = distributed.to_host((omega.variables, seller_ens.variables))
  params_tr = jax.tree.map(lambda a: a[: cfg.omega_tr], omega_vars)
  params_v = jax.tree.map(lambda a: a[cfg.omega_tr :], omega_vars)
  timings["sample_models_s"] = time.perf_counter() - t

  t = time.perf_counter()
  # The bootstraps sample_models trained Omega_Tr and Omega_V on.
  boots = sellers.sample_bootstraps(omega_key(cfg), len(buyer), cfg.omega_tr + cfg.omega_v)
  mask = sellers.out_of_bag_mask(boots[: cfg.omega_tr], len(buyer)) if cfg.sanitizer.out_of_bag else None
  result = sanitizer.sanitize(
    model,
    params_tr,
    params_v if cfg.sanitizer.val_stop else None,
    buyer.images,
    cfg.sanitizer,
    seed=cfg.seed,
    anchor_secret=anchor_secret_of(cfg, ckpt),
    checkpoint_dir=os.path.join(ckpt, "sanitize"),
    progress=progress,
    mesh=mesh,
    member_mask=mask,
    on_batch=batch_log,
  )
  timings["sanitize_s"] = time.perf_counter() - t

  out = evaluate(
    model,
    seller_vars,
    params_tr,
    params_v,
    buyer,
    result,
    cfg.models_per_seller,
    val_in_bag=sellers.in_bag(boots[cfg.omega_tr :], len(buyer)),
    reference=reference_set(cfg, len(buyer)),
  )
  out["timings"] = timings
  # Throughput when the batches ran (recorded in the checkpoints, so a resumed run keeps it);
  # None if some batch was restored from a checkpoint of a version that did not time it.
  seconds = float(np.sum(result.seconds))
  out["images_per_second"] = len(buyer) / seconds if np.isfinite(seconds) and seconds > 0 else None
  out["num_images"] = len(buyer)
  out["data_source"] = {"buyer": buyer.source, "sellers": pool.source}
  out["table_i"] = {
    "noise": list(noise),
    "resample_rate": [sellers.resample_rate(n) for n in noise],
    "paper_accuracy": list(sellers.TABLE_I_ACCURACY[sellers.table_i_family(buyer.name)]),
  }

  if not main:
    return out
  rundir.write_npz(
    os.path.join(workdir, "sanitized.npz"),
    images=result.images.astype(np.float32),
    labels=buyer.labels.astype(np.int32),
    **{data_lib.SANITIZED_KEY: np.array(True)},  # data.load reads it back (pixels outside [0, 1]).
  )
  from jipguard.ipprotect import report  # noqa: PLC0415 (matplotlib only when writing the report)

  report.write_ipprotect_report(workdir, cfg, out, buyer, result)
  rundir.write_json(os.path.join(workdir, "metrics.json"), out)  # Last: its presence means "finished".
  return out


def evaluate(
  model,
  seller_vars,
  params_tr,
  params_v,
  buyer: data_lib.Dataset,
  result: sanitizer.BatchResult,
  models_per_seller: int,
  val_in_bag: np.ndarray | None = None,
  reference: data_lib.Dataset | None = None,
) -> dict[str, Any]:
  """Every metric of a run: utilities, MAE, compliance, risk, ranks, bounds, similarity.

  With ``val_in_bag`` (``N x |Omega_V|``, :func:`sellers.in_bag`), also the buyer's own
  estimate of the sellers' utility error: Omega_V's utilities on the images outside each
  model's bootstrap (``utility_mae_val_oob``, ``utility_bias_val_oob``), which need no seller.
  With ``reference`` (:func:`reference_set`), ``utility_mae_fresh_images``: the sellers' utility MAE
  between the buyer set and as many other real test images.
  """
  x, x_san = buyer.images, result.images
  lo, ls = ensemble.predict(model, seller_vars, x), ensemble.predict(model, seller_vars, x_san)
  u_o, u_s = metrics.utility(lo, buyer.labels), metrics.utility(ls, buyer.labels)
  per_seller = lambda u: u.reshape(-1, models_per_seller).mean(1)
  out = {
    "utility_mae": metrics.utility_mae(u_o, u_s),
    "utility_mae_per_seller_mean": metrics.utility_mae(per_seller(u_o), per_seller(u_s)),
    "seller_utility_original": per_seller(u_o).tolist(),
    "seller_utility_sanitized": per_seller(u_s).tolist(),
    "seller_model_utility_original": u_o.tolist(),
    "seller_model_utility_sanitized": u_s.tolist(),
    "seller_compliance": per_seller(metrics.compliance(lo, ls)).tolist(),
    "utility_bias": float(np.mean(u_s - u_o)),
    "utility_mae_fresh_images": None
    if reference is None
    else metrics.utility_mae(
      u_o, metrics.utility(ensemble.predict(model, seller_vars, reference.images), reference.labels)
    ),
    "rank_correlation": metrics.rank_correlation(per_seller(u_o), per_seller(u_s)),
  }
  for name, params in (("train", params_tr), ("val", params_v)):
    po, ps = ensemble.predict(model, params, x), ensemble.predict(model, params, x_san)
    comp = metrics.compliance(po, ps)
    out[f"compliance_{name}"] = float(comp.mean())
    out[f"risk_{name}"] = float(metrics.estimated_risk(po, ps).mean())
    out[f"utility_mae_{name}"] = metrics.utility_mae(
      metrics.utility(po, buyer.labels), metrics.utility(ps, buyer.labels)
    )
    if name == "val" and val_in_bag is not None:
      oob = ~np.asarray(val_in_bag).T
      if oob.any(axis=1).all():
        vo, vs = metrics.utility(po, buyer.labels, oob), metrics.utility(ps, buyer.labels, oob)
        out["utility_mae_val_oob"] = metrics.utility_mae(vo, vs)
        out["utility_bias_val_oob"] = float(np.mean(vs - vo))
    if name == "val":
      out["compliance_lower_bound"] = metrics.hoeffding_lower_bound(comp, 0.95)
      out["compliance_lower_bound_confidence"] = 0.95
  corr = metrics.pixel_correlation(x, x_san)
  # The cheapest attack: each sanitized image's most correlated buyer image (docs/ipprotect-attacks.md).
  out["linkage"] = attacks.self_linkage(x, x_san, buyer.labels)
  out.update(
    correlation_mean=float(corr.mean()),
    correlation_max=float(corr.max()),
    ssim_mean=float(metrics.ssim(x, x_san).mean()),
    rms_to_original_mean=float(np.sqrt(np.mean(np.square(x - x_san), axis=(1, 2, 3))).mean()),
    sanitized_pixel_range=[float(x_san.min()), float(x_san.max())],
    steps_mean=float(result.steps.mean()),
    steps_max=int(result.steps.max()),
    final_val_loss_mean=float(np.nanmean(result.val_loss)) if np.isfinite(result.val_loss).any() else None,
  )
  return out
