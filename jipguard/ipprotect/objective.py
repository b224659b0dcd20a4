"""IPProtect's objective (Eq. 9) and one step of its optimisation (Singh et al.).

Each buyer image x_k is replaced by

    x~_k = argmin_x~  1/|Omega_Tr| sum_n L(f_n(x~), f_n(x_k)) + lambda max(D(x~, x_N) - tau, 0)   (Eq. 9)

over models f_n sampled by training on bootstraps of D_B (``sellers.sample_models``), with x_N
a secret N(0, 1) anchor per image. :func:`image_objective` is Eq. 9 for one image;
:func:`objective_grads` its gradient for a batch, each image under its own model subset, and
:func:`sanitize_step` one optimiser step of it (the loop around it, Algorithm 1, is
``sanitizer``).

Interpretations of the paper (docs/ipprotect.md too):

* **L** is the L2 distance between the two logit vectors, ``||f(x~) - f(x)||_2`` (not
  squared), averaged over the step's model subset. ``loss="probs"`` compares softmax
  probabilities instead, ``loss="kl"`` takes KL(target || f(x~)) of the softmax outputs
  (ablation options). ``loss="margin"`` (the main job's default preset, not the paper's L)
  is the hinge max(max_{j != c} f_j(x~) - f_c(x~) + margin, 0) with c = argmax f(x): each
  model must keep its decision on x, by a logit margin. The probability loss has no
  gradient where a model is saturated on a wrong class, and on larger buyer sets most
  images reach such a point within 50 steps and stay there (docs/ipprotect.md); the hinge's
  gradient there is +-1 on the two logits.
* **D** is the per-pixel RMS distance ``||x~ - x_N||_2 / sqrt(d)``: the paper's
  tau = 1.3-1.65 only makes sense on a per-pixel scale (an N(0, 1) anchor is at RMS
  distance ~1.4 from another N(0, 1) draw, and ~1.1 from a [0, 1] Fashion-MNIST image).
* The optimiser is optax (Adam by default) on the pixels, elementwise, so a batch's step
  equals its images' steps one at a time with the same keys.

Robust-sanitization options (not in the paper; candidates for closing the gap between the
buyer's sampled models and unseen sellers): ``input_noise`` averages the utility loss over
Gaussian perturbations of x~ (one draw per step), ``hidden_dropout`` drops hidden units of the
sampled models at every step (MLP only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jipguard import cli, ensemble, rundir

LOSSES = ("logits", "probs", "kl", "margin")


@dataclasses.dataclass(frozen=True)
class SanitizerConfig:
  """Parameters of the sanitizer (Table II and the robust options). See the module doc.

  The defaults are the main job's recommended setting (the ``default`` preset: margin loss,
  lr 0.1, T = 300, zeta = 0.01); :meth:`paper` gives the paper's reading (logits loss, lr
  0.01, T = 2000, zeta = 0.5), which the ablation measures at a utility MAE about three times
  larger (docs/ipprotect.md).
  """

  lam: float = 0.1  # lambda: weight of the security hinge.
  tau: float = 1.5  # Radius of the tau-ball around x_N (per-pixel RMS).
  zeta: float = 0.01  # Stop an image when its Omega_V loss changes less.
  steps: int = 300  # T: at most this many steps per image.
  model_batch: int | None = None  # B: models per step; None = round(0.95 |Omega_Tr|).
  data_batch: int = 5000  # B_D: images optimised together.
  learning_rate: float = 0.1  # Adam step size on the pixels.
  loss: str = "margin"  # L on "logits" (paper), softmax "probs", "kl" (distillation) or "margin".
  temperature: float = 1.0  # "probs" / "kl": compare softmax(logits / temperature).
  margin: float = 1.0  # "margin": the logit margin kappa each model's class must win by.
  input_noise: float = 0.0  # Robust option: sigma of Gaussian noise on x~.
  hidden_dropout: float = 0.0  # Robust option: dropout of sampled models' hidden units.
  val_stop: bool = True  # Use Omega_V's stopping rule (False: T steps, no Omega_V).
  val_every: int = 10  # Check the stopping rule every this many steps.
  min_steps: int = 50  # Never stop an image before this step.
  compact: bool = True  # Drop stopped images from the batch (same results, less work).
  out_of_bag: bool = False  # Fit each image only to the Omega_Tr models that did not train on it.

  @classmethod
  def paper(cls, **overrides: Any) -> SanitizerConfig:
    """The paper's reading (Table II, Algorithm 1): L2 of logits, lr 0.01, T = 2000, zeta = 0.5,
    the stopping rule checked every 50 steps from step 100; ``overrides`` replace fields."""
    paper = dict(loss="logits", learning_rate=0.01, steps=2000, zeta=0.5, val_every=50, min_steps=100)
    return cls(**{**paper, **overrides})

  def __post_init__(self):
    cli.check_choice("loss", self.loss, LOSSES)
    for name in ("steps", "data_batch", "val_every"):
      cli.check_int(name, getattr(self, name), lo=1)
    cli.check_int("min_steps", self.min_steps, lo=0)
    cli.check_int("model_batch", self.model_batch, lo=1)
    cli.check_float("learning_rate", self.learning_rate, lo=0, lo_open=True)
    for name in ("lam", "tau", "zeta", "input_noise", "margin"):
      cli.check_float(name, getattr(self, name), lo=0)
    cli.check_float("hidden_dropout", self.hidden_dropout, lo=0, hi=1, hi_open=True)
    cli.check_float("temperature", self.temperature, lo=0, lo_open=True)

  def fingerprint(self) -> dict[str, Any]:
    """What must match to resume a sanitization (fields added later only when set: older runs resume)."""
    return rundir.fingerprint(self, temperature=1.0, margin=1.0, compact=True, out_of_bag=False)

  def batch_of_models(self, num_train_models: int) -> int:
    b = self.model_batch or max(1, round(0.95 * num_train_models))
    if not 1 <= b <= num_train_models:
      raise ValueError(f"model_batch={b} must be in [1, |Omega_Tr|={num_train_models}]")
    return b


def distance(a: jax.Array, b: jax.Array, kind: str, temperature: float = 1.0, margin: float = 1.0) -> jax.Array:
  """L(a, b) between output vectors (last axis), ``b`` the target.

  ``logits``: L2 of the logits; ``probs``: L2 of softmax(logits / temperature);
  ``kl``: KL(softmax(b / T) || softmax(a / T)), the distillation loss;
  ``margin``: the hinge max(max_{j != c} a_j - a_c + margin, 0) towards the target's class
  c = argmax b (Carlini-Wagner): zero once the model predicts c by the margin, and its
  gradient does not vanish where the model is saturated on a wrong class (where "probs" is
  stuck, docs/ipprotect.md).
  """
  if kind == "margin":
    c = jnp.argmax(b, axis=-1)
    is_c = jax.nn.one_hot(c, a.shape[-1], dtype=bool)
    a_c = jnp.sum(jnp.where(is_c, a, 0.0), axis=-1)
    return jax.nn.relu(jnp.max(jnp.where(is_c, -jnp.inf, a), axis=-1) - a_c + margin)
  if kind == "kl":
    log_p, log_q = jax.nn.log_softmax(b / temperature), jax.nn.log_softmax(a / temperature)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if kind == "probs":
    a, b = jax.nn.softmax(a / temperature), jax.nn.softmax(b / temperature)
  return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-12)


def rms_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """D: per-pixel RMS distance between two images (any shape, all axes reduced)."""
  return jnp.sqrt(jnp.mean(jnp.square(a - b)))


def image_objective(
  x_tilde: jax.Array,
  target_MxK: jax.Array,
  anchor: jax.Array,
  weights_M: jax.Array,
  key: jax.Array,
  params: Any,
  *,
  model: nn.Module,
  cfg: SanitizerConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Eq. 9 for ONE image: weighted mean utility loss over members + security hinge.

  The definition the sanitizer optimises; :func:`sanitize_step` computes its gradient for a
  batch of images through ``ensemble.value_and_input_grad`` (the same value, tested).

  Args:
    x_tilde: The image being optimised, HWC.
    target_MxK: Cached logits of the M training models on the original image.
    anchor: x_N, HWC.
    weights_M: 1 for the models in this step's subset, 0 otherwise.
    key: Randomness of the robust options for this image and step.
    params: Flax variables of the M training models (leading member axis).
    model: The architecture.
    cfg: Sanitizer parameters.

  Returns:
    ``(total, (utility, security))``.
  """
  x_in, member_keys = _objective_inputs(x_tilde, key, weights_M.shape[0], cfg)
  if member_keys is None:
    logits_MxK = ensemble.apply(model, params, x_in[None])[:, 0]
  else:
    dropped = model.clone(dropout=cfg.hidden_dropout)
    logits_MxK = jax.vmap(lambda v, k: dropped.apply(v, x_in[None], train=True, rngs={"dropout": k})[0])(
      params, member_keys
    )
  utility = _utility(logits_MxK, (target_MxK, weights_M), jnp.sum(weights_M), cfg=cfg)
  security = _security(x_tilde, anchor, cfg)
  return utility + security, (utility, security)


def _objective_inputs(
  x_tilde: jax.Array, key: jax.Array, num_members: int, cfg: SanitizerConfig
) -> tuple[jax.Array, jax.Array | None]:
  """The models' input (x~ plus the robust input noise) and per-member dropout keys (or None)."""
  noise_key, drop_key = jax.random.split(key)
  x_in = x_tilde
  if cfg.input_noise > 0:
    x_in = x_in + cfg.input_noise * jax.random.normal(noise_key, x_in.shape)
  member_keys = jax.random.split(drop_key, num_members) if cfg.hidden_dropout > 0 else None
  return x_in, member_keys


def _utility(
  logits_MxK: jax.Array, targets_and_weights: tuple[jax.Array, jax.Array], norm: jax.Array, *, cfg: SanitizerConfig
) -> jax.Array:
  """The utility term of Eq. 9 for one image: sum_m w_m L(f_m(x~), f_m(x)) / norm.

  A sum over the members it is given, so it may be taken a group of members at a time
  (``ensemble.value_and_input_grad``); ``norm`` is the image's sum of weights (|subset|).
  """
  target_MxK, weights_M = targets_and_weights
  return jnp.sum(weights_M * distance(logits_MxK, target_MxK, cfg.loss, cfg.temperature, cfg.margin)) / norm


def _security(x_tilde: jax.Array, anchor: jax.Array, cfg: SanitizerConfig) -> jax.Array:
  """The hinge lambda max(D(x~, x_N) - tau, 0) of Eq. 9."""
  return cfg.lam * jnp.maximum(rms_distance(x_tilde, anchor) - cfg.tau, 0.0)


def optimizer(cfg: SanitizerConfig) -> optax.GradientTransformation:
  """The optimiser on the pixels (Adam, elementwise: images are independent)."""
  return optax.adam(cfg.learning_rate)


def step_members(
  model: nn.Module, params_tr: Any, cfg: SanitizerConfig, *, mesh: jax.sharding.Mesh | None = None, **layout: Any
) -> ensemble.Members:
  """Omega_Tr's members as :func:`sanitize_step` takes them (``ensemble.prepare``, with the
  dropout of ``cfg.hidden_dropout`` in the model); ``layout`` forces one (tests, benchmarks)."""
  if cfg.hidden_dropout > 0:
    if not hasattr(model, "dropout"):
      raise ValueError(f"hidden_dropout needs a model with a `dropout` attribute (mlp), got {type(model).__name__}")
    model = model.clone(dropout=cfg.hidden_dropout)
  return ensemble.prepare(model, params_tr, mesh=mesh, **layout)


def objective_grads(
  members: ensemble.Members,
  x_BxHxWxC: jax.Array,
  targets_BxMxK: jax.Array,
  anchors: jax.Array,
  weights_BxM: jax.Array,
  keys_B: jax.Array,
  *,
  cfg: SanitizerConfig,
) -> tuple[jax.Array, jax.Array]:
  """Every image's Eq. 9 (:func:`image_objective`) under its own model subset (``weights_BxM``):
  its utility term and the gradient of the whole objective with respect to its pixels.

  The utility's sum over Omega_Tr and its gradient come from ``ensemble.value_and_input_grad``
  on ``members`` (:func:`step_members`), which picks how the members are evaluated.

  Returns:
    ``(utility_B, grads_BxHxWxC)``.
  """
  m = weights_BxM.shape[1]
  x_in, member_keys = jax.vmap(lambda x, k: _objective_inputs(x, k, m, cfg))(x_BxHxWxC, keys_B)
  # d x_in / d x~ is the identity (the noise does not depend on x~).
  util, grads = ensemble.value_and_input_grad(
    members,
    functools.partial(_utility, cfg=cfg),
    x_in,
    (targets_BxMxK, weights_BxM),
    jnp.sum(weights_BxM, axis=1),
    dropout_keys_BxM=member_keys,
  )
  return util, grads + jax.vmap(jax.grad(functools.partial(_security, cfg=cfg)))(x_BxHxWxC, anchors)


def sanitize_step(
  members: ensemble.Members,
  x_BxHxWxC: jax.Array,
  opt_state: Any,
  targets_BxMxK: jax.Array,
  anchors: jax.Array,
  weights_BxM: jax.Array,
  keys_B: jax.Array,
  *,
  cfg: SanitizerConfig,
) -> tuple[jax.Array, Any, jax.Array]:
  """One step of Algorithm 1 for a batch of images (the sanitizer's hot kernel): the gradient
  of every image's Eq. 9 (:func:`objective_grads`) and the optimiser's update of its pixels.

  Returns:
    ``(x, opt_state, utility_B)``: the updated images and optimiser state, and each
    image's utility loss before the update.
  """
  util, grads = objective_grads(members, x_BxHxWxC, targets_BxMxK, anchors, weights_BxM, keys_B, cfg=cfg)
  updates, opt_state = optimizer(cfg).update(grads, opt_state, x_BxHxWxC)
  return optax.apply_updates(x_BxHxWxC, updates), opt_state, util


# Jitted :func:`sanitize_step`, with the XLA options its members need (``ensemble.jit``).
sanitize_step_jit = ensemble.jit(sanitize_step, static_argnames=("cfg",))
