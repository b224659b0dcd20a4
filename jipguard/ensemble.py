"""Stacked ensembles: N models of one architecture as one pytree, trained as one program.

Every jipguard method that needs "N models of one architecture" uses this module:
IPProtect's bootstrapped Omega_Tr / Omega_V models and its 8 x 10 label-noised
sellers, the watermark learners and shadow models, SecureMark's per-customer models.

An ensemble is an :class:`EnsembleState` whose leaves carry a leading member axis M:
``params = jax.vmap(model.init)(keys, x)``. Each member has

* its own PRNG key (initialisation, per-epoch shuffling, dropout),
* its own sample of the training pool (``indices_MxS``: a bootstrap, a subset, or all
  of it),
* its own labels (``labels`` of shape (M, N): the label-noised sellers are the same
  call as the clean ones),
* its own optimiser state and batch-norm statistics.

One epoch of all members is one jitted program (``lax.scan`` over steps, ``vmap`` over
members), compiled once per shape; on CPU, large members run member-major (groups of
members through the whole epoch, :func:`members_per_pass`), which keeps their state in
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

from collections.abc import Callable, Mapping
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from jipguard import distributed, metrics, models, sharding

PyTree = Any


@flax.struct.dataclass
class EnsembleState:
  """Parameters, batch statistics and optimiser state of M members (leading axis M)."""

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  @property
  def num_members(self) -> int:
    return jax.tree.leaves(self.params)[0].shape[0]

  @property
  def variables(self) -> dict[str, PyTree]:
    """The Flax variables of all members, for ``apply`` / ``predict``."""
    out = {"params": self.params}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out

  def member(self, m: int | slice) -> "EnsembleState":
    """Member ``m`` (an int keeps the axis as size 1; a slice selects several)."""
    sel = slice(m, m + 1) if isinstance(m, int) else m
    return jax.tree.map(lambda x: x[sel], self)


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


def apply(model: nn.Module, variables: PyTree, x_BxHxWxC: jax.Array, *, unroll: bool = False) -> jax.Array:
  """All members on one batch, inference mode: ``logits_MxBxC``.

  ``unroll`` evaluates the members one by one (a Python loop traced into the program)
  instead of vmapped: the same logits, but each member's convolution stays an ordinary
  one. Vmapped per-member convolutions become one grouped convolution, which XLA:CPU runs
  far slower than torch, forward and input gradient alike; ``lax.map`` over members is
  no better (convolutions inside loops miss XLA:CPU's fast path, jax-ml/jax#12868). For
  the CIFAR CNN, M=8, gradient of 64 images to the pixels: vmap 6.1 s, lax.map 4.0 s,
  unrolled 0.9 s (torch 0.67 s). Compile time grows with M. See :func:`unroll_members`.
  """
  return map_members(lambda v: model.apply(v, x_BxHxWxC, train=False), variables, unroll=unroll)


def map_members(fn: Callable[..., Any], *args: PyTree, unroll: bool = False) -> PyTree:
  """``fn`` over the leading member axis of ``args``: ``jax.vmap``, or unrolled and stacked.

  Both give the same result; ``unroll`` traces one call per member (see :func:`apply`).
  """
  if not unroll:
    return jax.vmap(fn)(*args)
  m = jax.tree.leaves(args)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], args)) for i in range(m)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def unroll_members(variables: PyTree) -> bool:
  """Whether to unroll the members (:func:`map_members`): conv models on the CPU backend."""
  return jax.default_backend() == "cpu" and has_convolutions(variables)


def apply_each(model: nn.Module, variables: PyTree, x_MxBxHxWxC: jax.Array) -> jax.Array:
  """Member m on its own batch ``x[m]``, inference mode: ``logits_MxBxC``."""
  return jax.vmap(lambda v, x: model.apply(v, x, train=False))(variables, x_MxBxHxWxC)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _predict(model, variables, x_NxHxWxC, *, batch_size):
  n = x_NxHxWxC.shape[0]
  chunks = -(-n // batch_size)
  x = jnp.pad(x_NxHxWxC, [(0, chunks * batch_size - n)] + [(0, 0)] * (x_NxHxWxC.ndim - 1))
  x = x.reshape(chunks, batch_size, *x.shape[1:])
  logits_KxMxBxC = jax.lax.map(lambda xb: apply(model, variables, xb), x)
  logits_MxKBxC = jnp.moveaxis(logits_KxMxBxC, 0, 1).reshape(logits_KxMxBxC.shape[1], -1,
                                                              logits_KxMxBxC.shape[-1])
  return logits_MxKBxC[:, :n]


def predict(model: nn.Module, variables: PyTree, x_NxHxWxC: jax.Array,
            batch_size: int = 1024) -> jax.Array:
  """Logits of every member on every image, ``logits_MxNxC``, in chunks of ``batch_size``."""
  return _predict(model, variables, jnp.asarray(x_NxHxWxC), batch_size=min(batch_size, len(x_NxHxWxC)))


def accuracy(model: nn.Module, variables: PyTree, x_NxHxWxC: jax.Array, y_N: jax.Array,
             batch_size: int = 1024) -> np.ndarray:
  """Accuracy of every member on ``(x, y)``: a numpy array of M floats."""
  return metrics.utility(predict(model, variables, x_NxHxWxC, batch_size), y_N)


def _member_step(model, tx, params, batch_stats, opt_state, x, y, key):
  """One optimiser step of one member on its batch; vmapped over members."""
  variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}

  def loss_fn(p):
    logits, updates = model.apply(
        {**variables, "params": p}, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
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


def _train_step(state, images, idx_MxB, y_MxB, dropout_keys_M, step, *, model, tx, unroll_members=False,
                batch_sharding=None):
  """One step of every member (:func:`_member_step` vmapped, or unrolled over members).

  ``batch_sharding`` (a ``NamedSharding`` of ``(member, data)``) splits every member's
  batch over the mesh's data axis: data parallelism inside each member, with the loss
  mean and batch-norm statistics reduced across it by the partitioner.
  """
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(dropout_keys_M)
  member_step = functools.partial(_member_step, model, tx)
  x_MxB = images[idx_MxB]
  if batch_sharding is not None:
    x_MxB = jax.lax.with_sharding_constraint(x_MxB, batch_sharding)
    y_MxB = jax.lax.with_sharding_constraint(y_MxB, batch_sharding)
  args = (state.params, state.batch_stats, state.opt_state, x_MxB, y_MxB, step_keys)
  # Unrolled: one ordinary convolution per member instead of a grouped one.
  params, batch_stats, opt_state, loss, acc = map_members(member_step, *args, unroll=unroll_members)
  return EnsembleState(params=params, batch_stats=batch_stats, opt_state=opt_state), (loss, acc)


def _train_epoch(state, images, indices_MxS, labels_MxS, keys_M, epoch, *, model, tx, batch_size,
                 batch_sharding=None, members_per_pass=None):
  """One epoch of every member: a scan over steps of a vmapped member step.

  ``members_per_pass`` G (a divisor of M) makes the epoch member-major: a ``lax.map``
  over M / G groups, each a scan over all steps of its G vmapped members, so that a
  group's parameters and optimiser state stay in the CPU's cache for the whole epoch
  instead of all M members' state streaming through memory at every step (see
  :func:`members_per_pass`). Same steps, same keys, same batches: the result equals the
  step-major epoch up to float rounding.
  """
  batch_idx, batch_y, dropout_keys = _epoch_batches(indices_MxS, labels_MxS, keys_M, epoch, batch_size=batch_size)
  steps = jnp.arange(batch_idx.shape[0])

  def run(state, idx_TxGxB, y_TxGxB, keys_G):
    def body(state, step):
      return _train_step(state, images, idx_TxGxB[step], y_TxGxB[step], keys_G, step, model=model, tx=tx,
                         batch_sharding=batch_sharding)

    state, (loss_TxG, acc_TxG) = jax.lax.scan(body, state, steps)
    return state, (loss_TxG.mean(0), acc_TxG.mean(0))

  m = dropout_keys.shape[0]
  if members_per_pass is None or members_per_pass >= m:
    state, (loss_M, acc_M) = run(state, batch_idx, batch_y, dropout_keys)
  else:
    group = functools.partial(group_members, members_per_pass=members_per_pass)
    state, (loss_M, acc_M) = jax.lax.map(
        lambda args: run(*args),
        (jax.tree.map(group, state), group(batch_idx, axis=1), group(batch_y, axis=1), group(dropout_keys)))
    state, loss_M, acc_M = jax.tree.map(lambda a: a.reshape(m, *a.shape[2:]), (state, loss_M, acc_M))
  return state, {"loss": loss_M, "train_accuracy": acc_M}


def group_members(a: jax.Array, members_per_pass: int, axis: int = 0) -> jax.Array:
  """Member axis ``axis`` of ``a`` (M) split into M / G groups of G = ``members_per_pass``,
  the group axis moved to the front: ``(M / G, ..., G, ...)``, for a loop over groups."""
  m = a.shape[axis]
  if m % members_per_pass:
    raise ValueError(f"members_per_pass={members_per_pass} must divide the number of members ({m})")
  a = a.reshape(*a.shape[:axis], m // members_per_pass, members_per_pass, *a.shape[axis + 1:])
  return jnp.moveaxis(a, axis, 0)


# XLA:CPU options for the programs of conv models that differentiate through them (training,
# IPProtect's sanitize step): YNNPACK keeps the dots and the reductions (pooling), Eigen gets
# the convolutions. This jaxlib sends convolutions to YNNPACK by default, whose
# weight-gradient convolutions run at 6-25 GFLOP/s on 2 cores and whose forward and input
# gradient ran at half Eigen's speed in isolation (CIFAR CNN 32->32 layer, B=128: forward 32
# vs 16 ms, forward + both gradients 420 vs 77 ms). One member's CNN training step (B=128):
# 399 ms by default, 266 ms with these options; 8 unrolled members 2.86 s vs 2.07 s; the
# sanitize step of 8 CNNs on 64 images 661 vs 573 ms. Without ``REDUCE`` the max pooling
# leaves YNNPACK (311 ms); with ``ELTWISE`` added, 303 ms (``benchmarks/README.md``, "Eigen
# convolutions for training").
CPU_CONV_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _xla_takes_conv_options() -> bool:
  """Whether this XLA:CPU knows :data:`CPU_CONV_OPTIONS` (an experimental flag)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=CPU_CONV_OPTIONS)
  except jax.errors.JaxRuntimeError:
    return False
  return True


def conv_compiler_options(variables: PyTree) -> dict[str, str] | None:
  """The XLA compiler options of the training and sanitizing programs for members
  ``variables``: :data:`CPU_CONV_OPTIONS` for conv models on the CPU backend (when this
  XLA knows them), None (XLA's defaults) otherwise. They change which library runs a
  convolution, not what it computes (tested)."""
  if unroll_members(variables) and _xla_takes_conv_options():
    return dict(CPU_CONV_OPTIONS)
  return None


class ConvJit:
  """``fn`` jitted twice (``jit_kwargs`` for both): with XLA's defaults (``default``) and with
  :data:`CPU_CONV_OPTIONS` (``conv_cpu``). A call runs the program that
  :func:`conv_compiler_options` picks for its first argument, the members' variables or state."""

  def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
    self.default = jax.jit(fn, **jit_kwargs)
    self.conv_cpu = jax.jit(fn, compiler_options=CPU_CONV_OPTIONS, **jit_kwargs)
    functools.update_wrapper(self, fn)

  def for_members(self, members: PyTree) -> Callable[..., Any]:
    """The jitted program for members whose variables or state are ``members``."""
    return self.conv_cpu if conv_compiler_options(members) else self.default

  def __call__(self, members: PyTree, *args: Any, **kwargs: Any) -> Any:
    return self.for_members(members)(members, *args, **kwargs)


train_epoch = ConvJit(
    _train_epoch, static_argnames=("model", "tx", "batch_size", "batch_sharding", "members_per_pass"),
    donate_argnums=(0,))
train_epoch.__doc__ = """Jitted :func:`_train_epoch`: ``(state, images, indices_MxS, labels_MxS, keys_M, epoch)``."""
epoch_batches = jax.jit(_epoch_batches, static_argnames=("batch_size",))
train_step = ConvJit(_train_step, static_argnames=("model", "tx", "unroll_members", "batch_sharding"),
                     donate_argnums=(0,))


# Seconds between the checkpoints of the experiments' trainings (``ipprotect.train_models``,
# ``watermark.train_learners``); the last epoch and the one an exception stops at are always
# saved (``EnsembleTrainer.fit``). Saving every epoch doubled ``sample_models`` in the main job:
# 110 MLPs' state is 355 MB, ~1 s to save on 2 cores, and one of their epochs (300 images,
# batch 32) takes ~1 s (fit of 10 epochs: 11.4 s without checkpoints, 21.9 s saving each epoch,
# 12.9 s saving every 10th; /tmp script).
CHECKPOINT_INTERVAL_S = 60.0


# Bytes of member state per pass on CPU (about a third of this machine's 32 MiB L3). On 2
# cores, one training epoch of M=100 MLPs 784-256-256-10 (3.2 MB each with Adam's moments),
# N=10,000, B=128: all members per step 12.8 s; 25 per pass 11.9 s, 5: 10.8 s, 2: 10.1 s,
# 1: 10.7 s. One sanitize step of 256 images through those 100 MLPs (1.1 MB each): all at
# once 268 ms; 20 per pass 222 ms, 10: 199 ms, 5: 193 ms, 4: 197 ms; through 10 of them: all
# at once 19.6 ms, 5 per pass 21.1 ms (benchmarks/README.md, "Members per pass").
CPU_PASS_BYTES = 12 << 20


def members_per_pass(tree: EnsembleState | PyTree, mesh: jax.sharding.Mesh | None = None) -> int | None:
  """How many members of an ensemble (``tree``: its state or parameters, leading member axis)
  a CPU program should take at a time (:func:`train_epoch`, ``ipprotect.sanitize_step``).

  None (all members at once) on other backends, with a ``mesh``, for conv models (unrolled
  instead, :func:`unroll_members`) and when all members fit in ``CPU_PASS_BYTES``; otherwise
  the largest divisor G of M whose G members fit in it (at least 1).
  """
  if mesh is not None or jax.default_backend() != "cpu" or has_convolutions(tree):
    return None
  leaves = [leaf for leaf in jax.tree.leaves(tree) if leaf.ndim]
  m = leaves[0].shape[0]
  per_member = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) / m
  g = max(1, int(CPU_PASS_BYTES // per_member))
  if g >= m:
    return None
  while m % g:
    g -= 1
  return g


@flax.struct.dataclass
class SharedInputMembers:
  """M members prepared for an input they all share, in groups of G: each group's input
  layer (the Dense on the flattened model input, ``models.input_layer``) is one matrix
  product for all G members, from kernels laid out for it once.

  Stacked kernels ``(M, D, O)`` are not a matrix: a vmapped input layer on a shared input
  makes XLA:CPU copy them into ``(D, M*O)`` for the forward and ``(M*O, D)`` for the input
  gradient at every call (for 100 MLPs 784-256-256-10 and 256 images, two 80 MB copies,
  119 ms of a 270 ms IPProtect step). Here both layouts are made once. The products are the
  same, so are the results (bitwise in the benchmark's step; tested to float tolerance).

  Attributes:
    variables: The members' variables without the input layer's kernel, leading axes
      ``(M / G, G)``.
    forward: ``(M / G, D, G * O)``: group g's kernels side by side, so that
      ``x_NxD @ forward[g]`` is the pre-activation (before the bias) of its G members.
    backward: ``(M / G, G * O, D)``: the same kernels transposed, for the input gradient.
    layer: The input layer's name in ``variables['params']``.
  """

  variables: PyTree
  forward: jax.Array
  backward: jax.Array
  layer: str = flax.struct.field(pytree_node=False)

  @property
  def members_per_pass(self) -> int:
    return jax.tree.leaves(self.variables)[0].shape[1]


def share_input(model: nn.Module, variables: PyTree, members_per_pass: int | None = None) -> SharedInputMembers:
  """``variables`` (leading member axis M) as :class:`SharedInputMembers` in groups of
  ``members_per_pass`` (None: one group of all M).

  Raises:
    ValueError: ``model`` has no input layer (``models.input_layer``), or the group size
      does not divide M.
  """
  layer = models.input_layer(model)
  if layer is None:
    raise ValueError(f"{type(model).__name__} does not start with a Dense layer on its flattened input")
  kernel = variables["params"][layer]["kernel"]
  m, d, o = kernel.shape
  g = members_per_pass or m
  grouped = group_members(kernel, g)  # (M / G, G, D, O)
  rest = {**variables, "params": {**variables["params"],
                                  layer: {k: v for k, v in variables["params"][layer].items() if k != "kernel"}}}
  return SharedInputMembers(
      variables=jax.tree.map(functools.partial(group_members, members_per_pass=g), rest),
      forward=jnp.transpose(grouped, (0, 2, 1, 3)).reshape(m // g, d, g * o),
      backward=jnp.transpose(grouped, (0, 1, 3, 2)).reshape(m // g, g * o, d),
      layer=layer)


def shared_input_members(model: nn.Module, variables: PyTree, mesh: jax.sharding.Mesh | None = None
                         ) -> SharedInputMembers | None:
  """What a CPU program that gives all members the same input should take (IPProtect's
  sanitize step): :func:`share_input` in groups of :func:`members_per_pass` for models with
  an input layer, on CPU without a mesh; None (the plain variables) otherwise."""
  if mesh is not None or jax.default_backend() != "cpu" or models.input_layer(model) is None:
    return None
  return share_input(model, variables, members_per_pass(variables, mesh))


@jax.custom_vjp
def _input_product(x_NxD: jax.Array, forward_DxK: jax.Array, backward_KxD: jax.Array) -> jax.Array:
  """``x @ forward``, whose input gradient is ``g @ backward`` (``backward = forward.T``)."""
  return x_NxD @ forward_DxK


def _input_product_fwd(x, forward, backward):
  return x @ forward, (x, backward)


def _input_product_bwd(residuals, g_NxK):
  x, backward = residuals
  # ``backward`` is a layout of ``forward``, not a parameter of its own: no cotangent.
  return g_NxK @ backward, x.T @ g_NxK, jnp.zeros_like(backward)


_input_product.defvjp(_input_product_fwd, _input_product_bwd)


def map_shared_input(fn: Callable[..., jax.Array], group: SharedInputMembers, x_NxHxWxC: jax.Array,
                     *member_args: PyTree) -> jax.Array:
  """``fn(variables_g, *member_args_g)`` for each member g of ONE group (``group``'s leaves
  without the group axis: variables ``(G, ...)``, forward ``(D, G * O)``), vmapped, where
  ``fn`` applies the model to ``x_NxHxWxC``: the input layer's pre-activations of all G
  members come from one product and replace that layer's output inside ``fn`` (a Flax
  method interceptor), so ``fn`` runs unchanged from the layer's bias on.
  """
  n = x_NxHxWxC.shape[0]
  g = jax.tree.leaves(group.variables)[0].shape[0]
  h_NxGxO = _input_product(x_NxHxWxC.reshape(n, -1), group.forward, group.backward).reshape(n, g, -1)

  def member(variables, h_NxO, *args):
    params = variables["params"][group.layer]

    def interceptor(next_fun, call_args, kwargs, context):
      if context.module.path == (group.layer,) and context.method_name == "__call__":
        return h_NxO + params["bias"][None] if "bias" in params else h_NxO
      return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(interceptor):
      return fn(variables, *args)

  return jax.vmap(member, in_axes=(0, 1, *[0] * len(member_args)))(group.variables, h_NxGxO, *member_args)


def has_convolutions(tree: EnsembleState | PyTree) -> bool:
  """Whether any parameter of a stacked ensemble is a conv kernel (rank 4 per member: HWIO)."""
  params = tree.params if isinstance(tree, EnsembleState) else tree
  return any(leaf.ndim == 5 for leaf in jax.tree.leaves(params))


# Initialisers are threefry-heavy and run once: skipping backend optimisation cuts their
# CPU compile time about 10x (e.g. 10 s -> 1 s for the CIFAR CNN).
@functools.partial(jax.jit, static_argnames=("model", "tx"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _init_members(keys_M, sample_x, *, model, tx):
  def init_one(key):
    variables = model.init(jax.random.fold_in(key, 0), sample_x, train=False)
    params = variables["params"]
    return EnsembleState(params=params, batch_stats=variables.get("batch_stats", {}),
                         opt_state=tx.init(params))

  return jax.vmap(init_one)(keys_M)


def digest(*trees: Any) -> str:
  """SHA-256 of the shapes, dtypes and bytes of every array in ``trees`` (keys included)."""
  h = hashlib.sha256()
  for a in jax.tree.leaves(trees):
    a = np.asarray(jax.random.key_data(a) if jnp.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key) else a)
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


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
      default: :func:`members_per_pass` (cache-sized groups on CPU, all members elsewhere).
      Needs an unsharded ensemble (no ``mesh``).
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation, *, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, scan: bool | None = None,
               members_per_pass: int | None = None):
    self.model = model
    self.tx = tx
    self.batch_size = batch_size
    self.mesh = mesh
    self.scan = scan
    if members_per_pass is not None and (members_per_pass < 0 or (mesh is not None and members_per_pass)):
      raise ValueError(f"members_per_pass must be >= 0 and 0 with a mesh, got {members_per_pass}")
    self.members_per_pass = members_per_pass
    self.batch_sharding = sharding.batch_sharding(mesh)
    if self.batch_sharding is not None and batch_size % mesh.shape[sharding.DATA]:
      raise ValueError(f"batch_size={batch_size} must be divisible by the mesh's data axis "
                       f"({mesh.shape[sharding.DATA]})")

  def init(self, keys_M: jax.Array, sample_x: jax.Array) -> EnsembleState:
    """Initialises one member per key (typed PRNG keys, shape (M,))."""
    return _init_members(keys_M, jnp.asarray(sample_x[:1]), model=self.model, tx=self.tx)

  def train_epoch(self, state: EnsembleState, images: jax.Array, indices_MxS: jax.Array,
                  labels_MxS: jax.Array, keys_M: jax.Array, epoch: int
                  ) -> tuple[EnsembleState, dict[str, jax.Array]]:
    """One epoch of every member (donates ``state``). Metrics are per member, shape (M,).

    With ``scan`` (the default, except for conv models on CPU) the epoch is one jitted
    program; otherwise one jitted step, with the members unrolled instead of vmapped, is
    called per batch. Both compute the same thing (tested). On XLA:CPU, convolutions'
    weight gradients inside a loop body (the scan) miss the fast convolution kernels, and
    vmapped convolutions become grouped ones: for the CIFAR CNN (M=2, B=128) a step took
    ~83 s in the scan, ~9 s as a vmapped step and ~2 s unrolled (PyTorch: ~0.9 s). Conv
    models' programs on CPU compile with :func:`conv_compiler_options` (Eigen's convolutions
    instead of YNNPACK's): M=8, B=128, a 16.7 s epoch of 8 steps instead of 20.8 s (PyTorch
    13.5-13.8 s; ``benchmarks/README.md``).
    """
    scan = self.scan
    if scan is None:
      scan = not unroll_members(state.params)
    epoch = jnp.int32(epoch)
    if scan:
      per_pass = self.members_per_pass
      per_pass = members_per_pass(state, self.mesh) if per_pass is None else (per_pass or None)
      return train_epoch(state, images, indices_MxS, labels_MxS, keys_M, epoch, model=self.model, tx=self.tx,
                         batch_size=self.batch_size, batch_sharding=self.batch_sharding, members_per_pass=per_pass)
    batch_idx, batch_y, dropout_keys = epoch_batches(indices_MxS, labels_MxS, keys_M, epoch,
                                                     batch_size=self.batch_size)
    step_fn = train_step.for_members(state)
    losses, accs = [], []
    for step in range(batch_idx.shape[0]):
      state, (loss, acc) = step_fn(state, images, batch_idx[step], batch_y[step], dropout_keys,
                                   jnp.int32(step), model=self.model, tx=self.tx, unroll_members=True,
                                   batch_sharding=self.batch_sharding)
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
      checkpoint_dir: str | os.PathLike | None = None,
      checkpoint_every: int = 1,
      checkpoint_interval_s: float = 0.0,
      fingerprint: Mapping[str, Any] | None = None,
      progress: bool = True,
      desc: str = "train",
      on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
      epoch_data: Callable[[int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
      init_state: EnsembleState | None = None,
  ) -> FitResult:
    """Trains M members for ``epochs`` epochs, resuming from ``checkpoint_dir`` if possible.

    Args:
      keys_M: One typed PRNG key per member, shape (M,).
      images: The shared training pool, NHWC float.
      labels: Labels of the pool, shape (N,) shared by all members or (M, N) per member.
      epochs: Total number of epochs (a resumed run trains only the missing ones).
      indices: Per-member sample of the pool, shape (M, S) (e.g. bootstrap indices);
        default: every member sees all N images.
      eval_data: Optional held-out ``(x, y)``; per-member accuracy is logged each epoch.
      checkpoint_dir: Orbax checkpoint directory. Training resumes from its latest
        epoch, and refuses to resume a checkpoint of a different configuration.
      checkpoint_every: Save every this many epochs (and always after the last).
      checkpoint_interval_s: Skip a due save when the last one (or the start) is less than
        this many seconds ago. A save is a device-to-host copy of every member's parameters
        and optimiser state (110 MLPs: 355 MB, ~1 s on 2 cores, as long as one of
        ``sample_models``' epochs). An exception that stops training (KeyboardInterrupt,
        which ``distributed.interrupt_on_sigterm`` makes of SIGTERM; an ``on_epoch_end``
        error) first saves the last finished epoch, or, when the interrupted epoch's program
        already took that state (``train_epoch`` donates it), the interrupted epoch once it
        completes with finite losses. So finished epochs are lost only to a hard kill (SIGKILL,
        power loss) or to a non-finite loss, and then at most this interval's worth. Single
        process only: with several (``jax.distributed``) every due epoch is saved, as the
        processes' clocks and exceptions are their own and a save is collective.
      fingerprint: Extra configuration that must match on resume (e.g. optimiser
        settings, which optax cannot describe).
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
        configuration a checkpoint must match.

    Returns:
      A :class:`FitResult`.

    Raises:
      FloatingPointError: A member's training loss became NaN or infinite (the epoch is
        not checkpointed).
      ValueError: Shapes disagree, or the checkpoint is of another configuration.
    """
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    m = keys_M.shape[0]
    n = images.shape[0]
    if indices is None:
      indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (m, n))
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 2 or indices.shape[0] != m:
      raise ValueError(f"indices must have shape (M={m}, S), got {indices.shape}")
    if labels.shape not in {(n,), (m, n)}:
      raise ValueError(f"labels must have shape ({n},) or ({m}, {n}), got {labels.shape}")
    if indices.shape[1] < self.batch_size:
      raise ValueError(f"each member has {indices.shape[1]} samples, fewer than batch_size={self.batch_size}")
    labels_MxS = labels[indices] if labels.ndim == 1 else jnp.take_along_axis(labels, indices, axis=1)

    manager = None
    meta = {
        "model": repr(self.model), "batch_size": self.batch_size, "num_members": m,
        "data": digest(keys_M, images, indices, labels_MxS), **dict(fingerprint or {}),
    }
    state = self.init(keys_M, images)
    if init_state is not None:
      if jax.tree.structure(init_state.params) != jax.tree.structure(state.params) or any(
          a.shape != b.shape for a, b in zip(jax.tree.leaves(init_state.params), jax.tree.leaves(state.params))):
        raise ValueError(f"init_state is not an ensemble of {m} members of this trainer's model")
      state = EnsembleState(params=init_state.params, batch_stats=init_state.batch_stats,
                            opt_state=jax.vmap(self.tx.init)(init_state.params))
      meta["init"] = digest(init_state.params)
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoint_dir is not None:
      manager = ocp.CheckpointManager(
          os.path.abspath(checkpoint_dir),
          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
      )
      state, history, start = _restore(manager, state, meta)

    # Pad members to the mesh and place them; the pool is replicated.
    shards = sharding.num_member_shards(self.mesh)

    def place_members(tree):
      return sharding.shard_members(sharding.pad_members(tree, shards)[0], self.mesh)

    state, keys_p, indices_p = place_members((state, keys_M, indices))

    def placed_data(epoch):
      x, y = images, labels_MxS
      if epoch_data is not None:  # Drawn for the real members only, so padding changes nothing.
        x, y = epoch_data(epoch, images, labels_MxS)
        if x.shape != images.shape or y.shape != labels_MxS.shape:
          raise ValueError(f"epoch_data changed the shapes: images {images.shape} -> {x.shape}, "
                           f"labels {labels_MxS.shape} -> {y.shape}")
      return sharding.replicate(x, self.mesh), place_members(y)

    fixed_data = placed_data(0) if epoch_data is None else None

    bar = tqdm.tqdm(total=epochs, initial=start, desc=desc, disable=not progress, leave=False)

    def epoch_record(epoch, state, epoch_metrics):
      """The epoch's history record; FloatingPointError if a member's loss is not finite."""
      record = {"epoch": epoch + 1, **{k: v[:m].tolist() for k, v in distributed.to_host(epoch_metrics).items()}}
      bad = [i for i, v in enumerate(record["loss"]) if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1} in members {bad}")
      if eval_data is not None:
        record["eval_accuracy"] = accuracy(
            self.model, state.member(slice(0, m)).variables, eval_data[0], eval_data[1]).tolist()
      return record

    saved, finished = start, (start, state)  # The last saved epoch; the last finished one and its state.
    in_flight = None  # An epoch dispatched and not yet checked: (epoch, state, metrics).
    last_save = time.monotonic()
    # Saves are collective across processes: each process's clock and exceptions are its own,
    # so with several processes every due epoch is saved and nothing is saved on the way out.
    single_process = jax.process_count() == 1
    try:
      for epoch in range(start, epochs):
        images_p, labels_p = fixed_data or placed_data(epoch)
        state, epoch_metrics = self.train_epoch(state, images_p, indices_p, labels_p, keys_p, epoch)
        in_flight = (epoch, state, epoch_metrics)
        record = epoch_record(epoch, state, epoch_metrics)
        in_flight = None
        history.append(record)
        finished = (epoch + 1, state)
        acc = np.asarray(record.get("eval_accuracy", record["train_accuracy"]))
        bar.set_postfix_str(
            f"loss {np.mean(record['loss']):.3f} acc {acc.mean():.3f} [{acc.min():.3f}, {acc.max():.3f}]")
        bar.update(1)
        due = (epoch + 1) % checkpoint_every == 0 and (
            not single_process or time.monotonic() - last_save >= checkpoint_interval_s)
        if manager is not None and (due or epoch + 1 == epochs):
          _save(manager, epoch + 1, state.member(slice(0, m)), history, meta)
          saved, last_save = epoch + 1, time.monotonic()
        if on_epoch_end is not None:
          on_epoch_end(epoch + 1, record)
    except BaseException:
      if manager is not None and single_process:  # Keep the finished epochs.
        try:
          if not _deleted(finished[1]):
            if finished[0] > saved:
              _save(manager, finished[0], finished[1].member(slice(0, m)), history, meta)
          elif in_flight is not None:
            # The last finished state went into the next epoch (``train_epoch`` donates its
            # input): finish that one instead, and keep it if its losses are finite.
            epoch, state, epoch_metrics = in_flight
            _save(manager, epoch + 1, state.member(slice(0, m)),
                  [*history, epoch_record(epoch, state, epoch_metrics)], meta)
        except FloatingPointError:
          pass  # The interrupted epoch diverged: nothing sound to keep.
        except Exception as e:  # noqa: BLE001 (best effort: the original exception goes on)
          logging.warning("%s: could not save the finished epochs on the way out: %r", desc, e)
      raise
    finally:
      bar.close()
      if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return FitResult(state=state.member(slice(0, m)), history=history, resumed_from=start)


def _deleted(tree: PyTree) -> bool:
  """Whether any array of ``tree`` was deleted (donated to a later computation)."""
  return any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(tree))


def _save(manager: ocp.CheckpointManager, epoch: int, state: EnsembleState,
          history: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      history=ocp.args.JsonSave(history),
      meta=ocp.args.JsonSave(meta),
  ))


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any) -> None:
  """Raises ValueError naming the differing keys if a checkpoint's configuration differs."""
  current = json.loads(json.dumps(current))
  if saved != current:
    diff = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
    raise ValueError(
        f"checkpoint in {where} was made with a different configuration "
        f"(differs in {diff}); use another directory or delete it to start afresh")


def _restore(manager: ocp.CheckpointManager, state: EnsembleState, meta: dict[str, Any]
             ) -> tuple[EnsembleState, list[dict[str, Any]], int]:
  """Latest checkpoint of ``manager`` if any, else ``state`` unchanged at epoch 0."""
  epoch = manager.latest_step()
  if epoch is None:
    return state, [], 0
  saved_meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_same_config(saved_meta, meta, manager.directory)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
  return restored["state"], list(restored["history"]), int(epoch)


def load_checkpoint(checkpoint_dir: str | os.PathLike, template: EnsembleState) -> EnsembleState:
  """Restores the latest ensemble saved by :meth:`EnsembleTrainer.fit` in ``checkpoint_dir``.

  Args:
    checkpoint_dir: The directory given to ``fit``.
    template: A state of the same structure (e.g. ``trainer.init(keys, x)``).

  Raises:
    FileNotFoundError: No checkpoint there.
  """
  with ocp.CheckpointManager(os.path.abspath(checkpoint_dir)) as manager:
    epoch = manager.latest_step()
    if epoch is None:
      raise FileNotFoundError(f"no ensemble checkpoint in {checkpoint_dir}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
