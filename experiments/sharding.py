"""FSDP-style shardings: every array leaf split over one mesh axis.

Each leaf is split along its largest axis whose size the mesh axis divides (ties
go to the later axis, the output features of a kernel); leaves with no such axis
(scalars, PRNG keys, small biases) are replicated. The rule only looks at a
leaf's shape, so an optimizer state gets, for each of its param-shaped leaves
(sparse_jax masks, momentum), the same sharding as the parameter: a mask update
then works on the shards each device already holds.

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = jax.device_put(params, fsdp_shardings(params, mesh))
  state_shardings = fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


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


def fsdp_shardings(tree: PyTree, mesh: Mesh, axis_name: str = "data") -> PyTree:
  """A ``NamedSharding`` per array leaf of ``tree`` (arrays or ShapeDtypeStructs).

  Example:
    >>> shardings = fsdp_shardings(params, mesh)
    >>> params = jax.device_put(params, shardings)

  Args:
    tree: any pytree of arrays or ``jax.ShapeDtypeStruct``; ``None`` leaves (the
      dense leaves of a mask tree) stay ``None``.
    mesh: the device mesh.
    axis_name: the mesh axis the leaves are split over.

  Returns:
    A pytree like ``tree`` of ``NamedSharding``.
  """
  if axis_name not in mesh.shape:
    raise ValueError(f"The mesh has no axis {axis_name!r} (axes: {tuple(mesh.shape)}); "
                     "pass axis_name= one of them.")
  n = mesh.shape[axis_name]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, axis_name)),
                      tree)
