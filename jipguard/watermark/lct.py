"""Anti-neuron watermarks (paper 003, sections 4.1 and 5.3): LCT hue rotations and the blue shift.

A user marks their images with a secret hue rotation ``k*`` (a linear colour transform, LCT)
before sharing them: :func:`lct` (Eqs. 3-5): RGB -> YIQ (or a user's own 3x3 transform
``T_u ~ U(-1, 1)``, :func:`user_transform`), rotate the (I, Q) plane by ``k`` degrees, back,
clip to [0, 1]. :func:`blue_shift` is the less noticeable variant that adds ``s`` to the blue
channel of secret pixels. :class:`Watermark` bundles either as a pytree.

Offline colour data: :func:`colorize` tints grey images (Fashion-MNIST, digits) with random
per-image colours whose hue follows the class (a "coloured MNIST" construction, Arjovsky et
al. 2019), so that natural colours have a distribution a hue rotation leaves.

Interpretation: Eq. 5 writes ``g_k = T_YIQ T_k T_YIQ^-1``; a rotation of the I/Q plane of RGB
pixels is ``T^-1 T_k T`` (RGB -> YIQ, rotate, back), which is what "convert RGB into YIQ ...
rotating the hue" describes and what we use. Hue is periodic: signature distances are circular
(``k = 0`` and ``k = 360`` coincide).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Eq. 3: RGB -> YIQ.
T_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.275, -0.321], [0.212, -0.523, 0.311]], np.float32)
FULL_SPACE = np.arange(360, dtype=np.float32)  # Default grid: every degree.
PAPER_SPACE = np.arange(30, 331, 30, dtype=np.float32)  # Section 5.1: 30, 60, ..., 330.
PAPER_TAU = 15.0


def check_rgb(images: jax.Array, what: str = "images") -> None:
  """ValueError unless ``images`` have a trailing RGB axis."""
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
  check_rgb(images)
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
  check_rgb(images)
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
  def hue(cls, transform: jax.Array | None = None) -> Watermark:
    """LCT with T_YIQ (default) or a user transform."""
    t = T_YIQ if transform is None else transform
    if np.shape(t) != (3, 3):
      raise ValueError(f"transform must be 3x3, got shape {np.shape(t)}")
    return cls(transform=jnp.asarray(t, jnp.float32))

  @classmethod
  def blue(cls, mask_HxW: jax.Array) -> Watermark:
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
  """One call: ``images`` (RGB, ``...xHxWx3`` in [0, 1]) marked with ``signature`` (degrees), as
  float32 numpy; default watermark: the LCT with T_YIQ."""
  images = np.asarray(images, np.float32)
  check_rgb(images)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN or infinite values")
  if not np.isfinite(signature):
    raise ValueError(f"signature must be a finite angle in degrees, got {signature}")
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


def colorize(
  seed: int,
  images_NxHxWx1: np.ndarray,
  labels_N: np.ndarray,
  num_classes: int,
  *,
  hue_mean: float = 30.0,
  hue_std: float = 10.0,
  class_hue_step: float = 12.0,
) -> np.ndarray:
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


def mark_users(
  images: np.ndarray, users_UxP: np.ndarray, signatures_U: Sequence[float], transforms_Ux3x3: np.ndarray | None = None
) -> np.ndarray:
  """A copy of ``images`` where user u's images carry LCT signature ``signatures_U[u]``
  (with T_YIQ, or user u's own transform)."""
  users = np.asarray(users_UxP)
  sig = jnp.asarray(signatures_U, jnp.float32)
  t = (
    jnp.broadcast_to(jnp.asarray(T_YIQ), (len(users), 3, 3))
    if transforms_Ux3x3 is None
    else jnp.asarray(transforms_Ux3x3, jnp.float32)
  )
  if sig.shape != (len(users),) or t.shape != (len(users), 3, 3):
    raise ValueError(f"need one signature and transform per user ({len(users)}), got {sig.shape}, {t.shape}")
  out = np.array(images, np.float32, copy=True)
  out[users] = np.asarray(_mark_users_jit(jnp.asarray(out[users]), sig, t))
  return out


_mark_users_jit = jax.jit(jax.vmap(lct))
