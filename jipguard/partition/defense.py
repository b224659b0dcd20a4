"""Per-owner adversarial defenders trained with the shared model (Eq. 3, Algorithm 1).

Our reading of section III and Algorithm 1 (docs/partition.md, "Reading of Eq. 3"):

* Owner i's defender ``d_i: H -> X`` is a decoder (:mod:`networks`). Its obfuscated sample of an
  image x is ``x' = d_i(f_l(x))``, an image; the owner runs ``f_l`` on x' and uploads the hidden
  state ``H' = f_l(x')`` (Algorithm 1, step 3), so the server trains the complete model on
  ``D' = {(x', y)}`` (section III) and never sees x or ``f_l(x)``.
* Eq. 3 alone, ``min_{d_i} -d(x, d_i(f_l(x)))``, has no utility term: its optimum is any image
  far from x (for the MSE, ``1 - x`` rounded, which an inverse network undoes). The paper's
  "weight of the defender", which Table I sweeps while accuracy stays > 96%, appears in no
  equation. We read it as the weight lambda of Eq. 3's privacy term against the model's loss on
  the obfuscated sample, with the model frozen in the defender's step::

      L_d(theta_d_i) = u * l(y, f_Theta(d_i(f_l(x)))) - lambda * MSE(x, d_i(f_l(x)))

  ``u = 0`` is Eq. 3 as printed (scaled by lambda); ``u = 1`` (default) keeps x' classifiable.
  The distance d is the per-pixel MSE (the paper names MSE and SSIM; MSE is the one we train on).
* The server's step (Algorithm 1, "for the server") updates ``Theta = {Theta_l, Theta_r}`` (and
  a conv net's batch statistics) on the owners' obfuscated batches by Eq. 1 (cross-entropy)
  plus an optional penalty on the remote part (Eq. 27's fingerprint term:
  ``penalty(remote_params, penalty_data)``, the signature of ``fingerprint.Penalty``). The
  obfuscated samples are data to it: no gradient reaches the defenders (``stop_gradient``).
* One round (Algorithm 1's loop body) is: every owner samples a batch and takes one defender step
  with the current Theta; the server takes one step on the union of the new obfuscated batches.
  An epoch is ``S // B`` rounds, S each owner's samples, B the batch per owner.
* Warm-up (not in the paper; ``warmup_epochs``, default 1): in the first epochs the server trains
  on the clean batch while the defenders step. From scratch the defenders' input ``f_l(x)`` moves
  with Theta while Theta learns from their output; at minutes scale the model then stayed at
  chance unless Theta learns 10x slower than the defenders (the paper's 1e-4 vs 1e-3) or warms up.

Owners of one defender design are one stacked ensemble (``ensemble.EnsembleState`` with a
leading owner axis; their step vmapped): owner o's defender initialises from
``fold_in(defender_key, o)``, so grouping owners differently gives the same defenders
(tests/partition/test_defense.py). With no design (``designs=()``) x' = x: the undefended
baseline, trained by the same code.

The same code trains the conv settings (``arch`` ``"lfw_cnn"`` / ``"vgg19_bn"``, split at a
stage ``"pool1"`` ..; designs of ``networks.CONV_DEFENDERS``, mirrors of the local part). There
the owners of a design are stepped one after another inside the compiled round (on the CPU
backend) instead of vmapped: vmapped per-member convolutions become grouped convolutions, which
XLA:CPU runs several times slower (see ``ensemble.members.apply``); both give the same result.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import os
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jipguard import data, ensemble, rundir
from jipguard.ensemble import projection
from jipguard.partition import networks, split

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
  """Privacy-partitioned training (Algorithm 1).

  Attributes mirror the flags of ``jipguard partition``; the paper's values are in comments.
  """

  designs: tuple[str, ...] = ()  # Defender designs dealt to owners in turn (): none; ("single",); networks.MULTIPLE.
  arch: str = "mlp"  # The network (split.ARCHS): the MNIST MLP, the LFW CNN or VGG-19-BN.
  width: float = 1.0  # Channel multiplier of a conv arch (1: the architecture as defined in split.py).
  num_owners: int = 20  # Data owners N (the paper's multiple-defender setting: 20).
  defender_weight: float = 1.0  # lambda, the weight of Eq. 3's privacy term (Table I sweeps it).
  utility_weight: float = 1.0  # u, the weight of the model's loss in the defender's loss (0: Eq. 3 as printed).
  epochs: int = 5  # Epochs of Algorithm 1 (the paper: 600), warm-up included.
  warmup_epochs: int = 1  # First epochs in which the server trains on the clean images (the paper: none).
  batch_size: int = 16  # Images per owner per round (the paper: 32).
  lr_model: float = 3e-4  # Adam learning rate of Theta (the paper: 1e-4 over 600 epochs).
  lr_defender: float = 1e-3  # Adam learning rate of the defenders (the paper: 1e-3).
  hidden: tuple[int, ...] = split.PAPER_HIDDEN  # Hidden widths of the MLP (the paper: four of 900).
  split_at: str = split.PAPER_SPLIT  # Last local layer (MLP: Dense_1, the paper's second) or stage (conv: pool1..).
  dropout: float = split.PAPER_DROPOUT  # Dropout of the dense layers (the paper: MLP 0.15).
  seed: int = 0  # Seeds the model, the defenders, the owners' shares and batches.

  def __post_init__(self):
    if self.arch not in split.ARCHS:
      raise ValueError(f"arch: unknown architecture {self.arch!r}; choose from {split.ARCHS}")
    known = networks.DEFENDERS if self.arch == "mlp" else networks.CONV_DEFENDERS
    for name in self.designs:
      if name not in known:
        raise ValueError(f"designs: unknown defender {name!r} for {self.arch}; choose from {sorted(known)}")
    if not 0 < self.width <= 8:
      raise ValueError(f"width must be in (0, 8], got {self.width}")
    if self.num_owners < 1 or self.num_owners < len(self.designs):
      raise ValueError(f"num_owners must be >= 1 and >= the number of designs, got {self.num_owners}")
    if not (self.defender_weight >= 0 and self.utility_weight >= 0):
      raise ValueError("defender_weight and utility_weight must be >= 0")
    if self.epochs < 0 or self.batch_size < 1 or self.warmup_epochs < 0:
      raise ValueError(f"epochs and warmup_epochs must be >= 0, batch_size >= 1, got {self}")

  def owner_designs(self) -> tuple[str, ...]:
    """Each owner's defender design (``""``: no defender), by :meth:`groups`."""
    design = [""] * self.num_owners
    for name, owners in self.groups():
      for o in owners:
        design[o] = name
    return tuple(design)

  def groups(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(design, owners)`` per group: owner o gets ``designs[perm[o] % len(designs)]``, perm a
    seeded permutation (the paper assigns its four designs to 20 owners at random)."""
    if not self.designs:
      return ()
    perm = np.random.default_rng([self.seed, 1]).permutation(self.num_owners)
    return tuple(
      (d, tuple(int(o) for o in np.flatnonzero(perm % len(self.designs) == g))) for g, d in enumerate(self.designs)
    )


@dataclasses.dataclass(frozen=True)
class Trained:
  """A privacy-partitioned model and its defenders.

  Attributes:
    config: The run's configuration.
    split: The local and remote parts.
    variables: Theta, the unsplit model's Flax variables (``params``, and a conv net's ``batch_stats``).
    defenders: One ``EnsembleState`` per group (owners in :meth:`DefenseConfig.groups` order).
    history: One dict per epoch (``epoch``, ``loss``, ``privacy_mse``).
  """

  config: DefenseConfig
  split: split.Split
  variables: PyTree
  defenders: tuple[ensemble.EnsembleState, ...]
  history: list[dict[str, Any]]

  @property
  def params(self) -> PyTree:
    """Theta's parameters (an MLP's: ``Dense_0 ..``)."""
    return self.variables["params"]

  @property
  def local_variables(self) -> PyTree:
    """The local part's Flax variables."""
    return split.split_variables(self.split, self.variables)[0]

  @property
  def local_params(self) -> PyTree:
    """The local part's parameters."""
    return self.local_variables["params"]


def _forward(net: split.Split, variables, x, *, train=False, key=None):
  """``f_r(f_l(x))`` of the unsplit model's ``variables``: logits in inference mode; in training
  mode (dropout from ``key``, batch statistics of this batch) ``(logits, new batch_stats)``."""
  local, remote = split.split_variables(net, variables)
  if not train:
    return net.remote.apply(remote, net.local.apply(local, x))
  k1, k2 = jax.random.split(key)
  h, local_stats = net.local.apply(local, x, train=True, rngs={"dropout": k1}, mutable=["batch_stats"])
  logits, remote_stats = net.remote.apply(remote, h, train=True, rngs={"dropout": k2}, mutable=["batch_stats"])
  return logits, split.merge_variables(net, dict(local_stats), dict(remote_stats))


def defender_loss(dec_params, model_variables, x, y, *, net, decoder, weight, utility):
  """``(L_d, privacy MSE)`` of one owner's batch (the model frozen, inference mode)."""
  local = split.split_variables(net, model_variables)[0]
  h = net.local.apply(local, x)
  x_obf = decoder.apply({"params": dec_params}, h)
  priv = jnp.mean((x_obf - x) ** 2)
  util = optax.softmax_cross_entropy_with_integer_labels(_forward(net, model_variables, x_obf), y).mean()
  return utility * util - weight * priv, priv


def defender_step(state: ensemble.EnsembleState, model_variables, x, y, *, net, decoder, tx, weight, utility):
  """One owner's defender step (Algorithm 1, step 2): ``(state, x', privacy MSE)``, x' made by the
  updated defender (step 3). Mapped over the owners of a design."""
  loss = functools.partial(defender_loss, net=net, decoder=decoder, weight=weight, utility=utility)
  (_, priv), grads = jax.value_and_grad(loss, has_aux=True)(state.params, model_variables, x, y)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  local = split.split_variables(net, model_variables)[0]
  x_obf = decoder.apply({"params": params}, net.local.apply(local, x))
  return dataclasses.replace(state, params=params, opt_state=opt_state), x_obf, priv


def _unroll(net: split.Split) -> bool:
  """Step a conv design's owners one by one on the CPU backend (module docstring)."""
  return net.is_conv and jax.default_backend() == "cpu"


def _round(
  variables, opt_state, defenders, x_OxB, y_OxB, key, penalty_data, warmup, *, net, groups, tx, tx_d, cfg, penalty
):
  """One round of Algorithm 1: every owner's defender step, then the server's step (on the clean
  batch in a warm-up round, when the defenders still step but their images are not used)."""
  x_obf = x_OxB
  privs = []
  new_defenders = []
  for (name, owners), state in zip(groups, defenders):
    decoder = networks.defender(name, x_OxB.shape[2:], net.local)
    step = functools.partial(
      defender_step,
      net=net,
      decoder=decoder,
      tx=tx_d,
      weight=cfg.defender_weight,
      utility=cfg.utility_weight,
    )
    idx = np.asarray(owners)
    state, xg, priv = ensemble.members.map_members(
      lambda s, x, y, step=step: step(s, variables, x, y), state, x_OxB[idx], y_OxB[idx], unroll=_unroll(net)
    )
    x_obf = x_obf.at[idx].set(xg)
    new_defenders.append(state)
    privs.append(priv)
  x_obf = jax.lax.stop_gradient(jnp.where(warmup, x_OxB, x_obf))
  xs = x_obf.reshape(-1, *x_obf.shape[2:])
  ys = y_OxB.reshape(-1)

  def server_loss(p):
    v = {**variables, "params": p}
    logits, stats = _forward(net, v, xs, train=True, key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
    if penalty is not None:
      loss = loss + penalty(split.split_variables(net, v)[1]["params"], penalty_data)
    return loss, stats

  (loss, stats), grads = jax.value_and_grad(server_loss, has_aux=True)(variables["params"])
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  variables = {**variables, **stats, "params": optax.apply_updates(variables["params"], updates)}
  priv = jnp.mean(jnp.concatenate(privs)) if privs else jnp.float32(0.0)
  return variables, opt_state, tuple(new_defenders), loss, priv


@functools.partial(jax.jit, static_argnames=("net", "groups", "tx", "tx_d", "cfg", "penalty"), donate_argnums=(0, 1, 2))
def _epoch(
  variables,
  opt_state,
  defenders,
  images_OxS,
  labels_OxS,
  key,
  penalty_data,
  warmup,
  *,
  net,
  groups,
  tx,
  tx_d,
  cfg,
  penalty,
):
  """All rounds of one epoch (a scan): each owner's fresh permutation of its share."""
  o, s = labels_OxS.shape
  steps = s // cfg.batch_size
  perm_key, dropout_key = jax.random.split(key)
  perms = jax.vmap(lambda k: jax.random.permutation(k, s))(jax.random.split(perm_key, o))
  order = perms[:, : steps * cfg.batch_size].reshape(o, steps, cfg.batch_size).swapaxes(0, 1)  # T x O x B

  def body(carry, t):
    variables, opt_state, defenders = carry
    idx = order[t]
    x = jnp.take_along_axis(images_OxS, idx.reshape(o, -1, *([1] * (images_OxS.ndim - 2))), axis=1)
    y = jnp.take_along_axis(labels_OxS, idx, axis=1)
    out = _round(
      variables,
      opt_state,
      defenders,
      x,
      y,
      jax.random.fold_in(dropout_key, t),
      penalty_data,
      warmup,
      net=net,
      groups=groups,
      tx=tx,
      tx_d=tx_d,
      cfg=cfg,
      penalty=penalty,
    )
    return out[:3], out[3:]

  carry = (variables, opt_state, defenders)
  (variables, opt_state, defenders), (loss, priv) = jax.lax.scan(body, carry, jnp.arange(steps))
  return variables, opt_state, defenders, loss.mean(), priv.mean()


# The remote layer whose kernel carries the fingerprint (its input width is P).
FINGERPRINT_LAYERS = ("Dense_0",)


def fingerprint_penalty(projection_LxP: np.ndarray, mu: float) -> projection.ProjectionPenalty:
  """Eq. 27 on the remote part, the server's ``penalty`` of :func:`train`:
  ``mu * mean((F - X theta_sub)^2)``, ``theta_sub`` the remote ``Dense_0`` kernel averaged over
  its outputs (``fingerprint.Penalty``'s form, from the ground floor). One object per training
  (hashed by identity)."""
  return projection.ProjectionPenalty(np.asarray(projection_LxP, np.float32), FINGERPRINT_LAYERS, mu)


def fingerprint_bit_errors(penalty: projection.ProjectionPenalty, remote_params: PyTree, f_L: np.ndarray) -> float:
  """Fraction of the fingerprint's bits whose sign the remote part reads wrong."""
  f_hat = projection.extract(remote_params, penalty.projection, penalty.layers)
  return float(np.mean(np.sign(f_hat) != np.sign(f_L)))


def fingerprint_secret(workdir: str, net: split.Split, image_shape, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """``(X, F)`` of a run's fingerprinted setting: the secret projection X (``bits`` x the remote
  ``Dense_0``'s input width) and a +-1 fingerprint F of ``bits``. Their seed and bits are drawn
  with ``secrets`` into ``workdir/fingerprint_projection.json`` (mode 0600) on the first call;
  a rerun reads them back, so it embeds the same fingerprint."""
  path = os.path.join(workdir, "fingerprint_projection.json")
  if not os.path.exists(path):
    rng = np.random.default_rng(secrets.randbits(128))
    rundir.write_secret(path, {"seed": int(rng.integers(2**63)), "fingerprint": rng.integers(0, 2, 4096).tolist()})
  secret = rundir.read_secret(path)
  if not 1 <= bits <= len(secret["fingerprint"]):
    raise ValueError(f"fingerprint bits must be in [1, {len(secret['fingerprint'])}], got {bits}")
  rng = np.random.default_rng(secret["seed"])
  h = jnp.zeros((1, *split.hidden_shape(net, image_shape)))
  p = jax.eval_shape(net.remote.init, jax.random.key(0), h)["params"]["Dense_0"]["kernel"].shape[0]
  f_L = 2 * np.asarray(secret["fingerprint"][:bits], np.float32) - 1
  return rng.standard_normal((bits, p)).astype(np.float32), f_L


def save_tree(path: str, tree: PyTree, **arrays: np.ndarray) -> None:
  """``tree``'s leaves (as ``p0, p1, ...``) and ``arrays`` in one ``.npz``, written atomically: a
  finished setting of a study, or :func:`train`'s checkpoint."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  leaves = {f"p{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))}
  rundir.write_npz(path, **arrays, **leaves)


def load_tree(path: str, template: PyTree) -> tuple[PyTree, dict[str, np.ndarray]]:
  """``(tree shaped like template, the other arrays)`` of a file :func:`save_tree` wrote.

  Raises:
    data.DataError: The file is unreadable, or its leaves do not fit ``template``.
  """
  f = data.read_npz(path)
  n = len(jax.tree.leaves(template))
  if any(f"p{i}" not in f for i in range(n)) or f"p{n}" in f:
    raise data.DataError(f"{path} does not hold this model's parameters")
  tree = jax.tree.unflatten(jax.tree.structure(template), [f.pop(f"p{i}") for i in range(n)])
  return tree, f


def owner_shares(num: int, num_owners: int, seed: int) -> np.ndarray:
  """``indices_OxS``: a seeded permutation of ``num`` images dealt into equal shares (remainder dropped)."""
  s = num // num_owners
  if s < 1:
    raise ValueError(f"{num} images cannot be shared among {num_owners} owners")
  return np.random.default_rng([seed, 2]).permutation(num)[: s * num_owners].reshape(num_owners, s)


def train(
  cfg: DefenseConfig,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int = 10,
  penalty: Callable[[PyTree, PyTree], jax.Array] | None = None,
  penalty_data: PyTree = None,
  progress: bool = False,
  on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
  checkpoint: str | None = None,
) -> Trained:
  """Trains Theta and every owner's defender by Algorithm 1.

  Args:
    cfg: The configuration.
    images: The owners' pooled training images (NHWC float32 in [0, 1]), dealt by :func:`owner_shares`.
    labels: Their labels.
    num_classes: Classes of the model.
    penalty: Optional extra server loss on the remote part, ``penalty(remote_params, penalty_data)``
      (e.g. ``fingerprint.Penalty(projection, layers=("Dense_0",))``: Eq. 27 in Theta_r; on a
    conv net the remote part's first dense layer is ``Dense_0`` as well).
    penalty_data: The penalty's data (e.g. the customer's fingerprint F_j).
    progress: Show a progress bar.
    on_epoch_end: Called with each epoch's record.
    checkpoint: A ``.npz`` path: after every epoch Theta, the defenders, both optimisers' states
      and the history are written there atomically, and a call that finds the file resumes
      after its last epoch (each epoch's batches and dropout come from ``fold_in(seed, epoch)``,
      so a resumed run equals an uninterrupted one; tested). Delete it once the result is
      saved elsewhere.

  Raises:
    ValueError: A share smaller than ``batch_size``, or images and labels that disagree.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f"images must be NHWC with one label each, got {images.shape} and {labels.shape}")
  shares = owner_shares(len(images), cfg.num_owners, cfg.seed)
  if shares.shape[1] < cfg.batch_size:
    raise ValueError(f"each owner has {shares.shape[1]} images, fewer than batch_size={cfg.batch_size}")
  net = split.split_model(network(cfg, num_classes), cfg.split_at)
  key = jax.random.key(cfg.seed)
  tx, tx_d = optax.adam(cfg.lr_model), optax.adam(cfg.lr_defender)
  variables = dict(network(cfg, num_classes).init(jax.random.fold_in(key, 0), images[:1]))
  opt_state = tx.init(variables["params"])
  groups = cfg.groups()
  h = net.local.apply(split.split_variables(net, variables)[0], images[:1])
  defenders = tuple(
    ensemble.members.init(
      jax.vmap(lambda o: jax.random.fold_in(jax.random.fold_in(key, 1), o))(jnp.asarray(owners)),
      h,
      model=networks.defender(name, images.shape[1:], net.local),
      tx=tx_d,
    )
    for name, owners in groups
  )
  x_OxS, y_OxS = jnp.asarray(images[shares]), jnp.asarray(labels[shares])
  history, first = [], 0
  tag = np.asarray(repr((cfg, images.shape, num_classes, penalty is not None)))
  if checkpoint is not None and os.path.exists(checkpoint):
    (variables, opt_state, defenders), f = load_tree(checkpoint, (variables, opt_state, defenders))
    if str(f["config"]) != str(tag):
      raise ValueError(f"{checkpoint} is the checkpoint of another training; delete it or use another run directory")
    variables, opt_state, defenders = jax.tree.map(jnp.asarray, (variables, opt_state, defenders))
    history = [dict(zip(("epoch", "loss", "privacy_mse"), (int(r[0]), *map(float, r[1:])))) for r in f["history"]]
    first = len(history)
  for epoch in tqdm.trange(first, cfg.epochs, desc="partition", disable=not progress, leave=False):
    variables, opt_state, defenders, loss, priv = _epoch(
      variables,
      opt_state,
      defenders,
      x_OxS,
      y_OxS,
      jax.random.fold_in(jax.random.fold_in(key, 2), epoch),
      penalty_data,
      jnp.bool_(epoch < cfg.warmup_epochs),
      net=net,
      groups=groups,
      tx=tx,
      tx_d=tx_d,
      cfg=cfg,
      penalty=penalty,
    )
    record = {"epoch": epoch + 1, "loss": float(loss), "privacy_mse": float(priv)}
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}")
    history.append(record)
    if checkpoint is not None:
      rows = np.asarray([[r["epoch"], r["loss"], r["privacy_mse"]] for r in history], np.float64)
      save_tree(checkpoint, (variables, opt_state, defenders), config=tag, history=rows)
    if on_epoch_end is not None:
      on_epoch_end(record)
  return Trained(config=cfg, split=net, variables=variables, defenders=defenders, history=history)


def obfuscate(trained: Trained, images: np.ndarray, *, owner: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(x', owner_N)``: image n is owner ``n % N``'s (or, given ``owner``, every image is that
  owner's) and goes through its owner's defender (x' = x for an owner without one).

  Raises:
    ValueError: ``owner`` is not one of the N owners.
  """
  x = jnp.asarray(images, jnp.float32)
  n_owners = trained.config.num_owners
  if owner is not None and not 0 <= owner < n_owners:
    raise ValueError(f"owner must be in [0, {n_owners}), got {owner}")
  owner = np.arange(len(x)) % n_owners if owner is None else np.full(len(x), owner)
  out = np.array(x)
  h = trained.split.local.apply(trained.local_variables, x)
  for (name, owners), state in zip(trained.config.groups(), trained.defenders):
    decoder = networks.defender(name, x.shape[1:], trained.split.local)
    for j, o in enumerate(owners):
      sel = np.flatnonzero(owner == o)
      if len(sel):
        out[sel] = np.asarray(decoder.apply({"params": jax.tree.map(lambda a, j=j: a[j], state.params)}, h[sel]))
  return out, owner


def accuracy(trained: Trained, images: np.ndarray, labels: np.ndarray) -> float:
  """Test accuracy of the deployed pipeline: ``f(d_o(f_l(x)))`` with each image's owner's defender."""
  x_obf, _ = obfuscate(trained, images)
  logits = _forward(trained.split, trained.variables, jnp.asarray(x_obf))
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(labels)))


def uploaded_states(trained: Trained, images: np.ndarray, *, owner: int | None = None) -> np.ndarray:
  """What the server sees of ``images``: ``H' = f_l(x')`` (``f_l(x)`` with no defender), ``h_NxD``;
  image n is owner ``n % N``'s, or every image is ``owner``'s (:func:`obfuscate`)."""
  x_obf, _ = obfuscate(trained, images, owner=owner)
  return np.asarray(trained.split.local.apply(trained.local_variables, jnp.asarray(x_obf)))


def classify(trained: Trained, images: np.ndarray) -> np.ndarray:
  """Theta's predicted classes of ``images`` as given (no defender): the reprint classifier."""
  return np.asarray(jnp.argmax(_forward(trained.split, trained.variables, jnp.asarray(images, jnp.float32)), -1))


def network(cfg: DefenseConfig, num_classes: int):
  """The unsplit network of ``cfg`` (``split.build``)."""
  return split.build(cfg.arch, num_classes, hidden=cfg.hidden, dropout=cfg.dropout, width=cfg.width)
