"""Anti-neuron watermarking (Zou, Gong & Wang, paper 003): LCT watermarks and verification.

A user marks their images with a secret hue rotation ``k*`` (a linear colour transform, LCT)
before sharing them; a learner trains a classifier on a dataset of which the user's images
are a small part; an arbitrator, given the model and the user's *unmarked* images, recovers
the signature as the one with the lowest loss (Eq. 6) and declares a match when
``|k^ - k*| < tau``.

* **Watermarks.** :func:`lct` (Eqs. 3-5): RGB -> YIQ (or a user's own 3x3 transform
  ``T_u ~ U(-1, 1)``, :func:`user_transform`), rotate the (I, Q) plane by ``k`` degrees,
  back, clip to [0, 1]. :func:`blue_shift`: the less noticeable variant that adds ``s`` to
  the blue channel of secret pixels. :class:`Watermark` bundles either as a pytree.
* **Offline colour data.** :func:`colorize` tints grey images (Fashion-MNIST, digits) with
  random per-image colours whose hue follows the class (a "coloured MNIST" construction,
  Arjovsky et al. 2019), so that natural colours have a distribution a hue rotation leaves.
* **The learner.** :func:`train_learners` trains M models of one jipguard architecture with
  ``ensemble.EnsembleTrainer``'s jitted epoch on a freshly augmented pool each epoch
  (:class:`Augment`: crop + flip, cutout, label smoothing, Gaussian noise, colour jitter).
* **Verification.** :func:`signature_losses` is the loss matrix ``losses_KxN`` of every
  candidate signature on every image: one jitted program, a chunk of signatures x images
  marked and classified as one flat batch, chunked so memory stays bounded, signatures sharded over a mesh's ``member`` axis.
  :func:`grid_search` averages it (Eq. 6); :func:`gradient_search` descends the loss from
  several initial signatures at once (vmapped) and returns the best. Matching and the
  statistics are host numpy (:func:`match`, :func:`adv_p`).
* **Baselines and defences.** :func:`mia_std_threshold`, :func:`mia_pow_threshold` (the
  threshold MIAs of section 5.5 with shadow models), :func:`prune` (magnitude pruning) and
  fine-tuning through :func:`train_learners` with ``init_state``.

Interpretations (the paper is terse or inconsistent here):

* Eq. 5 writes ``g_k = T_YIQ T_k T_YIQ^-1``; a rotation of the I/Q plane of RGB pixels is
  ``T^-1 T_k T`` (RGB -> YIQ, rotate, back), which is what "convert RGB into YIQ ... rotating
  the hue" describes and what we use.
* Hue is periodic: signature distances are circular (``k = 0`` and ``k = 360`` coincide).
* Label smoothing is applied in its unbiased stochastic form: each epoch every label is
  replaced by a uniformly random class with probability ``eps``, whose expected
  cross-entropy is the label-smoothed one (the shared trainer takes integer labels).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jipguard import ensemble, models, sharding

PyTree = Any

# Eq. 3: RGB -> YIQ.
T_YIQ = np.array([[0.299, 0.587, 0.114],
                  [0.596, -0.275, -0.321],
                  [0.212, -0.523, 0.311]], np.float32)
FULL_SPACE = np.arange(360, dtype=np.float32)  # Default grid: every degree.
PAPER_SPACE = np.arange(30, 331, 30, dtype=np.float32)  # Section 5.1: 30, 60, ..., 330.
PAPER_TAU = 15.0


# ----------------------------------------------------------------------------- watermarks


def _check_rgb(images: jax.Array, what: str = "images") -> None:
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f"{what} must be RGB with a trailing channel axis of 3, got shape {images.shape}")


def rotation(k_deg: jax.Array) -> jax.Array:
  """Eq. 4: the 3x3 rotation of the second and third coordinates by ``k`` degrees."""
  theta = jnp.deg2rad(jnp.asarray(k_deg, jnp.float32))
  c, s = jnp.cos(theta), jnp.sin(theta)
  one, zero = jnp.ones_like(c), jnp.zeros_like(c)
  return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, c, -s]), jnp.stack([zero, s, c])])


def lct_matrix(k_deg: jax.Array, transform: jax.Array | None = None) -> jax.Array:
  """``g_k = T^-1 T_k T``: the RGB -> RGB matrix of signature ``k`` (``T`` = T_YIQ by default)."""
  t = jnp.asarray(T_YIQ if transform is None else transform, jnp.float32)
  return jnp.linalg.solve(t, rotation(k_deg) @ t)


def lct(images_NxHxWx3: jax.Array, k_deg: jax.Array, transform: jax.Array | None = None) -> jax.Array:
  """Watermarks RGB images with signature ``k`` (degrees): Eq. 5 on every pixel, clipped to [0, 1].

  Differentiable in ``k`` (gradient search); any leading axes; ``k = 0`` is the identity up
  to float rounding (and the clip).
  """
  images = jnp.asarray(images_NxHxWx3, jnp.float32)
  _check_rgb(images)
  g = lct_matrix(k_deg, transform)
  # ``images @ g.T`` written out per channel: XLA:CPU fuses it with the clip into one
  # elementwise loop, where the 3x3 matmul ran as a separate dot (marking 40 signatures x 100
  # MNIST images: 17 ms vs 33 ms; the grid search's marking + MLP forward 54 ms vs 80 ms).
  channels = [sum(images[..., c] * g[d, c] for c in range(3)) for d in range(3)]
  return jnp.clip(jnp.stack(channels, axis=-1), 0.0, 1.0)


def user_transform(key: jax.Array, max_condition: float = 20.0) -> jax.Array:
  """A user-specific colour transform ``T_u ~ U(-1, 1)^{3x3}`` (section 5.4), well conditioned.

  Draws are repeated (deterministically from ``key``) until the condition number is at most
  ``max_condition``, so that ``T_u^-1`` is accurate.
  """
  for i in range(1000):
    t = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (3, 3), minval=-1.0, maxval=1.0))
    if np.linalg.cond(t) <= max_condition:
      return jnp.asarray(t, jnp.float32)
  raise RuntimeError("no well-conditioned user transform in 1000 draws")  # Never happens in practice.


def secret_pixels(key: jax.Array, image_hw: tuple[int, int], num_pixels: int = 512) -> jax.Array:
  """A boolean ``HxW`` mask of ``num_pixels`` secret pixels for :func:`blue_shift`."""
  h, w = image_hw
  if not 0 < num_pixels <= h * w:
    raise ValueError(f"num_pixels must be in [1, {h * w}] for {h}x{w} images, got {num_pixels}")
  idx = jax.random.choice(key, h * w, (num_pixels,), replace=False)
  return jnp.zeros(h * w, bool).at[idx].set(True).reshape(h, w)


def blue_shift(images_NxHxWx3: jax.Array, intensity: jax.Array, mask_HxW: jax.Array) -> jax.Array:
  """The less noticeable watermark (section 5.3): adds ``intensity`` to the blue channel of the
  secret pixels, clipped to [0, 1]."""
  images = jnp.asarray(images_NxHxWx3, jnp.float32)
  _check_rgb(images)
  if mask_HxW.shape != images.shape[-3:-1]:
    raise ValueError(f"mask shape {mask_HxW.shape} does not match images {images.shape}")
  delta_HxWx3 = jnp.zeros((*mask_HxW.shape, 3)).at[..., 2].set(mask_HxW.astype(jnp.float32))
  delta = jnp.broadcast_to(intensity * delta_HxWx3, images.shape)
  return jnp.clip(images + delta, 0.0, 1.0)


@flax.struct.dataclass
class Watermark:
  """A watermarking function ``g(I, k)`` of one family, as a pytree (passes through ``jit``).

  Attributes:
    transform: 3x3 colour transform of ``"lct"`` (T_YIQ, or a user's T_u).
    mask: ``HxW`` secret pixels of ``"blue"`` (None for ``"lct"``).
    kind: ``"lct"`` (signature in degrees, periodic 360) or ``"blue"`` (signature = blue shift).
  """

  transform: jax.Array
  mask: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default="lct")

  @classmethod
  def hue(cls, transform: jax.Array | None = None) -> "Watermark":
    """LCT with T_YIQ (default) or a user transform."""
    t = T_YIQ if transform is None else transform
    if np.shape(t) != (3, 3):
      raise ValueError(f"transform must be 3x3, got shape {np.shape(t)}")
    return cls(transform=jnp.asarray(t, jnp.float32))

  @classmethod
  def blue(cls, mask_HxW: jax.Array) -> "Watermark":
    return cls(transform=jnp.asarray(T_YIQ), mask=jnp.asarray(mask_HxW, bool), kind="blue")

  @property
  def period(self) -> float | None:
    """360 for hue rotations (signatures are angles); None for the blue shift."""
    return 360.0 if self.kind == "lct" else None

  def __call__(self, images: jax.Array, signature: jax.Array) -> jax.Array:
    if self.kind == "lct":
      return lct(images, signature, self.transform)
    if self.kind == "blue":
      return blue_shift(images, signature, self.mask)
    raise ValueError(f"unknown watermark kind {self.kind!r}")


def mark(images: np.ndarray, signature: float, watermark: Watermark | None = None) -> np.ndarray:
  """Host convenience: ``watermark(images, signature)`` as float32 numpy (default: LCT, T_YIQ)."""
  images = np.asarray(images, np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN or infinite values")
  wm = Watermark.hue() if watermark is None else watermark
  return np.asarray(_mark_jit(wm, jnp.asarray(images), jnp.float32(signature)))


_mark_jit = jax.jit(lambda wm, x, s: wm(x, s))


# ----------------------------------------------------------------------- coloured dataset


def hsv_to_rgb(h_N: np.ndarray, s_N: np.ndarray, v_N: np.ndarray) -> np.ndarray:
  """HSV (hue in degrees, s and v in [0, 1]) to RGB, ``N x 3``."""
  h = (np.asarray(h_N) % 360.0) / 60.0
  c = v_N * s_N
  x = c * (1 - np.abs(h % 2 - 1))
  z = np.zeros_like(c)
  sector = np.floor(h).astype(int) % 6
  table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
  rgb = np.zeros((len(h), 3), np.float32)
  for i, (r, g, b) in enumerate(table):
    sel = sector == i
    rgb[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
  return rgb + (v_N - c)[:, None]


def colorize(seed: int, images_NxHxWx1: np.ndarray, labels_N: np.ndarray, num_classes: int, *,
             hue_mean: float = 30.0, hue_std: float = 10.0, class_hue_step: float = 12.0) -> np.ndarray:
  """Tints grey images with random per-image colours: a coloured MNIST-style dataset.

  Foreground hue ``~ hue_mean + class_hue_step * c + N(0, hue_std)`` degrees for class
  ``c`` (saturation in [0.6, 1], value in [0.7, 1]); the background is a dark colour of
  random hue (value in [0, 0.25]). Pixel = ``g * fg + (1 - g) * bg`` with ``g`` the grey
  level. Natural colours thus have a distribution (warm foregrounds by default, like the
  colour statistics of natural photographs) that a hue rotation moves images out of;
  ``class_hue_step > 0`` ties colour to the class as in Arjovsky et al.'s coloured MNIST.

  Returns:
    float32 ``N x H x W x 3`` in [0, 1].
  """
  images = np.asarray(images_NxHxWx1, np.float32)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"colorize takes grey NHWC images with one channel, got shape {images.shape}")
  n = len(images)
  rng = np.random.default_rng(seed)
  hue = hue_mean + class_hue_step * np.asarray(labels_N) + rng.normal(0, hue_std, n)
  fg = hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.7, 1.0, n))
  bg = hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.25, n))
  out = images * fg[:, None, None, :] + (1 - images) * bg[:, None, None, :]
  return np.clip(out, 0, 1).astype(np.float32)


def assign_users(seed: int, n: int, num_users: int, per_user: int) -> np.ndarray:
  """Disjoint random image indices of ``num_users`` users, ``per_user`` each: ``users_UxP``."""
  if num_users * per_user > n:
    raise ValueError(f"{num_users} users x {per_user} images need {num_users * per_user} images, have {n}")
  return np.random.default_rng(seed).permutation(n)[: num_users * per_user].reshape(num_users, per_user)


def mark_users(images: np.ndarray, users_UxP: np.ndarray, signatures_U: Sequence[float],
               transforms_Ux3x3: np.ndarray | None = None) -> np.ndarray:
  """A copy of ``images`` where user u's images carry LCT signature ``signatures_U[u]``
  (with T_YIQ, or user u's own transform)."""
  users = np.asarray(users_UxP)
  sig = jnp.asarray(signatures_U, jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(T_YIQ), (len(users), 3, 3)) if transforms_Ux3x3 is None \
      else jnp.asarray(transforms_Ux3x3, jnp.float32)
  if sig.shape != (len(users),) or t.shape != (len(users), 3, 3):
    raise ValueError(f"need one signature and transform per user ({len(users)}), got {sig.shape}, {t.shape}")
  out = np.array(images, np.float32, copy=True)
  out[users] = np.asarray(_mark_users_jit(jnp.asarray(out[users]), sig, t))
  return out


_mark_users_jit = jax.jit(jax.vmap(lct))


# ----------------------------------------------------------------------------- the learner


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
def augment(key: jax.Array, images_NxHxWxC: jax.Array, labels_MxS: jax.Array, *, aug: Augment,
            num_classes: int) -> tuple[jax.Array, jax.Array]:
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


def train_learners(cfg: LearnerConfig, keys_M: jax.Array, images: np.ndarray, labels: np.ndarray,
                   num_classes: int, indices_MxS: np.ndarray | None = None, *,
                   checkpoint_dir: str | None = None, init_state: ensemble.EnsembleState | None = None,
                   checkpoint_interval_s: float = ensemble.CHECKPOINT_INTERVAL_S, progress: bool = True,
                   desc: str = "learner"
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

  result = trainer.fit(keys_M, images, labels, epochs=cfg.epochs, indices=idx, checkpoint_dir=checkpoint_dir,
                       checkpoint_interval_s=checkpoint_interval_s, fingerprint={"learner": repr(cfg)},
                       progress=progress, desc=desc, epoch_data=epoch_data, init_state=init_state)
  return model, result.state, result.history


def member_variables(state: ensemble.EnsembleState, m: int) -> PyTree:
  """Flax variables of member ``m`` (no member axis), for :func:`signature_losses`."""
  return jax.tree.map(lambda a: a[m], state.variables)


def save_model(path: str, model_name: str, num_classes: int, image_shape: Sequence[int],
               variables: PyTree) -> None:
  """Saves one model as an orbax checkpoint (``variables/``) plus ``model.json``."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, "variables"), variables, force=True)
  from jipguard import pipeline  # Local import: pipeline imports heavy IPProtect modules.
  pipeline.write_json(os.path.join(path, "model.json"), {
      "model": model_name, "num_classes": int(num_classes), "image_shape": [int(d) for d in image_shape]})


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


# ---------------------------------------------------------------------- verification (Eq. 6)


def _losses_local(model, variables, images_NxHxWxC, labels_N, signatures_K, wm, *, sig_chunk, img_chunk):
  """``losses_KxN`` on one device: signature chunks x image chunks, one flat forward per block."""
  k, n = signatures_K.shape[0], images_NxHxWxC.shape[0]
  pad_k, pad_n = -k % sig_chunk, -n % img_chunk
  sigs = jnp.pad(signatures_K, (0, pad_k)).reshape(-1, sig_chunk)
  x = jnp.pad(images_NxHxWxC, [(0, pad_n)] + [(0, 0)] * 3).reshape(-1, img_chunk, *images_NxHxWxC.shape[1:])
  y = jnp.pad(labels_N, (0, pad_n)).reshape(-1, img_chunk)

  def sig_block(s_S):
    def img_block(xy):
      x_B, y_B = xy
      # One forward of all S x B marked images as a flat batch. (A vmap over signatures
      # computes the same, but its batched convolutions ran ~3x slower on XLA:CPU:
      # CIFAR CNN, 36 x 100 images, 5.0 s vs 1.7 s.)
      marked = jax.vmap(wm, in_axes=(None, 0))(x_B, s_S).reshape(-1, *x_B.shape[1:])
      logits = model.apply(variables, marked, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.tile(y_B, sig_chunk)).reshape(sig_chunk, -1)
    l_IxSxB = jax.lax.map(img_block, (x, y))
    return jnp.moveaxis(l_IxSxB, 0, 1).reshape(sig_chunk, -1)  # S x (I B)

  l = jax.lax.map(sig_block, sigs).reshape(-1, x.shape[0] * img_chunk)
  return l[:k, :n]


@functools.partial(jax.jit, static_argnames=("model", "sig_chunk", "img_chunk", "mesh"))
def _signature_losses(model, variables, images, labels, signatures, wm, *, sig_chunk, img_chunk, mesh):
  local = functools.partial(_losses_local, model, sig_chunk=sig_chunk, img_chunk=img_chunk)
  if mesh is None:
    return local(variables, images, labels, signatures, wm)
  spec = jax.sharding.PartitionSpec
  fn = jax.shard_map(lambda v, x, y, s, w: local(v, x, y, s, w), mesh=mesh,
                     in_specs=(spec(), spec(), spec(), spec(sharding.MEMBER), spec()),
                     out_specs=spec(sharding.MEMBER), check_vma=False)
  return fn(variables, images, labels, signatures, wm)


def default_chunk(variables: PyTree, image_shape: tuple[int, ...]) -> int:
  """Watermarked images per forward pass of :func:`signature_losses`: 4,096, except for
  models without convolutions on CPU, whose marked batch is capped at
  ``ensemble.CPU_PASS_BYTES`` so that it stays in cache for the first layer's product. On 2
  cores, MLP 2352-256-256-10, 360 signatures x 100 images: 0.373 s with 4,096 images per
  pass, 0.321 s with 1,024; x 1,000 images: 3.55 s vs 3.25 s. The CIFAR CNN (whose
  activations exceed any cache) ran 36 x 100 in 1.28 s with 4,096 and 1.36 s with 1,024."""
  if jax.default_backend() != "cpu" or any(leaf.ndim == 4 for leaf in jax.tree.leaves(variables)):
    return 4096
  per_image = 4 * int(np.prod(image_shape))
  return int(min(4096, max(1, ensemble.CPU_PASS_BYTES // per_image)))


def signature_losses(model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array,
                     signatures: jax.Array, *, watermark: Watermark | None = None,
                     mesh: jax.sharding.Mesh | None = None, chunk: int | None = None) -> np.ndarray:
  """The loss matrix of Eq. 6: cross-entropy of every image watermarked with every signature.

  One jitted program (compiled once per shapes and model): the images of a chunk marked
  with each signature of a chunk and classified as one flat batch, ``lax.map`` over signature chunks and image chunks so that at most about
  ``chunk`` watermarked images are in flight per device. With ``mesh`` the signatures are
  padded to a multiple of its ``member`` axis and sharded over it (``shard_map``); the
  result equals the single-device one.

  Args:
    model: A jipguard Flax module (inference mode is used).
    variables: Its variables for one model (no member axis).
    images: The user's unmarked images ``N x H x W x 3`` in [0, 1].
    labels: Their labels ``(N,)``.
    signatures: Candidate signatures ``(K,)`` (degrees for LCT).
    watermark: The watermark family (default: LCT with T_YIQ).
    mesh: Optional ``sharding.make_mesh`` mesh.
    chunk: Images per forward pass and device; default :func:`default_chunk`.

  Returns:
    ``losses_KxN`` (numpy float32).

  Formal guarantees (tested):
    * Row ``k`` equals the per-image cross-entropy of ``model`` on ``watermark(images, k)``
      computed by a plain Python loop over signatures (float tolerance).
    * The sharded result equals the single-device result; padding of signatures (to the
      mesh) and of images / signatures (to chunks) never reaches the output.
    * A second call with arrays of the same shapes and the same model compiles nothing.

  Edge case handling:
    * K or N not a multiple of the chunk or mesh sizes: padded, then sliced off.
    * Grey images, mismatched labels, empty or non-finite signatures, NaN images: ValueError.

  Raises:
    ValueError: Bad shapes or non-finite inputs.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  signatures = jnp.asarray(signatures, jnp.float32)
  _check_rgb(images)
  if images.ndim != 4 or labels.shape != images.shape[:1] or signatures.ndim != 1 or not signatures.size:
    raise ValueError(f"need images NxHxWx3, labels (N,), signatures (K,): got {images.shape}, "
                     f"{labels.shape}, {signatures.shape}")
  if not (bool(jnp.all(jnp.isfinite(images))) and bool(jnp.all(jnp.isfinite(signatures)))):
    raise ValueError("images and signatures must be finite")
  wm = Watermark.hue() if watermark is None else watermark
  k, n = signatures.shape[0], images.shape[0]
  shards = sharding.num_member_shards(mesh)
  k_pad = -(-k // shards) * shards
  sigs = jnp.pad(signatures, (0, k_pad - k), mode="edge")
  chunk = default_chunk(variables, images.shape[1:]) if chunk is None else chunk
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  img_chunk = min(n, chunk)
  sig_chunk = max(1, min(k_pad // shards, chunk // img_chunk))
  if mesh is not None:
    sigs = jax.device_put(sigs, sharding.member_sharding(mesh))
    variables, images, labels, wm = sharding.replicate((variables, images, labels, wm), mesh)
  out = _signature_losses(model, variables, images, labels, sigs, wm,
                          sig_chunk=sig_chunk, img_chunk=img_chunk, mesh=mesh)
  return np.asarray(out)[:k]


@dataclasses.dataclass(frozen=True)
class GridResult:
  """Eq. 6 by grid search.

  Attributes:
    signatures: The candidates ``(K,)``.
    losses: Mean loss of the user's images per candidate ``(K,)``.
    recovered: ``k^``: the candidate of lowest mean loss.
  """

  signatures: np.ndarray
  losses: np.ndarray
  recovered: float


def grid_search(model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array,
                signatures: Sequence[float] = FULL_SPACE, **kwargs: Any) -> GridResult:
  """Recovers the signature of the lowest mean loss over ``signatures`` (Eq. 6).

  ``kwargs`` go to :func:`signature_losses` (``watermark``, ``mesh``, ``chunk``).
  """
  sigs = np.asarray(signatures, np.float32)
  losses = signature_losses(model, variables, images, labels, sigs, **kwargs).mean(1)
  return GridResult(signatures=sigs, losses=losses, recovered=float(sigs[int(np.argmin(losses))]))


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _gradient_search(model, variables, images, labels, inits_R, wm, learning_rate, *, steps):
  tx = optax.adam(learning_rate)

  def loss(s):
    logits = model.apply(variables, wm(images, s), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def descend(s0):
    def body(carry, _):
      s, opt = carry
      g = jax.grad(loss)(s)
      updates, opt = tx.update(g, opt)
      return (s + updates, opt), None

    (s, _), _ = jax.lax.scan(body, (s0, tx.init(s0)), None, length=steps)
    return s, loss(s)

  return jax.vmap(descend)(inits_R)


def gradient_search(model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array,
                    inits: Sequence[float] = tuple(range(0, 360, 30)), *, watermark: Watermark | None = None,
                    steps: int = 100, learning_rate: float = 1.0) -> tuple[float, np.ndarray, np.ndarray]:
  """Gradient search (section 4.2 (ii)): Adam on the signature from every initial value at once.

  Returns:
    ``(best, signatures_R, losses_R)``: the final signature of lowest loss (wrapped into
    [0, 360) for LCT) and every restart's final signature and loss.
  """
  wm = Watermark.hue() if watermark is None else watermark
  images = jnp.asarray(images, jnp.float32)
  _check_rgb(images)
  s, l = _gradient_search(model, variables, images, jnp.asarray(labels, jnp.int32),
                          jnp.asarray(inits, jnp.float32), wm, jnp.float32(learning_rate), steps=steps)
  s, l = np.asarray(s), np.asarray(l)
  if wm.period:
    s = np.mod(s, wm.period)
  return float(s[int(np.argmin(l))]), s, l


# ------------------------------------------------------------------- host-side statistics


def distance(a: np.ndarray, b: np.ndarray, period: float | None = 360.0) -> np.ndarray:
  """``|a - b|``, circular when ``period`` is given (hue angles)."""
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  if not period:
    return d
  d = d % period
  return np.minimum(d, period - d)


def match(recovered: np.ndarray, private: np.ndarray, tau: float = PAPER_TAU,
          period: float | None = 360.0) -> np.ndarray:
  """The matching rule ``|k^ - k*| < tau`` (elementwise)."""
  return distance(recovered, private, period) < tau


def adv_p(matches: np.ndarray, p_random: float) -> float:
  """Eq. 7 for Bernoulli trials: ``(M - N p) / N``, M matches in N trials, random-guess rate p."""
  matches = np.asarray(matches, bool)
  if matches.size == 0:
    raise ValueError("adv_p needs at least one trial")
  return float((matches.sum() - matches.size * p_random) / matches.size)


def per_example_losses(model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array) -> np.ndarray:
  """Cross-entropy of one model on each image (inference mode)."""
  images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
  out = [_plain_losses(model, variables, jnp.asarray(images[i:i + 1024]), jnp.asarray(labels[i:i + 1024]))
         for i in range(0, len(images), 1024)]
  return np.concatenate([np.asarray(o) for o in out])


@functools.partial(jax.jit, static_argnames=("model",))
def _plain_losses(model, variables, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, images, train=False), labels)


_logits = jax.jit(lambda model, variables, x: model.apply(variables, x, train=False), static_argnums=0)


def logits(model: nn.Module, variables: PyTree, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Logits of one model on ``images`` (inference mode, chunks of ``batch_size``)."""
  images = np.asarray(images, np.float32)
  return np.concatenate([np.asarray(_logits(model, variables, jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def mia_std_threshold(shadow_train_losses: np.ndarray) -> float:
  """MIA-std (Yeom et al. 2018): the mean training loss (here of the user's shadow model)."""
  return float(np.mean(shadow_train_losses))


def mia_pow_threshold(in_losses: np.ndarray, out_losses: np.ndarray) -> float:
  """MIA-pow (Sablayrolles et al. 2019): the threshold that best separates known training
  (``in``) from held-out (``out``) losses (maximum accuracy over all cut points)."""
  l = np.concatenate([in_losses, out_losses])
  member = np.concatenate([np.ones(len(in_losses), bool), np.zeros(len(out_losses), bool)])
  cuts = np.unique(l)
  cuts = np.concatenate([cuts, [cuts[-1] + 1.0]])
  acc = [np.mean((l < c) == member) for c in cuts]
  return float(cuts[int(np.argmax(acc))])
