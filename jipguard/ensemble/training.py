"""Training of stacked ensembles: M members of one architecture, one jitted program per epoch.

Every jipguard method that needs "N models of one architecture" trains them here:
IPProtect's bootstrapped Omega_Tr / Omega_V models and its 8 x 10 label-noised
sellers, the watermark learners and shadow models, SecureMark's per-customer models.

Each member has

* its own PRNG key (initialisation, per-epoch shuffling, dropout),
* its own sample of the training pool (``indices_MxS``: a bootstrap, a subset, or all
  of it),
* its own labels (``labels`` of shape (M, N): the label-noised sellers are the same
  call as the clean ones),
* its own optimiser state and batch-norm statistics.

One epoch of all members is one jitted program (``lax.scan`` over steps, ``vmap`` over
members), compiled once per shape; on CPU, large members run member-major (groups of
members through the whole epoch, ``_cpu.members_per_pass``), which keeps their state in
cache. The member axis can be sharded over a device mesh (``sharding.make_mesh``);
results equal the unsharded run up to float tolerance.

Key derivation (so that a member trained alone equals the same member trained in an
ensemble, and a resumed run equals an uninterrupted one): member ``m`` with key ``k``
initialises from ``fold_in(k, 0)``; epoch ``e`` uses ``fold_in(fold_in(k, 1), e)``,
split into a shuffling key and per-step dropout keys ``fold_in(., step)``. Each epoch
visits ``S // batch_size`` full batches of a fresh permutation of the member's sample
(the remainder of the permutation is skipped that epoch).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jipguard import distributed, sharding
from jipguard.ensemble import _cpu
from jipguard.ensemble.checkpoints import Checkpointing, EpochCheckpoints
from jipguard.ensemble.members import EnsembleState, accuracy, digest, init, map_members

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What :meth:`EnsembleTrainer.fit` returns.

  Attributes:
    state: The trained ensemble.
    history: One dict per epoch: ``epoch``, ``loss`` (M floats: mean training loss),
      ``train_accuracy`` (M), and ``eval_accuracy`` (M) when eval data was given.
    resumed_from: Epoch the run resumed from (0 for a fresh run).
  """

  state: EnsembleState
  history: list[dict[str, Any]]
  resumed_from: int


def _member_step(model, tx, penalty, params, batch_stats, opt_state, x, y, key, penalty_data):
  """One optimiser step of one member on its batch; vmapped over members.

  The loss is the mean cross-entropy, plus ``penalty(params, penalty_data)`` when a penalty is
  given (the member's own ``penalty_data``: e.g. SecureMark's per-customer fingerprint term).
  """
  variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}

  def loss_fn(p):
    logits, updates = model.apply(
      {**variables, "params": p}, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if penalty is not None:
      loss = loss + penalty(p, penalty_data)
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  param_updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, param_updates)
  batch_stats = updates.get("batch_stats", batch_stats)
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return params, batch_stats, opt_state, loss, acc


def _epoch_batches(indices_MxS, labels_MxS, keys_M, epoch, *, batch_size):
  """Per-member batch indices and labels of one epoch (steps x M x B) and dropout keys (M,)."""
  m, s = indices_MxS.shape
  steps = s // batch_size
  epoch_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, 1), epoch))(keys_M)
  shuffle_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(epoch_keys), 1, 0)
  perm_MxS = jax.vmap(lambda k: jax.random.permutation(k, s))(shuffle_keys)
  order = perm_MxS[:, : steps * batch_size]
  batch_idx = jnp.take_along_axis(indices_MxS, order, axis=1).reshape(m, steps, batch_size)
  batch_y = jnp.take_along_axis(labels_MxS, order, axis=1).reshape(m, steps, batch_size)
  return jnp.swapaxes(batch_idx, 0, 1), jnp.swapaxes(batch_y, 0, 1), dropout_keys


def _train_step(
  state,
  images,
  idx_MxB,
  y_MxB,
  dropout_keys_M,
  step,
  penalty_data_M=None,
  *,
  model,
  tx,
  penalty=None,
  unroll_members=False,
  batch_sharding=None,
):
  """One step of every member (:func:`_member_step` vmapped, or unrolled over members).

  ``batch_sharding`` (a ``NamedSharding`` of ``(member, data)``) splits every member's
  batch over the mesh's data axis: data parallelism inside each member, with the loss
  mean and batch-norm statistics reduced across it by the partitioner.
  """
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(dropout_keys_M)
  member_step = functools.partial(_member_step, model, tx, penalty)
  x_MxB = images[idx_MxB]
  if batch_sharding is not None:
    x_MxB = jax.lax.with_sharding_constraint(x_MxB, batch_sharding)
    y_MxB = jax.lax.with_sharding_constraint(y_MxB, batch_sharding)
  args = (state.params, state.batch_stats, state.opt_state, x_MxB, y_MxB, step_keys, penalty_data_M)
  # Unrolled: one ordinary convolution per member instead of a grouped one.
  params, batch_stats, opt_state, loss, acc = map_members(member_step, *args, unroll=unroll_members)
  return EnsembleState(params=params, batch_stats=batch_stats, opt_state=opt_state), (loss, acc)


def _train_epoch(
  state,
  images,
  indices_MxS,
  labels_MxS,
  keys_M,
  epoch,
  penalty_data_M=None,
  *,
  model,
  tx,
  batch_size,
  penalty=None,
  batch_sharding=None,
  members_per_pass=None,
):
  """One epoch of every member: a scan over steps of a vmapped member step.

  ``members_per_pass`` G (a divisor of M) makes the epoch member-major: a ``lax.map``
  over M / G groups, each a scan over all steps of its G vmapped members, so that a
  group's parameters and optimiser state stay in the CPU's cache for the whole epoch
  instead of all M members' state streaming through memory at every step (see
  ``_cpu.members_per_pass``). Same steps, same keys, same batches: the result equals the
  step-major epoch up to float rounding.
  """
  batch_idx, batch_y, dropout_keys = _epoch_batches(indices_MxS, labels_MxS, keys_M, epoch, batch_size=batch_size)
  steps = jnp.arange(batch_idx.shape[0])

  def run(state, idx_TxGxB, y_TxGxB, keys_G, penalty_data_G):
    def body(state, step):
      return _train_step(
        state,
        images,
        idx_TxGxB[step],
        y_TxGxB[step],
        keys_G,
        step,
        penalty_data_G,
        model=model,
        tx=tx,
        penalty=penalty,
        batch_sharding=batch_sharding,
      )

    state, (loss_TxG, acc_TxG) = jax.lax.scan(body, state, steps)
    return state, (loss_TxG.mean(0), acc_TxG.mean(0))

  m = dropout_keys.shape[0]
  if members_per_pass is None or members_per_pass >= m:
    state, (loss_M, acc_M) = run(state, batch_idx, batch_y, dropout_keys, penalty_data_M)
  else:
    group = functools.partial(_cpu.group_members, members_per_pass=members_per_pass)
    state, (loss_M, acc_M) = jax.lax.map(
      lambda args: run(*args),
      (
        jax.tree.map(group, state),
        group(batch_idx, axis=1),
        group(batch_y, axis=1),
        group(dropout_keys),
        jax.tree.map(group, penalty_data_M),
      ),
    )
    state, loss_M, acc_M = jax.tree.map(lambda a: a.reshape(m, *a.shape[2:]), (state, loss_M, acc_M))
  return state, {"loss": loss_M, "train_accuracy": acc_M}


train_epoch = _cpu.ConvJit(
  _train_epoch,
  static_argnames=("model", "tx", "batch_size", "penalty", "batch_sharding", "members_per_pass"),
  donate_argnums=(0,),
)
train_epoch.__doc__ = (
  """Jitted :func:`_train_epoch`: ``(state, images, indices_MxS, labels_MxS, keys_M, epoch, penalty_data_M)``."""
)
epoch_batches = jax.jit(_epoch_batches, static_argnames=("batch_size",))
train_step = _cpu.ConvJit(
  _train_step, static_argnames=("model", "tx", "penalty", "unroll_members", "batch_sharding"), donate_argnums=(0,)
)


@dataclasses.dataclass(frozen=True)
class _Data:
  """A training's checked data: the pool, and each member's sample and labels of it."""

  images: jax.Array  # The pool, N x H x W x C float32.
  indices_MxS: jax.Array  # Member m trains on images[indices_MxS[m]].
  labels_MxS: jax.Array  # labels_MxS[m, s] labels images[indices_MxS[m, s]].


def _check_data(keys_M: jax.Array, images: Any, labels: Any, indices: Any, batch_size: int) -> _Data:
  """The data of ``fit``, its shapes checked (ValueError naming the wrong one)."""
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  m, n = keys_M.shape[0], images.shape[0]
  if indices is None:
    indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (m, n))
  indices = jnp.asarray(indices, jnp.int32)
  if indices.ndim != 2 or indices.shape[0] != m:
    raise ValueError(f"indices must have shape (M={m}, S), got {indices.shape}")
  if labels.shape not in {(n,), (m, n)}:
    raise ValueError(f"labels must have shape ({n},) or ({m}, {n}), got {labels.shape}")
  if indices.shape[1] < batch_size:
    raise ValueError(f"each member has {indices.shape[1]} samples, fewer than batch_size={batch_size}")
  labels_MxS = labels[indices] if labels.ndim == 1 else jnp.take_along_axis(labels, indices, axis=1)
  return _Data(images=images, indices_MxS=indices, labels_MxS=labels_MxS)


class _Placement:
  """Members padded to a multiple of the mesh's member shards and placed on it; the pool
  replicated. Padding members never reach the caller (results are sliced to the real M)."""

  def __init__(
    self,
    mesh: jax.sharding.Mesh | None,
    data: _Data,
    epoch_data: Callable[[int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None,
  ):
    self.mesh, self.data, self.epoch_data = mesh, data, epoch_data
    self.shards = sharding.num_member_shards(mesh)
    self._fixed = None if epoch_data is not None else self._place(data.images, data.labels_MxS)

  def members(self, tree: PyTree) -> PyTree:
    return sharding.shard_members(sharding.pad_members(tree, self.shards)[0], self.mesh)

  def _place(self, x: jax.Array, y_MxS: jax.Array) -> tuple[jax.Array, jax.Array]:
    return sharding.replicate(x, self.mesh), self.members(y_MxS)

  def epoch(self, epoch: int) -> tuple[jax.Array, jax.Array]:
    """The placed pool and labels of ``epoch`` (0-based): ``epoch_data``'s, drawn for the real
    members only so that padding changes nothing, or the fixed ones."""
    if self._fixed is not None:
      return self._fixed
    d = self.data
    x, y = self.epoch_data(epoch, d.images, d.labels_MxS)
    if x.shape != d.images.shape or y.shape != d.labels_MxS.shape:
      raise ValueError(
        f"epoch_data changed the shapes: images {d.images.shape} -> {x.shape}, labels {d.labels_MxS.shape} -> {y.shape}"
      )
    return self._place(x, y)


class EnsembleTrainer:
  """Trains M members of one architecture as one jitted program per epoch.

  The epoch function (:func:`train_epoch`) is jitted once, at module level, with the
  model, optimiser and batch size static and the state donated: calling it again with
  arrays of the same shapes compiles nothing, also from another trainer with an equal
  model and the same optimiser object.

  Args:
    model: A Flax module with a ``train`` argument (see ``models.py``).
    tx: An optax optimiser; its state is kept per member.
    batch_size: Minibatch size per member.
    mesh: Optional ``sharding.make_mesh`` mesh; the member axis is sharded over its
      ``member`` axis (members are padded to a multiple of it, then sliced off), and
      each member's batch over its ``data`` axis (``batch_size`` must divide by it).
    scan: Run an epoch as one ``lax.scan`` program (True) or one jitted step per batch
      (False); default: scan, except for models with convolutions on CPU (see
      :meth:`train_epoch`).
    members_per_pass: In a scanned epoch, train this many members (a divisor of M) through
      all steps before the next ones (:func:`train_epoch`); 0: all members at every step;
      default: ``_cpu.members_per_pass`` (cache-sized groups on CPU, all members elsewhere).
      Needs an unsharded ensemble (no ``mesh``).
    penalty: Optional extra term of every member's loss, ``penalty(params, penalty_data) ->
      scalar`` for ONE member's parameters and its own data (``fit``'s ``penalty_data``,
      vmapped with the members). It is a static argument of the jitted epoch: pass one
      hashable object (a module-level function, or an object hashed by identity) for the
      trainer's life, so that it compiles once.
  """

  def __init__(
    self,
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    scan: bool | None = None,
    members_per_pass: int | None = None,
    penalty: Callable[[PyTree, PyTree], jax.Array] | None = None,
  ):
    self.model = model
    self.penalty = penalty
    self.tx = tx
    self.batch_size = batch_size
    self.mesh = mesh
    self.scan = scan
    if members_per_pass is not None and (members_per_pass < 0 or (mesh is not None and members_per_pass)):
      raise ValueError(f"members_per_pass must be >= 0 and 0 with a mesh, got {members_per_pass}")
    self.members_per_pass = members_per_pass
    self.batch_sharding = sharding.batch_sharding(mesh)
    if self.batch_sharding is not None and batch_size % mesh.shape[sharding.DATA]:
      raise ValueError(
        f"batch_size={batch_size} must be divisible by the mesh's data axis ({mesh.shape[sharding.DATA]})"
      )

  def init(self, keys_M: jax.Array, sample_x: jax.Array) -> EnsembleState:
    """Initialises one member per key (typed PRNG keys, shape (M,))."""
    return init(keys_M, jnp.asarray(sample_x[:1]), model=self.model, tx=self.tx)

  def train_epoch(
    self,
    state: EnsembleState,
    images: jax.Array,
    indices_MxS: jax.Array,
    labels_MxS: jax.Array,
    keys_M: jax.Array,
    epoch: int,
    penalty_data_M: PyTree = None,
  ) -> tuple[EnsembleState, dict[str, jax.Array]]:
    """One epoch of every member (donates ``state``). Metrics are per member, shape (M,).

    With ``scan`` (the default, except for conv models on CPU) the epoch is one jitted
    program; otherwise one jitted step, with the members unrolled instead of vmapped, is
    called per batch. Both compute the same thing (tested). On XLA:CPU, convolutions'
    weight gradients inside a loop body (the scan) miss the fast convolution kernels, and
    vmapped convolutions become grouped ones: for the CIFAR CNN (M=2, B=128) a step took
    ~83 s in the scan, ~9 s as a vmapped step and ~2 s unrolled (PyTorch: ~0.9 s). Conv
    models' programs on CPU compile with ``_cpu.conv_compiler_options`` (Eigen's
    convolutions instead of YNNPACK's): M=8, B=128, a 16.7 s epoch of 8 steps instead of
    20.8 s (PyTorch 13.5-13.8 s; ``benchmarks/README.md``).
    """
    scan = self.scan
    if scan is None:
      scan = not _cpu.unroll_members(state.params)
    epoch = jnp.int32(epoch)
    if scan:
      per_pass = self.members_per_pass
      per_pass = _cpu.members_per_pass(state, self.mesh) if per_pass is None else (per_pass or None)
      return train_epoch(
        state,
        images,
        indices_MxS,
        labels_MxS,
        keys_M,
        epoch,
        penalty_data_M,
        model=self.model,
        tx=self.tx,
        batch_size=self.batch_size,
        penalty=self.penalty,
        batch_sharding=self.batch_sharding,
        members_per_pass=per_pass,
      )
    batch_idx, batch_y, dropout_keys = epoch_batches(indices_MxS, labels_MxS, keys_M, epoch, batch_size=self.batch_size)
    step_fn = train_step.for_members(state)
    losses, accs = [], []
    for step in range(batch_idx.shape[0]):
      state, (loss, acc) = step_fn(
        state,
        images,
        batch_idx[step],
        batch_y[step],
        dropout_keys,
        jnp.int32(step),
        penalty_data_M,
        model=self.model,
        tx=self.tx,
        penalty=self.penalty,
        unroll_members=True,
        batch_sharding=self.batch_sharding,
      )
      losses.append(loss)
      accs.append(acc)
    return state, {"loss": jnp.mean(jnp.stack(losses), 0), "train_accuracy": jnp.mean(jnp.stack(accs), 0)}

  def fit(
    self,
    keys_M: jax.Array,
    images: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    *,
    epochs: int,
    indices: np.ndarray | jax.Array | None = None,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    epoch_data: Callable[[int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
    init_state: EnsembleState | None = None,
    penalty_data: PyTree = None,
  ) -> FitResult:
    """Trains M members for ``epochs`` epochs, resuming from ``checkpoint`` if possible.

    Args:
      keys_M: One typed PRNG key per member, shape (M,).
      images: The shared training pool, NHWC float.
      labels: Labels of the pool, shape (N,) shared by all members or (M, N) per member.
      epochs: Total number of epochs (a resumed run trains only the missing ones).
      indices: Per-member sample of the pool, shape (M, S) (e.g. bootstrap indices);
        default: every member sees all N images.
      eval_data: Optional held-out ``(x, y)``; per-member accuracy is logged each epoch.
      checkpoint: Where and how often to save (:class:`Checkpointing`); None: never. An
        exception that stops training (KeyboardInterrupt, which
        ``distributed.interrupt_on_sigterm`` makes of SIGTERM; an ``on_epoch_end`` error)
        first saves the last finished epoch, or, when the interrupted epoch's program already
        took that state (``train_epoch`` donates it), the interrupted epoch once it completes
        with finite losses. So finished epochs are lost only to a hard kill (SIGKILL, power
        loss) or to a non-finite loss, and then at most ``interval_s``' worth.
      progress: Show a progress bar with per-epoch mean / min / max member accuracy.
      desc: Progress bar label.
      on_epoch_end: Called as ``on_epoch_end(epoch, record)`` after each epoch (and its
        checkpoint); an exception there stops training with finished epochs saved.
      epoch_data: ``epoch_data(epoch, images, labels_MxS) -> (images, labels_MxS)``, the
        epoch's training data from the pool and the members' labels (``labels_MxS[m, s]``
        labels ``images[indices[m, s]]``), e.g. a fresh augmentation (0-based ``epoch``). Same
        shapes out as in. It must depend on nothing but its arguments and fixed keys, so a
        resumed run sees the data the uninterrupted one would. Default: the pool as is.
      init_state: Start from these members' parameters and batch statistics (fine-tuning)
        instead of fresh ones; the optimiser state starts afresh. Their digest is part of the
        configuration a checkpoint must match. They are copied: ``init_state`` stays valid.
      penalty_data: Each member's data for the trainer's ``penalty`` (a pytree whose leaves have
        a leading member axis M); part of the configuration a checkpoint must match.

    Returns:
      A :class:`FitResult`.

    Raises:
      FloatingPointError: A member's training loss became NaN or infinite (the epoch is
        not checkpointed).
      ValueError: Shapes disagree, or the checkpoint is of another configuration.
    """
    data = _check_data(keys_M, images, labels, indices, self.batch_size)
    m = keys_M.shape[0]
    state, meta = self._start(keys_M, data, init_state)
    if penalty_data is not None:
      if self.penalty is None:
        raise ValueError("penalty_data given to a trainer without a penalty")
      penalty_data = jax.tree.map(jnp.asarray, penalty_data)
      if any(leaf.ndim == 0 or leaf.shape[0] != m for leaf in jax.tree.leaves(penalty_data)):
        raise ValueError(f"every leaf of penalty_data must have a leading member axis of {m}")
      meta["penalty"] = digest(penalty_data)
    ckpt = None if checkpoint is None else EpochCheckpoints(checkpoint, meta, m, desc)
    try:
      state, history, start = (state, [], 0) if ckpt is None else ckpt.restore(state)
      placement = _Placement(self.mesh, data, epoch_data)
      state = self._epochs(
        placement,
        state,
        keys_M,
        history,
        range(start, epochs),
        ckpt=ckpt,
        eval_data=eval_data,
        on_epoch_end=on_epoch_end,
        penalty_data=penalty_data,
        bar=tqdm.tqdm(total=epochs, initial=start, desc=desc, disable=not progress, leave=False),
      )
    finally:
      if ckpt is not None:
        ckpt.close()
    return FitResult(state=state.member(slice(0, m)), history=history, resumed_from=start)

  def _start(
    self, keys_M: jax.Array, data: _Data, init_state: EnsembleState | None
  ) -> tuple[EnsembleState, dict[str, Any]]:
    """The members' starting state (fresh, or ``init_state``'s weights with a fresh optimiser)
    and the configuration a checkpoint must match."""
    m = keys_M.shape[0]
    meta = {
      "model": repr(self.model),
      "batch_size": self.batch_size,
      "num_members": m,
      "data": digest(keys_M, data.images, data.indices_MxS, data.labels_MxS),
    }
    state = self.init(keys_M, data.images)
    if init_state is not None:
      if jax.tree.structure(init_state.params) != jax.tree.structure(state.params) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(init_state.params), jax.tree.leaves(state.params))
      ):
        raise ValueError(f"init_state is not an ensemble of {m} members of this trainer's model")
      # Copies: the epoch donates its state, and the caller keeps init_state.
      params, batch_stats = jax.tree.map(jnp.array, (init_state.params, init_state.batch_stats))
      state = EnsembleState(params=params, batch_stats=batch_stats, opt_state=jax.vmap(self.tx.init)(params))
      meta["init"] = digest(init_state.params)
    return state, meta

  def _record(self, m: int, eval_data, epoch: int, state: EnsembleState, epoch_metrics) -> dict[str, Any]:
    """Epoch ``epoch``'s history record (real members only); FloatingPointError if a loss is not finite."""
    record = {"epoch": epoch + 1, **{k: v[:m].tolist() for k, v in distributed.to_host(epoch_metrics).items()}}
    bad = [i for i, v in enumerate(record["loss"]) if not np.isfinite(v)]
    if bad:
      raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1} in members {bad}")
    if eval_data is not None:
      record["eval_accuracy"] = accuracy(self.model, state.member(slice(0, m)).variables, *eval_data).tolist()
    return record

  def _epochs(
    self,
    placement: _Placement,
    state: EnsembleState,
    keys_M: jax.Array,
    history: list[dict[str, Any]],
    epochs: range,
    *,
    ckpt: EpochCheckpoints | None,
    eval_data,
    on_epoch_end,
    bar,
    penalty_data: PyTree = None,
  ) -> EnsembleState:
    """Runs ``epochs`` (appending to ``history``); on an exception, ``ckpt`` keeps the finished ones.

    Each epoch's metrics are fetched (and checked finite) after the epoch is dispatched; an
    epoch is "finished" once they are.
    """
    m = keys_M.shape[0]
    record = functools.partial(self._record, m, eval_data)
    state, keys_p, indices_p, penalty_p = placement.members((state, keys_M, placement.data.indices_MxS, penalty_data))
    finished = (epochs.start, state)  # The last finished epoch and its state.
    in_flight = None  # An epoch dispatched and not yet checked: (epoch, state, metrics).
    try:
      for epoch in epochs:
        images_p, labels_p = placement.epoch(epoch)
        state, epoch_metrics = self.train_epoch(state, images_p, indices_p, labels_p, keys_p, epoch, penalty_p)
        in_flight = (epoch, state, epoch_metrics)
        history.append(record(epoch, state, epoch_metrics))
        in_flight, finished = None, (epoch + 1, state)
        acc = np.asarray(history[-1].get("eval_accuracy", history[-1]["train_accuracy"]))
        bar.set_postfix_str(
          f"loss {np.mean(history[-1]['loss']):.3f} acc {acc.mean():.3f} [{acc.min():.3f}, {acc.max():.3f}]"
        )
        bar.update(1)
        if ckpt is not None:
          ckpt.after_epoch(epoch + 1, epochs.stop, state, history)
        if on_epoch_end is not None:
          on_epoch_end(epoch + 1, history[-1])
    except BaseException:
      if ckpt is not None:
        ckpt.on_exit(finished, in_flight, history, record)
      raise
    finally:
      bar.close()
    return state
