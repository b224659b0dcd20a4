"""The studies of anti-neuron watermarking (paper 003, section 5): multi-user, sweeps, defences.

Each study is a function of a frozen config (:class:`MultiuserConfig`, :class:`SweepConfig`,
:class:`DefencesConfig`) and a run directory, where it writes config.json, metrics.json,
report.md, PNG figures, ``results/`` (finished grid searches and sweep points) and
``checkpoints/`` (trained learners). Rerunning a study resumes: trained learners come from
checkpoints/, finished grid searches and sweep points from results/; a directory that holds
another configuration is refused. ``experiments/watermark.py`` (``cli.main``) runs them.

Data: a named dataset or a path (``data.load``); grey images are tinted with random per-image
colours (``lct.colorize``), RGB ones (``cifar10``) used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from jipguard import data, ensemble, rundir
from jipguard.watermark import lct, learner, report, verifier

LCT_KINDS = ("same", "per_user")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What every watermark study depends on (written to config.json)."""

  dataset: str = "fashion_mnist"  # A data.load name (fashion_mnist: Debian's IDX files) or a path.
  data_dir: str | None = None  # Local copy / tfds data_dir of a named dataset.
  train_size: int = 10_000  # The learner's training images (the first of the train split).
  model: str = "mlp"  # The learner's architecture (models.MODELS).
  epochs: int = 60  # Learner epochs.
  batch_size: int = 128  # Learner minibatch.
  lr: float = 2e-3  # Peak Adam learning rate (cosine decay).
  augment: str = "flip"  # learner.NAMED_AUGMENTS (crop_flip is the paper's default for ResNets).
  per_user: int = 100  # Images per marked user (1% of 10,000).
  heldout_users: int = 100  # Held-out users (test split), never trained on.
  heldout_per_user: int = 100  # Images per held-out user.
  grid_step: float = 2.0  # Grid over [0, 360) in this step (degrees).
  tau: float = lct.PAPER_TAU  # Match if |k^ - k*| < tau.
  signature: float = 60.0  # k* of the single-user studies.
  seed: int = 0  # Seed of users, signatures, learners.

  def __post_init__(self):
    if self.augment not in learner.NAMED_AUGMENTS:
      raise ValueError(f"augment must be one of {sorted(learner.NAMED_AUGMENTS)}, got {self.augment!r}")
    for name in ("train_size", "epochs", "batch_size", "per_user", "heldout_users", "heldout_per_user"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 < self.grid_step <= 360 or not self.tau > 0:
      raise ValueError(f"grid_step must be in (0, 360] and tau > 0, got {self.grid_step}, {self.tau}")


@dataclasses.dataclass(frozen=True)
class MultiuserConfig(StudyConfig):
  """Many users with random signatures, held-out users, MIA baselines (sections 5.2, 5.4, 5.5)."""

  num_users: int = 24  # Marked users.
  lct: str = "same"  # "same" (T_YIQ for all) or "per_user" (T_u ~ U(-1, 1)).
  gradient: bool = False  # Also gradient search for every member user.
  mia_users: int = 10  # Member + held-out users given shadow models (0: skip).
  shadow_epochs: int = 30  # Epochs of the shadow models.

  def __post_init__(self):
    super().__post_init__()
    if self.lct not in LCT_KINDS:
      raise ValueError(f"lct must be one of {LCT_KINDS}, got {self.lct!r}")


@dataclasses.dataclass(frozen=True)
class SweepConfig(StudyConfig):
  """One marked user; one factor varied (``SWEEPS``)."""

  vary: str = "num_marked"  # A key of SWEEPS.

  def __post_init__(self):
    super().__post_init__()
    if self.vary not in SWEEPS:
      raise ValueError(f"vary must be one of {sorted(SWEEPS)}, got {self.vary!r}")


@dataclasses.dataclass(frozen=True)
class DefencesConfig(StudyConfig):
  """Magnitude pruning and fine-tuning of a learner trained with one marked user (section 5.3)."""

  finetune_epochs: int = 10  # Epochs of fine-tuning on clean data.


STUDIES = {"multiuser": MultiuserConfig, "sweep": SweepConfig, "defences": DefencesConfig}


def study_name(cfg: StudyConfig) -> str:
  """The study a config is of (a key of :data:`STUDIES`)."""
  return next(name for name, cls in STUDIES.items() if type(cfg) is cls)


def _config(cfg: StudyConfig) -> dict[str, Any]:
  return {"study": study_name(cfg), **dataclasses.asdict(cfg)}


def _setup(workdir: str, cfg: StudyConfig) -> None:
  """config.json (refusing another configuration) and results/."""
  rundir.write_config(workdir, _config(cfg))
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)


def load_colour(name: str, data_dir: str | None, seed: int) -> tuple[data.Dataset, data.Dataset]:
  """Train and test splits as RGB: grey datasets are tinted (``lct.colorize``), RGB ones kept."""
  kw = {"data_dir": data_dir} if data_dir else {}
  out = []
  for i, split in enumerate(("train", "test")):
    ds = data.load(name, split, **kw)
    if ds.images.shape[-1] == 1:
      ds = dataclasses.replace(
        ds,
        images=lct.colorize(seed + i, ds.images, ds.labels, ds.num_classes),
        source=ds.source + " (tinted by watermark.lct.colorize)",
      )
    out.append(ds)
  return out[0], out[1]


def cached_point(path: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """The JSON point at ``path``; computed by ``fn()`` and written first when absent (a finished
  point is never redone)."""
  if not os.path.exists(path):
    rundir.write_json(path, fn())
  return rundir.read_json(path)


def accuracy_on(model, variables, ds: data.Dataset) -> float:
  """Accuracy of one model on a dataset."""
  return float(np.mean(np.argmax(learner.logits(model, variables, ds.images), -1) == ds.labels))


def cached(path: str, fn):
  """``fn()`` saved as npz at ``path`` (a finished step is never redone)."""
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  out = {k: np.asarray(v) for k, v in fn().items()}
  rundir.write_atomic(path, lambda tmp: np.savez(tmp, **out))
  return out


def verify_users(model, variables, x, y, users, transforms, sigs, chunk=None) -> np.ndarray:
  """Mean loss per user and signature, ``U x K``: one call when all users share T_YIQ
  (``chunk``: ``verifier.signature_losses``'s, default ``verifier.default_chunk``)."""
  if transforms is None:
    flat = users.reshape(-1)
    l = verifier.signature_losses(model, variables, x[flat], y[flat], sigs, chunk=chunk)
    return l.reshape(len(sigs), *users.shape).mean(-1).T
  return np.stack(
    [
      verifier.signature_losses(model, variables, x[u], y[u], sigs, watermark=lct.Watermark.hue(t), chunk=chunk).mean(1)
      for u, t in zip(users, transforms)
    ]
  )


def check_user_counts(
  cfg: StudyConfig, n_train: int, n_test: int, num_users: int, per_user: int, *, test_split: str = "test split"
) -> None:
  """ValueError naming the flags when a split cannot hold its users' disjoint images (checked
  before any training, so a run does not train a learner it cannot verify). ``n_test``: the
  test images the held-out users may take, called ``test_split`` in the message."""
  needs = (
    (
      "train split (up to --train_size)",
      n_train,
      num_users,
      per_user,
      "--num_users x --per_user (or a larger --train_size)",
    ),
    (test_split, n_test, cfg.heldout_users, cfg.heldout_per_user, "--heldout_users x --heldout_per_user"),
  )
  for split, n, users, per, flags in needs:
    if users * per > n:
      raise ValueError(
        f"{flags} = {users} x {per} = {users * per} images, but the {split} of {cfg.dataset} has {n}: lower them"
      )


def multiuser(cfg: MultiuserConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """``num_users`` users mark their images with random signatures of the paper's space; one
  learner trains on the pool; every member user's and held-out user's signature is recovered
  by grid search (and gradient search); MIA baselines with shadow models. Returns metrics.json's
  dict (matching accuracy, false-match rate, held-out |k^|, MIA accuracies, adv^P)."""
  t_start = time.time()
  _setup(workdir, cfg)
  train, test = load_colour(cfg.dataset, cfg.data_dir, cfg.seed)
  train = train.subset(slice(0, cfg.train_size))
  check_user_counts(cfg, len(train), len(test), cfg.num_users, cfg.per_user)
  rng = np.random.default_rng(cfg.seed)
  users = lct.assign_users(cfg.seed, len(train), cfg.num_users, cfg.per_user)
  held = lct.assign_users(cfg.seed + 1, len(test), cfg.heldout_users, cfg.heldout_per_user)
  k_star = rng.choice(lct.PAPER_SPACE, cfg.num_users)
  k_claim = rng.choice(lct.PAPER_SPACE, cfg.heldout_users)  # What a held-out user would claim.
  t_users = t_held = None
  if cfg.lct == "per_user":
    t_users = np.stack([lct.user_transform(jax.random.key(10_000 + cfg.seed * 1000 + u)) for u in range(cfg.num_users)])
    t_held = np.stack(
      [lct.user_transform(jax.random.key(20_000 + cfg.seed * 1000 + u)) for u in range(cfg.heldout_users)]
    )
  marked = lct.mark_users(train.images, users, k_star, t_users)
  lcfg = learner.LearnerConfig(
    model=cfg.model,
    epochs=cfg.epochs,
    batch_size=cfg.batch_size,
    learning_rate=cfg.lr,
    augment=learner.NAMED_AUGMENTS[cfg.augment],
  )
  t0 = time.time()
  model, state, hist = learner.train_learners(
    lcfg,
    jax.random.split(jax.random.key(cfg.seed), 1),
    marked,
    train.labels,
    train.num_classes,
    checkpoint_dir=os.path.join(workdir, "checkpoints", "learner"),
    metrics_log=os.path.join(workdir, "metrics.jsonl"),
    progress=progress,
  )
  train_s = time.time() - t0
  v = learner.member_variables(state, 0)
  learner.save_model(os.path.join(workdir, "model"), cfg.model, train.num_classes, train.image_shape, v)
  test_acc = accuracy_on(model, v, test)
  sigs = np.arange(0, 360, cfg.grid_step, dtype=np.float32)
  t0 = time.time()
  g_m = cached(
    os.path.join(workdir, "results", "grid_members.npz"),
    lambda: {"losses": verify_users(model, v, train.images, train.labels, users, t_users, sigs)},
  )["losses"]
  g_h = cached(
    os.path.join(workdir, "results", "grid_heldout.npz"),
    lambda: {"losses": verify_users(model, v, test.images, test.labels, held, t_held, sigs)},
  )["losses"]
  grid_s = time.time() - t0
  rec_m, rec_h = sigs[np.argmin(g_m, 1)], sigs[np.argmin(g_h, 1)]
  slot = np.concatenate([[0.0], lct.PAPER_SPACE])  # The paper's 12-slot space with the null slot.
  slot_idx = np.searchsorted(sigs, slot)
  ok_slots = np.all(sigs[np.clip(slot_idx, 0, len(sigs) - 1)] == slot)
  match_m = verifier.match(rec_m, k_star, cfg.tau)
  false_h = verifier.match(rec_h, k_claim, cfg.tau)
  m = dict(
    test_accuracy=test_acc,
    final_train_loss=hist[-1]["loss"][0] if hist else None,
    matching_accuracy=float(match_m.mean()),
    num_users=cfg.num_users,
    false_match_rate=float(false_h.mean()),
    num_heldout_users=cfg.heldout_users,
    heldout_non_null_rate=float((verifier.distance(rec_h, 0) >= cfg.tau).mean()),
    **heldout_distance(rec_h),
    member_abs_error_mean=float(verifier.distance(rec_m, k_star).mean()),
    recovered_members=rec_m.tolist(),
    private_members=k_star.tolist(),
    recovered_heldout=rec_h.tolist(),
    adv_p_anw_members=verifier.adv_p(match_m, 2 * cfg.tau / 360),
    train_seconds=train_s,
    grid_seconds=grid_s,
  )
  if ok_slots:
    rec_slot_m = slot[np.argmin(g_m[:, slot_idx], 1)]
    rec_slot_h = slot[np.argmin(g_h[:, slot_idx], 1)]
    m.update(
      slot_matching_accuracy=float(verifier.match(rec_slot_m, k_star, cfg.tau).mean()),
      slot_false_match_rate=float(verifier.match(rec_slot_h, k_claim, cfg.tau).mean()),
      slot_heldout_null_rate=float((rec_slot_h == 0).mean()),
    )
  if cfg.gradient:
    t0 = time.time()
    gs = cached(
      os.path.join(workdir, "results", "gradient_members.npz"),
      lambda: {
        "best": np.array(
          [
            verifier.gradient_search(
              model,
              v,
              train.images[u],
              train.labels[u],
              watermark=None if t_users is None else lct.Watermark.hue(t_users[i]),
            )[0]
            for i, u in enumerate(users)
          ]
        )
      },
    )["best"]
    m.update(
      gradient_matching_accuracy=float(verifier.match(gs, k_star, cfg.tau).mean()),
      gradient_abs_error_mean=float(verifier.distance(gs, k_star).mean()),
      gradient_recovered=gs.tolist(),
      gradient_seconds=time.time() - t0,
    )
  if cfg.mia_users:
    m.update(mia(cfg, workdir, model, v, train, test, users, held, marked, progress=progress))
  m["total_seconds"] = time.time() - t_start
  rundir.write_json(os.path.join(workdir, "metrics.json"), m)
  n = min(6, cfg.num_users)
  report.loss_plot(
    os.path.join(workdir, "members.png"),
    [(f"user {u} k*={k_star[u]:.0f}", sigs, g_m[u], k_star[u]) for u in range(n)],
    cfg.tau,
    f"{cfg.num_users} users ({cfg.lct} LCT): loss vs signature",
  )
  report.loss_plot(
    os.path.join(workdir, "heldout.png"),
    [(f"held-out {u}", sigs, g_h[u], 0.0) for u in range(n)],
    cfg.tau,
    "held-out users (images never used): k* = 0 (no watermark)",
  )
  report.write_report(
    workdir,
    "Multi-user anti-neuron watermarking",
    _config(cfg),
    m,
    ["members.png", "heldout.png"] + (["mia.png"] if cfg.mia_users else []),
  )
  return m


def mia(
  cfg: MultiuserConfig, workdir: str, model, v, train, test, users, held, marked, *, progress: bool = True
) -> dict[str, Any]:
  """MIA-std / MIA-pow with per-user shadow models (section 5.5 (ii)) vs ANW, and adv^P."""
  u = min(cfg.mia_users, len(users), len(held))
  pool = np.concatenate([marked[users[:u].reshape(-1)], test.images[held[:u].reshape(-1)]])
  pool_y = np.concatenate([train.labels[users[:u].reshape(-1)], test.labels[held[:u].reshape(-1)]])
  p_m, p_h = users.shape[1], held.shape[1]
  idx_full = [np.arange(i * p_m, (i + 1) * p_m) for i in range(u)] + [
    u * p_m + np.arange(i * p_h, (i + 1) * p_h) for i in range(u)
  ]
  s = min(len(i) for i in idx_full)
  idx_full = np.stack([i[:s] for i in idx_full])
  idx_half = idx_full[:, : s // 2]  # MIA-pow: the shadow trains on half, the other half is "out".
  scfg = learner.LearnerConfig(
    model=cfg.model,
    epochs=cfg.shadow_epochs,
    batch_size=min(32, s // 2),
    learning_rate=cfg.lr,
    augment=learner.NAMED_AUGMENTS[cfg.augment],
  )
  keys = jax.random.split(jax.random.key(cfg.seed + 99), 2 * u)
  ck = os.path.join(workdir, "checkpoints")
  sm, s_full, _ = learner.train_learners(
    scfg,
    keys,
    pool,
    pool_y,
    train.num_classes,
    idx_full,
    checkpoint_dir=os.path.join(ck, "shadow_std"),
    desc="shadow std",
    metrics_log=os.path.join(workdir, "metrics.jsonl"),
    progress=progress,
  )
  _, s_half, _ = learner.train_learners(
    scfg,
    keys,
    pool,
    pool_y,
    train.num_classes,
    idx_half,
    checkpoint_dir=os.path.join(ck, "shadow_pow"),
    desc="shadow pow",
    metrics_log=os.path.join(workdir, "metrics.jsonl"),
    progress=progress,
  )
  # MIAs query the learner with the exact images it was trained on (member users' marked copies),
  # their best case; held-out users' images were never used.
  target = learner.per_example_losses(model, v, pool, pool_y)
  truth = np.concatenate([np.ones(u, bool), np.zeros(u, bool)])
  std_pred, pow_pred, std_sample, pow_sample = [], [], [], []
  for i in range(2 * u):
    own = idx_full[i]
    sh_full = learner.per_example_losses(sm, learner.member_variables(s_full, i), pool[own], pool_y[own])
    sh_half = learner.per_example_losses(sm, learner.member_variables(s_half, i), pool[own], pool_y[own])
    t_std = verifier.mia_std_threshold(sh_full)
    t_pow = verifier.mia_pow_threshold(sh_half[: s // 2], sh_half[s // 2 :])
    std_sample.append(np.mean((target[own] < t_std) == truth[i]))
    pow_sample.append(np.mean((target[own] < t_pow) == truth[i]))
    std_pred.append(np.mean(target[own] < t_std) > 0.5)
    pow_pred.append(np.mean(target[own] < t_pow) > 0.5)
  std_ok, pow_ok = np.array(std_pred) == truth, np.array(pow_pred) == truth
  shadow0 = learner.per_example_losses(sm, learner.member_variables(s_full, 0), pool[idx_full[0]], pool_y[idx_full[0]])
  report.loss_histogram(
    os.path.join(workdir, "mia.png"), target[: u * p_m], target[u * p_m :], verifier.mia_std_threshold(shadow0)
  )
  return dict(
    mia_users_each=u,
    mia_std_user_accuracy=float(std_ok.mean()),
    mia_pow_user_accuracy=float(pow_ok.mean()),
    mia_std_sample_accuracy=float(np.mean(std_sample)),
    mia_pow_sample_accuracy=float(np.mean(pow_sample)),
    adv_p_mia_std=verifier.adv_p(std_ok, 0.5),
    adv_p_mia_pow=verifier.adv_p(pow_ok, 0.5),
  )


# ------------------------------------------------------------------ single-user sweeps


def single_point(
  cfg: StudyConfig, train, test, *, model_name, k_star, num_marked, augment, key, workdir, name, progress: bool = True
):
  """Trains one learner on the pool with one user's ``num_marked`` images marked ``k_star``
  (checkpoints in ``workdir/checkpoints/name``, epochs in ``workdir/metrics.jsonl``):
  ``(model, its variables, the user's image indices)``."""
  users = lct.assign_users(cfg.seed, len(train), 1, num_marked)
  marked = lct.mark_users(train.images, users, [k_star])
  lcfg = learner.LearnerConfig(
    model=model_name, epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.lr, augment=augment
  )
  model, state, _ = learner.train_learners(
    lcfg,
    jax.random.split(jax.random.key(key), 1),
    marked,
    train.labels,
    train.num_classes,
    checkpoint_dir=os.path.join(workdir, "checkpoints", name),
    metrics_log=os.path.join(workdir, "metrics.jsonl"),
    desc=name,
    progress=progress,
  )
  return model, learner.member_variables(state, 0), users


def heldout_distance(recovered_U: np.ndarray) -> dict[str, float | None]:
  """Mean and standard deviation (ddof 1; None for one user) of held-out users' ``|k^ - 0|``,
  the paper's 4.3 +- 1.4 degrees."""
  d = verifier.distance(np.asarray(recovered_U, np.float64), 0)
  return dict(
    heldout_abs_recovered_mean=float(d.mean()),
    heldout_abs_recovered_std=float(d.std(ddof=1)) if len(d) > 1 else None,
  )


def grid_point(cfg: StudyConfig, model, v, train, test, users, k_star) -> dict[str, Any]:
  """Grid search for the marked user and for the held-out users of one learner."""
  sigs = np.arange(0, 360, cfg.grid_step, dtype=np.float32)
  g = verify_users(model, v, train.images, train.labels, users, None, sigs)[0]
  held = lct.assign_users(cfg.seed + 1, len(test), cfg.heldout_users, cfg.heldout_per_user)
  gh = verify_users(model, v, test.images, test.labels, held, None, sigs)
  rec, rec_h = float(sigs[np.argmin(g)]), sigs[np.argmin(gh, 1)]
  return dict(
    k_star=float(k_star),
    recovered=rec,
    match=bool(verifier.match(rec, k_star, cfg.tau)),
    heldout_recovered=rec_h.tolist(),
    heldout_non_null=float((verifier.distance(rec_h, 0) >= cfg.tau).mean()),
    signatures=sigs.tolist(),
    losses=g.tolist(),
  )


# The points of each single-user sweep: what each varies from the study's defaults.
SWEEPS = {
  "num_marked": tuple(dict(num_marked=n) for n in (5, 20, 50, 100, 200)),
  "signature": tuple(dict(k_star=float(k)) for k in lct.PAPER_SPACE[::2]),
  "model": tuple(dict(model_name=m) for m in ("mlp", "resnet8")),
  "augment": tuple(dict(augment=n) for n in learner.NAMED_AUGMENTS),
}


def sweep(cfg: SweepConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """One learner per point of ``SWEEPS[cfg.vary]``, each with one marked user: recovered
  signature, match, held-out users' recovered signatures. Returns metrics.json's dict."""
  _setup(workdir, cfg)
  train, test = load_colour(cfg.dataset, cfg.data_dir, cfg.seed)
  train = train.subset(slice(0, cfg.train_size))
  check_user_counts(
    cfg, len(train), len(test), 1, max(over.get("num_marked", cfg.per_user) for over in SWEEPS[cfg.vary])
  )
  points = []
  for over in SWEEPS[cfg.vary]:
    p = {**dict(model_name=cfg.model, k_star=cfg.signature, num_marked=cfg.per_user, augment=cfg.augment), **over}
    name = "-".join(f"{k}={v}" for k, v in over.items())

    def point(p=p, name=name):
      t0 = time.time()
      model, v, users = single_point(
        cfg,
        train,
        test,
        model_name=p["model_name"],
        k_star=p["k_star"],
        num_marked=p["num_marked"],
        augment=learner.NAMED_AUGMENTS[p["augment"]],
        key=cfg.seed,
        workdir=workdir,
        name=name,
        progress=progress,
      )
      r = grid_point(cfg, model, v, train, test, users, p["k_star"])
      return {**p, **r, "name": name, "seconds": time.time() - t0}

    points.append(cached_point(os.path.join(workdir, "results", f"{name}.json"), point))
  m = {
    "points": [
      {**{k: v for k, v in q.items() if k not in ("signatures", "losses")}, **heldout_distance(q["heldout_recovered"])}
      for q in points
    ],
    "matching_accuracy": float(np.mean([q["match"] for q in points])),
  }
  rundir.write_json(os.path.join(workdir, "metrics.json"), m)
  report.loss_plot(
    os.path.join(workdir, "losses.png"),
    [(q["name"], np.array(q["signatures"]), np.array(q["losses"]), q["k_star"]) for q in points],
    cfg.tau,
    f"varying {cfg.vary}",
  )
  report.write_report(workdir, f"Sweep over {cfg.vary}", _config(cfg), m, ["losses.png"])
  return m


def defences(cfg: DefencesConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Magnitude pruning (30-90% of every kernel) and fine-tuning on clean data of a learner
  trained with one marked user: test accuracy and the recovered signature after each.
  Returns metrics.json's dict."""
  _setup(workdir, cfg)
  train, test = load_colour(cfg.dataset, cfg.data_dir, cfg.seed)
  train = train.subset(slice(0, cfg.train_size))
  # The fine-tuned learner is verified on the test split's second half (the first fine-tunes it).
  held = len(test) - len(test) // 2
  check_user_counts(cfg, len(train), held, 1, cfg.per_user, test_split="held-out half of the test split")
  model, v, users = single_point(
    cfg,
    train,
    test,
    model_name=cfg.model,
    k_star=cfg.signature,
    num_marked=cfg.per_user,
    augment=learner.NAMED_AUGMENTS[cfg.augment],
    key=cfg.seed,
    workdir=workdir,
    name="learner",
    progress=progress,
  )

  def scored(name: str, variables, test_set: data.Dataset) -> dict[str, Any]:
    return {
      "name": name,
      "test_accuracy": accuracy_on(model, variables, test_set),
      **grid_point(cfg, model, variables, train, test_set, users, cfg.signature),
    }

  points = [
    cached_point(
      os.path.join(workdir, "results", f"prune={frac}.json"),
      lambda frac=frac: scored(f"prune={frac}", learner.prune(v, frac), test),
    )
    for frac in (0.0, 0.3, 0.5, 0.7, 0.9)
  ]

  def finetuned() -> dict[str, Any]:
    # Fine-tuning on clean data the learner did not train on (the first half of the test split).
    half = len(test) // 2
    state0 = jax.tree.map(lambda x: x[None], v)
    init = ensemble.EnsembleState(params=state0["params"], batch_stats=state0.get("batch_stats", {}), opt_state=None)
    fcfg = learner.LearnerConfig(
      model=cfg.model,
      epochs=cfg.finetune_epochs,
      batch_size=cfg.batch_size,
      learning_rate=cfg.lr / 10,
      augment=learner.NAMED_AUGMENTS[cfg.augment],
    )
    _, fs, _ = learner.train_learners(
      fcfg,
      jax.random.split(jax.random.key(cfg.seed + 5), 1),
      test.images[:half],
      test.labels[:half],
      test.num_classes,
      init_state=init,
      checkpoint_dir=os.path.join(workdir, "checkpoints", "finetune"),
      metrics_log=os.path.join(workdir, "metrics.jsonl"),
      desc="finetune",
      progress=progress,
    )
    return scored(f"finetune={cfg.finetune_epochs}", learner.member_variables(fs, 0), test.subset(slice(half, None)))

  points.append(cached_point(os.path.join(workdir, "results", f"finetune={cfg.finetune_epochs}.json"), finetuned))
  m = {"points": [{k: v for k, v in q.items() if k not in ("signatures", "losses")} for q in points]}
  rundir.write_json(os.path.join(workdir, "metrics.json"), m)
  report.loss_plot(
    os.path.join(workdir, "defences.png"),
    [(q["name"], np.array(q["signatures"]), np.array(q["losses"]), q["k_star"]) for q in points],
    cfg.tau,
    "pruning and fine-tuning",
  )
  report.write_report(workdir, "Defences: pruning and fine-tuning", _config(cfg), m, ["defences.png"])
  return m
