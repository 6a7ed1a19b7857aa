"""FSDP-style shardings: every array leaf split over one mesh axis.

Each leaf is split along its largest axis whose size the mesh axis divides (ties
go to the later axis, the output features of a kernel); leaves with no such axis
(scalars, PRNG keys, small biases) are replicated. The rule only looks at a
leaf's shape, so an optimizer state gets, for each of its param-shaped leaves
(sparse_jax masks, momentum), the same sharding as the parameter: a mask update
then works on the shards each device already holds. Bit-packed masks
(``sparse_jax.PackedMask``) are split so that each device unpacks exactly the rows
of its parameter shard (or replicated, when the packed bytes cannot be split so).

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = jax.device_put(params, fsdp_shardings(params, mesh))
  state_shardings = fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sparse_jax

PyTree = Any


def data_mesh(config) -> Mesh | None:
  """The run's mesh, one ``"data"`` axis over every device; None for ``pmap``."""
  if config.parallelism != "mesh":
    return None
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def fsdp_spec(shape, num_shards: int, axis_name: str = "data") -> P:
  """The ``PartitionSpec`` that splits ``shape`` over ``axis_name`` (or replicates).

  Example:
    >>> fsdp_spec((784, 300), 4)   # 784 and 300 are both divisible: the larger
    PartitionSpec('data', None)

  Args:
    shape: the leaf's shape.
    num_shards: size of the mesh axis.
    axis_name: name of the mesh axis.

  Returns:
    ``P(..., axis_name, ...)`` on the largest divisible axis, or ``P()``.
  """
  shape = tuple(shape)
  best = None
  for i, n in enumerate(shape):
    if n >= num_shards and n % num_shards == 0 and (best is None or n >= shape[best]):
      best = i
  if best is None:
    return P()
  return P(*[axis_name if i == best else None for i in range(len(shape))])


def packed_fsdp_spec(shape, num_shards: int, axis_name: str = "data") -> P:
  """The ``PartitionSpec`` of ``PackedMask.bits`` for a mask of ``shape``.

  Split like the parameter (``fsdp_spec(shape)``) wherever every device can then
  unpack its own rows: on the last axis, or on axis 0 when each device's rows are
  whole bytes (rows divisible by ``8 * num_shards``). Otherwise replicated (the
  bytes are 1/32 of a float32 parameter's): a split by the bytes' own shape would
  put other rows on a device than its parameter shard, and every step would
  reshard the mask (an all-to-all).

  Example:
    >>> packed_fsdp_spec((4096, 2560), 8)   # bits (512, 2560): 64 rows per device
    PartitionSpec('data', None)

  Args:
    shape: the mask's (and parameter's) shape, ``PackedMask.shape``.
    num_shards: size of the mesh axis.
    axis_name: name of the mesh axis.

  Returns:
    A spec for ``bits`` (of rank 2, or 1 for a 0-d or 1-d mask).
  """
  shape = tuple(shape)
  spec = tuple(fsdp_spec(shape, num_shards, axis_name))
  bits_ndim = 2 if len(shape) >= 2 else 1
  if axis_name not in spec:
    return P()
  axis = spec.index(axis_name)
  if bits_ndim == 2 and axis == len(shape) - 1:
    return P(None, axis_name)
  rows = math.prod(shape[:-1]) if bits_ndim == 2 else math.prod(shape)
  if axis == 0 and rows % (8 * num_shards) == 0:
    return P(axis_name, *[None] * (bits_ndim - 1))
  return P()


def fsdp_shardings(tree: PyTree, mesh: Mesh, axis_name: str = "data") -> PyTree:
  """A ``NamedSharding`` per array leaf of ``tree`` (arrays or ShapeDtypeStructs).

  Example:
    >>> shardings = fsdp_shardings(params, mesh)
    >>> params = jax.device_put(params, shardings)

  Args:
    tree: any pytree of arrays or ``jax.ShapeDtypeStruct``; ``None`` leaves (the
      dense leaves of a mask tree) stay ``None``, and a ``PackedMask`` gets a
      ``PackedMask`` of its bits' sharding (``packed_fsdp_spec``).
    mesh: the device mesh.
    axis_name: the mesh axis the leaves are split over.

  Returns:
    A pytree like ``tree`` of ``NamedSharding``.
  """
  if axis_name not in mesh.shape:
    raise ValueError(f"The mesh has no axis {axis_name!r} (axes: {tuple(mesh.shape)}); "
                     "pass axis_name= one of them.")
  n = mesh.shape[axis_name]
  is_packed = lambda x: isinstance(x, sparse_jax.PackedMask)

  def leaf_sharding(x):
    if is_packed(x):
      return sparse_jax.PackedMask(
          NamedSharding(mesh, packed_fsdp_spec(x.shape, n, axis_name)), x.shape)
    return NamedSharding(mesh, fsdp_spec(np.shape(x), n, axis_name))

  return jax.tree.map(leaf_sharding, tree, is_leaf=is_packed)
