"""IP exposure of a sanitized dataset (IPProtect paper, section III-A, Defs. 2-4, and VI-A4).

A sanitized dataset D~ is safe to share only if it is useless as images and as training data:

* **Image IP exposure** (Def. 2, Eq. 3): ``E_I(x~, x) = 1 / D(x~, x)`` with D the perceptual
  loss of an ImageNet-pretrained VGG at conv5_1, ``||phi(x~) - phi(x)||^2 / (L H W)``, averaged
  over the dataset. ``vgg.VGGFeatures`` is that network in Flax; its weights come from a file
  the user gives (``vgg.load_vgg_weights``; ``scripts/convert_vgg_weights.py`` writes it from
  torchvision's or Keras' VGG16/VGG19). Without a file, :func:`image_exposure` reports stand-ins
  under their own names, never as the VGG perceptual loss: ``pixel_mse`` (1 / per-pixel MSE),
  ``ssim`` (mean SSIM, a similarity, not inverted) and ``own_cnn_feature`` (1 / the same
  feature distance under the zoo's CNN trained on D_X, a network the run trained itself).
* **Training statistical IP exposure** (Def. 3, Eqs. 4-5): mean accuracy on D_X of the model
  set G trained on D~ (:func:`training_exposure`).
* **Inference statistical IP exposure** (Def. 4, Eqs. 6-7): mean accuracy on D~ of the model
  set G trained on D_X (:func:`fit_zoo` once, then :func:`inference_exposure` per D~).
* **0-1 normalised harmonic mean** (VI-A4): :func:`normalized_harmonic_mean`.

G (``ZOO``) is the paper's list: logistic regression, Bernoulli and Gaussian naive Bayes,
random forest, linear SVC, decision tree, LDA, AdaBoost, MLP, CNN, bagging, gradient
boosting and XGBoost; scikit-learn / xgboost on flattened pixels, the CNN in JAX (one
:class:`jipguard.ensemble.EnsembleTrainer` member). The models are fitted in parallel
threads (scikit-learn's and XGBoost's tree code, BLAS and XLA release the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import ensemble, models
from jipguard.ipprotect import metrics
from jipguard.ipprotect.vgg import VGGWeights, check_pair, vgg_perceptual_distance

# --------------------------------------------------------------------------------------------
# Image IP exposure and its stand-ins.


def inverse_mean(distances_N: np.ndarray) -> float:
  """Eq. 3 averaged over a dataset: mean of 1 / d (infinite if any distance is 0)."""
  d = np.asarray(distances_N, np.float64)
  if d.size == 0 or np.any(d < 0) or not np.all(np.isfinite(d)):
    raise ValueError("distances must be a non-empty array of finite values >= 0")
  if np.any(d == 0):
    return math.inf
  return float(np.mean(1.0 / d))


def pixel_mse(a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray) -> np.ndarray:
  """Per-pair mean squared pixel difference, shape (N,)."""
  a, b = check_pair(a_NxHxWxC, b_NxHxWxC)
  return np.mean(np.square(a.astype(np.float64) - b), axis=(1, 2, 3))


def image_exposure(
  originals_NxHxWxC: np.ndarray,
  sanitized_NxHxWxC: np.ndarray,
  *,
  pair_randomly: bool = False,
  seed: int = 0,
  vgg: VGGWeights | None = None,
  vgg_size: int = 224,
  feature_zoo: FittedZoo | None = None,
) -> dict[str, float]:
  """Image IP exposure of a dataset (Def. 2) and / or its named stand-ins.

  Args:
    originals_NxHxWxC: The original images D_O.
    sanitized_NxHxWxC: Their sanitized versions (same order), or a generated set.
    pair_randomly: Pair each original with a randomly chosen sanitized image (the paper's
      choice for DP-MERF, whose outputs correspond to no particular original).
    seed: Seed of the random pairing.
    vgg: Weights of the pretrained VGG; gives ``vgg_conv5_1`` (the paper's metric).
    vgg_size: Input size of the VGG (see ``vgg.vgg_perceptual_distance``).
    feature_zoo: A zoo fitted on D_X (:func:`fit_zoo`) with its CNN: gives the stand-in
      ``own_cnn_feature``.

  Returns:
    ``{"vgg_conv5_1": ...}`` (only with ``vgg``), ``pixel_mse`` (mean 1 / MSE), ``ssim``
    (mean SSIM, a similarity in [-1, 1]) and ``own_cnn_feature`` (with ``feature_zoo``).
    Exposures are ``inf`` when some pair is identical (the Identity baseline).
  """
  a, b = check_pair(originals_NxHxWxC, sanitized_NxHxWxC)
  if pair_randomly:
    b = b[np.random.default_rng(seed).permutation(len(b))]
  out = {}
  if vgg is not None:
    out["vgg_conv5_1"] = inverse_mean(vgg_perceptual_distance(vgg, a, b, size=vgg_size))
  out["pixel_mse"] = inverse_mean(pixel_mse(a, b))
  out["ssim"] = float(np.mean(metrics.ssim(a, b)))
  if feature_zoo is not None:
    out["own_cnn_feature"] = inverse_mean(feature_zoo.feature_distance(a, b))
  return out


# Display names of the image exposure metrics (a stand-in is never called the VGG loss).
IMAGE_METRIC_NAMES = {
  "vgg_conv5_1": "1 / VGG conv5_1 perceptual loss (Def. 2)",
  "own_cnn_feature": "stand-in: 1 / feature distance under the run's own CNN trained on D_X",
  "pixel_mse": "stand-in: 1 / per-pixel MSE",
  "ssim": "stand-in: mean SSIM (a similarity, not inverted)",
}


# --------------------------------------------------------------------------------------------
# Statistical IP exposure (Defs. 3, 4): the model set G.

ZOO = (
  "logistic_regression",
  "bernoulli_nb",
  "gaussian_nb",
  "random_forest",
  "linear_svc",
  "decision_tree",
  "lda",
  "adaboost",
  "mlp",
  "cnn",
  "bagging",
  "gradient_boosting",
  "xgboost",
)


@dataclasses.dataclass(frozen=True)
class ZooConfig:
  """How each model of G is trained (the paper gives no hyper-parameters: library defaults)."""

  models: tuple[str, ...] = ZOO  # Which members of G to use.
  n_estimators: int = 50  # Forests, bagging, AdaBoost, gradient boosting, XGBoost.
  max_iter: int = 200  # Logistic regression, linear SVC, MLP.
  mlp_hidden: int = 128  # Hidden units of the MLP.
  # Features searched per split by gradient boosting: "sqrt" makes it ~25x faster on 784 pixels
  # (158 s -> ~7 s on 2,000 images, 2 cores); None is scikit-learn's default (all).
  gradient_boosting_max_features: str | None = "sqrt"
  cnn_epochs: int = 5  # Epochs of the JAX CNN.
  cnn_batch_size: int = 64  # Its minibatch size.
  cnn_learning_rate: float = 1e-3  # Its Adam step size.
  n_jobs: int = 2  # Models fitted in parallel (threads).
  seed: int = 0  # Seed of every model's randomness.

  def __post_init__(self):
    unknown = sorted(set(self.models) - set(ZOO))
    if unknown or not self.models:
      raise ValueError(f"unknown zoo models {unknown}; choose from {ZOO}")
    for name in ("n_estimators", "max_iter", "mlp_hidden", "cnn_epochs", "cnn_batch_size", "n_jobs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


SMOKE_ZOO = ZooConfig(n_estimators=5, max_iter=30, mlp_hidden=32, cnn_epochs=2)


class ZooCNN(nn.Module):
  """The CNN of G: ``[conv3x3(32) ReLU maxpool] -> [conv3x3(64) ReLU maxpool] -> dense(128) -> C``.

  ``features=True`` returns the last conv block's map (the stand-in image metric's phi).
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    del train  # No dropout or batch norm.
    for width in (32, 64):
      x = models.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)))
    if features:
      return x
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


@functools.partial(jax.jit, static_argnames=("model",))
def _cnn_feature_distance(model, variables, a, b):
  fa = model.apply(variables, a, features=True)
  fb = model.apply(variables, b, features=True)
  return jnp.mean(jnp.square(fa - fb), axis=(1, 2, 3))


@functools.cache
def _adam(learning_rate: float) -> optax.GradientTransformation:
  """One optimiser object per step size: the trainer's jitted step is cached on its identity."""
  return optax.adam(learning_rate)


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the leading axis with zeros to a multiple of ``multiple`` (one compiled shape per bucket)."""
  n = -(-len(x) // multiple) * multiple
  return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)]) if n > len(x) else x


class _CNNClassifier:
  """The JAX CNN behind a scikit-learn-like ``fit`` / ``predict`` on flattened images.

  Arrays are zero-padded to a multiple of ``_BUCKET`` rows and the batch size is fixed, so
  every training and evaluation set up to that size shares one compiled program (the
  padding is never trained on: training indices point at real rows only).
  """

  _BUCKET = 1024

  def __init__(self, image_shape, num_classes, cfg: ZooConfig):
    self.image_shape, self.num_classes, self.cfg = tuple(image_shape), num_classes, cfg
    self.model = ZooCNN(num_classes)

  def fit(self, x_NxD, y_N):
    x = np.asarray(x_NxD, np.float32).reshape(-1, *self.image_shape)
    n, batch = len(x), self.cfg.cnn_batch_size
    trainer = ensemble.EnsembleTrainer(self.model, _adam(self.cfg.cnn_learning_rate), batch_size=batch)
    keys = jax.random.split(jax.random.key(self.cfg.seed), 1)
    indices = np.resize(np.arange(n, dtype=np.int32), max(n, batch))[None]  # Tiny sets: repeated to a batch.
    y = _pad_rows(np.asarray(y_N, np.int32), self._BUCKET)
    self.state = trainer.fit(
      keys, _pad_rows(x, self._BUCKET), y, epochs=self.cfg.cnn_epochs, indices=indices, progress=False
    ).state
    return self

  def _logits(self, x):
    x = _pad_rows(np.asarray(x, np.float32).reshape(-1, *self.image_shape), self._BUCKET)
    return ensemble.predict(self.model, self.state.variables, x, batch_size=256)[0]

  def predict(self, x_NxD):
    return np.asarray(jnp.argmax(self._logits(x_NxD), -1))[: len(x_NxD)]

  def feature_distance(self, a, b, batch_size: int = 256):
    variables = jax.tree.map(lambda v: v[0], self.state.variables)
    a, b = _pad_rows(a, batch_size), _pad_rows(b, batch_size)
    d = np.concatenate(
      [
        np.asarray(_cnn_feature_distance(self.model, variables, a[i : i + batch_size], b[i : i + batch_size]))
        for i in range(0, len(a), batch_size)
      ]
    ).astype(np.float64)
    return d


class _Constant:
  """What any learner returns from a one-class training set: that class."""

  def __init__(self, label):
    self.label = label

  def predict(self, x):
    return np.full(len(x), self.label)


class _Encoded:
  """Fits on labels re-indexed to 0..k-1 (XGBoost needs that when D~ lacks some classes)."""

  def __init__(self, est):
    self.est = est

  def fit(self, x, y):
    self.classes, yi = np.unique(y, return_inverse=True)
    self.est.fit(x, yi)
    return self

  def predict(self, x):
    return self.classes[np.asarray(self.est.predict(x)).astype(int)]


def make_model(name: str, cfg: ZooConfig, image_shape: Sequence[int], num_classes: int):
  """A fresh, unfitted member ``name`` of G with ``fit(x_NxD, y)`` / ``predict(x_NxD)``."""
  # scikit-learn is imported only when a zoo is built (seconds of start-up otherwise).
  from sklearn import discriminant_analysis, linear_model, naive_bayes, neural_network, svm, tree  # noqa: PLC0415
  from sklearn import ensemble as sk_ensemble  # noqa: PLC0415

  n, seed = cfg.n_estimators, cfg.seed
  if name == "logistic_regression":
    return linear_model.LogisticRegression(max_iter=cfg.max_iter)
  if name == "bernoulli_nb":
    return naive_bayes.BernoulliNB(binarize=0.5)  # Pixels are in [0, 1]: "on" above mid-grey.
  if name == "gaussian_nb":
    return naive_bayes.GaussianNB()
  if name == "random_forest":
    return sk_ensemble.RandomForestClassifier(n_estimators=n, random_state=seed, n_jobs=1)
  if name == "linear_svc":
    return svm.LinearSVC(max_iter=cfg.max_iter, random_state=seed)
  if name == "decision_tree":
    return tree.DecisionTreeClassifier(random_state=seed)
  if name == "lda":
    return discriminant_analysis.LinearDiscriminantAnalysis()
  if name == "adaboost":
    return sk_ensemble.AdaBoostClassifier(n_estimators=n, random_state=seed)
  if name == "mlp":
    return neural_network.MLPClassifier(hidden_layer_sizes=(cfg.mlp_hidden,), max_iter=cfg.max_iter, random_state=seed)
  if name == "cnn":
    return _CNNClassifier(image_shape, num_classes, cfg)
  if name == "bagging":
    return sk_ensemble.BaggingClassifier(n_estimators=n, random_state=seed, n_jobs=1)
  if name == "gradient_boosting":
    return sk_ensemble.GradientBoostingClassifier(
      n_estimators=n, random_state=seed, max_features=cfg.gradient_boosting_max_features
    )
  if name == "xgboost":
    import xgboost  # noqa: PLC0415 (only for the XGBoost member of the zoo)

    return _Encoded(xgboost.XGBClassifier(n_estimators=n, tree_method="hist", random_state=seed, n_jobs=1, verbosity=0))
  raise ValueError(f"unknown zoo model {name!r}; choose from {ZOO}")


def _check_labelled(images, labels, num_classes, what) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images, np.float32), np.asarray(labels)
  if images.ndim != 4 or labels.shape != images.shape[:1] or len(images) == 0:
    raise ValueError(
      f"{what}: need non-empty NHWC images and labels of shape (N,), got {images.shape} and {labels.shape}"
    )
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{what}: images contain NaN or infinite values")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{what}: labels must be integers in [0, {num_classes})")
  return images, labels.astype(np.int32)


def _fit_one(name, cfg, x, y, image_shape, num_classes):
  if len(np.unique(y)) < 2:
    return _Constant(int(y[0]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Convergence / collinearity warnings of small or noisy sets.
    return make_model(name, cfg, image_shape, num_classes).fit(x.reshape(len(x), -1), y)


def _parallel(fn: Callable, names: Sequence[str], n_jobs: int) -> list:
  """``[fn(n) for n in names]`` in ``n_jobs`` threads, BLAS single-threaded.

  One BLAS thread per job: with OpenBLAS' own threads competing with the jobs (or with
  other processes), logistic regression on 300 images took 9 s instead of 0.4 s.
  """
  import joblib  # noqa: PLC0415 (with scikit-learn, only when a zoo is fitted)
  import threadpoolctl  # noqa: PLC0415

  with threadpoolctl.threadpool_limits(1):
    return joblib.Parallel(n_jobs=n_jobs, prefer="threads")(joblib.delayed(fn)(n) for n in names)


@dataclasses.dataclass
class FittedZoo:
  """The members of G fitted on one labelled set (for inference exposure and the stand-in)."""

  models: dict[str, Any]
  image_shape: tuple[int, ...]
  num_classes: int

  def accuracies(self, images_NxHxWxC: np.ndarray, labels_N: np.ndarray, n_jobs: int = 1) -> dict[str, float]:
    """Each member's accuracy on ``(images, labels)``."""
    x, y = _check_labelled(images_NxHxWxC, labels_N, self.num_classes, "evaluation set")
    if x.shape[1:] != self.image_shape:
      raise ValueError(f"images of shape {x.shape[1:]}; the zoo was fitted on {self.image_shape}")
    flat = x.reshape(len(x), -1)
    names = list(self.models)
    accs = _parallel(lambda n: float(np.mean(self.models[n].predict(flat) == y)), names, n_jobs)
    return dict(zip(names, accs))

  def feature_distance(self, a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray) -> np.ndarray:
    """Stand-in D: mean squared difference of the zoo CNN's last conv features, shape (N,)."""
    cnn = self.models.get("cnn")
    if not isinstance(cnn, _CNNClassifier):
      raise ValueError("the feature stand-in needs the zoo's CNN fitted on at least two classes")
    a, b = check_pair(a_NxHxWxC, b_NxHxWxC)
    return cnn.feature_distance(a, b)[: len(a)]


def fit_zoo(
  images_NxHxWxC: np.ndarray, labels_N: np.ndarray, num_classes: int, cfg: ZooConfig = ZooConfig()
) -> FittedZoo:
  """Fits every member of ``cfg.models`` on ``(images, labels)`` (threads: ``cfg.n_jobs``)."""
  x, y = _check_labelled(images_NxHxWxC, labels_N, num_classes, "training set")
  names = list(cfg.models)
  fitted = _parallel(lambda n: _fit_one(n, cfg, x, y, x.shape[1:], num_classes), names, cfg.n_jobs)
  return FittedZoo(dict(zip(names, fitted)), tuple(x.shape[1:]), num_classes)


@dataclasses.dataclass(frozen=True)
class StatisticalExposure:
  """Accuracy of each member of G and their mean (the exposure, Eq. 4 or 6)."""

  per_model: dict[str, float]

  @property
  def mean(self) -> float:
    return float(np.mean(list(self.per_model.values())))


def training_exposure(
  sanitized_images: np.ndarray,
  sanitized_labels: np.ndarray,
  dx_images: np.ndarray,
  dx_labels: np.ndarray,
  num_classes: int,
  cfg: ZooConfig = ZooConfig(),
) -> StatisticalExposure:
  """Def. 3: G trained on the sanitized set D~, accuracy on D_X (drawn from P_O)."""
  zoo = fit_zoo(sanitized_images, sanitized_labels, num_classes, cfg)
  return StatisticalExposure(zoo.accuracies(dx_images, dx_labels, cfg.n_jobs))


def inference_exposure(
  dx_zoo: FittedZoo, sanitized_images: np.ndarray, sanitized_labels: np.ndarray, n_jobs: int = 1
) -> StatisticalExposure:
  """Def. 4: G trained on D_X (``dx_zoo = fit_zoo(D_X)``, reusable), accuracy on D~."""
  return StatisticalExposure(dx_zoo.accuracies(sanitized_images, sanitized_labels, n_jobs))


# --------------------------------------------------------------------------------------------
# The 0-1 normalised harmonic mean (section VI-A4).


def harmonic_mean(x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
  """``2 x y / (x + y)`` elementwise (0 where x + y = 0), for x, y >= 0."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if np.any(x < 0) or np.any(y < 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("harmonic_mean needs finite values >= 0")
  s = x + y
  return np.divide(2 * x * y, s, out=np.zeros(np.broadcast(x, y).shape), where=s > 0)


def normalized_harmonic_mean(mae, exposure, mae_max: float, exposure_max: float) -> np.ndarray:
  """Section VI-A4: the harmonic mean of 0-1 normalised utility MAE and IP exposure.

  ``x = mae / mae_max``, ``y = exposure / exposure_max``, with the maxima taken over every
  compared point (all methods and parameters); the result is ``2 x y / (x + y)``, lower is
  better. The paper prints ``(x^-1 + y^-1) / 2``, the reciprocal of this (without the outer
  inverse); its Table III is the harmonic mean itself: e.g. FMNIST image IP, IPProtect MAE 0.01
  and exposure 0.73 with maxima 0.52 (InstaHide's MAE) and 1.09 (DP-MERF's exposure) give
  x = 0.019, y = 0.67 and 2xy / (x + y) = 0.037, the table's 0.04 (the printed formula: 27).

  Raises:
    ValueError: A maximum is not positive and finite, or a value lies outside [0, max].
  """
  mae, exposure = np.asarray(mae, np.float64), np.asarray(exposure, np.float64)
  for name, v, top in (("mae", mae, mae_max), ("exposure", exposure, exposure_max)):
    if not (math.isfinite(top) and top > 0):
      raise ValueError(f"{name}_max must be positive and finite, got {top}")
    if np.any(v < 0) or np.any(v > top * (1 + 1e-9)) or not np.all(np.isfinite(v)):
      raise ValueError(f"{name} values must lie in [0, {name}_max={top}]")
  return harmonic_mean(np.minimum(mae / mae_max, 1.0), np.minimum(exposure / exposure_max, 1.0))
