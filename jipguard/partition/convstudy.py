"""The conv settings (section VI-A2, Fig. 4): a conv net split at pool1 / pool2 / pool3, attacked.

For each split point of ``splits`` one partitioned model is trained per setting (:mod:`defense`):

* ``none``: no defender; ``single``: the mirror defender (``networks.CONV_DEFENDERS["mirror"]``)
  on every owner at ``defender_weight``; ``multiple``: the two mirror designs dealt over the
  owners (``networks.MULTIPLE_CONV``);
* ``fingerprint``: ``single`` with a customer's fingerprint embedded in the remote part during the
  same training (Eq. 27: ``mu * mean((F - X theta_sub)^2)`` on the remote ``Dense_0`` kernel,
  :func:`defense.fingerprint_penalty`), so its accuracy reads against ``single``'s: with and without.

Every setting's deployed accuracy is measured on the test images. Each attack of ``attacks``
(``networks.CONV_ATTACKS``) trains ONCE per split point as a stacked ensemble with one member
per setting, on the attacker's auxiliary images; the optimisation attack runs on a few test
images. Reprint accuracy is the split point's undefended model on the reconstructions.

Data: ``fashion_colour`` (offline: the embedded Fashion-MNIST subset padded to 32x32 and tinted,
``data.colourise``), ``cifar10`` (tensorflow-datasets; ``data_dir`` a prepared copy), ``lfw`` (an
image folder with one sub-folder per person at ``data_dir``, resized to ``image_size``; a
DataError names what is missing), or any path ``data.load`` reads.

Outputs in the run directory: ``config.json``, ``metrics.jsonl`` (one row per epoch of each
setting, one per attack and setting), ``table.md/.csv`` (accuracy, then MSE / SSIM / reprint
accuracy / DPD_aux per attack, setting and split point; DPD_aux is the DPD stand-in of
:mod:`perceptual`), ``fig4.png`` (the paper's Fig. 4: accuracy, reprint accuracy, MSE, SSIM and
DPD_aux of the best attack per split point and setting),
``reconstructions_<split>.png`` (originals, then the first attack's reconstructions per
setting), ``fingerprint_projection.json`` (the secret X's seed and F, mode 0600),
``settings/<split>_<setting>.npz`` (finished settings; a rerun loads them), ``report.md`` and,
last, ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jipguard import cli, data, rundir
from jipguard.partition import attacks, defense, networks, split, study

SETTINGS = ("none", "single", "multiple", "fingerprint")
DATASETS = ("fashion_colour", "cifar10", "lfw")  # Or a path data.load reads.
DEFAULT_ATTACKS = {
  "lfw_cnn": "lfw_attack1,lfw_attack2",
  "vgg19_bn": "cifar_attack1,cifar_attack2",
}  # A mirror, a dense.


@dataclasses.dataclass(frozen=True)
class ConvStudyConfig:
  """The conv study (defaults: the LFW CNN at pool1-3, about 25 minutes on a shared 2-core CPU)."""

  arch: str = "lfw_cnn"  # lfw_cnn (the paper's LFW network) or vgg19_bn (its CIFAR-10 network).
  splits: str = "pool1,pool2,pool3"  # Split points, comma-separated (the paper: LFW pool1-3; CIFAR-10 pool2).
  dataset: str = "fashion_colour"  # fashion_colour (offline), cifar10 (tfds), lfw (--data_dir), or a path.
  data_dir: str = ""  # LFW's image folder, or a tfds / local data folder ("": none).
  image_size: int = 32  # Side images are resized to (LFW's 250x250 faces; the paper: 64).
  width: float = 0.25  # Channel multiplier of the conv net (1: full width).
  settings: str = "none,single,fingerprint"  # Settings trained per split point (of SETTINGS).
  train_size: int = 1200  # Owners' pooled training images.
  aux_size: int = 800  # The attacker's auxiliary images (disjoint from the owners').
  test_size: int = 200  # Test images for accuracy and the attacks.
  num_owners: int = 4  # Data owners.
  epochs: int = 4  # Epochs of Algorithm 1, warm-up included.
  warmup_epochs: int = 1  # Epochs on clean images first.
  batch_size: int = 16  # Images per owner per round.
  lr_model: float = 1e-3  # Adam learning rate of the model.
  lr_defender: float = 3e-3  # Adam learning rate of the defenders (the conv mirrors learn slower than dense ones).
  defender_weight: float = 0.1  # lambda of the defenders.
  attacks: str = ""  # Inverse networks (networks.CONV_ATTACKS), comma-separated ("": the arch's three).
  attack_epochs: int = 8  # Epochs of each inverse network on the auxiliary images.
  attack_lr: float = 3e-3  # Adam learning rate of the inverse networks.
  opt_images: int = 20  # Test images attacked by the optimisation attack (0: none).
  opt_steps: int = 300  # Adam steps of the optimisation attack.
  fingerprint_bits: int = 32  # L, the fingerprint's length in the fingerprint setting.
  fingerprint_weight: float = 0.2  # mu of Eq. 27 (the paper: 0.2).
  perceptual_epochs: int = 10  # Epochs of DPD_aux's feature network on the auxiliary images (0: no DPD_aux).
  seed: int = 0  # Seeds everything.

  def __post_init__(self):
    cli.check_choice("--arch", self.arch, ("lfw_cnn", "vgg19_bn"))
    for name in ("train_size", "aux_size", "test_size", "num_owners", "batch_size", "epochs", "image_size"):
      cli.check_int(f"--{name}", getattr(self, name), lo=1)
    for name in ("warmup_epochs", "attack_epochs", "opt_images", "opt_steps", "perceptual_epochs", "seed"):
      cli.check_int(f"--{name}", getattr(self, name), lo=0)
    cli.check_int("--fingerprint_bits", self.fingerprint_bits, lo=1, hi=4096)
    cli.check_float("--width", self.width, lo=0.01, hi=8)
    cli.check_float("--defender_weight", self.defender_weight, lo=0, hi=100)
    cli.check_float("--fingerprint_weight", self.fingerprint_weight, lo=0, hi=100)
    cli.check_float("--lr_model", self.lr_model, lo=1e-7, hi=1)
    cli.check_float("--lr_defender", self.lr_defender, lo=1e-7, hi=1)
    cli.check_float("--attack_lr", self.attack_lr, lo=1e-7, hi=1)
    if self.train_size < self.num_owners * self.batch_size:
      raise ValueError(f"--train_size must be >= num_owners * batch_size = {self.num_owners * self.batch_size}")
    if self.num_owners < len(networks.MULTIPLE_CONV):
      raise ValueError(f"--num_owners must be >= {len(networks.MULTIPLE_CONV)} (the multiple defenders' designs)")
    if self.opt_images > self.test_size:
      raise ValueError(f"--opt_images must be <= test_size={self.test_size}")
    stages = len(split.build(self.arch, 10).stages)
    names = [f"pool{i + 1}" for i in range(stages - 1)]
    if not self.split_list() or any(s not in names for s in self.split_list()):
      raise ValueError(f"--splits must name some of {names}, got {self.splits!r}")
    if not self.setting_list() or any(s not in SETTINGS for s in self.setting_list()) or "none" not in self.settings:
      raise ValueError(f"--settings must name some of {SETTINGS}, 'none' included, got {self.settings!r}")
    bad = [a for a in self.attack_list() if a not in networks.CONV_ATTACKS]
    if bad or not self.attack_list():
      raise ValueError(f"--attacks must name some of {sorted(networks.CONV_ATTACKS)}, got {self.attacks!r}")
    if self.arch == "vgg19_bn" and self.image_size != 32:
      raise ValueError("--image_size must be 32 for vgg19_bn (five 2x2 pools to a 1x1 map)")

  def split_list(self) -> list[str]:
    return [s.strip() for s in self.splits.split(",") if s.strip()]

  def setting_list(self) -> list[str]:
    return [s.strip() for s in self.settings.split(",") if s.strip()]

  def attack_list(self) -> list[str]:
    return [a.strip() for a in (self.attacks or DEFAULT_ATTACKS[self.arch]).split(",") if a.strip()]


PRESETS = {
  "smoke": dict(
    arch="lfw_cnn", splits="pool2", image_size=16, settings="none,single,multiple,fingerprint", train_size=128,
    aux_size=64, test_size=32, epochs=2, batch_size=8, attack_epochs=1, opt_images=4, opt_steps=5, fingerprint_bits=8,
    perceptual_epochs=1,
  ),
  "vgg": dict(arch="vgg19_bn", splits="pool2", width=0.125, settings="none,single,multiple,fingerprint"),
}  # fmt: skip


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1:3] == (size, size):
    return images
  out = jax.image.resize(jnp.asarray(images), (len(images), size, size, images.shape[-1]), "linear")
  return np.clip(np.asarray(out), 0, 1).astype(np.float32)


def load(cfg: ConvStudyConfig) -> tuple[data.Dataset, data.Dataset]:
  """The training and test splits as colour images of ``image_size`` (module docstring).

  Raises:
    data.DataError: Missing data (LFW without ``data_dir``, cifar10 offline), or too few images.
  """
  if cfg.dataset == "fashion_colour":
    train, test = data.load("fashion_mnist_subset"), data.load("fashion_mnist_subset", "test")
    train = dataclasses.replace(train, images=data.colourise(train.images, cfg.seed, 32), name="fashion_colour")
    test = dataclasses.replace(test, images=data.colourise(test.images, cfg.seed + 1, 32), name="fashion_colour")
  elif cfg.dataset == "lfw":
    if not cfg.data_dir or not os.path.exists(cfg.data_dir):
      raise data.DataError(
        f"lfw needs --data_dir: a folder with one sub-folder of face images per person (e.g. the extracted "
        f"lfw-deepfunneled.tgz of vis-www.cs.umass.edu/lfw), got {cfg.data_dir or 'none'!r}"
      )
    full = data.load_local(cfg.data_dir)
    train, test = data.train_test_split(full, 0.2, jax.random.key(cfg.seed))
  else:
    kw = {"data_dir": cfg.data_dir} if cfg.data_dir and cfg.dataset in data.DATASETS else {}
    train, test = data.load(cfg.dataset, **kw), data.load(cfg.dataset, "test", **kw)
  if train.image_shape[-1] == 1:
    train = dataclasses.replace(train, images=data.colourise(train.images, cfg.seed, max(train.image_shape[:2])))
    test = dataclasses.replace(test, images=data.colourise(test.images, cfg.seed + 1, max(test.image_shape[:2])))
  train = dataclasses.replace(train, images=_resize(train.images, cfg.image_size))
  test = dataclasses.replace(test, images=_resize(test.images, cfg.image_size))
  if len(train) < cfg.train_size + cfg.aux_size or len(test) < cfg.test_size:
    raise data.DataError(
      f"{cfg.dataset} has {len(train)} training and {len(test)} test images; the study needs "
      f"train_size + aux_size = {cfg.train_size + cfg.aux_size} and test_size = {cfg.test_size}"
    )
  return train, test


def _designs(setting: str) -> tuple[str, ...]:
  return {"none": (), "single": ("mirror",), "multiple": networks.MULTIPLE_CONV, "fingerprint": ("mirror",)}[setting]


def _setting(cfg, at, setting, workdir, own, test, penalty, f_L, *, progress):
  """``(variables, uploaded test states, accuracy, fingerprint bit errors)`` of one setting:
  loaded from ``settings/<at>_<setting>.npz`` when finished before, else trained and saved."""
  path = os.path.join(workdir, "settings", f"{at}_{setting}.npz")
  x_te, y_te = test
  dcfg = defense.DefenseConfig(
    designs=_designs(setting),
    arch=cfg.arch,
    width=cfg.width,
    split_at=at,
    num_owners=cfg.num_owners,
    defender_weight=cfg.defender_weight,
    epochs=cfg.epochs,
    warmup_epochs=cfg.warmup_epochs,
    batch_size=cfg.batch_size,
    lr_model=cfg.lr_model,
    lr_defender=cfg.lr_defender,
    dropout=split.LFW_DROPOUT,
    seed=cfg.seed,
  )
  template = jax.eval_shape(defense.network(dcfg, own.num_classes).init, jax.random.key(0), x_te[:1])
  if os.path.exists(path):
    variables, f = defense.load_tree(path, template)
    return variables, f["h"], float(f["accuracy"]), float(f["bits"])
  log = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  marked = setting == "fingerprint"
  trained = defense.train(
    dcfg,
    own.images,
    own.labels,
    num_classes=own.num_classes,
    penalty=penalty if marked else None,
    penalty_data=jnp.asarray(f_L) if marked else None,
    progress=progress,
    on_epoch_end=lambda r: rundir.append_jsonl(log, {"split": at, "setting": setting, **r}),
    checkpoint=study.checkpoint_path(path),
  )
  acc = defense.accuracy(trained, x_te, y_te)
  h = defense.uploaded_states(trained, x_te)
  remote = split.split_variables(trained.split, trained.variables)[1]["params"]
  bits = defense.fingerprint_bit_errors(penalty, remote, f_L)
  row = {"split": at, "setting": setting, "accuracy": acc, "fingerprint_bit_errors": bits, "train_s": time.time() - t0}
  rundir.append_jsonl(log, row)
  study.save_finished(path, trained.variables, h=h, accuracy=np.float64(acc), bits=np.float64(bits))
  return trained.variables, h, acc, bits


def _fingerprint(cfg: ConvStudyConfig, workdir: str, num_classes: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(X, F)`` of the fingerprinted setting (:func:`defense.fingerprint_secret`)."""
  net = split.split_model(split.build(cfg.arch, num_classes, width=cfg.width), cfg.split_list()[0])
  return defense.fingerprint_secret(workdir, net, x.shape[1:], cfg.fingerprint_bits)


def figure4(path: str, metrics: dict[str, Any]) -> None:
  """Fig. 4 of the paper from ``metrics.json``'s content: per split point and setting, (a) model
  accuracy, (b) reprint accuracy, (c) MSE, (d) SSIM and (e) DPD_aux (when measured) of the best
  attack (the lowest MSE)."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 (plotting only here)

  splits = list(metrics["accuracy"])
  settings = [s for s in SETTINGS if s in metrics["accuracy"][splits[0]]]
  best = {
    (at, s): min((r[s] for r in metrics["attacks"][at].values()), key=lambda m: m["mse"])
    for at in splits
    for s in settings
  }
  panels = [
    ("(a) model accuracy %", lambda at, s: 100 * metrics["accuracy"][at][s]),
    ("(b) reprint accuracy %", lambda at, s: 100 * best[at, s]["reprint_accuracy"]),
    ("(c) MSE, best attack", lambda at, s: best[at, s]["mse"]),
    ("(d) SSIM, best attack", lambda at, s: best[at, s]["ssim"]),
  ]
  if "dpd_aux" in best[splits[0], settings[0]]:
    panels.append(("(e) DPD_aux, best attack", lambda at, s: best[at, s]["dpd_aux"]))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3))
  width = 0.8 / len(settings)
  for ax, (title, value) in zip(axes, panels):
    for k, s in enumerate(settings):
      ax.bar(np.arange(len(splits)) + k * width, [value(at, s) for at in splits], width, label=s)
    ax.set_xticks(np.arange(len(splits)) + width * (len(settings) - 1) / 2, splits)
    ax.set_title(title, fontsize=9)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  rundir.save_figure(fig, path)
  plt.close(fig)


def run(cfg: ConvStudyConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs the study into ``workdir`` (see the module docstring); returns metrics.json's content."""
  train, test = load(cfg)  # Bad data fail before the run directory exists.
  rundir.write_config(workdir, dataclasses.asdict(cfg))
  own, aux, x_te, y_te = study.split_data(cfg, train, test)
  log = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  projection, f_L = _fingerprint(cfg, workdir, train.num_classes, x_te)
  penalty = defense.fingerprint_penalty(projection, cfg.fingerprint_weight)
  names = cfg.setting_list()
  rows, metrics = [], {"accuracy": {}, "fingerprint_bit_errors": {}, "attacks": {}}
  dpd = study.dpd_aux(cfg, aux, train.num_classes, log)
  for at in cfg.split_list():
    variables, h, acc, bits = {}, {}, {}, {}
    for s in names:
      variables[s], h[s], acc[s], bits[s] = _setting(
        cfg, at, s, workdir, own, (x_te, y_te), penalty, f_L, progress=progress
      )
    net = split.split_model(split.build(cfg.arch, train.num_classes, width=cfg.width), at)
    local = {s: split.split_variables(net, variables[s])[0] for s in names}
    reference = split.split_variables(net, variables["none"])
    classify = lambda z, r=reference, net=net: np.asarray(jnp.argmax(split.compose(net, *r, jnp.asarray(z)), -1))  # noqa: E731
    locals_M = jax.tree.map(lambda *a: jnp.stack(a), *[local[s] for s in names])
    h_M = jnp.stack([jnp.asarray(h[s]) for s in names])
    results: dict[str, dict[str, dict[str, float]]] = {}
    recon = {}
    for attack in cfg.attack_list():
      dec = networks.attack(attack, x_te.shape[1:], net.local)
      icfg = attacks.InverseConfig(epochs=cfg.attack_epochs, batch_size=32, lr=cfg.attack_lr, seed=cfg.seed)
      state, _ = attacks.train_inverse(dec, net.local, locals_M, aux.images, icfg)
      x_hat = np.asarray(attacks.invert(dec, state.params, h_M))
      results[attack] = {
        s: attacks.reconstruction_metrics(x_te, x_hat[m], y_te, classify, dpd) for m, s in enumerate(names)
      }
      if not recon:
        recon = {f"{attack} {s}": x_hat[m] for m, s in enumerate(names)}
    if cfg.opt_images:
      results["optimisation"] = {}
      for m, s in enumerate(names):
        x_hat = attacks.optimisation_attack(
          net.local, local[s], h_M[m, : cfg.opt_images], image_shape=x_te.shape[1:], steps=cfg.opt_steps, tv_weight=0.01
        )
        results["optimisation"][s] = attacks.reconstruction_metrics(
          x_te[: cfg.opt_images], x_hat, y_te[: cfg.opt_images], classify, dpd
        )
    for attack, r in results.items():
      for s in names:
        rundir.append_jsonl(log, {"split": at, "attack": attack, "setting": s, **r[s]})
    rows.append({"split": at, "attack": "accuracy %", **{s: f"{100 * acc[s]:.1f}" for s in names}})
    for attack, r in results.items():
      cell = {
        s: f"{r[s]['mse']:.3f}/{r[s]['ssim']:.3f}/{100 * r[s]['reprint_accuracy']:.0f}"
        + (f"/{r[s]['dpd_aux']:.2f}" if "dpd_aux" in r[s] else "")
        for s in names
      }
      rows.append({"split": at, "attack": attack, **cell})
    if "fingerprint" in names:
      rows.append({"split": at, "attack": "fingerprint bit errors", **{s: f"{bits[s]:.3f}" for s in names}})
    study.grid(os.path.join(workdir, f"reconstructions_{at}.png"), x_te, recon)
    metrics["accuracy"][at] = acc
    metrics["fingerprint_bit_errors"][at] = bits
    metrics["attacks"][at] = results
  rundir.write_table(
    os.path.join(workdir, "table"),
    rows,
    ["split", "attack", *names],
    title="Conv settings: accuracy; MSE/SSIM/reprint %" + ("/DPD_aux" if dpd else ""),
  )
  elapsed = time.time() - start
  report = [
    f"# SecureMark-DL privacy partitioning: {cfg.arch} split at {cfg.splits}\n",
    f"Dataset {cfg.dataset} ({cfg.train_size} owners' images over {cfg.num_owners} owners, {cfg.aux_size} auxiliary, "
    f"{cfg.test_size} test, {cfg.image_size}x{cfg.image_size}); width {cfg.width}; {cfg.epochs} epochs "
    f"({cfg.warmup_epochs} warm-up); defender weight {cfg.defender_weight}; {elapsed:.0f} s.\n",
    "Cells: MSE / SSIM / reprint accuracy % (the split point's undefended model on the reconstructions)"
    + (" / DPD_aux (the DPD stand-in: partition.perceptual). " if dpd else ". ")
    + f"`fingerprint` is `single` with a {cfg.fingerprint_bits}-bit fingerprint embedded in the remote part "
    f"(mu {cfg.fingerprint_weight}); its bit errors are read from the remote Dense_0 kernel (the projection is "
    "in fingerprint_projection.json, mode 0600).\n",
    open(os.path.join(workdir, "table.md")).read(),
    "![Fig. 4](fig4.png)\n",
    *[f"![{at}](reconstructions_{at}.png)\n" for at in cfg.split_list()],
  ]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(report))
  metrics["elapsed_s"] = elapsed
  figure4(os.path.join(workdir, "fig4.png"), metrics)
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics
