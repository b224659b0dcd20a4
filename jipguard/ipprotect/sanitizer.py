"""IPProtect's sanitizer: Algorithm 1 around Eq. 9 (``objective``), over a whole dataset.

A buyer in a data marketplace shares a sanitized version of its task dataset D_B so
that sellers can measure how useful their models are on it (utility preserved) while
the shared images are worthless as images or training data (low IP exposure). Every image
starts from N(0, 1) noise and follows ``objective.sanitize_step`` until the stopping rule
stops it; :func:`sanitize_batch` runs a batch as one jitted loop, :func:`sanitize` a dataset in
resumable data batches.

Interpretations of the paper (docs/ipprotect.md too):

* **Model batch B**: each step, each image draws its own random subset of exactly B of
  the |Omega_Tr| models (Algorithm 1, line 8, with a fixed subset size so shapes stay
  static); the loss is averaged over it. Default B = round(0.95 |Omega_Tr|).
* **Stopping rule, per image**: every ``val_every`` steps (and from ``min_steps`` on),
  the image's validation loss L_k (mean L over Omega_V, Algorithm 1 line 14) is
  compared with its value at the previous check; an image stops when it changed by
  less than ``zeta`` (absolute). A stopped image stops changing (its pixels and optimiser
  state are frozen); a data batch ends when all its images stopped or at T steps. With
  ``val_stop=False`` Omega_V is not used at all and every image runs T steps.

Out-of-bag option (``out_of_bag``, not in the paper): each image's utility loss is taken
only over the Omega_Tr models whose bootstrap left that image out (about 37% of them; the
step's random subset is intersected with them). A model trained on an image has
memorised it, so it classifies it confidently and correctly; fitting x~ to such targets
makes sanitized images easier than the originals for every unseen seller (utility
overshoots). Out-of-bag models saw the image no more than a seller did. An image that
every model was trained on (probability ~0.63^|Omega_Tr|) uses all of them.

Keys: image k (global index in D_B) uses ``fold_in(fold_in(step_key, k), t)`` at step t (the
model subsets and the robust options' noise, from the public ``seed``). Its starting noise x~_0
and its anchor x_N come from the run's 256-bit **anchor secret** (:func:`anchor_secret`: drawn
with ``secrets``, or derived from a given integer seed by scrypt) through a KDF: the per-image
keys are HMAC-SHA256(secret, "jipguard/ipprotect/<anchor|start>/k") cut to JAX's 64-bit threefry
key (:func:`anchor_keys`). Recovering one image's anchor or start is a 2^64 search for that image
alone; the secret, and every other image's keys, stay out of reach. The start is secret too: a
sanitized image stays at RMS ~0.8 from its start, and knowing the start would let an adversary
subtract it (x~ - x~_0 correlates more with the original than x~ does). The secret is kept in
the buyer's private checkpoint directory (0600) and never written to ``sanitized.npz``;
checkpoints record only a keyed commitment to it (:func:`anchor_commitment`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import hashlib
import hmac
import os
import secrets
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from jipguard import distributed, ensemble, rundir, sharding
from jipguard.ipprotect.objective import SanitizerConfig, distance, optimizer, sanitize_step, step_members


@dataclasses.dataclass(frozen=True)
class BatchResult:
  """Outcome of sanitizing one data batch (all arrays host numpy, one row per image)."""

  images: np.ndarray  # Sanitized images.
  val_loss: np.ndarray  # Final L_k on Omega_V (NaN when val_stop is off).
  train_loss: np.ndarray  # Final utility loss on the last step's Omega_Tr subset.
  steps: np.ndarray  # Steps taken by each image.
  seconds: np.ndarray | None = None  # Wall time of the image's batch / its size (when it ran, not a resume).


def _val_loss(model, cfg, params_v, x, targets_v_BxVxK):
  """L_k of Algorithm 1 line 14: mean L over Omega_V of each image (NaN without val_stop)."""
  if params_v is None:
    return jnp.full(x.shape[:1], jnp.nan)
  logits = jnp.swapaxes(ensemble.apply(model, params_v, x), 0, 1)
  return jnp.mean(distance(logits, targets_v_BxVxK, cfg.loss, cfg.temperature, cfg.margin), axis=1)


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


ANCHOR_SECRET_BYTES = 32  # 256 bits.
_SEED_SALT = b"jipguard/ipprotect/anchor_seed"  # scrypt's salt for secrets derived from a given seed.


def anchor_secret(seed: int | None = None) -> bytes:
  """A 256-bit anchor secret: fresh from ``secrets`` (``seed=None``), or derived from an integer
  ``seed`` by scrypt (reproducible runs; such a secret is only as hard to guess as the seed)."""
  if seed is None:
    return secrets.token_bytes(ANCHOR_SECRET_BYTES)
  return _secret_from_seed(seed)


def seed_digest(seed: int, salt: bytes) -> bytes:
  """scrypt(seed, salt): 32 bytes, slow to search (the anchor secret of a given seed with a fixed
  salt; with a random salt, config.json's commitment to that seed)."""
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"anchor seed must be a non-negative integer, got {seed!r}")
  return hashlib.scrypt(str(seed).encode(), salt=salt, n=2**14, r=8, p=1, dklen=ANCHOR_SECRET_BYTES)


@functools.lru_cache(maxsize=16)
def _secret_from_seed(seed: int) -> bytes:
  return seed_digest(seed, _SEED_SALT)


def _as_secret(secret: bytes | int) -> bytes:
  if isinstance(secret, (bytes, bytearray)):
    if len(secret) != ANCHOR_SECRET_BYTES:
      raise ValueError(f"an anchor secret has {ANCHOR_SECRET_BYTES} bytes, got {len(secret)}")
    return bytes(secret)
  return anchor_secret(secret)


def anchor_keys(secret: bytes | int, start: int, count: int, purpose: str = "anchor") -> jax.Array:
  """Threefry keys of images start..start+count-1's anchors (``purpose="anchor"``) or starting
  noise (``"start"``): a KDF of the secret (module doc)."""
  secret = _as_secret(secret)
  words = np.empty((count, 2), np.uint32)
  for i in range(count):
    digest = hmac.digest(secret, b"jipguard/ipprotect/%s/%d" % (purpose.encode(), start + i), "sha256")
    words[i] = np.frombuffer(digest[:8], ">u4")
  return jax.random.wrap_key_data(words)


def anchor_commitment(secret: bytes | int) -> str:
  """A keyed commitment to the anchor secret (HMAC-SHA256 of a fixed message): equal for equal
  secrets, so a checkpoint of another secret is refused, and revealing nothing of the secret."""
  return hmac.digest(_as_secret(secret), b"jipguard/ipprotect/commitment", "sha256").hex()


def starting_points(
  image_shape: Sequence[int], start: int, count: int, *, seed: int, anchor_secret: bytes | int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Images start..start+count-1's starting noise x~_0, anchors x_N and step keys (module doc).

  ``anchor_secret``: 32 bytes (:func:`anchor_secret`), or an integer seed it is derived from.
  """
  root = jax.random.key(seed)
  normal = lambda k: jax.random.normal(k, tuple(image_shape))
  x0 = jax.vmap(normal)(anchor_keys(anchor_secret, start, count, "start"))
  anchors = jax.vmap(normal)(anchor_keys(anchor_secret, start, count, "anchor"))
  return x0, anchors, image_keys(jax.random.fold_in(root, 1), start, count)


_COMPACT_AT = 2  # Compaction shrinks the batch once at most 1 / _COMPACT_AT of its slots are active.
# The smallest batch compaction shrinks to, per backend (others: ``_MIN_BUCKET_ELSEWHERE``);
# each batch size is one more compiled program. On the 2-core CPU a step costs in proportion
# to its batch, so the batch follows the active images down to 1. The benchmark's
# sanitize_dataset problem (256 images, 50 + 10 MLPs; one process per floor),
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
  anchor_secret: bytes | int,
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
  x0, anchors, step_keys = starting_points(shape, start, b, seed=seed, anchor_secret=anchor_secret)
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
  anchor_secret: bytes | int,
  checkpoint_dir: str | os.PathLike | None = None,
  progress: bool = True,
  mesh: jax.sharding.Mesh | None = None,
  member_mask: np.ndarray | None = None,
  on_batch: Callable[[int, BatchResult], None] | None = None,
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
    anchor_secret: The run's 32-byte anchor secret (:func:`anchor_secret`; keep it private), or an
      integer seed it is derived from.
    checkpoint_dir: Where finished batches go.
    progress: Show a progress bar over images.
    mesh: Optional device mesh: images over its data axis, models over its member axis
      (see :func:`sanitize_batch`); batches are padded to a multiple of the data axis.
    member_mask: With ``cfg.out_of_bag``: ``N x |Omega_Tr|`` eligible models per image
      (:func:`out_of_bag_mask`).
    on_batch: Called as ``on_batch(index, result)`` after each batch sanitized in this call
      (not for batches restored from ``checkpoint_dir``), e.g. to append to ``metrics.jsonl``.

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
    "anchor": anchor_commitment(anchor_secret),  # Keyed: reveals nothing of the secret.
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
          anchor_secret=anchor_secret,
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
        if on_batch is not None:
          on_batch(i, res)
      results.append(res)
      bar.update(len(res.images))
      val = f" val {np.mean(res.val_loss):.3f}" if np.all(np.isfinite(res.val_loss)) else ""
      bar.set_postfix_str(f"steps {np.mean(res.steps):.0f}{val}")
  finally:
    bar.close()
    if manager is not None:
      manager.close()
  return BatchResult(*(np.concatenate([getattr(r, f.name) for r in results]) for f in dataclasses.fields(BatchResult)))
