"""The study: models trained on clean, protected and restored data (Table 1), the ablation of
where the accuracy drop comes from, and the countermeasures a user of the data would try.

One run (:func:`run`) protects a training set with the full method (FSP targets from a
surrogate, mRIT, AES-SIV, LSB embedding), restores it in both modes, builds the ablation and
countermeasure sets, and trains one small ResNet per set (``seeds`` per set) as ONE stacked
ensemble: the sets are concatenated into one pool and each member trains on its own slice
(``EnsembleTrainer.fit``'s ``indices``). Every model is tested on the same clean test images.

Sets (``CONDITIONS``; all images uint8 before training):

* ``clean``, ``protected`` (the full method), ``restored_exact`` (bit-identical to ``clean``:
  its row measures seed noise only), ``restored_lsb`` (the paper's mode, off by one in the
  payload pixels);
* ablation: ``fsp_only`` (the FSP images, no mRIT), ``mrit_self`` (mRIT with the clean image as
  its own target: the identity plus the LSB payload), ``mrit_other`` (mRIT towards the clean
  image that FSP targeted, of another class: block scrambling without FSP);
* countermeasures on the protected images: ``jpeg<q>`` (Pillow), ``blur`` (Gaussian, radius 1),
  ``grayscale`` (colour sets only). Their models are tested on the clean test images and, as a
  user who squeezes the training images would also squeeze the inputs, on the test images with
  the same countermeasure applied (``test_accuracy_squeezed_test``).

The run directory (``docs/authorization.md``): ``config.json``, ``key.json`` (0600, the secret
key; never printed), ``sets.npz`` (the FSP and protected sets, sidecar, targets: a finished
piece, kept when the run resumes), ``checkpoints/`` (surrogate and models), ``metrics.jsonl``
(per epoch, each condition's test accuracy), ``table1`` / ``ablation`` / ``countermeasures``
(.md, .csv), ``grid.png``, ``report.md``, and ``metrics.json`` last.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any

import jax
import numpy as np
import optax
from PIL import Image, ImageFilter

from jipguard import data, ensemble, models, rundir
from jipguard.authorization import crypto, embed, fsp, mrit

CONDITIONS = ("clean", "protected", "restored_exact", "restored_lsb", "fsp_only", "mrit_self", "mrit_other")
COUNTERMEASURES = ("jpeg90", "jpeg50", "jpeg10", "blur", "grayscale")
# Table 1 of the paper: ResNet-18, CIFAR-10 (training accuracy, test accuracy), in %.
PAPER_TABLE1 = {"clean": (96.44, 86.21), "protected": (100.00, 38.23), "restored": (95.21, 85.86)}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study's results depend on.

  Attributes:
    dataset: ``fashion_mnist_subset`` (embedded), ``fashion_mnist``, ``cifar10`` (tfds), ``digits``
      or a path.
    data_dir: Local copy / tfds data_dir of a named dataset.
    colour: Make a 32x32x3 colour set of grey images (padded, tinted per image).
    train_size: Training images (a random subset).
    test_size: Clean test images every model is tested on.
    model: Architecture of the trained models and the surrogate (``models.MODELS``).
    epochs: Training epochs of each model.
    batch_size: Minibatch size.
    lr: Adam learning rate.
    seeds: Models per set (independent initialisations and shuffles).
    surrogate_epochs: Epochs of the FSP surrogate.
    epsilon: FSP L_inf radius.
    iterations: FSP steps.
    momentum: FSP momentum (0: off).
    layer: FSP feature layer of the surrogate.
    candidates: FSP target candidates per image.
    target_class: FSP target class rule (``fsp.TARGET_CLASSES``).
    block: mRIT block side.
    classes: mRIT SD classes.
    shift_step: mRIT mean-shift quantum (even).
    countermeasures: Comma-separated subset of ``COUNTERMEASURES`` ("" for none).
    seed: Seed of the subset, the surrogate, FSP targets and the models.
  """

  dataset: str = "fashion_mnist_subset"
  data_dir: str | None = None
  colour: bool = False
  train_size: int = 1000
  test_size: int = 1000
  model: str = "resnet8"
  epochs: int = 6
  batch_size: int = 32
  lr: float = 1e-3
  seeds: int = 1
  surrogate_epochs: int = 15
  epsilon: float = 0.07
  iterations: int = 10
  momentum: float = 1.0
  layer: str = "ResidualBlock_1"
  candidates: int = 20
  target_class: str = "next"
  block: int = 4
  classes: int = 4
  shift_step: int = 4
  countermeasures: str = "jpeg90,jpeg50,jpeg10,blur"
  seed: int = 0

  def __post_init__(self):
    for name, lo in (("train_size", 16), ("test_size", 1), ("epochs", 1), ("batch_size", 1), ("seeds", 1)):
      if getattr(self, name) < lo:
        raise ValueError(f"--{name} must be >= {lo}, got {getattr(self, name)}")
    if self.batch_size > self.train_size:
      raise ValueError(f"--batch_size ({self.batch_size}) must not exceed --train_size ({self.train_size})")
    if self.model not in models.MODELS:
      raise ValueError(f"--model must be one of {sorted(models.MODELS)}, got {self.model!r}")
    if not 0 < self.lr < 1:
      raise ValueError(f"--lr must lie in (0, 1), got {self.lr}")
    bad = [c for c in self.countermeasure_list if c not in COUNTERMEASURES]
    if bad:
      raise ValueError(f"--countermeasures: unknown {bad}; choose from {','.join(COUNTERMEASURES)}")
    self.fsp_config()  # Validates the FSP and mRIT fields.
    self.mrit_config()

  @property
  def countermeasure_list(self) -> list[str]:
    return [c for c in self.countermeasures.split(",") if c]

  def fsp_config(self) -> fsp.FSPConfig:
    return fsp.FSPConfig(
      epsilon=self.epsilon,
      iterations=self.iterations,
      momentum=self.momentum,
      layer=self.layer,
      candidates=self.candidates,
      target_class=self.target_class,
    )

  def mrit_config(self) -> mrit.MRITConfig:
    return mrit.MRITConfig(block=self.block, classes=self.classes, shift_step=self.shift_step)

  def conditions(self, channels: int) -> list[str]:
    cms = [c for c in self.countermeasure_list if c != "grayscale" or channels == 3]
    return [*CONDITIONS, *cms]


PRESETS = {
  # The smallest setting where protected images train clearly worse models (the test's): an MLP
  # attacked at its last hidden layer with epsilon 0.15; 51 s on 2 shared cores. Inkawhich's 0.07 is
  # too small a budget against an MLP surrogate (the "mlp" preset; docs/authorization.md).
  "smoke": {
    "model": "mlp",
    "layer": "Dense_1",
    "epsilon": 0.15,
    "epochs": 15,
    "surrogate_epochs": 5,
    "test_size": 500,
    "countermeasures": "jpeg50",
  },
  # An MLP under Inkawhich's settings (FSP features of its first layer): no clear drop.
  "mlp": {"model": "mlp", "layer": "Dense_0", "train_size": 1000, "epochs": 15, "surrogate_epochs": 5},
  # The first setting measured: a weak surrogate and Inkawhich's random targets (no clear drop).
  "weak": {"surrogate_epochs": 3, "target_class": "random"},
  "default": {},
}


# --------------------------------------------------------------------------------- data


def load(cfg: StudyConfig) -> tuple[data.Dataset, data.Dataset]:
  """The training subset and the test set, colourised if asked (grey sets only)."""
  train = data.load(cfg.dataset, "train", data_dir=cfg.data_dir)
  test = data.load(cfg.dataset, "test", data_dir=cfg.data_dir)
  if cfg.train_size > len(train) or cfg.test_size > len(test):
    raise ValueError(
      f"--train_size {cfg.train_size} / --test_size {cfg.test_size} exceed the dataset's {len(train)} / {len(test)}"
    )
  rng = np.random.default_rng(cfg.seed)
  train = train.subset(np.sort(rng.permutation(len(train))[: cfg.train_size]))
  test = test.subset(np.arange(cfg.test_size))
  if cfg.colour:
    if train.image_shape[-1] != 1:
      raise ValueError("--colour makes a colour set of grey images; this dataset is already in colour")
    train = dataclasses.replace(train, images=data.colourise(train.images, cfg.seed))
    test = dataclasses.replace(test, images=data.colourise(test.images, cfg.seed + 1))
  return train, test


def countermeasure(name: str, images_u8: np.ndarray) -> np.ndarray:
  """A user's attempt to undo the protection: JPEG at quality q (``jpeg<q>``), Gaussian blur of
  radius 1, or grayscale (replicated to the channels); uint8 in, uint8 out."""
  grey = images_u8.shape[-1] == 1
  mode = "L" if grey else "RGB"

  def one(x):
    img = Image.fromarray(x[..., 0] if grey else x, mode)
    if name.startswith("jpeg"):
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=int(name[4:]))
      img = Image.open(io.BytesIO(buf.getvalue())).convert(mode)
    elif name == "blur":
      img = img.filter(ImageFilter.GaussianBlur(1))
    elif name == "grayscale":
      img = img.convert("L").convert(mode)
    else:
      raise ValueError(f"unknown countermeasure {name!r}")
    out = np.asarray(img, np.uint8)
    return out[..., None] if grey else out

  return np.stack([one(x) for x in images_u8])


# --------------------------------------------------------------------------------- sets


def _key(workdir: str) -> crypto.Key:
  path = os.path.join(workdir, "key.json")
  if not os.path.exists(path):
    crypto.write_key_file(path, crypto.generate_key())
  return crypto.read_key_file(path)


def dataset_id(cfg: StudyConfig) -> str:
  return f"study:{os.path.basename(os.path.normpath(cfg.dataset))}:{cfg.seed}"


def build_sets(cfg: StudyConfig, workdir: str, train: data.Dataset, *, progress: bool) -> dict[str, np.ndarray]:
  """FSP, protected and restored sets (cached in ``sets.npz``), with timings."""
  path = os.path.join(workdir, "sets.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  clean = fsp.to_uint8(train.images)
  x = clean.astype(np.float32) / 255  # FSP starts from the uint8 image that is protected.
  t0 = time.perf_counter()
  model, variables = fsp.train_surrogate(
    x,
    train.labels,
    train.num_classes,
    fsp.SurrogateConfig(model=cfg.model, epochs=cfg.surrogate_epochs, batch_size=cfg.batch_size, lr=cfg.lr),
    seed=cfg.seed + 1,
    checkpoint_dir=os.path.join(workdir, "checkpoints", "surrogate"),
    progress=progress,
  )
  surrogate_acc = float(ensemble.accuracy(model, jax.tree.map(lambda a: a[None], variables), x, train.labels)[0])
  t1 = time.perf_counter()
  adv, targets = fsp.fsp_images(model, variables, x, train.labels, train.num_classes, cfg.fsp_config(), seed=cfg.seed)
  t2 = time.perf_counter()
  key, mcfg, did = _key(workdir), cfg.mrit_config(), dataset_id(cfg)
  prot = embed.protect(clean, adv, key, dataset_id=did, cfg=mcfg)
  t3 = time.perf_counter()
  exact = embed.restore(prot.images, key, dataset_id=did, cfg=mcfg, sidecar=prot.sidecar)
  t4 = time.perf_counter()
  lsb = embed.restore(prot.images, key, dataset_id=did, cfg=mcfg)
  if not np.array_equal(exact, clean):
    raise AssertionError("exact restoration differs from the clean images")
  sets = {
    "clean": clean,
    "protected": prot.images,
    "sidecar": prot.sidecar,
    "restored_exact": exact,
    "restored_lsb": lsb,
    "fsp_only": adv,
    "targets": targets,
    "mrit_self": embed.protect(clean, clean, key, dataset_id=did, cfg=mcfg).images,
    "mrit_other": embed.protect(clean, clean[targets], key, dataset_id=did, cfg=mcfg).images,
    "timing_s": np.array([t1 - t0, t2 - t1, t3 - t2, t4 - t3]),  # surrogate, FSP, protect, restore
    "surrogate_train_accuracy": np.array(surrogate_acc),
  }
  rundir.write_npz(path, **sets)
  return sets


def image_stats(sets: dict[str, np.ndarray], cfg: StudyConfig) -> dict[str, Any]:
  """PSNRs (dB, means over images) and the LSB mode's restoration error."""
  clean, prot, adv = sets["clean"], sets["protected"], sets["fsp_only"]
  finite = lambda v: float(np.mean(np.minimum(v, 100.0)))  # identical images count as 100 dB
  diff = np.abs(sets["restored_lsb"].astype(int) - clean)
  n = len(clean)
  cap = embed.capacity(clean.shape[1:], cfg.mrit_config())
  return {
    "psnr_protected_vs_fsp": finite(embed.psnr(prot, adv)),
    "psnr_protected_vs_clean": finite(embed.psnr(prot, clean)),
    "psnr_fsp_vs_clean": finite(embed.psnr(adv, clean)),
    "psnr_mrit_other_vs_its_target": finite(embed.psnr(sets["mrit_other"], clean[sets["targets"]])),
    "psnr_restored_lsb_vs_clean": finite(embed.psnr(sets["restored_lsb"], clean)),
    "restored_exact_equal": bool(np.array_equal(sets["restored_exact"], clean)),
    "lsb_max_abs_error": int(diff.max()),
    "lsb_pixels_changed_mean": float((diff > 0).reshape(n, -1).sum(1).mean()),
    "lsb_pixels_changed_max": int((diff > 0).reshape(n, -1).sum(1).max()),
    "payload_bits": cap.payload_bits,
    "available_bits": cap.available_bits,
    "surrogate_train_accuracy": float(sets["surrogate_train_accuracy"]),
    "surrogate_s": float(sets["timing_s"][0]),
    "fsp_images_per_s": n / float(sets["timing_s"][1]),
    "protect_images_per_s": n / float(sets["timing_s"][2]),
    "restore_images_per_s": n / float(sets["timing_s"][3]),
  }


# ------------------------------------------------------------------------------ training


def train_all(
  cfg: StudyConfig, workdir: str, sets: dict[str, np.ndarray], labels: np.ndarray, test: data.Dataset, *, progress: bool
) -> dict[str, dict[str, float]]:
  """One model per set and seed, as one stacked ensemble; each condition's mean accuracies."""
  channels = sets["clean"].shape[-1]
  conditions = cfg.conditions(channels)
  images = {c: sets[c] if c in sets else countermeasure(c, sets["protected"]) for c in conditions}
  n = len(labels)
  pool = np.concatenate([images[c] for c in conditions]).astype(np.float32) / 255
  member_condition = [c for c in conditions for _ in range(cfg.seeds)]
  indices = np.stack([np.arange(n) + conditions.index(c) * n for c in member_condition])
  model = models.get_model(cfg.model, int(max(labels.max(), test.labels.max()) + 1))
  trainer = ensemble.EnsembleTrainer(model, optax.adam(cfg.lr), batch_size=cfg.batch_size)
  keys = jax.random.split(jax.random.key(cfg.seed + 2), len(member_condition))
  jsonl = os.path.join(workdir, "metrics.jsonl")

  def log(epoch, record):
    acc = np.asarray(record["eval_accuracy"])
    row = {c: float(np.mean(acc[[i for i, mc in enumerate(member_condition) if mc == c]])) for c in conditions}
    rundir.append_jsonl(jsonl, {"epoch": epoch, "test_accuracy": row})

  result = trainer.fit(
    keys,
    pool,
    np.tile(labels, len(conditions)),
    epochs=cfg.epochs,
    indices=indices,
    eval_data=(test.images, test.labels),
    checkpoint=ensemble.Checkpointing(os.path.join(workdir, "checkpoints", "models"), fingerprint={"lr": cfg.lr}),
    progress=progress,
    desc="models",
    on_epoch_end=log,
  )
  out = {}
  for c in conditions:
    members = [i for i, mc in enumerate(member_condition) if mc == c]
    train_acc = [
      float(ensemble.accuracy(model, result.state.member(i).variables, pool[indices[i]], labels)[0]) for i in members
    ]
    test_acc = [
      float(ensemble.accuracy(model, result.state.member(i).variables, test.images, test.labels)[0]) for i in members
    ]
    out[c] = {
      "train_accuracy": float(np.mean(train_acc)),
      "test_accuracy": float(np.mean(test_acc)),
      "test_accuracy_std": float(np.std(test_acc)),
    }
    if c not in CONDITIONS:
      # A user who squeezes the training images may squeeze the inputs at test time too
      # (grayscale above all: a model trained on grey images meets colour ones otherwise).
      squeezed = countermeasure(c, fsp.to_uint8(test.images)).astype(np.float32) / 255
      out[c]["test_accuracy_squeezed_test"] = float(
        np.mean([ensemble.accuracy(model, result.state.member(i).variables, squeezed, test.labels)[0] for i in members])
      )
  return out


# ------------------------------------------------------------------------------- report


def _grid(path: str, sets: dict[str, np.ndarray], k: int = 8) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib only when a figure is written)

  rows = ("clean", "fsp_only", "protected", "restored_lsb", "restored_exact")
  fig, axes = plt.subplots(len(rows), k, figsize=(1.3 * k, 1.4 * len(rows)))
  for r, name in enumerate(rows):
    for j in range(k):
      img = sets[name][j]
      axes[r, j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
      axes[r, j].set_xticks([])
      axes[r, j].set_yticks([])
    axes[r, 0].set_ylabel(name.replace("_", "\n"), fontsize=8)
  fig.suptitle("clean / FSP / protected / restored (paper LSB mode) / restored (exact mode)", fontsize=9)
  rundir.save_figure(fig, path)


def _pct(v: float) -> float:
  return round(100 * v, 2)


def report(cfg: StudyConfig, workdir: str, acc: dict[str, dict[str, float]], stats: dict[str, Any]) -> None:
  """Tables, report.md."""
  paper = {"clean": "clean", "protected": "protected", "restored_lsb": "restored", "restored_exact": "restored"}
  rows = []
  for c in ("clean", "protected", "restored_lsb", "restored_exact"):
    p = PAPER_TABLE1[paper[c]]
    rows.append(
      {
        "set": c,
        "train_acc_%": _pct(acc[c]["train_accuracy"]),
        "test_acc_%": _pct(acc[c]["test_accuracy"]),
        "paper_train_%": p[0],
        "paper_test_%": p[1],
      }
    )
  cols = ["set", "train_acc_%", "test_acc_%", "paper_train_%", "paper_test_%"]
  kind = "colour" if cfg.colour else "as loaded"
  title = f"Table 1: {cfg.model} on {dataset_id(cfg)} ({kind}) vs paper (ResNet-18, CIFAR-10)"
  rundir.write_table(os.path.join(workdir, "table1"), rows, cols, title=title)
  abl = [
    {"set": c, "train_acc_%": _pct(acc[c]["train_accuracy"]), "test_acc_%": _pct(acc[c]["test_accuracy"])}
    for c in ("clean", "fsp_only", "mrit_self", "mrit_other", "protected")
  ]
  rundir.write_table(os.path.join(workdir, "ablation"), abl, ["set", "train_acc_%", "test_acc_%"], title="Ablation")
  cms = [c for c in acc if c not in CONDITIONS]
  cm_rows = [
    {
      "countermeasure": c,
      "test_acc_%": _pct(acc[c]["test_accuracy"]),
      "squeezed_test_acc_%": _pct(acc[c]["test_accuracy_squeezed_test"]),
      "protected_%": _pct(acc["protected"]["test_accuracy"]),
      "clean_%": _pct(acc["clean"]["test_accuracy"]),
    }
    for c in cms
  ]
  cm_cols = ["countermeasure", "test_acc_%", "squeezed_test_acc_%", "protected_%", "clean_%"]
  rundir.write_table(
    os.path.join(workdir, "countermeasures"),
    cm_rows,
    cm_cols,
    title="Countermeasures applied to the protected training images (squeezed_test: and to the test images)",
  )
  lines = [
    "# Dataset authorization control: study",
    "",
    f"Config: `config.json`. Secret key: `key.json` (mode 0600, not shown). Dataset id `{dataset_id(cfg)}`.",
    "Restoration modes: `restored_exact` used the sidecar (exact mode); `restored_lsb` is the paper's LSB mode.",
    "",
    rundir.markdown_table(rows, cols),
    "## Ablation (where the drop comes from)",
    "",
    rundir.markdown_table(abl, ["set", "train_acc_%", "test_acc_%"]),
    "## Countermeasures",
    "",
    rundir.markdown_table(cm_rows, cm_cols) if cm_rows else "none\n",
    "## Images",
    "",
    rundir.markdown_table([{"quantity": k, "value": v} for k, v in stats.items()], ["quantity", "value"]),
    "![grid](grid.png)",
    "",
  ]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(lines))


def run(cfg: StudyConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the study in ``workdir``; returns metrics.json's content."""
  train, test = load(cfg)  # Bad data, sizes or layers fail before the run directory exists.
  embed.check_capacity(train.image_shape, cfg.mrit_config())
  fsp.check_layer(models.get_model(cfg.model, train.num_classes), train.image_shape, cfg.layer)
  rundir.write_config(workdir, dataclasses.asdict(cfg))
  sets = build_sets(cfg, workdir, train, progress=progress)
  stats = image_stats(sets, cfg)
  acc = train_all(cfg, workdir, sets, train.labels, test, progress=progress)
  _grid(os.path.join(workdir, "grid.png"), sets)
  report(cfg, workdir, acc, stats)
  metrics = {"accuracy": acc, "images": stats, "paper_table1": PAPER_TABLE1}
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics
