"""Anti-neuron watermarking (paper 003): studies, and the mark / verify tools.

    # A person marking and checking images:
    python experiments/watermark.py mark --input my.npz --signature 60 --output my_marked.npz
    python experiments/watermark.py verify --model runs/wm-multiuser/model --images my.npz --signature 60

    # Studies (each writes a run directory: config.json, metrics.json, report.md, PNGs, checkpoints/):
    python experiments/watermark.py multiuser        # 24 users x 1% + 100 held-out users, MIA baselines
    python experiments/watermark.py multiuser --lct per_user
    python experiments/watermark.py sweep --vary num_marked     # or signature, model, augment
    python experiments/watermark.py defences                    # magnitude pruning, fine-tuning

Data: Fashion-MNIST (Debian's IDX files; ``--dataset fashion_mnist_subset`` for the embedded
copy) tinted with random per-image colours (``watermark.colorize``), or ``cifar10`` through
tfds (``--dataset cifar10 --data_dir ...``), used as is. Rerunning a command resumes: trained
learners come from checkpoints/, finished grid searches and sweep points from results/.
Run times and results on the 2-core development machine are in docs/watermark.md. For
example, `multiuser` with the defaults (MLP, 60 epochs, flips) took 585 s on a loaded 2-core
CPU. It reached a matching accuracy of 0.83 over 24 users, a false-match rate of 0.01 over 100
held-out users and held-out |k^ - 0| = 4.2 +- 3.6 degrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jipguard import __version__, data, distributed, ensemble, report
from jipguard import pipeline
from jipguard import watermark as wm

plt = report.plt


# ------------------------------------------------------------------------------ data


def load_colour(name: str, data_dir: str | None, seed: int) -> tuple[data.Dataset, data.Dataset]:
  """Train and test splits as RGB: grey datasets are tinted (``colorize``), RGB ones kept."""
  kw = {"data_dir": data_dir} if data_dir else {}
  out = []
  for i, split in enumerate(("train", "test")):
    ds = data.load(name, split, **kw)
    if ds.images.shape[-1] == 1:
      ds = dataclasses.replace(ds, images=wm.colorize(seed + i, ds.images, ds.labels, ds.num_classes),
                               source=ds.source + " (tinted by watermark.colorize)")
    out.append(ds)
  return out[0], out[1]


def run_dir_setup(workdir: str, cfg: dict[str, Any]) -> None:
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  cfg = {**cfg, "jipguard_version": __version__, "devices": [str(d) for d in jax.devices()]}
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    keep = {k: v for k, v in old.items() if k not in ("devices",)}
    new = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in ("devices",)}
    if keep != new:
      diff = sorted(k for k in set(keep) | set(new) if keep.get(k) != new.get(k))
      raise SystemExit(f"{workdir} holds a run of another configuration (differs in {diff}); "
                       "use another --workdir")
  pipeline.write_json(path, cfg)


def cached(path: str, fn):
  """``fn()`` saved as npz at ``path`` (a finished step is never redone)."""
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  out = {k: np.asarray(v) for k, v in fn().items()}
  pipeline.write_atomic(path, lambda tmp: np.savez(tmp, **out))
  return out


def loss_plot(path: str, curves: list[tuple[str, np.ndarray, np.ndarray, float]], tau: float, title: str) -> None:
  """Fig-2-style plot: mean loss vs signature distance ``k - k*``, match region shaded."""
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for label, sigs, losses, k_star in curves:
    d = (sigs - k_star + 180) % 360 - 180
    order = np.argsort(d)
    line, = ax.plot(d[order], losses[order], label=label, lw=1.2)
    i = int(np.argmin(losses))
    ax.plot(d[i], losses[i], "s", color=line.get_color())
  ax.axvspan(-tau, tau, color="tab:green", alpha=0.15, label="match |k - k*| < tau")
  ax.set_xlabel("k - k* (degrees)")
  ax.set_ylabel("mean loss of the user's images")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.legend(fontsize=6, ncol=2)
  report.save_figure(fig, path)


# ------------------------------------------------------------------------ multi-user


def verify_users(model, variables, x, y, users, transforms, sigs, chunk=None) -> np.ndarray:
  """Mean loss per user and signature, ``U x K``: one call when all users share T_YIQ
  (``chunk``: ``watermark.signature_losses``'s, default ``watermark.default_chunk``)."""
  if transforms is None:
    flat = users.reshape(-1)
    l = wm.signature_losses(model, variables, x[flat], y[flat], sigs, chunk=chunk)
    return l.reshape(len(sigs), *users.shape).mean(-1).T
  return np.stack([wm.signature_losses(model, variables, x[u], y[u], sigs, watermark=wm.Watermark.hue(t),
                                       chunk=chunk).mean(1) for u, t in zip(users, transforms)])


def check_user_counts(a, n_train: int, n_test: int, num_users: int, per_user: int) -> None:
  """ValueError naming the flags when a split cannot hold its users' disjoint images (checked
  before any training, so a run does not train a learner it cannot verify)."""
  needs = (("train split (up to --train_size)", n_train, num_users, per_user,
            "--num_users x --per_user (or a larger --train_size)"),
           ("test split", n_test, a.heldout_users, a.heldout_per_user, "--heldout_users x --heldout_per_user"))
  for split, n, users, per, flags in needs:
    if users * per > n:
      raise ValueError(f"{flags} = {users} x {per} = {users * per} images, but the {split} of {a.dataset} "
                       f"has {n}: lower them")


def multiuser(a) -> dict[str, Any]:
  t_start = time.time()
  cfg = dict(study="multiuser", dataset=a.dataset, train_size=a.train_size, num_users=a.num_users,
             per_user=a.per_user, heldout_users=a.heldout_users, heldout_per_user=a.heldout_per_user,
             lct=a.lct, model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, augment=a.augment,
             grid_step=a.grid_step, tau=a.tau, seed=a.seed, mia_users=a.mia_users, shadow_epochs=a.shadow_epochs)
  run_dir_setup(a.workdir, cfg)
  train, test = load_colour(a.dataset, a.data_dir, a.seed)
  train = train.subset(slice(0, a.train_size))
  check_user_counts(a, len(train), len(test), a.num_users, a.per_user)
  rng = np.random.default_rng(a.seed)
  users = wm.assign_users(a.seed, len(train), a.num_users, a.per_user)
  held = wm.assign_users(a.seed + 1, len(test), a.heldout_users, a.heldout_per_user)
  k_star = rng.choice(wm.PAPER_SPACE, a.num_users)
  k_claim = rng.choice(wm.PAPER_SPACE, a.heldout_users)  # What a held-out user would claim.
  t_users = t_held = None
  if a.lct == "per_user":
    t_users = np.stack([wm.user_transform(jax.random.key(10_000 + a.seed * 1000 + u)) for u in range(a.num_users)])
    t_held = np.stack([wm.user_transform(jax.random.key(20_000 + a.seed * 1000 + u)) for u in range(a.heldout_users)])
  marked = wm.mark_users(train.images, users, k_star, t_users)
  lcfg = wm.LearnerConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr,
                          augment=wm.NAMED_AUGMENTS[a.augment])
  t0 = time.time()
  model, state, hist = wm.train_learners(lcfg, jax.random.split(jax.random.key(a.seed), 1), marked, train.labels,
                                         train.num_classes, checkpoint_dir=os.path.join(a.workdir, "checkpoints", "learner"))
  train_s = time.time() - t0
  v = wm.member_variables(state, 0)
  wm.save_model(os.path.join(a.workdir, "model"), a.model, train.num_classes, train.image_shape, v)
  test_acc = float(np.mean(np.argmax(np.asarray(wm.logits(model, v, test.images)), -1) == test.labels))
  sigs = np.arange(0, 360, a.grid_step, dtype=np.float32)
  t0 = time.time()
  g_m = cached(os.path.join(a.workdir, "results", "grid_members.npz"),
               lambda: {"losses": verify_users(model, v, train.images, train.labels, users, t_users, sigs)})["losses"]
  g_h = cached(os.path.join(a.workdir, "results", "grid_heldout.npz"),
               lambda: {"losses": verify_users(model, v, test.images, test.labels, held, t_held, sigs)})["losses"]
  grid_s = time.time() - t0
  rec_m, rec_h = sigs[np.argmin(g_m, 1)], sigs[np.argmin(g_h, 1)]
  slot = np.concatenate([[0.0], wm.PAPER_SPACE])  # The paper's 12-slot space with the null slot.
  slot_idx = np.searchsorted(sigs, slot)
  ok_slots = np.all(sigs[np.clip(slot_idx, 0, len(sigs) - 1)] == slot)
  match_m = wm.match(rec_m, k_star, a.tau)
  false_h = wm.match(rec_h, k_claim, a.tau)
  m = dict(
      test_accuracy=test_acc, final_train_loss=hist[-1]["loss"][0] if hist else None,
      matching_accuracy=float(match_m.mean()), num_users=a.num_users,
      false_match_rate=float(false_h.mean()), num_heldout_users=a.heldout_users,
      heldout_non_null_rate=float((wm.distance(rec_h, 0) >= a.tau).mean()),
      heldout_abs_recovered_mean=float(wm.distance(rec_h, 0).mean()),
      heldout_abs_recovered_std=float(wm.distance(rec_h, 0).std()),
      member_abs_error_mean=float(wm.distance(rec_m, k_star).mean()),
      recovered_members=rec_m.tolist(), private_members=k_star.tolist(), recovered_heldout=rec_h.tolist(),
      adv_p_anw_members=wm.adv_p(match_m, 2 * a.tau / 360), train_seconds=train_s, grid_seconds=grid_s,
  )
  if ok_slots:
    rec_slot_m = slot[np.argmin(g_m[:, slot_idx], 1)]
    rec_slot_h = slot[np.argmin(g_h[:, slot_idx], 1)]
    m.update(slot_matching_accuracy=float(wm.match(rec_slot_m, k_star, a.tau).mean()),
             slot_false_match_rate=float(wm.match(rec_slot_h, k_claim, a.tau).mean()),
             slot_heldout_null_rate=float((rec_slot_h == 0).mean()))
  if a.gradient:
    t0 = time.time()
    gs = cached(os.path.join(a.workdir, "results", "gradient_members.npz"), lambda: {"best": np.array([
        wm.gradient_search(model, v, train.images[u], train.labels[u],
                           watermark=None if t_users is None else wm.Watermark.hue(t_users[i]))[0]
        for i, u in enumerate(users)])})["best"]
    m.update(gradient_matching_accuracy=float(wm.match(gs, k_star, a.tau).mean()),
             gradient_abs_error_mean=float(wm.distance(gs, k_star).mean()), gradient_recovered=gs.tolist(),
             gradient_seconds=time.time() - t0)
  if a.mia_users:
    m.update(mia(a, model, v, train, test, users, held, marked))
  m["total_seconds"] = time.time() - t_start
  pipeline.write_json(os.path.join(a.workdir, "metrics.json"), m)
  n = min(6, a.num_users)
  loss_plot(os.path.join(a.workdir, "members.png"),
            [(f"user {u} k*={k_star[u]:.0f}", sigs, g_m[u], k_star[u]) for u in range(n)], a.tau,
            f"{a.num_users} users ({a.lct} LCT): loss vs signature")
  loss_plot(os.path.join(a.workdir, "heldout.png"),
            [(f"held-out {u}", sigs, g_h[u], 0.0) for u in range(n)], a.tau,
            "held-out users (images never used): k* = 0 (no watermark)")
  write_report(a.workdir, "Multi-user anti-neuron watermarking", cfg, m,
               ["members.png", "heldout.png"] + (["mia.png"] if a.mia_users else []))
  return m


def mia(a, model, v, train, test, users, held, marked) -> dict[str, Any]:
  """MIA-std / MIA-pow with per-user shadow models (section 5.5 (ii)) vs ANW, and adv^P."""
  u = min(a.mia_users, len(users), len(held))
  pool = np.concatenate([marked[users[:u].reshape(-1)], test.images[held[:u].reshape(-1)]])
  pool_y = np.concatenate([train.labels[users[:u].reshape(-1)], test.labels[held[:u].reshape(-1)]])
  p_m, p_h = users.shape[1], held.shape[1]
  idx_full = [np.arange(i * p_m, (i + 1) * p_m) for i in range(u)] + \
             [u * p_m + np.arange(i * p_h, (i + 1) * p_h) for i in range(u)]
  s = min(len(i) for i in idx_full)
  idx_full = np.stack([i[:s] for i in idx_full])
  idx_half = idx_full[:, : s // 2]  # MIA-pow: the shadow trains on half, the other half is "out".
  scfg = wm.LearnerConfig(model=a.model, epochs=a.shadow_epochs, batch_size=min(32, s // 2), learning_rate=a.lr,
                          augment=wm.NAMED_AUGMENTS[a.augment])
  keys = jax.random.split(jax.random.key(a.seed + 99), 2 * u)
  ck = os.path.join(a.workdir, "checkpoints")
  sm, s_full, _ = wm.train_learners(scfg, keys, pool, pool_y, train.num_classes, idx_full,
                                    checkpoint_dir=os.path.join(ck, "shadow_std"), desc="shadow std")
  _, s_half, _ = wm.train_learners(scfg, keys, pool, pool_y, train.num_classes, idx_half,
                                   checkpoint_dir=os.path.join(ck, "shadow_pow"), desc="shadow pow")
  # MIAs query the learner with the exact images it was trained on (member users' marked copies),
  # their best case; held-out users' images were never used.
  target = wm.per_example_losses(model, v, pool, pool_y)
  truth = np.concatenate([np.ones(u, bool), np.zeros(u, bool)])
  std_pred, pow_pred, std_sample, pow_sample = [], [], [], []
  for i in range(2 * u):
    own = idx_full[i]
    sh_full = wm.per_example_losses(sm, wm.member_variables(s_full, i), pool[own], pool_y[own])
    sh_half = wm.per_example_losses(sm, wm.member_variables(s_half, i), pool[own], pool_y[own])
    t_std = wm.mia_std_threshold(sh_full)
    t_pow = wm.mia_pow_threshold(sh_half[: s // 2], sh_half[s // 2:])
    std_sample.append(np.mean((target[own] < t_std) == truth[i]))
    pow_sample.append(np.mean((target[own] < t_pow) == truth[i]))
    std_pred.append(np.mean(target[own] < t_std) > 0.5)
    pow_pred.append(np.mean(target[own] < t_pow) > 0.5)
  std_ok, pow_ok = np.array(std_pred) == truth, np.array(pow_pred) == truth
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.hist(target[: u * p_m], 40, alpha=0.6, label="learner loss, member users")
  ax.hist(target[u * p_m:], 40, alpha=0.6, label="learner loss, held-out users")
  ax.axvline(float(np.mean([wm.mia_std_threshold(wm.per_example_losses(sm, wm.member_variables(s_full, 0),
                                                                           pool[idx_full[0]], pool_y[idx_full[0]]))])),
             color="k", ls="--", label="a shadow-model threshold (MIA-std)")
  ax.set_xlabel("cross-entropy")
  ax.legend(fontsize=6)
  report.save_figure(fig, os.path.join(a.workdir, "mia.png"))
  return dict(mia_users_each=u, mia_std_user_accuracy=float(std_ok.mean()), mia_pow_user_accuracy=float(pow_ok.mean()),
              mia_std_sample_accuracy=float(np.mean(std_sample)), mia_pow_sample_accuracy=float(np.mean(pow_sample)),
              adv_p_mia_std=wm.adv_p(std_ok, 0.5), adv_p_mia_pow=wm.adv_p(pow_ok, 0.5))


# ------------------------------------------------------------------ single-user sweeps


def single_point(a, train, test, *, model_name, k_star, num_marked, augment, key, ckpt) -> dict[str, Any]:
  """One learner with one user's ``num_marked`` images marked ``k_star``: grid search for the
  user and for held-out users."""
  users = wm.assign_users(a.seed, len(train), 1, num_marked)
  marked = wm.mark_users(train.images, users, [k_star])
  lcfg = wm.LearnerConfig(model=model_name, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr,
                          augment=augment)
  model, state, _ = wm.train_learners(lcfg, jax.random.split(jax.random.key(key), 1), marked, train.labels,
                                      train.num_classes, checkpoint_dir=ckpt)
  return model, wm.member_variables(state, 0), users


def grid_point(a, model, v, train, test, users, k_star) -> dict[str, Any]:
  sigs = np.arange(0, 360, a.grid_step, dtype=np.float32)
  g = verify_users(model, v, train.images, train.labels, users, None, sigs)[0]
  held = wm.assign_users(a.seed + 1, len(test), a.heldout_users, a.heldout_per_user)
  gh = verify_users(model, v, test.images, test.labels, held, None, sigs)
  rec, rec_h = float(sigs[np.argmin(g)]), sigs[np.argmin(gh, 1)]
  return dict(k_star=float(k_star), recovered=rec, match=bool(wm.match(rec, k_star, a.tau)),
              heldout_recovered=rec_h.tolist(), heldout_non_null=float((wm.distance(rec_h, 0) >= a.tau).mean()),
              signatures=sigs.tolist(), losses=g.tolist())


SWEEPS = {
    "num_marked": lambda a: [dict(num_marked=n) for n in (5, 20, 50, 100, 200)],
    "signature": lambda a: [dict(k_star=float(k)) for k in wm.PAPER_SPACE[::2]],
    "model": lambda a: [dict(model_name=m) for m in ("mlp", "resnet8")],
    "augment": lambda a: [dict(augment=n) for n in wm.NAMED_AUGMENTS],
}


def sweep(a) -> dict[str, Any]:
  cfg = dict(study=f"sweep-{a.vary}", dataset=a.dataset, train_size=a.train_size, model=a.model, epochs=a.epochs,
             batch_size=a.batch_size, lr=a.lr, augment=a.augment, k_star=a.signature, num_marked=a.per_user,
             grid_step=a.grid_step, tau=a.tau, seed=a.seed, heldout_users=a.heldout_users,
             heldout_per_user=a.heldout_per_user)
  run_dir_setup(a.workdir, cfg)
  train, test = load_colour(a.dataset, a.data_dir, a.seed)
  train = train.subset(slice(0, a.train_size))
  check_user_counts(a, len(train), len(test), 1, max(over.get("num_marked", a.per_user) for over in SWEEPS[a.vary](a)))
  points = []
  for i, over in enumerate(SWEEPS[a.vary](a)):
    p = {**dict(model_name=a.model, k_star=a.signature, num_marked=a.per_user, augment=a.augment), **over}
    name = "-".join(f"{k}={v}" for k, v in over.items())
    path = os.path.join(a.workdir, "results", f"{name}.json")
    if not os.path.exists(path):
      t0 = time.time()
      model, v, users = single_point(a, train, test, model_name=p["model_name"], k_star=p["k_star"],
                                     num_marked=p["num_marked"], augment=wm.NAMED_AUGMENTS[p["augment"]],
                                     key=a.seed, ckpt=os.path.join(a.workdir, "checkpoints", name))
      r = grid_point(a, model, v, train, test, users, p["k_star"])
      pipeline.write_json(path, {**p, **r, "name": name, "seconds": time.time() - t0})
    with open(path) as f:
      points.append(json.load(f))
  m = {"points": [{k: v for k, v in q.items() if k not in ("signatures", "losses")} for q in points],
       "matching_accuracy": float(np.mean([q["match"] for q in points]))}
  pipeline.write_json(os.path.join(a.workdir, "metrics.json"), m)
  loss_plot(os.path.join(a.workdir, "losses.png"),
            [(q["name"], np.array(q["signatures"]), np.array(q["losses"]), q["k_star"]) for q in points], a.tau,
            f"varying {a.vary}")
  write_report(a.workdir, f"Sweep over {a.vary}", cfg, m, ["losses.png"])
  return m


def defences(a) -> dict[str, Any]:
  """Magnitude pruning and fine-tuning of a learner trained with one marked user."""
  cfg = dict(study="defences", dataset=a.dataset, train_size=a.train_size, model=a.model, epochs=a.epochs,
             batch_size=a.batch_size, lr=a.lr, augment=a.augment, k_star=a.signature, num_marked=a.per_user,
             grid_step=a.grid_step, tau=a.tau, seed=a.seed, finetune_epochs=a.finetune_epochs,
             heldout_users=a.heldout_users, heldout_per_user=a.heldout_per_user)
  run_dir_setup(a.workdir, cfg)
  train, test = load_colour(a.dataset, a.data_dir, a.seed)
  train = train.subset(slice(0, a.train_size))
  check_user_counts(a, len(train), len(test), 1, a.per_user)
  model, v, users = single_point(a, train, test, model_name=a.model, k_star=a.signature, num_marked=a.per_user,
                                 augment=wm.NAMED_AUGMENTS[a.augment], key=a.seed,
                                 ckpt=os.path.join(a.workdir, "checkpoints", "learner"))
  points = []
  for frac in (0.0, 0.3, 0.5, 0.7, 0.9):
    path = os.path.join(a.workdir, "results", f"prune={frac}.json")
    if not os.path.exists(path):
      vp = wm.prune(v, frac)
      acc = float(np.mean(np.argmax(np.asarray(wm.logits(model, vp, test.images)), -1) == test.labels))
      pipeline.write_json(path, {"name": f"prune={frac}", "test_accuracy": acc,
                                 **grid_point(a, model, vp, train, test, users, a.signature)})
    with open(path) as f:
      points.append(json.load(f))
  path = os.path.join(a.workdir, "results", f"finetune={a.finetune_epochs}.json")
  if not os.path.exists(path):
    # Fine-tuning on clean data the learner did not train on (the first half of the test split).
    half = len(test) // 2
    state0 = jax.tree.map(lambda x: x[None], v)
    init = ensemble.EnsembleState(params=state0["params"], batch_stats=state0.get("batch_stats", {}), opt_state=None)
    fcfg = wm.LearnerConfig(model=a.model, epochs=a.finetune_epochs, batch_size=a.batch_size,
                            learning_rate=a.lr / 10, augment=wm.NAMED_AUGMENTS[a.augment])
    _, fs, _ = wm.train_learners(fcfg, jax.random.split(jax.random.key(a.seed + 5), 1), test.images[:half],
                                 test.labels[:half], test.num_classes, init_state=init,
                                 checkpoint_dir=os.path.join(a.workdir, "checkpoints", "finetune"))
    vf = wm.member_variables(fs, 0)
    test2 = test.subset(slice(half, None))
    acc = float(np.mean(np.argmax(np.asarray(wm.logits(model, vf, test2.images)), -1) == test2.labels))
    pipeline.write_json(path, {"name": f"finetune={a.finetune_epochs}", "test_accuracy": acc,
                               **grid_point(a, model, vf, train, test2, users, a.signature)})
  with open(path) as f:
    points.append(json.load(f))
  m = {"points": [{k: v for k, v in q.items() if k not in ("signatures", "losses")} for q in points]}
  pipeline.write_json(os.path.join(a.workdir, "metrics.json"), m)
  loss_plot(os.path.join(a.workdir, "defences.png"),
            [(q["name"], np.array(q["signatures"]), np.array(q["losses"]), q["k_star"]) for q in points], a.tau,
            "pruning and fine-tuning")
  write_report(a.workdir, "Defences: pruning and fine-tuning", cfg, m, ["defences.png"])
  return m


def write_report(workdir: str, title: str, cfg: dict[str, Any], m: dict[str, Any], figures: list[str]) -> None:
  lines = [f"# {title}", "", "## Configuration", "", "```json", json.dumps(cfg, indent=2), "```", "", "## Results", ""]
  for k, v in m.items():
    if k == "points":
      keys = [c for c in v[0] if not isinstance(v[0][c], list)]
      lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
      lines += ["| " + " | ".join(f"{q[c]:.4g}" if isinstance(q[c], float) else str(q[c]) for c in keys) + " |"
                for q in v]
    elif not isinstance(v, list):
      lines.append(f"- **{k}**: {v:.4g}" if isinstance(v, float) else f"- **{k}**: {v}")
  lines += [""] + [f"![{f}]({f})" for f in figures]
  pipeline.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")


# ------------------------------------------------------------------------ mark / verify


def load_images(path: str) -> data.Dataset:
  """An ``.npz`` (``images``/``labels`` or ``x_train``/``y_train``) or a class-folder of images."""
  return data.load_local(path, "train")


def cmd_mark(a) -> int:
  if a.input.endswith(".npz") and os.path.isfile(a.input):
    with np.load(a.input) as z:
      arrays = {k: z[k] for k in z.files}
    key = "images" if "images" in arrays else "x_train"
    if key not in arrays:
      raise SystemExit(f"{a.input}: expected an 'images' (or 'x_train') array, found {sorted(arrays)}")
    images = arrays[key].astype(np.float32)
    if arrays[key].dtype == np.uint8:
      images /= 255.0
  else:
    ds = load_images(a.input)
    arrays, key, images = {"labels": ds.labels}, "images", ds.images
  if images.ndim != 4 or images.shape[-1] != 3:
    raise SystemExit(f"need RGB images N x H x W x 3, got {images.shape}")
  t = None if a.transform_seed is None else wm.user_transform(jax.random.key(a.transform_seed))
  arrays[key] = wm.mark(images, a.signature, wm.Watermark.hue(t))
  pipeline.write_atomic(a.output, lambda tmp: np.savez_compressed(tmp, **arrays))
  print(f"marked {len(images)} images with signature {a.signature} deg -> {a.output}")
  return 0


def cmd_verify(a) -> int:
  model, v, meta = wm.load_model(a.model)
  ds = load_images(a.images)
  if ds.image_shape != tuple(meta["image_shape"]):
    raise SystemExit(f"images are {ds.image_shape}, the model takes {tuple(meta['image_shape'])}")
  t = None if a.transform_seed is None else wm.user_transform(jax.random.key(a.transform_seed))
  sigs = np.arange(0, 360, a.grid_step, dtype=np.float32)
  r = wm.grid_search(model, v, ds.images, ds.labels, sigs, watermark=wm.Watermark.hue(t))
  print("signature (deg) -> mean loss")
  for s, l in zip(r.signatures[:: max(1, int(15 / a.grid_step))], r.losses[:: max(1, int(15 / a.grid_step))]):
    print(f"  {s:6.1f}  {l:.4f}  " + "#" * int(40 * (l - r.losses.min()) / max(np.ptp(r.losses), 1e-9)))
  print(f"recovered signature (grid): {r.recovered:.1f} deg")
  rec = r.recovered
  if a.gradient:
    rec, _, _ = wm.gradient_search(model, v, ds.images, ds.labels, watermark=wm.Watermark.hue(t))
    print(f"recovered signature (gradient search): {rec:.1f} deg")
  if a.signature is not None:
    ok = bool(wm.match(rec, a.signature, a.tau))
    print(f"verdict: {'MATCH' if ok else 'NO MATCH'}: |k^ - k*| = {float(wm.distance(rec, a.signature)):.1f} "
          f"{'<' if ok else '>='} tau = {a.tau}: the model was {'very likely' if ok else 'not shown to be'} "
          "trained on the marked images")
  else:
    null = wm.distance(rec, 0) < a.tau
    print("verdict: " + ("the recovered signature is the null one: no sign of a watermark" if null else
                         f"a non-null signature ({rec:.1f} deg) was recovered: compare it with the owner's"))
  if a.plot:
    loss_plot(a.plot, [("user images", r.signatures, r.losses, 0.0 if a.signature is None else a.signature)],
              a.tau, "loss vs signature")
  return 0


# ---------------------------------------------------------------------------- flags


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)

  def common(q, workdir):
    q.add_argument("--workdir", default=workdir, help="run directory")
    q.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (Debian IDX), fashion_mnist_subset, "
                   "mnist, digits, cifar10, or a path; grey images are tinted")
    q.add_argument("--data_dir", help="local copy / tfds data_dir of a named dataset")
    q.add_argument("--train_size", type=int, default=10_000, help="learner's training images")
    q.add_argument("--model", default="mlp", help="mlp, cnn, resnet8, resnet20")
    q.add_argument("--epochs", type=int, default=60, help="learner epochs")
    q.add_argument("--batch_size", type=int, default=128)
    q.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay)")
    q.add_argument("--augment", default="flip", choices=sorted(wm.NAMED_AUGMENTS),
                   help="learner augmentation (crop_flip is the paper's default for its ResNets; random "
                   "crops defeat a pixel-aligned MLP's memorisation, see docs/watermark.md)")
    q.add_argument("--per_user", type=int, default=100, help="images per user (1%% of 10,000)")
    q.add_argument("--heldout_users", type=int, default=100, help="held-out users (test split)")
    q.add_argument("--heldout_per_user", type=int, default=100, help="images per held-out user")
    q.add_argument("--grid_step", type=float, default=2.0, help="grid over [0, 360) in this step (deg)")
    q.add_argument("--tau", type=float, default=wm.PAPER_TAU, help="match if |k^ - k*| < tau")
    q.add_argument("--signature", type=float, default=60.0, help="k* of the single-user studies")
    q.add_argument("--seed", type=int, default=0)

  q = sub.add_parser("multiuser", help="many users with random signatures, held-out users, MIA baselines")
  common(q, None)
  q.add_argument("--num_users", type=int, default=24)
  q.add_argument("--lct", default="same", choices=["same", "per_user"], help="T_YIQ for all, or T_u ~ U(-1, 1)")
  q.add_argument("--gradient", action="store_true", help="also gradient search for every member user")
  q.add_argument("--mia_users", type=int, default=10, help="member + held-out users given shadow models (0: skip)")
  q.add_argument("--shadow_epochs", type=int, default=30)
  q = sub.add_parser("sweep", help="one marked user; vary one factor")
  common(q, None)
  q.add_argument("--vary", required=True, choices=sorted(SWEEPS))
  q = sub.add_parser("defences", help="magnitude pruning and fine-tuning")
  common(q, None)
  q.add_argument("--finetune_epochs", type=int, default=10)

  q = sub.add_parser("mark", help="mark images with a signature")
  q.add_argument("--input", required=True, help=".npz (images[, labels]) or an image folder")
  q.add_argument("--output", required=True, help="output .npz")
  q.add_argument("--signature", type=float, required=True, help="k* in degrees")
  q.add_argument("--transform_seed", type=int, help="use a user transform T_u drawn from this seed")
  q = sub.add_parser("verify", help="recover the signature from a saved model and unmarked images")
  q.add_argument("--model", required=True, help="a saved model directory (watermark.save_model)")
  q.add_argument("--images", required=True, help="the owner's unmarked images with labels (.npz or folder)")
  q.add_argument("--signature", type=float, help="the owner's private signature (for the verdict)")
  q.add_argument("--transform_seed", type=int, help="the owner's T_u seed, if marked with one")
  q.add_argument("--tau", type=float, default=wm.PAPER_TAU)
  q.add_argument("--grid_step", type=float, default=1.0)
  q.add_argument("--gradient", action="store_true", help="refine with gradient search")
  q.add_argument("--plot", help="write the loss-vs-signature plot here (PNG)")
  for q in sub.choices.values():
    distributed.add_compilation_cache_flag(q)
  a = p.parse_args(argv)
  if a.cmd in ("multiuser", "sweep", "defences") and a.workdir is None:
    tag = {"multiuser": f"multiuser-{a.lct}" if a.cmd == "multiuser" else "", "sweep": f"sweep-{getattr(a, 'vary', '')}",
           "defences": "defences"}[a.cmd]
    a.workdir = os.path.join("runs", f"wm-{tag}-{os.path.basename(os.path.normpath(a.dataset))}-{a.model}-s{a.seed}")
  return a


def main(argv=None) -> int:
  a = parse(argv)
  distributed.enable_compilation_cache(a.compilation_cache)  # Before any compilation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  if a.cmd == "mark":
    return cmd_mark(a)
  if a.cmd == "verify":
    return cmd_verify(a)
  m = {"multiuser": multiuser, "sweep": sweep, "defences": defences}[a.cmd](a)
  print(json.dumps({k: v for k, v in m.items() if not isinstance(v, list)}, indent=2))
  print(f"run directory: {a.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
