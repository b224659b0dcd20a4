"""Tables I-II: attacks against no / single / multiple defenders, the defender-weight sweep, and
Table III (ours): the server colluding with one data owner.

One partitioned model is trained per setting (:mod:`defense`): no defender; the single design
(``"single"`` on every owner) at each defender weight of ``weights`` (Table I's sweep); the
four designs of Table II dealt over the owners (``networks.MULTIPLE``) at ``defender_weight``;
and ``fingerprint``: the single defender at ``defender_weight`` with a customer's fingerprint
embedded in the remote part during the same training (Eq. 27, ``defense.fingerprint_penalty``),
so its accuracy reads against ``single``'s: with and without; and ``shared``: the single design
as ONE defender that every owner shares (the reading of "single defender" under which a
colluding owner exposes everyone). Every setting's deployed accuracy
is measured on the test images. Then each inverse-network design of ``attacks`` is trained ONCE
as a stacked ensemble with one member per setting (member m learns to invert setting m's local
part on the auxiliary images) and applied to what each setting's owners upload for the test
images; the optimisation attack runs on a few of them. Reprint accuracy is the undefended
model's accuracy on the reconstructions; DPD_aux (:mod:`perceptual`) stands in for the paper's
DPD.

Table III tests what the paper's argument for multiple defenders rests on: an attacker who
knows one owner's defender. Owner ``colluder`` runs its defender on the server's auxiliary
images and hands over the uploads; ``colluder_attack`` trained on those pairs (one member per
setting) attacks every owner's test uploads, reported for the colluder's own images, the other
owners of its design (in ``shared``: of its defender), and the owners of other designs.

Outputs in the run directory: ``config.json``, ``metrics.jsonl`` (one row per epoch of each
setting, one per attack and setting), ``table1.md/.csv`` (single defender: MSE / SSIM per
attack and weight), ``table2.md/.csv`` (no / single / multiple), ``table3.md/.csv`` (the
colluding owner), ``reconstructions.png`` (originals, then Attack_3's reconstructions per
setting), ``fingerprint_projection.json`` (the secret X's seed and F, mode 0600),
``settings/<setting>.npz`` (each trained setting's parameters, uploaded test states, the
colluder's uploads of the auxiliary images, accuracy and fingerprint bit errors: a rerun of the
same command loads finished settings instead of training them again), ``report.md`` and, last,
``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jipguard import cli, data, models, rundir
from jipguard.partition import attacks, defense, networks, perceptual, split

PAPER_TABLE2 = {  # Table II: accuracy, then MSE / SSIM of each attack, per setting.
  "accuracy": {"none": 97.67, "single": 96.85, "multiple": 95.71},
  "attack1": ((0.068, 0.542), (0.081, 0.498), (0.214, 0.075)),
  "attack2": ((0.074, 0.522), (0.082, 0.497), (0.210, 0.097)),
  "attack3": ((0.018, 0.832), (0.023, 0.805), (0.070, 0.499)),
  "attack4": ((0.024, 0.781), (0.024, 0.756), (0.072, 0.493)),
  "attack5": ((0.068, 0.550), (0.073, 0.535), (0.192, 0.193)),
  "attack6": ((0.076, 0.512), (0.089, 0.453), (0.201, 0.116)),
  "attack7": ((0.072, 0.517), (0.074, 0.511), (0.167, 0.203)),
  "attack8": ((0.033, 0.731), (0.048, 0.661), (0.190, 0.158)),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The Table I-II study (defaults: a few minutes on a shared 2-core CPU)."""

  dataset: str = "fashion_mnist_subset"  # Images (Fashion-MNIST standing in for MNIST; mnist needs tfds).
  train_size: int = 4000  # Owners' pooled training images.
  aux_size: int = 1000  # The attacker's auxiliary images (disjoint from the owners').
  test_size: int = 500  # Test images for accuracy and the attacks.
  num_owners: int = 20  # Data owners (the paper: 20).
  epochs: int = 4  # Epochs of Algorithm 1, warm-up included (the paper: 600).
  warmup_epochs: int = 1  # Epochs on clean images first.
  batch_size: int = 8  # Images per owner per round (the paper: 32).
  lr_model: float = 3e-4  # Adam learning rate of the model (the paper: 1e-4).
  lr_defender: float = 1e-3  # Adam learning rate of the defenders (the paper: 1e-3).
  defender_weight: float = 0.1  # lambda of the single and multiple defenders of Table II.
  weights: str = "0.03,0.1,0.3"  # Table I: single-defender weights swept (comma-separated).
  attacks: str = "attack1,attack2,attack3,attack4,attack5,attack6,attack7,attack8"  # Inverse networks of Table I.
  attack_epochs: int = 8  # Epochs of each inverse network on the auxiliary images.
  opt_images: int = 50  # Test images attacked by the optimisation attack (0: none).
  opt_steps: int = 300  # Adam steps of the optimisation attack.
  hidden: int = 900  # Width of the MLP's four hidden layers (the paper: 900).
  shared: bool = True  # Also the single design as ONE defender every owner shares (Table III's control).
  colluder: int = 0  # The owner who colludes with the server (Table III: its defender's pairs train the attack).
  colluder_attack: str = "attack3"  # Inverse network of the colluding-owner attack ("": no Table III).
  perceptual_epochs: int = 10  # Epochs of DPD_aux's feature network on the auxiliary images (0: no DPD_aux).
  fingerprint_bits: int = 32  # L of the fingerprinted setting (single + Eq. 27 in the remote part; 0: none).
  fingerprint_weight: float = 0.2  # mu of Eq. 27 (the paper: 0.2).
  seed: int = 0  # Seeds everything.

  def __post_init__(self):
    for name in ("train_size", "aux_size", "test_size", "num_owners", "batch_size", "hidden", "epochs"):
      cli.check_int(f"--{name}", getattr(self, name), lo=1)
    for name in ("warmup_epochs", "attack_epochs", "opt_images", "opt_steps", "perceptual_epochs", "seed"):
      cli.check_int(f"--{name}", getattr(self, name), lo=0)
    cli.check_int("--fingerprint_bits", self.fingerprint_bits, lo=0, hi=4096)
    cli.check_float("--defender_weight", self.defender_weight, lo=0)
    cli.check_float("--fingerprint_weight", self.fingerprint_weight, lo=0, hi=100)
    cli.check_int("--colluder", self.colluder, lo=0, hi=self.num_owners - 1)
    if self.train_size < self.num_owners * self.batch_size:
      raise ValueError(f"--train_size must be >= num_owners * batch_size = {self.num_owners * self.batch_size}")
    if self.num_owners < len(networks.MULTIPLE):
      raise ValueError(f"--num_owners must be >= {len(networks.MULTIPLE)} (the multiple defenders' designs)")
    if self.opt_images > self.test_size:
      raise ValueError(f"--opt_images must be <= test_size={self.test_size}")
    for name in ("lr_model", "lr_defender"):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f"--{name} must be in (0, 1), got {getattr(self, name)}")
    if not 0 <= self.defender_weight < 100:
      raise ValueError(f"--defender_weight must be in [0, 100), got {self.defender_weight}")
    try:
      ws = self.weight_list()
    except ValueError:
      raise ValueError(f"--weights must be comma-separated numbers, got {self.weights!r}") from None
    if not all(0 < w < 100 for w in ws):
      raise ValueError(f"--weights must lie in (0, 100), got {self.weights!r}")
    known = sorted({*networks.ATTACKS, *networks.CONV1D_ATTACKS})
    bad = [a for a in self.attack_list() if a not in known]
    if bad or not self.attack_list():
      raise ValueError(f"--attacks must name some of {known}, got {self.attacks!r}")
    if self.colluder_attack and self.colluder_attack not in known:
      raise ValueError(f"--colluder_attack must be one of {known} or empty, got {self.colluder_attack!r}")

  def weight_list(self) -> list[float]:
    return [float(w) for w in self.weights.split(",") if w.strip()]

  def attack_list(self) -> list[str]:
    return [a.strip() for a in self.attacks.split(",") if a.strip()]

  def settings(self) -> list[tuple[str, tuple[str, ...], float]]:
    """``(name, designs, lambda)`` of every setting: none, single at each weight (and at
    ``defender_weight``), multiple, and (``fingerprint_bits`` > 0) fingerprint: single at
    ``defender_weight`` with Eq. 27 in the remote part, and (``shared``) shared: the single
    design as one defender all owners share."""
    ws = sorted({*self.weight_list(), self.defender_weight} - {0.0})
    single = [(f"single@{w:g}", ("single",), w) for w in ws]
    marked = [("fingerprint", ("single",), self.defender_weight)] if self.fingerprint_bits else []
    shared = [("shared", ("single",), self.defender_weight)] if self.shared else []
    return [("none", (), 0.0), *single, ("multiple", networks.MULTIPLE, self.defender_weight), *marked, *shared]

  def defense(self, name: str, designs: tuple[str, ...], weight: float) -> defense.DefenseConfig:
    """Algorithm 1's configuration of setting ``name``. The ``shared`` setting's one defender
    serves every owner: Algorithm 1 with ONE owner holding all images, whose batch is the N
    owners' batches together, so the server's rounds and batches are those of the others."""
    owners = 1 if name == "shared" else self.num_owners
    return defense.DefenseConfig(
      designs=designs,
      num_owners=owners,
      defender_weight=weight,
      epochs=self.epochs,
      warmup_epochs=self.warmup_epochs,
      batch_size=self.batch_size * self.num_owners // owners,
      lr_model=self.lr_model,
      lr_defender=self.lr_defender,
      hidden=(self.hidden,) * 4,
      seed=self.seed,
    )


PRESETS = {
  "smoke": dict(
    train_size=400, aux_size=200, test_size=100, num_owners=4, epochs=2, hidden=64, weights="0.1",
    attacks="attack3,attack8", attack_epochs=2, opt_images=10, opt_steps=20, perceptual_epochs=1, fingerprint_bits=8,
  ),
}  # fmt: skip


def _load(cfg: StudyConfig) -> tuple[data.Dataset, data.Dataset]:
  train, test = data.load(cfg.dataset), data.load(cfg.dataset, split="test")
  if len(train) < cfg.train_size + cfg.aux_size or len(test) < cfg.test_size:
    raise data.DataError(
      f"{cfg.dataset} has {len(train)} training and {len(test)} test images; the study needs "
      f"train_size + aux_size = {cfg.train_size + cfg.aux_size} and test_size = {cfg.test_size}"
    )
  return train, test


def checkpoint_path(path: str) -> str:
  """Where the training of the setting saved at ``path`` keeps its epoch checkpoint."""
  return path.replace(".npz", ".partial.npz")


def save_finished(path: str, tree: Any, **arrays: np.ndarray) -> None:
  """Saves a finished setting (:func:`defense.save_tree`), then deletes its training checkpoint."""
  defense.save_tree(path, tree, **arrays)
  with contextlib.suppress(FileNotFoundError):
    os.remove(checkpoint_path(path))


def dpd_aux(cfg: Any, aux: data.Dataset, num_classes: int, log: str) -> perceptual.PerceptualDistance | None:
  """DPD_aux trained on the auxiliary images for ``cfg.perceptual_epochs`` (None when 0); its
  training accuracy goes to the ``log``."""
  if not cfg.perceptual_epochs:
    return None
  pcfg = perceptual.PerceptualConfig(epochs=cfg.perceptual_epochs, seed=cfg.seed)
  dpd = perceptual.train(aux.images, aux.labels, num_classes=num_classes, cfg=pcfg)
  rundir.append_jsonl(log, {"dpd_aux_train_accuracy": dpd.train_accuracy})
  return dpd


def _setting(
  cfg: StudyConfig, name: str, designs, weight: float, workdir: str, own: data.Dataset, aux, test, mark, *, progress
) -> dict[str, Any]:
  """One setting: its trained params, the states its owners upload for the test images (``h``),
  what the colluding owner's defender makes of the auxiliary images (``h_colluder``), its
  accuracy and fingerprint bit errors (``bits``). From ``settings/<name>.npz`` when a previous
  run finished it, else trained and saved. ``mark``: ``(penalty, F)`` of the fingerprint."""
  path = os.path.join(workdir, "settings", name.replace("@", "_at_") + ".npz")
  x_te, y_te = test
  dcfg = cfg.defense(name, designs, weight)
  template = jax.eval_shape(defense.network(dcfg, own.num_classes).init, jax.random.key(0), x_te[:1])["params"]
  keys = ("h", "h_colluder", "accuracy", "bits")
  if os.path.exists(path):
    params, f = defense.load_tree(path, template)
    if all(k in f for k in keys):  # Else written by a version without them: trained again.
      return {"params": params, **{k: f[k] for k in keys}}
  log = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  penalty, f_L = mark
  marked = name == "fingerprint"
  trained = defense.train(
    dcfg,
    own.images,
    own.labels,
    num_classes=own.num_classes,
    penalty=penalty if marked else None,
    penalty_data=jnp.asarray(f_L) if marked else None,
    progress=progress,
    on_epoch_end=lambda r: rundir.append_jsonl(log, {"setting": name, **r}),
    checkpoint=checkpoint_path(path),
  )
  out = {
    "params": trained.params,  # An MLP: params only.
    "h": defense.uploaded_states(trained, x_te),
    "h_colluder": defense.uploaded_states(trained, aux, owner=cfg.colluder % dcfg.num_owners),
    "accuracy": np.float64(defense.accuracy(trained, x_te, y_te)),
    "bits": np.float64(np.nan),
  }
  if penalty is not None:
    out["bits"] = np.float64(
      defense.fingerprint_bit_errors(penalty, split.split_variables(trained.split, trained.variables)[1]["params"], f_L)
    )
  row = {"setting": name, "accuracy": float(out["accuracy"]), "fingerprint_bit_errors": float(out["bits"])}
  rundir.append_jsonl(log, {**row, "train_s": time.time() - t0})
  save_finished(path, trained.params, **{k: out[k] for k in keys})
  return out


def grid(path: str, x: np.ndarray, rows: dict[str, np.ndarray]) -> None:
  """A PNG of up to 10 originals (first row), then one row of reconstructions per entry of ``rows``."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 (plotting only here)

  n = min(10, len(x))
  names = ["original", *rows]
  fig, axes = plt.subplots(len(names), n, figsize=(n, len(names) * 1.05), squeeze=False)
  for r, name in enumerate(names):
    imgs = x if name == "original" else rows[name]
    for c in range(n):
      ax = axes[r, c]
      ax.imshow(np.clip(imgs[c, ..., 0] if imgs.shape[-1] == 1 else imgs[c], 0, 1), cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_ylabel(name, fontsize=7)
  rundir.save_figure(fig, path)
  plt.close(fig)


def split_data(cfg: Any, train: data.Dataset, test: data.Dataset):
  """``(owners' images, auxiliary images, test images, test labels)``: the first ``cfg.train_size``
  and the next ``cfg.aux_size`` images of a seeded permutation of ``train`` (disjoint: the
  attacker's auxiliary images are never an owner's), and the first ``cfg.test_size`` test images."""
  perm = np.random.default_rng([cfg.seed, 0]).permutation(len(train))
  own, aux = train.subset(perm[: cfg.train_size]), train.subset(perm[cfg.train_size : cfg.train_size + cfg.aux_size])
  return own, aux, test.images[: cfg.test_size], test.labels[: cfg.test_size]


def run(cfg: StudyConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs the study into ``workdir`` (see the module docstring); returns metrics.json's content."""
  train, test = _load(cfg)  # Bad data fail before the run directory exists.
  rundir.write_config(workdir, dataclasses.asdict(cfg))
  own, aux, x_te, y_te = split_data(cfg, train, test)
  log = os.path.join(workdir, "metrics.jsonl")
  net = split.split_model(models.MLP(num_classes=train.num_classes, hidden=(cfg.hidden,) * 4), split.PAPER_SPLIT)
  mark = (None, None)
  if cfg.fingerprint_bits:
    projection, f_L = defense.fingerprint_secret(workdir, net, x_te.shape[1:], cfg.fingerprint_bits)
    mark = (defense.fingerprint_penalty(projection, cfg.fingerprint_weight), f_L)
  settings, rows2 = {}, []
  start = time.time()
  for name, designs, weight in cfg.settings():
    settings[name] = _setting(
      cfg, name, designs, weight, workdir, own, aux.images, (x_te, y_te), mark, progress=progress
    )
    rows2.append({"setting": name, "defender_weight": weight, "accuracy": 100 * float(settings[name]["accuracy"])})
  names = list(settings)
  reference = settings["none"]["params"]
  classify = lambda z: np.asarray(jnp.argmax(split.compose(net, *split.split_params(reference, net.num_local), z), -1))  # noqa: E731
  dpd = dpd_aux(cfg, aux, train.num_classes, log)
  metric = lambda x, x_hat, y: attacks.reconstruction_metrics(x, x_hat, y, classify, dpd)  # noqa: E731
  local_params = {n: split.split_params(settings[n]["params"], net.num_local)[0] for n in names}
  locals_M = jax.tree.map(lambda *a: jnp.stack(a), *[local_params[n] for n in names])
  h_M = jnp.stack([jnp.asarray(settings[n]["h"]) for n in names])
  results: dict[str, dict[str, dict[str, float]]] = {}
  recon: dict[str, np.ndarray] = {}
  icfg = attacks.InverseConfig(epochs=cfg.attack_epochs, batch_size=32, seed=cfg.seed)
  for attack in cfg.attack_list():
    dec = networks.attack(attack, x_te.shape[1:])
    state, _ = attacks.train_inverse(dec, net.local, locals_M, aux.images, icfg)
    x_hat = np.asarray(attacks.invert(dec, state.params, h_M))
    results[attack] = {}
    for m, n in enumerate(names):
      results[attack][n] = metric(x_te, x_hat[m], y_te)
      rundir.append_jsonl(log, {"attack": attack, "setting": n, **results[attack][n]})
    if attack == "attack3" or not recon:
      recon = {f"{attack} {n}": x_hat[m] for m, n in enumerate(names) if n in _table2(cfg)}
  if cfg.opt_images:
    results["optimisation"] = {}
    for m, n in enumerate(names):
      x_hat = attacks.optimisation_attack(
        net.local,
        local_params[n],
        h_M[m, : cfg.opt_images],
        image_shape=x_te.shape[1:],
        steps=cfg.opt_steps,
        tv_weight=0.01,
      )
      results["optimisation"][n] = metric(x_te[: cfg.opt_images], x_hat, y_te[: cfg.opt_images])
      rundir.append_jsonl(log, {"attack": "optimisation", "setting": n, **results["optimisation"][n]})
  collusion = _collusion(cfg, names, settings, aux.images, h_M, x_te, y_te, metric, log) if cfg.colluder_attack else {}
  _write_tables(cfg, workdir, names, results, rows2, collusion)
  grid(os.path.join(workdir, "reconstructions.png"), x_te, recon)
  elapsed = time.time() - start
  acc = {r["setting"]: r["accuracy"] for r in rows2}
  bits = {n: float(settings[n]["bits"]) for n in names}
  report = [
    "# SecureMark-DL privacy partitioning: Tables I-II\n",
    f"Dataset {cfg.dataset} ({cfg.train_size} owners' images over {cfg.num_owners} owners, {cfg.aux_size} "
    f"auxiliary, {cfg.test_size} test); {cfg.epochs} epochs ({cfg.warmup_epochs} warm-up); {elapsed:.0f} s.\n",
    "Table II's single defender is `" + _table2(cfg)[1] + "`. Reprint accuracy: the undefended model on the "
    "reconstructions. DPD_aux: the stand-in for the paper's DPD (LPIPS-form distance in the features of a CNN "
    "trained on the auxiliary images; not comparable with the paper's values).\n",
    open(os.path.join(workdir, "table2.md")).read(),
    open(os.path.join(workdir, "table1.md")).read(),
  ]
  if "fingerprint" in names:
    report.append(
      f"Fingerprints (Eq. 27, {cfg.fingerprint_bits} bits, mu {cfg.fingerprint_weight}, in the remote Dense_0): "
      f"accuracy {acc['fingerprint']:.1f}% with, {acc[_table2(cfg)[1]]:.1f}% without (the same single defender); "
      f"bit errors {bits['fingerprint']:.3f} (unmarked: {bits[_table2(cfg)[1]]:.3f}).\n"
    )
  if collusion:
    report.append(open(os.path.join(workdir, "table3.md")).read())
  report.append("![reconstructions](reconstructions.png)\n")
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(report))
  metrics = {
    "accuracy": acc,
    "fingerprint_bit_errors": bits,
    "attacks": results,
    "collusion": collusion,
    "table2_settings": _table2(cfg),
    "elapsed_s": elapsed,
  }
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics


def _collusion(cfg, names, settings, x_aux, h_M, x_te, y_te, metric, log) -> dict[str, dict[str, dict[str, float]]]:
  """Table III: the server colludes with owner ``cfg.colluder``, who runs its defender on the
  server's auxiliary images; one inverse network per setting (one stacked ensemble) learns
  uploaded state -> image from those pairs and attacks every owner's test uploads. Metrics per
  group of test images: the colluder's own, other owners of the colluder's design, owners of the
  other designs."""
  dec = networks.attack(cfg.colluder_attack, x_te.shape[1:])
  icfg = attacks.InverseConfig(epochs=cfg.attack_epochs, batch_size=32, seed=cfg.seed)
  h_col = jnp.stack([jnp.asarray(settings[n]["h_colluder"]) for n in names])
  state, _ = attacks.fit_inverse(dec, h_col, x_aux, icfg)
  x_hat = np.asarray(attacks.invert(dec, state.params, h_M))
  owner = np.arange(len(x_te)) % cfg.num_owners  # The data owner of each test image.
  out = {}
  for m, (n, designs, weight) in enumerate(cfg.settings()):
    dcfg = cfg.defense(n, designs, weight)
    design = np.asarray(dcfg.owner_designs())[owner % dcfg.num_owners]  # Shared: one defender for all.
    own_design = design[owner == cfg.colluder][0] if np.any(owner == cfg.colluder) else None
    groups = {
      "colluder": owner == cfg.colluder,
      "same design": (owner != cfg.colluder) & (design == own_design),
      "other designs": design != own_design,
    }
    out[n] = {
      g: metric(x_te[sel], x_hat[m][sel], y_te[sel]) | {"images": int(sel.sum())}
      for g, sel in groups.items()
      if sel.any()
    }
    for g, r in out[n].items():
      rundir.append_jsonl(log, {"attack": f"colluder {cfg.colluder_attack}", "setting": n, "group": g, **r})
  return out


def _write_tables(cfg: StudyConfig, workdir: str, names, results, rows2, collusion) -> None:
  """table1 (the weight sweep), table2 (no / single / multiple) and table3 (the colluding owner)."""
  t1 = [
    {"attack": a, **{f"{n} mse": r[n]["mse"] for n in names if n.startswith("single@")}}
    | {f"{n} ssim": r[n]["ssim"] for n in names if n.startswith("single@")}
    for a, r in results.items()
  ]
  t1.append(
    {
      "attack": "accuracy %",
      **{f"{r['setting']} mse": r["accuracy"] for r in rows2 if r["setting"].startswith("single@")},
    }
  )
  cols1 = ["attack", *[f"{n} mse" for n in names if n.startswith("single@")]]
  cols1 += [f"{n} ssim" for n in names if n.startswith("single@")]
  rundir.write_table(os.path.join(workdir, "table1"), t1, cols1, title="Table I: single defender, weight sweep")
  t2_names = _table2(cfg)
  keys = ("none", "single", "multiple")
  t2 = []
  for a, r in results.items():
    row = {"attack": a}
    for n, key in zip(t2_names, keys):
      row[f"{key} mse/ssim"] = f"{r[n]['mse']:.3f}/{r[n]['ssim']:.3f}"
      row[f"{key} reprint"] = r[n]["reprint_accuracy"]
      if "dpd_aux" in r[n]:
        row[f"{key} dpd_aux"] = r[n]["dpd_aux"]
    if a in PAPER_TABLE2:
      row["paper mse/ssim (none, single, multiple)"] = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in PAPER_TABLE2[a])
    t2.append(row)
  acc = {r["setting"]: r["accuracy"] for r in rows2}
  acc_row = {"attack": "accuracy %"}
  for n, key in zip(t2_names, keys):
    acc_row[f"{key} mse/ssim"] = f"{acc[n]:.2f}"
  acc_row["paper mse/ssim (none, single, multiple)"] = "97.67, 96.85, 95.71"
  t2.insert(0, acc_row)
  extra = ("reprint", "dpd_aux") if cfg.perceptual_epochs else ("reprint",)
  cols2 = ["attack", *[f"{k} {c}" for k in keys for c in ("mse/ssim", *extra)]]
  cols2.append("paper mse/ssim (none, single, multiple)")
  rundir.write_table(os.path.join(workdir, "table2"), t2, cols2, title="Table II: no / single / multiple defenders")
  if collusion:
    groups = ("colluder", "same design", "other designs")
    t3 = [
      {"setting": n, **{g: f"{c[g]['mse']:.3f}/{c[g]['ssim']:.3f} ({c[g]['images']})" for g in groups if g in c}}
      for n, c in collusion.items()
    ]
    title = (
      f"Table III: the server colludes with owner {cfg.colluder} ({cfg.colluder_attack} trained on its "
      "defender's uploads of the auxiliary images); MSE/SSIM (test images) per owner group"
    )
    rundir.write_table(os.path.join(workdir, "table3"), t3, ["setting", *groups], title=title)


def _table2(cfg: StudyConfig) -> list[str]:
  """The settings of Table II's columns: none, single at ``defender_weight``, multiple."""
  return ["none", f"single@{cfg.defender_weight:g}", "multiple"]
