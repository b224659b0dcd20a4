"""Stacked members: initialise, apply, predict, and the calls of methods that optimise inputs.

An ensemble's variables carry a leading member axis M (``jax.vmap(model.init)(keys, x)``).
Two kinds of call serve the methods:

* Evaluation: :func:`apply` (all members on one batch), :func:`apply_each` (member m on its
  own batch), :func:`predict` (chunked, every member on every image), :func:`accuracy`.
* Input optimisation ("these members, these inputs"): :func:`prepare` lays the members out
  once for inputs they all see, :func:`value_and_input_grad` gives, per input, a sum over the
  members and its gradient with respect to the input, and :func:`jit` compiles a program that
  takes prepared members with the XLA options they need. IPProtect's sanitizer, and any method
  that searches an input against many models, is written with these three; which fast path
  runs (vmapped members, unrolled conv members, cache-sized groups, a shared input layer) is
  chosen here, not by the method.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import hashlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jipguard import models
from jipguard.ensemble import _cpu

PyTree = Any

LAYOUTS = ("vmap", "unroll", "groups", "shared_input")


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

  def member(self, m: int | slice) -> EnsembleState:
    """Member ``m`` (an int keeps the axis as size 1; a slice selects several)."""
    sel = slice(m, m + 1) if isinstance(m, int) else m
    return jax.tree.map(lambda x: x[sel], self)


# Initialisers are threefry-heavy and run once: skipping backend optimisation cuts their
# CPU compile time about 10x (e.g. 10 s -> 1 s for the CIFAR CNN).
@functools.partial(jax.jit, static_argnames=("model", "tx"), compiler_options={"xla_backend_optimization_level": 0})
def init(keys_M: jax.Array, sample_x: jax.Array, *, model: nn.Module, tx: Any) -> EnsembleState:
  """One member per key (typed PRNG keys, shape (M,)): member ``m`` initialises from
  ``fold_in(keys_M[m], 0)`` on ``sample_x`` (one batch of inputs), its optimiser state from ``tx``."""

  def init_one(key):
    variables = model.init(jax.random.fold_in(key, 0), sample_x, train=False)
    params = variables["params"]
    return EnsembleState(params=params, batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.vmap(init_one)(keys_M)


def map_members(fn: Callable[..., Any], *args: PyTree, unroll: bool = False) -> PyTree:
  """``fn`` over the leading member axis of ``args``: ``jax.vmap``, or unrolled and stacked.

  Both give the same result; ``unroll`` traces one call per member (see :func:`apply`).
  """
  if not unroll:
    return jax.vmap(fn)(*args)
  m = jax.tree.leaves(args)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], args)) for i in range(m)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def apply(model: nn.Module, variables: PyTree, x_BxHxWxC: jax.Array, *, unroll: bool | None = None) -> jax.Array:
  """All members on one batch, inference mode: ``logits_MxBxK``.

  ``unroll`` evaluates the members one by one (a Python loop traced into the program)
  instead of vmapped: the same logits, but each member's convolution stays an ordinary
  one. Vmapped per-member convolutions become one grouped convolution, which XLA:CPU runs
  far slower than torch, forward and input gradient alike; ``lax.map`` over members is
  no better (convolutions inside loops miss XLA:CPU's fast path, jax-ml/jax#12868). For
  the CIFAR CNN, M=8, gradient of 64 images to the pixels: vmap 6.1 s, lax.map 4.0 s,
  unrolled 0.9 s (torch 0.67 s). Compile time grows with M. Default (None): unrolled for
  conv models on the CPU backend, vmapped otherwise.
  """
  if unroll is None:
    unroll = _cpu.unroll_members(variables["params"])
  return map_members(lambda v: model.apply(v, x_BxHxWxC, train=False), variables, unroll=unroll)


def apply_each(model: nn.Module, variables: PyTree, x_MxBxHxWxC: jax.Array) -> jax.Array:
  """Member m on its own batch ``x[m]``, inference mode: ``logits_MxBxK``."""
  return jax.vmap(lambda v, x: model.apply(v, x, train=False))(variables, x_MxBxHxWxC)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _predict(model, variables, x_NxHxWxC, *, batch_size):
  n = x_NxHxWxC.shape[0]
  chunks = -(-n // batch_size)
  x = jnp.pad(x_NxHxWxC, [(0, chunks * batch_size - n)] + [(0, 0)] * (x_NxHxWxC.ndim - 1))
  x = x.reshape(chunks, batch_size, *x.shape[1:])
  # Vmapped members inside the loop over chunks (unrolled ones would multiply compile time).
  per_chunk = jax.lax.map(lambda xb: apply(model, variables, xb, unroll=False), x)  # chunks x M x B x K
  logits_MxNxK = jnp.moveaxis(per_chunk, 0, 1).reshape(per_chunk.shape[1], -1, per_chunk.shape[-1])
  return logits_MxNxK[:, :n]


# Conv members' activations per image are large: a chunk holds at most this many member-images
# (10 ResNet-8 members on 1,024 32x32x3 images in one chunk took over 12 GB with the compile).
CONV_MEMBER_IMAGES_PER_CHUNK = 2048


def predict(model: nn.Module, variables: PyTree, x_NxHxWxC: jax.Array, batch_size: int = 1024) -> jax.Array:
  """Logits of every member on every image, ``logits_MxNxK``, in chunks of ``batch_size`` images
  (for conv models at most ``CONV_MEMBER_IMAGES_PER_CHUNK / M``; the logits do not depend on it)."""
  if _cpu.has_convolutions(variables["params"]):
    m = jax.tree.leaves(variables["params"])[0].shape[0]
    batch_size = min(batch_size, max(1, CONV_MEMBER_IMAGES_PER_CHUNK // m))
  return _predict(model, variables, jnp.asarray(x_NxHxWxC), batch_size=min(batch_size, len(x_NxHxWxC)))


def accuracy(
  model: nn.Module, variables: PyTree, x_NxHxWxC: jax.Array, y_N: jax.Array, batch_size: int = 1024
) -> np.ndarray:
  """Accuracy of every member on ``(x, y)``: a numpy array of M floats."""
  logits_MxNxK = predict(model, variables, x_NxHxWxC, batch_size)
  return np.asarray(jnp.mean(jnp.argmax(logits_MxNxK, -1) == jnp.asarray(y_N)[None], axis=-1))


def digest(*trees: Any) -> str:
  """SHA-256 of the shapes, dtypes and bytes of every array in ``trees`` (keys included)."""
  h = hashlib.sha256()
  for a in jax.tree.leaves(trees):
    a = np.asarray(jax.random.key_data(a) if jnp.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key) else a)
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------ input optimisation


@flax.struct.dataclass
class Members:
  """M members of one architecture, laid out for inputs that all of them see.

  Made by :func:`prepare`, outside the jitted loop that uses it (a layout is a copy of the
  weights, which XLA would repeat at every step if it were made inside).

  Attributes:
    tree: The members' variables in the layout's form: ``(M, ...)`` for ``vmap`` and
      ``unroll``; ``(M / G, G, ...)`` for ``groups``; ``_cpu.SharedInputMembers`` for
      ``shared_input``.
    model: The architecture (static).
    layout: One of :data:`LAYOUTS` (static): ``vmap`` (all members vmapped), ``unroll``
      (all members unrolled: conv models on CPU), ``groups`` (G members at a time, the
      groups summed in a loop), ``shared_input`` (groups whose input layer is one product).
  """

  tree: PyTree
  model: nn.Module = flax.struct.field(pytree_node=False)
  layout: str = flax.struct.field(pytree_node=False)

  @property
  def num_members(self) -> int:
    leaf = jax.tree.leaves(self.tree)[0]
    return leaf.shape[0] * (leaf.shape[1] if self.layout in ("groups", "shared_input") else 1)

  @property
  def members_per_pass(self) -> int:
    """Members per group (M for the one-group layouts)."""
    return jax.tree.leaves(self.tree)[0].shape[1] if self.layout in ("groups", "shared_input") else self.num_members

  @property
  def compiler_options(self) -> dict[str, str] | None:
    """XLA options of programs that take these members (``_cpu.conv_compiler_options``)."""
    return _cpu.conv_compiler_options(self.tree["params"]) if self.layout == "unroll" else None


def prepare(
  model: nn.Module,
  variables: PyTree,
  *,
  mesh: jax.sharding.Mesh | None = None,
  layout: str | None = None,
  members_per_pass: int | None = None,
) -> Members:
  """Members ``variables`` (leading member axis M) of ``model``, laid out for a shared input.

  Args:
    model: The members' architecture.
    variables: Their Flax variables, leading member axis M.
    mesh: A device mesh the members are sharded over (then ``vmap``: the partitioner splits
      the member axis).
    layout: Force one of :data:`LAYOUTS` (tests, benchmarks). Default: on the CPU backend
      without a mesh, ``unroll`` for conv models, else ``shared_input`` for models with an
      input layer (``models.input_layer``), else ``groups`` when the members exceed the
      cache (``_cpu.members_per_pass``), else ``vmap``; ``vmap`` on other backends.
    members_per_pass: G, the group size of ``groups`` / ``shared_input`` (a divisor of M).
      Default: ``_cpu.members_per_pass`` (None there: one group of all M).

  Raises:
    ValueError: Unknown layout, a group size that does not divide M, or ``shared_input``
      for a model without an input layer.
  """
  if layout is None:
    if mesh is not None or jax.default_backend() != "cpu":
      layout = "vmap"
    elif _cpu.has_convolutions(variables["params"]):
      layout = "unroll"
    else:
      if members_per_pass is None:
        members_per_pass = _cpu.members_per_pass(variables, mesh)
      if models.input_layer(model) is not None:
        layout = "shared_input"
      elif members_per_pass is None:
        layout = "vmap"
      else:
        layout = "groups"
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "shared_input":
    return Members(tree=_cpu.share_input(model, variables, members_per_pass), model=model, layout=layout)
  if layout == "groups":
    m = jax.tree.leaves(variables)[0].shape[0]
    group = functools.partial(_cpu.group_members, members_per_pass=members_per_pass or m)
    return Members(tree=jax.tree.map(group, variables), model=model, layout=layout)
  return Members(tree=variables, model=model, layout=layout)


def _group_logits(members: Members, tree: PyTree, x_HxWxC: jax.Array, keys_G: jax.Array | None) -> jax.Array:
  """``logits_GxK`` of the members in ``tree`` (all members, or one group) on ONE input.

  With ``keys_G``, in training mode with member g's dropout key ``keys_G[g]``.
  """
  model, x = members.model, x_HxWxC[None]
  if keys_G is None:
    call = lambda v: model.apply(v, x, train=False)[0]
    args = ()
  else:
    call = lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k})[0]
    args = (keys_G,)
  if members.layout == "shared_input":
    return _cpu.map_shared_input(call, tree, x, *args)
  return map_members(call, tree, *args, unroll=members.layout == "unroll")


def value_and_input_grad(
  members: Members,
  fn: Callable[..., jax.Array],
  x_BxHxWxC: jax.Array,
  member_args: PyTree,
  image_args: PyTree = None,
  *,
  dropout_keys_BxM: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per input, a sum over the members and its gradient with respect to the input.

  For every input b: ``value_b = fn(logits_MxK(x_b), member_args[b], image_args[b])``, where
  ``logits_MxK(x_b)`` are all members' logits on ``x_b`` (inference mode, or training mode
  with ``dropout_keys_BxM[b, m]`` as member m's dropout key), and ``grad_b = d value_b / d x_b``.

  ``fn`` must be a sum over the member axis of what it is given (a weighted sum, divided by a
  per-input constant, is fine): the members may be evaluated a group at a time
  (``members.layout``), ``fn`` called on each group's logits and member arguments, and the
  groups' values and gradients added. Every layout computes the same sum (tested).

  Args:
    members: :func:`prepare`'s members.
    fn: ``fn(logits_GxK, member_args_G, image_args) -> scalar`` for one input and G members.
    x_BxHxWxC: The inputs.
    member_args: Pytree of per-input, per-member arrays, leading axes ``(B, M)``.
    image_args: Pytree of per-input arrays, leading axis B (or None).
    dropout_keys_BxM: Optional per-input, per-member dropout keys.

  Returns:
    ``(value_B, grad_BxHxWxC)``.
  """

  def one_input(x, margs, iargs, keys, tree):
    return fn(_group_logits(members, tree, x, keys), margs, iargs)

  value_and_grad = jax.vmap(jax.value_and_grad(one_input), in_axes=(0, 0, 0, 0, None))
  if members.layout in ("vmap", "unroll"):
    return value_and_grad(x_BxHxWxC, member_args, image_args, dropout_keys_BxM, members.tree)
  # Groups: a loop over them, each group's weights staying in cache for every input.
  per_input = functools.partial(_cpu.group_members, members_per_pass=members.members_per_pass, axis=1)

  def body(carry, group):
    tree, margs, keys = group
    value, grad = value_and_grad(x_BxHxWxC, margs, image_args, keys, tree)
    return (carry[0] + value, carry[1] + grad), None

  xs = (members.tree, jax.tree.map(per_input, member_args), jax.tree.map(per_input, dropout_keys_BxM))
  init_carry = (jnp.zeros(x_BxHxWxC.shape[:1], x_BxHxWxC.dtype), jnp.zeros_like(x_BxHxWxC))
  (value, grad), _ = jax.lax.scan(body, init_carry, xs)
  return value, grad


def jit(fn: Callable[..., Any], **jit_kwargs: Any) -> _cpu.ConvJit:
  """``fn`` jitted for the members in its first argument (:class:`Members`, or stacked
  parameters / state): compiled with the XLA options those members need (Eigen's
  convolutions for conv models on CPU, ``_cpu.CPU_CONV_OPTIONS``), else XLA's defaults.
  ``jit_kwargs`` go to ``jax.jit``. Call it as ``fn``; ``.for_members(m)`` gives the program."""
  return _cpu.ConvJit(fn, **jit_kwargs)
