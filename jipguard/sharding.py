"""Device meshes for stacked ensembles: a ``member`` axis and a ``data`` axis.

The same code runs on one CPU, 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which is how the tests
exercise sharding), a GPU, or many hosts after ``jax.distributed.initialize()``:
arrays are placed with ``NamedSharding`` and ``jit`` partitions the computation
(computation follows data). Members are independent, so sharding the member axis
needs no communication inside a training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MEMBER = "member"
DATA = "data"


def make_mesh(member: int | None = None, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(member, data)`` mesh over ``devices`` (default: all devices).

  Args:
    member: Size of the member axis; default: all devices not used by ``data``.
    data: Size of the data (image / batch) axis.
    devices: Devices to use; default ``jax.devices()``.

  Raises:
    ValueError: The axis sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if member is None:
    member = len(devices) // data
  if member * data != len(devices):
    raise ValueError(f"mesh {member} (member) x {data} (data) needs {member * data} devices, have {len(devices)}")
  return jax.make_mesh((member, data), (MEMBER, DATA), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading (member) axis over ``mesh``'s member axis."""
  return NamedSharding(mesh, P(MEMBER))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
  """``(member, data)`` sharding of per-member batches, or None without a data axis."""
  if mesh is None or mesh.shape[DATA] == 1:
    return None
  return NamedSharding(mesh, P(MEMBER, DATA))


def image_sharding(mesh: Mesh) -> NamedSharding:
  """Splits an array's leading (image) axis over ``mesh``'s data axis."""
  return NamedSharding(mesh, P(DATA))


def num_member_shards(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[MEMBER]


def pad_members(tree: Any, multiple: int) -> tuple[Any, int]:
  """Pads every leaf's leading axis to a multiple of ``multiple`` by repeating member 0.

  Returns:
    The padded tree and the original number of members (slice ``[:m]`` to undo).
  """
  m = jax.tree.leaves(tree)[0].shape[0]
  pad = -m % multiple
  if pad == 0:
    return tree, m

  def _pad(x):
    filler = jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))
    return jnp.concatenate([jnp.asarray(x), filler])

  return jax.tree.map(_pad, tree), m


def place(tree: Any, target: NamedSharding) -> Any:
  """``jax.device_put(tree, target)`` that also works when ``target`` spans several hosts.

  With several processes (``jax.distributed``), every process passes the same host
  values; each keeps the shards of its own devices. Arrays that already span hosts are
  resharded by an identity ``jit``. Typed PRNG key arrays are placed through their data.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, target)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=target)(x)
    if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(one, tree)


def shard_members(tree: Any, mesh: Mesh | None) -> Any:
  """Places ``tree`` (leading member axis on every leaf) on ``mesh``'s member axis."""
  if mesh is None:
    return tree
  return place(tree, member_sharding(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Places a full copy of ``tree`` on every device of ``mesh``."""
  if mesh is None:
    return tree
  return place(tree, replicated(mesh))
