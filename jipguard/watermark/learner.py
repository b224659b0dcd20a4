"""The (unauthorized) learner of paper 003: training, saving, pruning, evaluating one model.

:func:`train_learners` trains M models of one jipguard architecture with
``ensemble.EnsembleTrainer``'s jitted epoch on a freshly augmented pool each epoch
(:class:`Augment`: crop + flip, cutout, label smoothing, Gaussian noise, colour jitter).
:func:`prune` (magnitude pruning) and fine-tuning (:func:`train_learners` with ``init_state``)
are the defences of section 5.3.

Interpretation: label smoothing is applied in its unbiased stochastic form: each epoch every
label is replaced by a uniformly random class with probability ``eps``, whose expected
cross-entropy is the label-smoothed one (the shared trainer takes integer labels).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jipguard import ensemble, models, rundir
from jipguard.watermark.lct import T_YIQ, lct

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Augment:
  """The learner's augmentations (section 5.3); crop + flip by default.

  Attributes:
    crop: Pad by this many pixels (edge mode) and crop back at a random offset; 0: off.
    flip: Random horizontal flips.
    cutout: Side of a random square set to 0 (DeVries & Taylor 2017); 0: off.
    label_smoothing: eps; applied stochastically (module docstring).
    noise_std: Std of additive Gaussian noise (then clipped to [0, 1]); 0: off.
    jitter: Strength of brightness, contrast and saturation jitter (factors in 1 +- jitter).
    hue_deg: Random hue rotation in +- hue_deg degrees with the LCT (colour jitter's hue).
  """

  crop: int = 2
  flip: bool = True
  cutout: int = 0
  label_smoothing: float = 0.0
  noise_std: float = 0.0
  jitter: float = 0.0
  hue_deg: float = 0.0


NAMED_AUGMENTS = {
  "none": Augment(crop=0, flip=False),
  "flip": Augment(crop=0),
  "crop_flip": Augment(),
  "cutout": Augment(cutout=8),
  "label_smoothing": Augment(label_smoothing=0.1),
  "noise": Augment(noise_std=0.05),
  "color_jitter": Augment(jitter=0.4, hue_deg=36.0),  # torchvision ColorJitter(.4, .4, .4, .1).
}


def _augment_one(key, x_HxWxC, aug: Augment):
  h, w, c = x_HxWxC.shape
  k = jax.random.split(key, 8)
  x = x_HxWxC
  if aug.crop:
    p = aug.crop
    padded = jnp.pad(x, ((p, p), (p, p), (0, 0)), mode="edge")
    off = jax.random.randint(k[0], (2,), 0, 2 * p + 1)
    x = jax.lax.dynamic_slice(padded, (off[0], off[1], 0), (h, w, c))
  if aug.flip:
    x = jnp.where(jax.random.bernoulli(k[1]), x[:, ::-1], x)
  if aug.jitter:
    lo, hi = 1 - aug.jitter, 1 + aug.jitter
    b, ct, s = (jax.random.uniform(k[i], (), minval=lo, maxval=hi) for i in (2, 3, 4))
    x = jnp.clip(x * b, 0, 1)
    x = jnp.clip((x - x.mean()) * ct + x.mean(), 0, 1)
    if c == 3:
      grey = (x @ jnp.asarray(T_YIQ[0]))[..., None]
      x = jnp.clip(grey + (x - grey) * s, 0, 1)
  if aug.hue_deg and c == 3:
    x = lct(x, jax.random.uniform(k[5], (), minval=-aug.hue_deg, maxval=aug.hue_deg))
  if aug.noise_std:
    x = jnp.clip(x + aug.noise_std * jax.random.normal(k[6], x.shape), 0, 1)
  if aug.cutout:
    centre = jax.random.randint(k[7], (2,), 0, jnp.array([h, w]))
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    half = aug.cutout // 2
    inside = (jnp.abs(rows - centre[0]) <= half) & (jnp.abs(cols - centre[1]) <= half)
    x = jnp.where(inside[..., None], 0.0, x)
  return x


@functools.partial(jax.jit, static_argnames=("aug", "num_classes"))
def augment(
  key: jax.Array, images_NxHxWxC: jax.Array, labels_MxS: jax.Array, *, aug: Augment, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """One epoch's augmented pool (every image independently) and, with label smoothing, labels."""
  k_img, k_lab, k_cls = jax.random.split(key, 3)
  keys = jax.random.split(k_img, images_NxHxWxC.shape[0])
  images = jax.vmap(functools.partial(_augment_one, aug=aug))(keys, images_NxHxWxC)
  if aug.label_smoothing:
    resample = jax.random.bernoulli(k_lab, aug.label_smoothing, labels_MxS.shape)
    random_labels = jax.random.randint(k_cls, labels_MxS.shape, 0, num_classes)
    labels_MxS = jnp.where(resample, random_labels, labels_MxS)
  return images, labels_MxS


@functools.cache
def optimizer(learning_rate: float, epochs: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with a cosine decay (one object per setting, so equal trainers share compilations)."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(1, epochs * steps_per_epoch)))


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """How the (unauthorized) learner trains.

  Attributes:
    model: A ``models.MODELS`` name.
    epochs: Training epochs.
    batch_size: Minibatch size.
    learning_rate: Peak Adam learning rate (cosine decay to 0).
    augment: The augmentations.
  """

  model: str = "resnet8"
  epochs: int = 30
  batch_size: int = 128
  learning_rate: float = 2e-3
  augment: Augment = Augment()


def train_learners(
  cfg: LearnerConfig,
  keys_M: jax.Array,
  images: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  indices_MxS: np.ndarray | None = None,
  *,
  checkpoint_dir: str | None = None,
  init_state: ensemble.EnsembleState | None = None,
  checkpoint_interval_s: float = ensemble.CHECKPOINT_INTERVAL_S,
  progress: bool = True,
  desc: str = "learner",
  metrics_log: str | None = None,
) -> tuple[nn.Module, ensemble.EnsembleState, list[dict[str, Any]]]:
  """Trains M learners on a shared pool (member m sees ``indices_MxS[m]``), with augmentation.

  :meth:`ensemble.EnsembleTrainer.fit` with each epoch's pool augmented afresh
  (:func:`augment`, keyed by the epoch, so a resumed run sees the same data). With
  ``checkpoint_dir`` a rerun resumes from the last saved epoch (refusing another
  configuration), and an interrupted run saves its finished epochs first.

  Args:
    cfg: The learner's configuration.
    keys_M: One typed PRNG key per member.
    images: The pool, ``N x H x W x C`` float32 in [0, 1].
    labels: Pool labels ``(N,)``.
    num_classes: Number of classes.
    indices_MxS: Each member's sample of the pool (default: the whole pool).
    checkpoint_dir: Orbax directory for resuming.
    init_state: Start from these weights (fine-tuning); the optimiser state is fresh.
    checkpoint_interval_s: Save at most this often (``fit``'s; 0: every epoch).
    progress: Progress bar.
    desc: Its label.
    metrics_log: A run directory's ``metrics.jsonl``: one line per epoch (``phase``: ``desc``).

  Returns:
    ``(model, state, history)``; ``history`` as :class:`ensemble.FitResult`'s.

  Raises:
    ValueError: Bad shapes or non-finite images; FloatingPointError: a non-finite loss.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or not np.all(np.isfinite(images)):
    raise ValueError(f"images must be finite NHWC, got shape {images.shape}")
  m, n = keys_M.shape[0], len(images)
  idx = np.broadcast_to(np.arange(n), (m, n)) if indices_MxS is None else np.asarray(indices_MxS)
  if idx.ndim != 2 or idx.shape[0] != m:
    raise ValueError(f"indices must be (M={m}, S), got {idx.shape}")
  model = models.get_model(cfg.model, num_classes)
  tx = optimizer(cfg.learning_rate, cfg.epochs, idx.shape[1] // cfg.batch_size)
  trainer = ensemble.EnsembleTrainer(model, tx, batch_size=cfg.batch_size)
  aug_key = jax.random.fold_in(keys_M[0], 7919)

  def epoch_data(epoch, x, labels_MxS):
    return augment(jax.random.fold_in(aug_key, epoch), x, labels_MxS, aug=cfg.augment, num_classes=num_classes)

  ckpt = (
    None
    if checkpoint_dir is None
    else ensemble.Checkpointing(checkpoint_dir, interval_s=checkpoint_interval_s, fingerprint={"learner": repr(cfg)})
  )
  result = trainer.fit(
    keys_M,
    images,
    labels,
    epochs=cfg.epochs,
    indices=idx,
    checkpoint=ckpt,
    progress=progress,
    desc=desc,
    epoch_data=epoch_data,
    init_state=init_state,
    on_epoch_end=None
    if metrics_log is None
    else lambda epoch, record: rundir.append_jsonl(metrics_log, {"phase": desc, "epoch": epoch, **record}),
  )
  return model, result.state, result.history


def member_variables(state: ensemble.EnsembleState, m: int) -> PyTree:
  """Flax variables of member ``m`` (no member axis), for :func:`signature_losses`."""
  return jax.tree.map(lambda a: a[m], state.variables)


def save_model(path: str, model_name: str, num_classes: int, image_shape: Sequence[int], variables: PyTree) -> None:
  """Saves one model as an orbax checkpoint (``variables/``) plus ``model.json``."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, "variables"), variables, force=True)
  rundir.write_json(
    os.path.join(path, "model.json"),
    {"model": model_name, "num_classes": int(num_classes), "image_shape": [int(d) for d in image_shape]},
  )


def load_model(path: str) -> tuple[nn.Module, PyTree, dict[str, Any]]:
  """Loads a :func:`save_model` checkpoint: ``(model, variables, meta)``.

  Raises:
    FileNotFoundError: ``path`` holds no such checkpoint.
  """
  path = os.path.abspath(path)
  meta_file = os.path.join(path, "model.json")
  if not os.path.exists(meta_file):
    raise FileNotFoundError(f"{path} is not a saved jipguard model (no model.json)")
  with open(meta_file) as f:
    meta = json.load(f)
  model = models.get_model(meta["model"], meta["num_classes"])
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *meta["image_shape"])), train=False))
  with ocp.StandardCheckpointer() as ckpt:
    variables = ckpt.restore(os.path.join(path, "variables"), template)
  return model, variables, meta


def prune(variables: PyTree, fraction: float) -> PyTree:
  """Magnitude pruning: zeroes the ``fraction`` smallest-magnitude weights of every conv /
  dense kernel (per layer, biases and batch norm untouched); works with or without a member axis."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")

  def _prune(path, w):
    if getattr(path[-1], "key", None) != "kernel" or fraction == 0:
      return w
    w = np.asarray(w)  # Host: one quantile per layer, no compilation.
    q = np.quantile(np.abs(w), fraction)
    return jnp.asarray(np.where(np.abs(w) <= q, 0.0, w).astype(w.dtype))

  return {**variables, "params": jax.tree_util.tree_map_with_path(_prune, variables["params"])}


def per_example_losses(model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array) -> np.ndarray:
  """Cross-entropy of one model on each image (inference mode)."""
  images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
  out = [
    _plain_losses(model, variables, jnp.asarray(images[i : i + 1024]), jnp.asarray(labels[i : i + 1024]))
    for i in range(0, len(images), 1024)
  ]
  return np.concatenate([np.asarray(o) for o in out])


@functools.partial(jax.jit, static_argnames=("model",))
def _plain_losses(model, variables, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, images, train=False), labels)


_logits = jax.jit(lambda model, variables, x: model.apply(variables, x, train=False), static_argnums=0)


def logits(model: nn.Module, variables: PyTree, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Logits of one model on ``images`` (inference mode, chunks of ``batch_size``)."""
  images = np.asarray(images, np.float32)
  return np.concatenate(
    [
      np.asarray(_logits(model, variables, jnp.asarray(images[i : i + batch_size])))
      for i in range(0, len(images), batch_size)
    ]
  )
