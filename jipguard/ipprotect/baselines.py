"""The baselines IPProtect is compared with (paper 000, section VI-A1 and Fig. 2).

Every baseline maps a buyer dataset to a shared ("sanitized") dataset through one call,
``sanitize(name, key, images, labels, num_classes, param)``, like IPProtect does:

* **identity**: D~_B = D_B (no protection; the highest exposure).
* **random**: every pixel of every image drawn i.i.d. from N(0, 1); labels kept (no utility).
* **instahide** (Huang et al. 2020, the cross-dataset variant; ``param`` = k): each private
  image is mixed with one other random private image and k - 2 images of a public dataset,
  with random weights in which its own weight is the largest, then multiplied by a random
  pixel-wise sign mask. N = 1 (one encoding per private image).
* **dp_merf** (Harder et al. 2021; ``param`` = sigma): the random-Fourier-feature mean
  embedding of (image, one-hot label) pairs is released once with Gaussian noise of std
  ``sigma * 2 / m``; a conditional generator is trained to match the released embedding
  (MMD with the random-feature kernel), and ``m`` images and labels are sampled from it.

Conventions (documented in docs/baselines.md):

* Inputs are images float32 NHWC in [0, 1] (the ``data`` contract) and int32 labels.
* Pixel ranges of the outputs: identity [0, 1]; random unbounded N(0, 1); instahide
  [-1, 1] (mixing happens on images mapped to [-1, 1] by ``2x - 1``, as InstaHide's
  normalised inputs, and the sign mask keeps that range); dp_merf [0, 1] (sigmoid output).
* Labels: identity, random and instahide return the buyer's labels (for InstaHide the label
  of the dominant, i.e. the encoded, private image; ``instahide_mix`` also exposes the mixed
  soft labels of the two private images); dp_merf returns the generated labels (balanced).
* InstaHide's public dataset: the caller's ``public_images``, else ``public_dataset(shape)``:
  scikit-learn's bundled 8x8 handwritten digits (1,797 images, always offline), bilinearly
  resized to the buyer's H x W and repeated over channels.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
import scipy.stats

from jipguard import data as data_lib

PARAMS: dict[str, list] = {
  "identity": [None],
  "random": [None],
  "instahide": [4, 6, 10, 15],
  "dp_merf": [5, 10, 15, 30, 40],
}
PUBLIC_SOURCE = "digits"  # Default public dataset of InstaHide (any `data.load` name works).


# Input checks. --------------------------------------------------------------------------------


def _check_key(key: Any) -> None:
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
    return
  if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
    return
  raise TypeError(
    f"key must be one JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
    f"{type(key).__name__} {getattr(key, 'dtype', '')} {getattr(key, 'shape', '')}"
  )


def _check_images(images: Any, what: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{what} must be a float NHWC array, got {images.dtype} {images.shape}")
  if images.shape[0] == 0 or 0 in images.shape[1:]:
    raise ValueError(f"{what} is empty: shape {images.shape}")
  bad = images.size - np.count_nonzero(np.isfinite(images))
  if bad:
    raise ValueError(f"{what}: {bad} pixel values are NaN or infinite")
  lo, hi = float(images.min()), float(images.max())
  if lo < 0 or hi > 1:
    raise ValueError(f"{what}: pixels must lie in [0, 1] (the data contract), found min {lo} and max {hi}")
  return images.astype(np.float32)


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


# InstaHide. -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _public_cached(source: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  parts = [data_lib.load(source, split) for split in data_lib.SPLITS]
  images = np.concatenate([p.images for p in parts])
  h, w, c = image_shape
  if images.shape[1:3] != (h, w):
    images = np.asarray(jax.image.resize(images, (len(images), h, w, images.shape[-1]), "linear"))
  if images.shape[-1] != c:
    if images.shape[-1] == 1:
      images = np.repeat(images, c, axis=-1)
    else:  # Colour to grey (c == 1) or another channel count: the mean, repeated.
      images = np.repeat(images.mean(-1, keepdims=True), c, axis=-1)
  images = np.clip(images, 0, 1).astype(np.float32)
  images.setflags(write=False)
  return images


def public_dataset(image_shape: Sequence[int], source: str = PUBLIC_SOURCE) -> np.ndarray:
  """InstaHide's public dataset, fitted to the buyer's image shape.

  Args:
    image_shape: (H, W, C) of the buyer's images.
    source: a `data.load` name; both splits are concatenated. The default, "digits", is
      scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline everywhere).

  Returns:
    float32 (P, H, W, C) in [0, 1] (read-only): bilinearly resized to H x W; grey images
    repeated over C channels, colour ones averaged to grey first when C differs.
  """
  shape = tuple(int(d) for d in image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape!r}")
  return _public_cached(source, shape)


class InstaHideDraws(NamedTuple):
  """The randomness of one InstaHide encoding pass (N = 1) over n private images."""

  other_N: jax.Array  # The second private image of each encoding (never the image itself).
  public_NxQ: jax.Array  # k - 2 distinct public images per encoding.
  coefficients_NxJ: jax.Array  # Mixing weights: [own, other private, public...], sum 1, own the largest.
  signs_NxHxWxC: jax.Array  # The pixel-wise sign mask, +-1.


def instahide_draws(
  key: jax.Array, num_private: int, num_public: int, k: int, image_shape: Sequence[int]
) -> InstaHideDraws:
  """All of InstaHide's random choices, from one uniform draw (one threefry call compiles fast).

  * The other private image is uniform over the rest of the private set.
  * The k - 2 public images are uniform without replacement (the top k - 2 of random scores).
  * The weights are |N(0, 1)| draws normalised to sum 1, as InstaHide's code draws them; each
    row's largest weight is then swapped into column 0 (the encoded private image), as the
    paper requires ("the mixup coefficient for the original image to be maximum").
  * The sign mask is a fair +-1 coin per pixel.
  """
  n, d = num_private, math.prod(image_shape)
  u = jax.random.uniform(key, (n, 1 + num_public + k + d), minval=jnp.finfo(jnp.float32).tiny)
  other = (jnp.arange(n) + 1 + jnp.floor(u[:, 0] * (n - 1)).astype(jnp.int32)) % n
  other = jnp.where(other == jnp.arange(n), (other + 1) % n, other)  # u -> 1 rounding guard.
  scores = u[:, 1 : 1 + num_public]
  public = jax.lax.top_k(scores, k - 2)[1].astype(jnp.int32) if k > 2 else jnp.zeros((n, 0), jnp.int32)
  lam = jnp.sqrt(2.0) * jax.lax.erf_inv(u[:, 1 + num_public : 1 + num_public + k])  # |N(0, 1)|.
  lam = lam / jnp.sum(lam, axis=1, keepdims=True)
  rows, top = jnp.arange(n), jnp.argmax(lam, axis=1)
  lam = lam.at[rows, 0].set(lam[rows, top]).at[rows, top].set(lam[:, 0])
  signs = jnp.where(u[:, 1 + num_public + k :] < 0.5, 1.0, -1.0).reshape(n, *image_shape)
  return InstaHideDraws(other, public, lam, signs.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("k",))
def _instahide_mix(key, private_NxHxWxC, public_PxHxWxC, *, k):
  n = private_NxHxWxC.shape[0]
  draws = instahide_draws(key, n, public_PxHxWxC.shape[0], k, private_NxHxWxC.shape[1:])
  lam_NxJ = draws.coefficients_NxJ
  signed = lambda x: 2 * x - 1  # [0, 1] -> [-1, 1], InstaHide's centred inputs.
  w = lambda j: lam_NxJ[:, j].reshape(n, 1, 1, 1)
  mixed = w(0) * signed(private_NxHxWxC) + w(1) * signed(private_NxHxWxC[draws.other_N])
  for j in range(k - 2):
    mixed = mixed + w(j + 2) * signed(public_PxHxWxC[draws.public_NxQ[:, j]])
  return jnp.clip(mixed, -1, 1) * draws.signs_NxHxWxC, lam_NxJ, draws.signs_NxHxWxC  # Clip: float rounding only.


def instahide_mix(
  key: jax.Array, private_NxHxWxC: np.ndarray, public_PxHxWxC: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cross-dataset InstaHide with N = 1: one encoding per private image.

  Encoding i is ``signs_i * (lam_i0 (2 x_i - 1) + lam_i1 (2 x_o - 1) + sum_j lam_ij (2 p_j - 1))``
  with x_o another private image, p_j k - 2 distinct public images, the weights and the sign
  mask all from ``instahide_draws(key, N, P, k, (H, W, C))``.

  Args:
    key: PRNG key.
    private_NxHxWxC: the private images, [0, 1], N >= 2.
    public_PxHxWxC: the public images, [0, 1], same H, W, C, P >= k - 2.
    k: images per encoding, >= 2 (2 private + k - 2 public).

  Returns:
    (mixed (N, H, W, C) in [-1, 1], coefficients (N, k), signs (N, H, W, C) of +-1), numpy.
    The soft label of encoding i is ``lam_i0 onehot(y_i) + lam_i1 onehot(y_o)``.

  Raises:
    TypeError: a bad key. ValueError: a bad k, shapes, non-finite or out-of-range pixels.
  """
  _check_key(key)
  private = _check_images(private_NxHxWxC, "private images")
  public = _check_images(public_PxHxWxC, "public images")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
    raise ValueError(f"InstaHide's k must be an integer >= 2 (2 private + k - 2 public images), got {k!r}")
  if public.shape[1:] != private.shape[1:]:
    raise ValueError(
      f"public images have shape {public.shape[1:]}, private ones {private.shape[1:]}; "
      "fit them with public_dataset(image_shape)"
    )
  if len(private) < 2:
    raise ValueError("InstaHide mixes 2 private images: need at least 2")
  if len(public) < k - 2:
    raise ValueError(f"k={k} needs at least {k - 2} public images, got {len(public)}")
  mixed, lam, signs = _instahide_mix(key, jnp.asarray(private), jnp.asarray(public), k=int(k))
  return np.asarray(mixed), np.asarray(lam), np.asarray(signs)


# DP-MERF. -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPMERFConfig:
  """DP-MERF's data-independent settings (none of them looks at the private data)."""

  num_features: int = 2000  # D: random features, cos and sin of D / 2 frequencies.
  length_scale: float | None = None  # Gaussian kernel width; None: sqrt(105 d / 784) (DP-MERF's MNIST value at d=784).
  code_dim: int = 5  # Generator's latent code size (DP-MERF's MNIST generator).
  hidden: tuple[int, ...] = (200, 500)  # Generator's hidden widths (DP-MERF's MNIST generator's dense part).
  steps: int = 500  # Generator Adam steps; as good as 1,500 on Fashion-MNIST (docs/baselines.md).
  batch_size: int = 200  # Generated samples per step.
  learning_rate: float = 1e-2  # Adam, DP-MERF's default.
  sensitivity_scale: float = 2.0  # Delta * m: replace-one sensitivity of a mean of unit-norm terms is 2 / m.

  def __post_init__(self):
    if self.num_features < 2 or self.num_features % 2:
      raise ValueError(f"num_features must be a positive even integer, got {self.num_features}")
    if self.length_scale is not None and not self.length_scale > 0:
      raise ValueError(f"length_scale must be positive, got {self.length_scale}")
    if min(self.code_dim, self.steps, self.batch_size, *self.hidden) < 1 or not self.learning_rate > 0:
      raise ValueError(f"invalid DPMERFConfig {self}")


def default_length_scale(input_dim: int) -> float:
  """sqrt(105 d / 784): DP-MERF's (Fashion-)MNIST kernel (rff_sigma = 105) scaled with the pixel count."""
  return math.sqrt(105.0 * input_dim / 784.0)


def rff_frequencies(key: jax.Array, input_dim: int, num_features: int, length_scale: float | None = None) -> jax.Array:
  """Frequencies (num_features / 2, input_dim) ~ N(0, I / length_scale^2) of a Gaussian kernel."""
  _check_key(key)
  if num_features < 2 or num_features % 2:
    raise ValueError(f"num_features must be a positive even integer, got {num_features}")
  scale = default_length_scale(input_dim) if length_scale is None else length_scale
  return jax.random.normal(key, (num_features // 2, input_dim)) / scale


def rff_features(frequencies_FxD: jax.Array, x_NxD: jax.Array) -> jax.Array:
  """phi(x) = [cos(W x), sin(W x)] / sqrt(F), shape (N, 2F); ||phi(x)|| = 1 exactly.

  phi(x) . phi(y) is an unbiased estimate of exp(-||x - y||^2 / (2 length_scale^2)).
  """
  proj_NxF = x_NxD @ frequencies_FxD.T
  return jnp.concatenate([jnp.cos(proj_NxF), jnp.sin(proj_NxF)], axis=1) / jnp.sqrt(frequencies_FxD.shape[0])


def mean_embedding(
  frequencies_FxD: jax.Array, images_NxHxWxC: jax.Array, labels_N: jax.Array, num_classes: int
) -> jax.Array:
  """(1 / N) sum_i phi(x_i) onehot(y_i)^T, shape (2F, C): the kernel mean embedding of (x, y)."""
  phi = rff_features(frequencies_FxD, images_NxHxWxC.reshape(images_NxHxWxC.shape[0], -1))
  return phi.T @ jax.nn.one_hot(labels_N, num_classes, dtype=phi.dtype) / images_NxHxWxC.shape[0]


_mean_embedding_jit = jax.jit(mean_embedding, static_argnames=("num_classes",))


def mmd2(embedding_a: jax.Array, embedding_b: jax.Array) -> jax.Array:
  """Squared MMD under the random-feature kernel: ||a - b||_F^2 of two mean embeddings."""
  return jnp.sum(jnp.square(embedding_a - embedding_b))


def dp_merf_embedding(
  key: jax.Array,
  images_NxHxWxC: np.ndarray,
  labels_N: np.ndarray,
  num_classes: int,
  sigma: float,
  frequencies_FxD: jax.Array,
  *,
  sensitivity_scale: float = 2.0,
) -> tuple[np.ndarray, float]:
  """The released mean embedding: ``mean_embedding + N(0, (sigma * Delta)^2 I)``, released once.

  Each ``phi(x) onehot(y)^T`` has Frobenius norm exactly 1, so replacing one of the m examples
  moves the mean by at most ``Delta = 2 / m`` (``sensitivity_scale / m``); Gaussian noise of
  std ``sigma * Delta`` on every entry is then the Gaussian mechanism with noise multiplier
  sigma (``gaussian_epsilon`` converts it to epsilon).

  Args:
    key: PRNG key of the noise.
    images_NxHxWxC: private images in [0, 1].
    labels_N: their labels.
    num_classes: C.
    sigma: noise multiplier >= 0 (0 releases the clean embedding, not private).
    frequencies_FxD: ``rff_frequencies(..., input_dim=H*W*C, ...)`` (data-independent, public).
    sensitivity_scale: Delta * m.

  Returns:
    (noisy embedding (2F, C) float32 numpy, the noise std used ``sigma * Delta``).
  """
  _check_key(key)
  images = _check_images(images_NxHxWxC)
  labels = _check_labels(labels_N, len(images), num_classes)
  if (
    not isinstance(sigma, (int, float, np.integer, np.floating))
    or isinstance(sigma, bool)
    or not (np.isfinite(sigma) and sigma >= 0)
  ):
    raise ValueError(f"DP-MERF's sigma must be a finite number >= 0, got {sigma!r}")
  freq = jnp.asarray(frequencies_FxD)
  if freq.ndim != 2 or freq.shape[1] != math.prod(images.shape[1:]):
    raise ValueError(f"frequencies must have shape (F, {math.prod(images.shape[1:])}), got {freq.shape}")
  clean = _mean_embedding_jit(freq, jnp.asarray(images), jnp.asarray(labels), num_classes=int(num_classes))
  std = float(sigma) * sensitivity_scale / len(images)
  noisy = clean + std * jax.random.normal(key, clean.shape, clean.dtype)
  return np.asarray(noisy), std


def gaussian_epsilon(sigma: float, delta: float = 1e-5) -> float:
  """Epsilon of one Gaussian-mechanism release with noise multiplier sigma at this delta.

  The exact (analytic) calibration of Balle & Wang 2018: the smallest eps with
  ``Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta``.
  """
  if not sigma > 0 or not 0 < delta < 1:
    raise ValueError(f"need sigma > 0 and delta in (0, 1), got sigma={sigma}, delta={delta}")
  phi = scipy.stats.norm.cdf
  gap = lambda eps: phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma) - delta
  if gap(0.0) <= 0:
    return 0.0
  hi = 1.0
  while gap(hi) > 0:
    hi *= 2
  return float(scipy.optimize.brentq(gap, 0.0, hi, xtol=1e-10))


class Generator(nn.Module):
  """DP-MERF's conditional generator (dense): [z, onehot(y)] -> ReLU MLP -> sigmoid pixels."""

  image_shape: tuple[int, int, int]
  num_classes: int
  hidden: tuple[int, ...] = (200, 500)

  @nn.compact
  def __call__(self, z_BxZ: jax.Array, labels_B: jax.Array) -> jax.Array:
    x = jnp.concatenate([z_BxZ, jax.nn.one_hot(labels_B, self.num_classes, dtype=z_BxZ.dtype)], axis=1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    x = nn.sigmoid(nn.Dense(math.prod(self.image_shape))(x))
    return x.reshape(z_BxZ.shape[0], *self.image_shape)


class GeneratorFit(NamedTuple):
  """A trained DP-MERF generator."""

  params: Any  # Generator parameters.
  generator: Generator  # The module.
  config: DPMERFConfig
  loss_history: np.ndarray  # MMD^2 minibatch loss per step.


def _draw(key, batch, code_dim, num_classes):
  key_z, key_y = jax.random.split(key)
  return jax.random.normal(key_z, (batch, code_dim)), jax.random.randint(key_y, (batch,), 0, num_classes)


@functools.partial(
  jax.jit, static_argnames=("generator", "batch_size", "code_dim", "learning_rate"), donate_argnums=(0, 1)
)
def _train_chunk(
  params, opt_state, keys_S, active_S, target_FxK, frequencies, *, generator, batch_size, code_dim, learning_rate
):
  tx = optax.adam(learning_rate)

  def loss_fn(p, key):
    z, y = _draw(key, batch_size, code_dim, generator.num_classes)
    return mmd2(mean_embedding(frequencies, generator.apply(p, z, y), y, generator.num_classes), target_FxK)

  def step(carry, inputs):
    key, active = inputs

    def update(carry):
      p, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, key)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss

    return jax.lax.cond(active, update, lambda c: (c, jnp.float32(jnp.nan)), carry)

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (keys_S, active_S))
  return params, opt_state, losses


_CHUNK = 250  # Steps per jitted scan (the last is padded with no-op steps): a NaN stops training early.


def dp_merf_train_generator(
  key: jax.Array,
  embedding_FxK: np.ndarray,
  frequencies_FxD: jax.Array,
  image_shape: Sequence[int],
  config: DPMERFConfig = DPMERFConfig(),
) -> GeneratorFit:
  """Trains a conditional generator whose samples' mean embedding matches ``embedding_FxK``.

  Each Adam step draws ``batch_size`` codes z ~ N(0, I) and labels uniform over the C
  classes (the buyer sets here are class-balanced) and minimises ``mmd2`` between their
  mean embedding and the released one. Uses only the released embedding: post-processing,
  so the generator and its samples keep the release's privacy.

  Raises:
    FloatingPointError: a non-finite loss.
  """
  _check_key(key)
  target = jnp.asarray(embedding_FxK, jnp.float32)
  freq = jnp.asarray(frequencies_FxD, jnp.float32)
  shape = tuple(int(d) for d in image_shape)
  if target.ndim != 2 or target.shape[0] != 2 * freq.shape[0] or freq.shape[1] != math.prod(shape):
    raise ValueError(
      f"embedding {target.shape}, frequencies {freq.shape} and image shape {shape} do not fit: "
      "need embedding (2F, C) and frequencies (F, H*W*C)"
    )
  if not bool(jnp.all(jnp.isfinite(target))):
    raise ValueError("the embedding contains NaN or infinite values")
  generator = Generator(shape, int(target.shape[1]), tuple(config.hidden))
  key_init, key_steps = jax.random.split(key)
  z, y = _draw(key_init, 1, config.code_dim, generator.num_classes)
  params = generator.init(key_init, z, y)
  opt_state = optax.adam(config.learning_rate).init(params)
  chunk_steps = min(_CHUNK, config.steps)  # Every chunk has this length: one compile per shape.
  losses = []
  for start in range(0, config.steps, chunk_steps):
    t = jnp.arange(start, start + chunk_steps)
    keys = jax.vmap(lambda i: jax.random.fold_in(key_steps, i))(t)
    params, opt_state, chunk = _train_chunk(
      params,
      opt_state,
      keys,
      t < config.steps,
      target,
      freq,
      generator=generator,
      batch_size=config.batch_size,
      code_dim=config.code_dim,
      learning_rate=config.learning_rate,
    )
    chunk = np.asarray(chunk)[: config.steps - start]
    if not np.all(np.isfinite(chunk)):
      raise FloatingPointError(f"DP-MERF generator loss became non-finite by step {start + len(chunk)}")
    losses.append(chunk)
  return GeneratorFit(params, generator, config, np.concatenate(losses))


@functools.partial(jax.jit, static_argnames=("generator", "n", "code_dim"))
def _sample(key, params, *, generator, n, code_dim):
  key_z, key_y = jax.random.split(key)
  labels = jax.random.permutation(key_y, jnp.arange(n) % generator.num_classes)
  return generator.apply(params, jax.random.normal(key_z, (n, code_dim)), labels), labels


def dp_merf_sample(key: jax.Array, fit: GeneratorFit, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n generated images (float32 NHWC in [0, 1]) and their labels (int32, balanced, shuffled)."""
  _check_key(key)
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be a positive integer, got {n!r}")
  images, labels = _sample(key, fit.params, generator=fit.generator, n=int(n), code_dim=fit.config.code_dim)
  return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def dp_merf(
  key: jax.Array,
  images_NxHxWxC: np.ndarray,
  labels_N: np.ndarray,
  num_classes: int,
  sigma: float,
  config: DPMERFConfig = DPMERFConfig(),
) -> tuple[np.ndarray, np.ndarray, GeneratorFit, float]:
  """The whole DP-MERF baseline: frequencies, one noisy release, generator, m samples.

  Returns:
    (images, labels, the generator fit, the noise std of the release).
  """
  images = _check_images(images_NxHxWxC)
  key_freq, key_noise, key_train, key_sample = jax.random.split(key, 4)
  freq = rff_frequencies(key_freq, math.prod(images.shape[1:]), config.num_features, config.length_scale)
  released, std = dp_merf_embedding(
    key_noise, images, labels_N, num_classes, sigma, freq, sensitivity_scale=config.sensitivity_scale
  )
  fit = dp_merf_train_generator(key_train, released, freq, images.shape[1:], config)
  out_images, out_labels = dp_merf_sample(key_sample, fit, len(images))
  return out_images, out_labels, fit, std


# The common interface. ------------------------------------------------------------------------


def sanitize(
  name: str,
  key: jax.Array,
  images_NxHxWxC: np.ndarray,
  labels_N: np.ndarray,
  num_classes: int,
  param=None,
  *,
  public_images: np.ndarray | None = None,
  dp_merf_config: DPMERFConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A baseline's shared version of a buyer dataset.

  Args:
    name: one of ``PARAMS``: "identity", "random", "instahide", "dp_merf".
    key: PRNG key (unused by identity).
    images_NxHxWxC: the buyer's images, float NHWC in [0, 1].
    labels_N: their int labels in [0, num_classes).
    num_classes: C.
    param: None for identity and random; k (int >= 2) for instahide; sigma (number >= 0)
      for dp_merf. ``PARAMS`` lists the paper's values.
    public_images: InstaHide's public set (P, H, W, C) in [0, 1]; default
      ``public_dataset(image_shape)`` (sklearn digits, resized).
    dp_merf_config: DP-MERF's settings (default ``DPMERFConfig()``).

  Returns:
    (sanitized images float32 NHWC, labels int32): for dp_merf the generated labels, else the
    buyer's. Ranges: see the module docstring.

  Raises:
    TypeError: a bad key. ValueError: unknown name, a param the baseline does not take,
    shapes, NaN / infinite or out-of-range pixels, bad labels.
  """
  if name not in PARAMS:
    raise ValueError(f"unknown baseline {name!r}: expected one of {tuple(PARAMS)}")
  _check_key(key)
  images = _check_images(images_NxHxWxC)
  labels = _check_labels(labels_N, len(images), num_classes)
  if name in ("identity", "random"):
    if param is not None:
      raise ValueError(f"baseline {name!r} takes no parameter, got param={param!r}")
    if name == "identity":
      return images.copy(), labels
    return np.asarray(jax.random.normal(key, images.shape, jnp.float32)), labels
  if param is None:
    raise ValueError(f"baseline {name!r} needs a parameter, e.g. one of {PARAMS[name]}")
  if name == "instahide":
    public = public_images if public_images is not None else public_dataset(images.shape[1:])
    mixed, _, _ = instahide_mix(key, images, public, param)
    return mixed, labels
  out_images, out_labels, _, _ = dp_merf(key, images, labels, num_classes, param, dp_merf_config or DPMERFConfig())
  return out_images, out_labels
