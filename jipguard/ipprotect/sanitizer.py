"""IPProtect's per-image sanitizer: Eq. 9 and Algorithm 1 (Singh et al.).

A buyer in a data marketplace shares a sanitized version of its task dataset D_B so
that sellers can measure how useful their models are on it (utility preserved) while
the shared images are worthless as images or training data (low IP exposure). Each
image x_k is replaced by

    x~_k = argmin_x~  1/|Omega_Tr| sum_n L(f_n(x~), f_n(x_k)) + lambda max(D(x~, x_N) - tau, 0)   (Eq. 9)

over models f_n sampled by training on bootstraps of D_B (``sample_models``), starting
from N(0, 1) noise, with x_N ~ N(0, 1) a fresh anchor per image.

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
* **Model batch B**: each step, each image draws its own random subset of exactly B of
  the |Omega_Tr| models (Algorithm 1, line 8, with a fixed subset size so shapes stay
  static); the loss is averaged over it. Default B = round(0.95 |Omega_Tr|).
* **Stopping rule, per image**: every ``val_every`` steps (and from ``min_steps`` on),
  the image's validation loss L_k (mean L over Omega_V, Algorithm 1 line 14) is
  compared with its value at the previous check; an image stops when it changed by
  less than ``zeta`` (absolute). A stopped image stops changing (its pixels and optimiser
  state are frozen); a data batch ends when all its images stopped or at T steps. With
  ``val_stop=False`` Omega_V is not used at all and every image runs T steps.
* The optimiser is optax (Adam by default) on the pixels, elementwise, so sanitizing a
  batch equals sanitizing its images one at a time with the same keys.

Robust-sanitization options (not in the paper; candidates for closing the gap
between the buyer's sampled models and unseen sellers): ``input_noise`` averages the
utility loss over Gaussian perturbations of x~ (one draw per step), ``hidden_dropout``
drops hidden units of the sampled models at every step (MLP only).

Out-of-bag option (``out_of_bag``, not in the paper): each image's utility loss is taken
only over the Omega_Tr models whose bootstrap left that image out (about 37% of them; the
step's random subset is intersected with them). A model trained on an image has
memorised it, so it classifies it confidently and correctly; fitting x~ to such targets
makes sanitized images easier than the originals for every unseen seller (utility
overshoots). Out-of-bag models saw the image no more than a seller did. An image that
every model was trained on (probability ~0.63^|Omega_Tr|) uses all of them.

Keys: image k (global index in D_B) uses ``fold_in(init_key, k)`` for its starting
noise, ``fold_in(anchor_key, k)`` for its anchor x_N, and ``fold_in(fold_in(step_key,
k), t)`` at step t. ``anchor_key`` comes from a one-time secret seed drawn with
``secrets`` unless given; it is kept in the buyer's private checkpoint directory and
never written to ``sanitized.npz``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from jipguard import distributed, ensemble, rundir, sharding

LOSSES = ("logits", "probs", "kl", "margin")


@dataclasses.dataclass(frozen=True)
class SanitizerConfig:
  """Parameters of the sanitizer (Table II and the robust options). See the module doc."""

  lam: float = 0.1  # lambda: weight of the security hinge.
  tau: float = 1.5  # Radius of the tau-ball around x_N (per-pixel RMS).
  zeta: float = 0.5  # Stop an image when its Omega_V loss changes less.
  steps: int = 2000  # T: at most this many steps per image.
  model_batch: int | None = None  # B: models per step; None = round(0.95 |Omega_Tr|).
  data_batch: int = 5000  # B_D: images optimised together.
  learning_rate: float = 0.01  # Adam step size on the pixels.
  loss: str = "logits"  # L on "logits" (paper), softmax "probs", "kl" (distillation) or "margin".
  temperature: float = 1.0  # "probs" / "kl": compare softmax(logits / temperature).
  margin: float = 1.0  # "margin": the logit margin kappa each model's class must win by.
  input_noise: float = 0.0  # Robust option: sigma of Gaussian noise on x~.
  hidden_dropout: float = 0.0  # Robust option: dropout of sampled models' hidden units.
  val_stop: bool = True  # Use Omega_V's stopping rule (False: T steps, no Omega_V).
  val_every: int = 50  # Check the stopping rule every this many steps.
  min_steps: int = 100  # Never stop an image before this step.
  compact: bool = True  # Drop stopped images from the batch (same results, less work).
  out_of_bag: bool = False  # Fit each image only to the Omega_Tr models that did not train on it.

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {self.loss!r}")
    for name in ("steps", "data_batch", "val_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.lam < 0 or self.tau < 0 or self.input_noise < 0 or not 0 <= self.hidden_dropout < 1:
      raise ValueError("lam, tau, input_noise must be >= 0 and hidden_dropout in [0, 1)")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.margin < 0:
      raise ValueError(f"margin must be >= 0, got {self.margin}")

  def fingerprint(self) -> dict[str, Any]:
    """What must match to resume a sanitization (fields added later only when set: older runs resume)."""
    return rundir.fingerprint(self, temperature=1.0, margin=1.0, compact=True, out_of_bag=False)

  def batch_of_models(self, num_train_models: int) -> int:
    b = self.model_batch or max(1, round(0.95 * num_train_models))
    if not 1 <= b <= num_train_models:
      raise ValueError(f"model_batch={b} must be in [1, |Omega_Tr|={num_train_models}]")
    return b


def _distance(a: jax.Array, b: jax.Array, kind: str, temperature: float = 1.0, margin: float = 1.0) -> jax.Array:
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
  return jnp.sum(weights_M * _distance(logits_MxK, target_MxK, cfg.loss, cfg.temperature, cfg.margin)) / norm


def _security(x_tilde: jax.Array, anchor: jax.Array, cfg: SanitizerConfig) -> jax.Array:
  """The hinge lambda max(D(x~, x_N) - tau, 0) of Eq. 9."""
  return cfg.lam * jnp.maximum(rms_distance(x_tilde, anchor) - cfg.tau, 0.0)


@dataclasses.dataclass(frozen=True)
class BatchResult:
  """Outcome of sanitizing one data batch (all arrays host numpy, one row per image)."""

  images: np.ndarray  # Sanitized images.
  val_loss: np.ndarray  # Final L_k on Omega_V (NaN when val_stop is off).
  train_loss: np.ndarray  # Final utility loss on the last step's Omega_Tr subset.
  steps: np.ndarray  # Steps taken by each image.
  seconds: np.ndarray | None = None  # Wall time of the image's batch / its size (when it ran, not a resume).


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


def _val_loss(model, cfg, params_v, x, targets_v_BxVxK):
  """L_k of Algorithm 1 line 14: mean L over Omega_V of each image (NaN without val_stop)."""
  if params_v is None:
    return jnp.full(x.shape[:1], jnp.nan)
  logits = jnp.swapaxes(ensemble.apply(model, params_v, x), 0, 1)
  return jnp.mean(_distance(logits, targets_v_BxVxK, cfg.loss, cfg.temperature, cfg.margin), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _start(params_tr, params_v, x_BxHxWxC, x0, *, model, cfg):
  """Targets of Omega_Tr / Omega_V on the original images, and the optimiser state of x0."""
  targets = jnp.swapaxes(ensemble.apply(model, params_tr, x_BxHxWxC), 0, 1)
  targets_v = None if params_v is None else jnp.swapaxes(ensemble.apply(model, params_v, x_BxHxWxC), 0, 1)
  return targets, targets_v, optimizer(cfg).init(x0)


def _steps(members, params_v, t, t_end, shared, slots, *, model, cfg, model_batch, treedef):
  """Steps t..t_end-1 of every active image (one jitted while loop).

  ``members`` are Omega_Tr's (:func:`step_members`), ``params_v`` Omega_V's variables (or
  None), ``model`` their architecture. ``slots`` holds per-image arrays with a leading image
  axis: ``x``, ``mu`` / ``nu`` (the optimiser state's per-pixel leaves), ``active``,
  ``prev_val``, ``steps``, ``last_train`` and the constants ``targets``, ``targets_v``,
  ``anchors``, ``keys`` (and ``mask``, the per-image eligible models, with ``out_of_bag``).
  ``shared`` is the optimiser state's other leaves (Adam's step count), and ``treedef``
  the optimiser state's structure.
  """
  m = slots["targets"].shape[1]

  def subset_weights(key):
    # Exactly `model_batch` of the m models, uniformly at random.
    return (jnp.argsort(jax.random.uniform(key, (m,))) < model_batch).astype(jnp.float32)

  def body(carry):
    t, shared, s = carry
    opt_state = jax.tree.unflatten(treedef, _merge_leaves(shared, s["opt"]))
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(s["keys"])
    sub_keys, obj_keys = jnp.moveaxis(jax.vmap(jax.random.split)(step_keys), 1, 0)
    weights = jax.vmap(subset_weights)(sub_keys)
    if "mask" in s:  # Out-of-bag: the subset's eligible models, or all eligible ones if none is drawn.
      weights = weights * s["mask"]
      weights = jnp.where(jnp.sum(weights, axis=1, keepdims=True) > 0, weights, s["mask"])
    new_x, new_opt, util = sanitize_step(
      members, s["x"], opt_state, s["targets"], s["anchors"], weights, obj_keys, cfg=cfg
    )
    active = s["active"]
    keep = lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    new_shared, new_per_image = _split_leaves(jax.tree.leaves(new_opt))
    s = {
      **s,
      "x": keep(new_x, s["x"]),
      "opt": [keep(n, o) for n, o in zip(new_per_image, s["opt"])],
      "steps": s["steps"] + active,
      "last_train": jnp.where(active, util, s["last_train"]),
    }
    t = t + 1
    if cfg.val_stop:

      def check(args):
        active, prev_val = args
        val = _val_loss(model, cfg, params_v, s["x"], s["targets_v"])
        converged = (jnp.abs(val - prev_val) < cfg.zeta) & (t >= cfg.min_steps)
        return active & ~converged, val

      active, prev_val = jax.lax.cond(t % cfg.val_every == 0, check, lambda a: a, (s["active"], s["prev_val"]))
      s = {**s, "active": active, "prev_val": prev_val}
    return t, new_shared, s

  def cond(carry):
    t, _, s = carry
    return (t < t_end) & jnp.any(s["active"])

  return jax.lax.while_loop(cond, body, (t, shared, slots))


# Jitted :func:`_steps`, with the XLA options its members need (``ensemble.jit``).
_run_steps = ensemble.jit(_steps, static_argnames=("model", "cfg", "model_batch", "treedef"))


def _split_leaves(leaves):
  """Optimiser-state leaves -> (shared scalars, per-image arrays), with positions kept."""
  shared = [leaf if leaf.ndim == 0 else None for leaf in leaves]
  per_image = [leaf for leaf in leaves if leaf.ndim > 0]
  return shared, per_image


def _merge_leaves(shared, per_image):
  it = iter(per_image)
  return [leaf if leaf is not None else next(it) for leaf in shared]


@jax.jit
def _gather(slots, index):
  return jax.tree.map(lambda a: a[index], slots)


def image_keys(seed_key: jax.Array, start: int, count: int) -> jax.Array:
  """Per-image keys ``fold_in(seed_key, k)`` for global image indices start..start+count-1."""
  return jax.vmap(lambda k: jax.random.fold_in(seed_key, k))(jnp.arange(start, start + count))


def secret_key(seed: int) -> jax.Array:
  """A threefry key from a 64-bit integer seed (anchors use a one-time 64-bit secret)."""
  if not 0 <= seed < 2**64:
    raise ValueError("anchor seed must be an integer in [0, 2**64)")
  return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))


def starting_points(
  image_shape: Sequence[int], start: int, count: int, *, seed: int, anchor_seed: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Images start..start+count-1's starting noise x~_0, anchors x_N and step keys (module doc)."""
  root = jax.random.key(seed)
  normal = lambda k: jax.random.normal(k, tuple(image_shape))
  x0 = jax.vmap(normal)(image_keys(jax.random.fold_in(root, 0), start, count))
  anchors = jax.vmap(normal)(image_keys(secret_key(anchor_seed), start, count))
  return x0, anchors, image_keys(jax.random.fold_in(root, 1), start, count)


_COMPACT_AT = 2  # Compaction shrinks the batch once at most 1 / _COMPACT_AT of its slots are active.
# The smallest batch compaction shrinks to, per backend (others: ``_MIN_BUCKET_ELSEWHERE``);
# each batch size is one more compiled program. On the 2-core CPU a step costs in proportion
# to its batch, so the batch follows the active images down to 1. The benchmark's
# sanitize_dataset problem (256 images, 50 + 10 MLPs; /tmp script, one process per floor),
# cold (compiling) / warm: floor 1: batches 256 128 64 32 16 4 2 1, 22.4 s (15.2 s of it
# compiling) / 7.2 s; floor 16: 19.9 s (11.9 s) / 7.7 s; floor 64: 20.3 s (10.2 s) / 10.4 s;
# the same steps, images equal to float rounding. Warm runs are the common case with the
# persistent compilation cache, hence 1. On one H100 the programs of that problem took 122 s
# to compile, while a whole step of 256 images through 100 MLPs takes 2.2 ms, so elsewhere
# the batch stops at 64 (not yet timed on a GPU).
_MIN_BUCKET = {"cpu": 1}
_MIN_BUCKET_ELSEWHERE = 64


def _min_bucket() -> int:
  """The smallest batch compaction shrinks to on this backend (see ``_MIN_BUCKET``)."""
  return _MIN_BUCKET.get(jax.default_backend(), _MIN_BUCKET_ELSEWHERE)


def _check_batch(
  params_tr: Any,
  params_v: Any | None,
  n: int,
  b: int,
  cfg: SanitizerConfig,
  mesh: jax.sharding.Mesh | None,
  member_mask: np.ndarray | None,
) -> None:
  """ValueError naming what :func:`sanitize_batch`'s arguments get wrong."""
  if n > b:
    raise ValueError(f"{n} images exceed pad_to={b}")
  if mesh is not None:
    data_shards, member_shards = mesh.shape[sharding.DATA], mesh.shape[sharding.MEMBER]
    if b % data_shards:
      raise ValueError(f"the image batch ({b}) must be divisible by the mesh's data axis ({data_shards})")
    for name, params in (("Omega_Tr", params_tr), ("Omega_V", params_v if cfg.val_stop else None)):
      if params is not None and jax.tree.leaves(params)[0].shape[0] % member_shards:
        raise ValueError(
          f"|{name}| = {jax.tree.leaves(params)[0].shape[0]} must be divisible by the mesh's "
          f"member axis ({member_shards})"
        )
  if params_v is None and cfg.val_stop:
    raise ValueError("val_stop needs Omega_V models (params_v)")
  m = jax.tree.leaves(params_tr)[0].shape[0]
  if cfg.out_of_bag != (member_mask is not None):
    raise ValueError("member_mask is required with out_of_bag=True and only then")
  if member_mask is not None:
    member_mask = np.asarray(member_mask, np.float32)
    if member_mask.shape != (n, m) or not np.all(member_mask.sum(1) > 0):
      raise ValueError(
        f"member_mask must be (images, |Omega_Tr|) = {(n, m)} with a model in every row, got shape {member_mask.shape}"
      )


def sanitize_batch(
  model: nn.Module,
  params_tr: Any,
  params_v: Any | None,
  images: np.ndarray,
  cfg: SanitizerConfig,
  *,
  start: int,
  seed: int,
  anchor_seed: int,
  pad_to: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  member_mask: np.ndarray | None = None,
) -> BatchResult:
  """Sanitizes ``images`` (global indices ``start..``) as one jitted program.

  ``member_mask`` (``N x |Omega_Tr|``, :func:`out_of_bag_mask`) is required with
  ``cfg.out_of_bag`` and only then: each image's loss uses only its rows' models.

  The batch is padded to ``pad_to`` images (default: its own size) that are inactive
  from step 0, so every batch of a dataset runs the same compiled program.

  With a ``mesh`` (``sharding.make_mesh``), the images are split over its ``data`` axis
  and the sampled models over its ``member`` axis (|Omega_Tr| and |Omega_V| must divide by
  it); the partitioner adds the reduction over models. The result equals the unsharded
  one up to float rounding (tested on 8 simulated devices).
  """
  n = len(images)
  b = pad_to or n
  _check_batch(params_tr, params_v, n, b, cfg, mesh, member_mask)
  m = jax.tree.leaves(params_tr)[0].shape[0]
  x = jnp.zeros((b, *images.shape[1:]), jnp.float32).at[:n].set(images)
  shape = images.shape[1:]
  x0, anchors, step_keys = starting_points(shape, start, b, seed=seed, anchor_seed=anchor_seed)
  active = jnp.arange(b) < n
  extra = {}
  if member_mask is not None:
    extra["mask"] = jnp.ones((b, m), jnp.float32).at[:n].set(np.asarray(member_mask, np.float32))
  params_v = params_v if cfg.val_stop else None
  shards = 1
  if mesh is not None:
    shards = mesh.shape[sharding.DATA]
    x, x0, anchors, step_keys, active, extra = sharding.place(
      (x, x0, anchors, step_keys, active, extra), sharding.image_sharding(mesh)
    )
    params_tr, params_v = sharding.shard_members((params_tr, params_v), mesh)
  targets, targets_v, opt_state = _start(params_tr, params_v, x, x0, model=model, cfg=cfg)
  leaves, treedef = jax.tree.flatten(opt_state)
  shared, per_image = _split_leaves(leaves)
  slots = {
    "x": x0,
    "opt": per_image,
    "active": active,
    "prev_val": jnp.full((b,), jnp.inf),
    "steps": jnp.zeros((b,), jnp.int32),
    "last_train": jnp.full((b,), jnp.nan),
    "targets": targets,
    "targets_v": targets_v,
    "anchors": anchors,
    "keys": step_keys,
    **extra,
  }
  members = step_members(model, params_tr, cfg, mesh=mesh)
  run = functools.partial(
    _run_steps, members, params_v, model=model, cfg=cfg, model_batch=cfg.batch_of_models(m), treedef=treedef
  )

  # Host-side results, filled as images finish (compaction) and at the end.
  out_x = np.zeros((b, *shape), np.float32)
  out_steps = np.zeros((b,), np.int32)
  out_train = np.full((b,), np.nan, np.float32)
  slot_image = np.arange(b)  # Which image each slot holds.
  slot_real = np.ones((b,), bool)  # False for padding slots added by compaction.

  def write_back(slots):
    host = distributed.to_host({k: slots[k] for k in ("x", "steps", "last_train")})
    real = slot_real
    out_x[slot_image[real]] = host["x"][real]
    out_steps[slot_image[real]] = host["steps"][real]
    out_train[slot_image[real]] = host["last_train"][real]

  t = jnp.int32(0)
  segment = cfg.val_every if (cfg.val_stop and cfg.compact) else cfg.steps
  while int(t) < cfg.steps:
    t_end = min(cfg.steps, (int(t) // segment + 1) * segment)
    t, shared, slots = run(t, jnp.int32(t_end), shared, slots)
    alive = distributed.to_host(slots["active"])
    if not alive.any():
      break
    bucket = len(alive)
    # Stop spending on converged images: once at most 1 / _COMPACT_AT of the slots are active,
    # continue with the active ones only, in a batch of the next power of two (at least
    # `_min_bucket()`, and a multiple of the data shards).
    new_bucket = max(shards, _min_bucket(), int(2 ** np.ceil(np.log2(max(alive.sum(), 1)))))
    new_bucket = -(-new_bucket // shards) * shards
    if cfg.compact and alive.sum() * _COMPACT_AT <= bucket and new_bucket < bucket:
      write_back(slots)
      keep_slots = np.flatnonzero(alive)
      index = np.concatenate([keep_slots, np.full(new_bucket - len(keep_slots), keep_slots[0])])
      slots = _gather(slots, jnp.asarray(index))
      slots["active"] = jnp.asarray(np.arange(new_bucket) < len(keep_slots))
      slot_image, slot_real = slot_image[index], np.arange(new_bucket) < len(keep_slots)
      if mesh is not None:
        slots = sharding.place(slots, sharding.image_sharding(mesh))
  write_back(slots)
  val = distributed.to_host(
    _final_val(
      params_v,
      sharding.place(jnp.asarray(out_x), sharding.image_sharding(mesh)) if mesh is not None else jnp.asarray(out_x),
      targets_v,
      model=model,
      cfg=cfg,
    )
  )
  return BatchResult(images=out_x[:n], val_loss=val[:n], train_loss=out_train[:n], steps=out_steps[:n])


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _final_val(params_v, x, targets_v, *, model, cfg):
  return _val_loss(model, cfg, params_v, x, targets_v)


def sanitize(
  model: nn.Module,
  params_tr: Any,
  params_v: Any | None,
  images: np.ndarray,
  cfg: SanitizerConfig,
  *,
  seed: int,
  anchor_seed: int,
  checkpoint_dir: str | os.PathLike | None = None,
  progress: bool = True,
  mesh: jax.sharding.Mesh | None = None,
  member_mask: np.ndarray | None = None,
) -> BatchResult:
  """Algorithm 1 over a whole dataset, in data batches of ``cfg.data_batch`` images.

  Finished batches are saved to ``checkpoint_dir`` (orbax, one step per batch), and a
  rerun resumes at the next unfinished batch; the result equals an uninterrupted run.

  Args:
    model: The architecture of the sampled models.
    params_tr: Variables of Omega_Tr (leading member axis).
    params_v: Variables of Omega_V, or None with ``cfg.val_stop=False``.
    images: The buyer's images, NHWC.
    cfg: Sanitizer parameters.
    seed: Seed of the starting noise and the per-step randomness.
    anchor_seed: One-time secret seed of the anchors x_N (keep it private).
    checkpoint_dir: Where finished batches go.
    progress: Show a progress bar over images.
    mesh: Optional device mesh: images over its data axis, models over its member axis
      (see :func:`sanitize_batch`); batches are padded to a multiple of the data axis.
    member_mask: With ``cfg.out_of_bag``: ``N x |Omega_Tr|`` eligible models per image
      (:func:`out_of_bag_mask`).

  Returns:
    A :class:`BatchResult` for all images.

  Raises:
    ValueError: Non-finite input images, or ``checkpoint_dir`` holds batches of another
      configuration (parameters, seeds, anchor secret, models or images).
    FloatingPointError: A sanitized batch has non-finite pixels.
  """
  images = np.asarray(images, np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN or infinite values")
  batch = min(cfg.data_batch, len(images))
  padded = batch if mesh is None else -(-batch // mesh.shape[sharding.DATA]) * mesh.shape[sharding.DATA]
  starts = list(range(0, len(images), batch))
  manager = None
  meta = {
    "config": cfg.fingerprint(),
    "seed": seed,
    "model": repr(model),
    "anchor": hashlib.sha256(str(anchor_seed).encode()).hexdigest(),  # A commitment, not the secret.
    "data": ensemble.digest(images, params_tr, params_v, member_mask),
  }
  if checkpoint_dir is not None:
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), options=ocp.CheckpointManagerOptions(create=True))
    done = manager.all_steps()
    if done:
      saved = manager.restore(done[0], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      rundir.check_same_config(saved, meta, f"checkpoint {manager.directory}")
  results: list[BatchResult] = []
  bar = tqdm.tqdm(total=len(images), desc="sanitize", unit="img", disable=not progress, leave=False)
  try:
    for i, start in enumerate(starts):
      if manager is not None and i in manager.all_steps():
        restored = manager.restore(i, args=ocp.args.Composite(batch=ocp.args.StandardRestore()))
        res = BatchResult(**{k: np.asarray(v) for k, v in restored["batch"].items()})
        if res.seconds is None:  # Saved by a version that did not time batches.
          res = dataclasses.replace(res, seconds=np.full(len(res.images), np.nan, np.float32))
      else:
        t0 = time.perf_counter()
        res = sanitize_batch(
          model,
          params_tr,
          params_v,
          images[start : start + batch],
          cfg,
          start=start,
          seed=seed,
          anchor_seed=anchor_seed,
          pad_to=padded,
          mesh=mesh,
          member_mask=None if member_mask is None else member_mask[start : start + batch],
        )
        n_b = len(res.images)
        res = dataclasses.replace(res, seconds=np.full(n_b, (time.perf_counter() - t0) / n_b, np.float32))
        if not np.all(np.isfinite(res.images)):
          raise FloatingPointError(f"sanitized batch {i} has non-finite pixels; lower the learning rate")
        if manager is not None:
          manager.save(
            i,
            args=ocp.args.Composite(batch=ocp.args.StandardSave(dataclasses.asdict(res)), meta=ocp.args.JsonSave(meta)),
          )
          manager.wait_until_finished()
      results.append(res)
      bar.update(len(res.images))
      val = f" val {np.mean(res.val_loss):.3f}" if np.all(np.isfinite(res.val_loss)) else ""
      bar.set_postfix_str(f"steps {np.mean(res.steps):.0f}{val}")
  finally:
    bar.close()
    if manager is not None:
      manager.close()
  return BatchResult(*(np.concatenate([getattr(r, f.name) for r in results]) for f in dataclasses.fields(BatchResult)))
