"""The ensemble's CPU fast paths (XLA:CPU on a few cores), chosen inside the ensemble.

Methods never call these directly: :func:`jipguard.ensemble.prepare`, :func:`~jipguard.ensemble.jit`
and the trainer pick them. What each buys is measured in ``benchmarks/README.md``.

* **Unrolled members** (:func:`unroll_members`): conv models on CPU evaluate their members one
  by one inside the program; vmapped per-member convolutions become grouped convolutions, which
  XLA:CPU runs far slower than ordinary ones.
* **Eigen convolutions** (:data:`CPU_CONV_OPTIONS`, :class:`ConvJit`): the programs of conv
  models that differentiate through them compile with options that give convolutions to Eigen
  and keep the optimization barriers of ``models.conv_xla_barrier``.
* **Members per pass** (:func:`members_per_pass`): large members are taken a cache-sized group
  at a time (training: through all of an epoch's steps; the sanitizer: through its sum).
* **Shared input** (:class:`SharedInputMembers`): members that all see one input have their
  input layer laid out once as one matrix product per group.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jipguard import models

PyTree = Any


def has_convolutions(params: PyTree) -> bool:
  """Whether any parameter of stacked members is a conv kernel (rank 4 per member: HWIO)."""
  return any(leaf.ndim == 5 for leaf in jax.tree.leaves(params))


def unroll_members(params: PyTree) -> bool:
  """Whether to unroll the members (``members.map_members``): conv models on the CPU backend."""
  return jax.default_backend() == "cpu" and has_convolutions(params)


def group_members(a: jax.Array, members_per_pass: int, axis: int = 0) -> jax.Array:
  """Member axis ``axis`` of ``a`` (M) split into M / G groups of G = ``members_per_pass``,
  the group axis moved to the front: ``(M / G, ..., G, ...)``, for a loop over groups."""
  m = a.shape[axis]
  if m % members_per_pass:
    raise ValueError(f"members_per_pass={members_per_pass} must divide the number of members ({m})")
  a = a.reshape(*a.shape[:axis], m // members_per_pass, members_per_pass, *a.shape[axis + 1 :])
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
# They also keep optimization barriers (XLA:CPU's ``cse_barrier_expander`` removes them by
# default), so that ``models.conv_xla_barrier``'s kernel gradient transposes the stored input
# instead of recomputing batch norm + ReLU inside the transpose: one member's training step
# (B=128, alternated in one process, 2 shared cores at load 6-7) ResNet-8 408-436 -> 328-351 ms,
# CNN 578 -> 464 ms (``benchmarks/README.md``, "Materialised kernel-gradient transposes").
CPU_CONV_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
  "xla_disable_hlo_passes": "cse_barrier_expander",
}


@functools.cache
def _xla_takes_conv_options() -> bool:
  """Whether this XLA:CPU knows :data:`CPU_CONV_OPTIONS` (an experimental flag)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=CPU_CONV_OPTIONS)
  except jax.errors.JaxRuntimeError:
    return False
  return True


def conv_compiler_options(params: PyTree) -> dict[str, str] | None:
  """The XLA compiler options of the training and input-gradient programs for stacked members
  ``params``: :data:`CPU_CONV_OPTIONS` for conv models on the CPU backend (when this XLA knows
  them), None (XLA's defaults) otherwise. They change which library runs a convolution, not
  what it computes (tested)."""
  if unroll_members(params) and _xla_takes_conv_options():
    return dict(CPU_CONV_OPTIONS)
  return None


class ConvJit:
  """``fn`` jitted twice (``jit_kwargs`` for both): with XLA's defaults (``default``) and with
  :data:`CPU_CONV_OPTIONS` (``conv_cpu``). A call runs the program that
  :func:`conv_compiler_options` picks for its first argument: stacked members' parameters,
  variables or state, or anything that names its options (``Members.compiler_options``)."""

  def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
    self.default = jax.jit(fn, **jit_kwargs)
    self.conv_cpu = jax.jit(fn, compiler_options=CPU_CONV_OPTIONS, **jit_kwargs)
    functools.update_wrapper(self, fn)

  def for_members(self, members: PyTree) -> Callable[..., Any]:
    """The jitted program for members whose parameters, state or ``Members`` are ``members``."""
    if hasattr(members, "compiler_options"):
      options = members.compiler_options
    else:
      options = conv_compiler_options(getattr(members, "params", members))
    return self.conv_cpu if options else self.default

  def __call__(self, members: PyTree, *args: Any, **kwargs: Any) -> Any:
    return self.for_members(members)(members, *args, **kwargs)


# Bytes of member state per pass on CPU (about a third of this machine's 32 MiB L3). On 2
# cores, one training epoch of M=100 MLPs 784-256-256-10 (3.2 MB each with Adam's moments),
# N=10,000, B=128: all members per step 12.8 s; 25 per pass 11.9 s, 5: 10.8 s, 2: 10.1 s,
# 1: 10.7 s. One sanitize step of 256 images through those 100 MLPs (1.1 MB each): all at
# once 268 ms; 20 per pass 222 ms, 10: 199 ms, 5: 193 ms, 4: 197 ms; through 10 of them: all
# at once 19.6 ms, 5 per pass 21.1 ms (benchmarks/README.md, "Members per pass").
CPU_PASS_BYTES = 12 << 20


def cpu_pass_bytes() -> int:
  """:data:`CPU_PASS_BYTES`: the bytes of member state (or of a batch of inputs) a CPU program
  should keep in cache at a time."""
  return CPU_PASS_BYTES


def members_per_pass(tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> int | None:
  """How many members of an ensemble (``tree``: its state or parameters, leading member axis)
  a CPU program should take at a time (training epochs, the sum of an input-gradient method).

  None (all members at once) on other backends, with a ``mesh``, for conv models (unrolled
  instead, :func:`unroll_members`) and when all members fit in ``CPU_PASS_BYTES``; otherwise
  the largest divisor G of M whose G members fit in it (at least 1).
  """
  params = getattr(tree, "params", tree)
  if mesh is not None or jax.default_backend() != "cpu" or has_convolutions(params):
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
  rest = {
    **variables,
    "params": {**variables["params"], layer: {k: v for k, v in variables["params"][layer].items() if k != "kernel"}},
  }
  return SharedInputMembers(
    variables=jax.tree.map(functools.partial(group_members, members_per_pass=g), rest),
    forward=jnp.transpose(grouped, (0, 2, 1, 3)).reshape(m // g, d, g * o),
    backward=jnp.transpose(grouped, (0, 1, 3, 2)).reshape(m // g, g * o, d),
    layer=layer,
  )


@jax.custom_vjp
def _input_product(x_NxD: jax.Array, forward_DxF: jax.Array, backward_FxD: jax.Array) -> jax.Array:
  """``x @ forward``, whose input gradient is ``g @ backward`` (``backward = forward.T``)."""
  return x_NxD @ forward_DxF


def _input_product_fwd(x, forward, backward):
  return x @ forward, (x, backward)


def _input_product_bwd(residuals, g_NxF):
  x, backward = residuals
  # ``backward`` is a layout of ``forward``, not a parameter of its own: no cotangent.
  return g_NxF @ backward, x.T @ g_NxF, jnp.zeros_like(backward)


_input_product.defvjp(_input_product_fwd, _input_product_bwd)


def map_shared_input(
  fn: Callable[..., jax.Array], group: SharedInputMembers, x_NxHxWxC: jax.Array, *member_args: PyTree
) -> jax.Array:
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
