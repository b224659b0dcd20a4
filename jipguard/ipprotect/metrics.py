"""Utility and security metrics of IPProtect (sections VI-A4 and VI-B of the paper).

Scores are computed in JAX from logits; the statistics built on them (rank correlation,
confidence bounds) run on the host in numpy / scipy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


def utility(logits_MxNxK: jax.Array, labels_N: jax.Array, mask_MxN: np.ndarray | None = None) -> np.ndarray:
  """Eq. 1: each model's accuracy on a dataset, ``U_g(D)``, shape (M,).

  With ``mask_MxN``, model m's accuracy on the images where ``mask[m]`` is true only.
  """
  correct = jnp.argmax(logits_MxNxK, -1) == jnp.asarray(labels_N)[None]
  if mask_MxN is None:
    return np.asarray(jnp.mean(correct, axis=-1))
  mask = jnp.asarray(mask_MxN, bool)
  if not bool(jnp.all(jnp.any(mask, axis=-1))):
    raise ValueError("every model needs at least one image in mask_MxN")
  return np.asarray(jnp.sum(correct & mask, axis=-1) / jnp.sum(mask, axis=-1))


def utility_mae(u_original_M: np.ndarray, u_sanitized_M: np.ndarray) -> float:
  """The headline: mean over models of |U(D~_B) - U(D_B)|."""
  return float(np.mean(np.abs(np.asarray(u_sanitized_M) - np.asarray(u_original_M))))


def compliance(logits_original_MxNxK: jax.Array, logits_sanitized_MxNxK: jax.Array) -> np.ndarray:
  """Per model, the fraction of images whose argmax is the same on x~ and x, shape (M,)."""
  same = jnp.argmax(logits_original_MxNxK, -1) == jnp.argmax(logits_sanitized_MxNxK, -1)
  return np.asarray(jnp.mean(same, axis=-1))


def estimated_risk(logits_original_MxNxK: jax.Array, logits_sanitized_MxNxK: jax.Array) -> np.ndarray:
  """Per model, the mean L2 distance between the logits on x~ and on x, shape (M,)."""
  d = jnp.linalg.norm(logits_original_MxNxK - logits_sanitized_MxNxK, axis=-1)
  return np.asarray(jnp.mean(d, axis=-1))


def rank_correlation(u_original_M: np.ndarray, u_sanitized_M: np.ndarray) -> float:
  """Spearman correlation of the sellers' utilities on original vs sanitized data.

  A buyer cares whether the ranking of sellers survives sanitization (1: same order).
  NaN if either side is constant.
  """
  if np.ptp(u_original_M) == 0 or np.ptp(u_sanitized_M) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(u_original_M, u_sanitized_M).statistic)


def hoeffding_lower_bound(values_M: np.ndarray, confidence: float = 0.95) -> float:
  """One-sided Hoeffding lower confidence bound on the mean of [0, 1]-valued draws.

  With M i.i.d. models' compliances c_m in [0, 1], the expected compliance of an unseen
  model of the same distribution is at least ``max(0, mean(c) - sqrt(ln(1/delta) / (2M)))``
  with probability ``confidence = 1 - delta``.
  """
  values_M = np.asarray(values_M, np.float64)
  if values_M.size == 0 or not 0 < confidence < 1:
    raise ValueError("need at least one value and a confidence in (0, 1)")
  bound = values_M.mean() - math.sqrt(math.log(1 / (1 - confidence)) / (2 * values_M.size))
  return float(max(bound, 0.0))


def pixel_correlation(a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray) -> np.ndarray:
  """Pearson correlation between each pair of images (flattened), shape (N,)."""
  a = np.asarray(a_NxHxWxC, np.float64).reshape(len(a_NxHxWxC), -1)
  b = np.asarray(b_NxHxWxC, np.float64).reshape(len(b_NxHxWxC), -1)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return np.divide((a * b).sum(1), denom, out=np.zeros(len(a)), where=denom > 0)


@jax.jit
def _ssim(x, y):
  # Gaussian window 7x7, sigma 1.5 (a small-image variant of Wang et al. 2004), data range 1.
  g = jnp.exp(-0.5 * jnp.square(jnp.arange(7.0) - 3) / 1.5**2)
  g = g / g.sum()
  win = (g[:, None] * g[None, :])[:, :, None, None]

  def blur(z):
    c = z.shape[-1]
    return jax.lax.conv_general_dilated(
      z, jnp.tile(win, (1, 1, 1, c)), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
    )

  c1, c2 = 0.01**2, 0.03**2
  mx, my = blur(x), blur(y)
  sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def ssim(a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray) -> np.ndarray:
  """Structural similarity of each pair (data range 1; sanitized pixels clipped to [0, 1]), (N,)."""
  a = np.clip(np.asarray(a_NxHxWxC, np.float32), 0, 1)
  b = np.clip(np.asarray(b_NxHxWxC, np.float32), 0, 1)
  return np.asarray(_ssim(a, b))


def sample_std(values: np.ndarray) -> float:
  """Sample standard deviation (ddof = 1) of repetitions (seeds); NaN for fewer than two."""
  v = np.asarray(values, np.float64)
  return float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
