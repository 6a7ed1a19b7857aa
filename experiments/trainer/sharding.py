"""FSDP-style shardings over a "data" mesh axis, and tensor parallelism over "model".

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

A 2-D ``("data", "model")`` mesh (``config.mesh_shape = "4x2"``) adds tensor
parallelism by leaf name (``TENSOR_PARALLEL``, Megatron's split): the attention's
q/k/v kernels [.., width, heads, head_dim] and out kernel [.., heads, head_dim,
width] by heads, ``mlp_in`` [.., width, mlp] and ``mlp_out`` [.., mlp, width] by
MLP units, over ``"model"``; the axis counts from the end, so the leading layer
axis of a scanned model's stacked kernels is never split. FSDP (``fsdp=True``)
then splits each leaf over ``"data"`` on its largest other divisible axis, never a
leading layer axis (``layer_axes``). The optimizer state's param-shaped leaves take
their parameter's sharding by name (``mesh_shardings``); packed masks of a
model-split parameter are replicated.

  mesh = jax.make_mesh((4, 2), ("data", "model"))
  stacked = {"blocks/.*": 1}  # a scanned model's [depth, ...] leaves
  params = jax.device_put(params, mesh_shardings(params, mesh, params, fsdp=True,
                                                 layer_axes=stacked))
  opt_shardings = mesh_shardings(jax.eval_shape(tx.init, params), mesh, params,
                                 fsdp=True, layer_axes=stacked)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sparse_jax

PyTree = Any


def data_mesh(config) -> Mesh | None:
  """The run's mesh; None for ``pmap``.

  One ``"data"`` axis over every device, or ``("data", "model")`` of
  ``config.mesh_shape`` (``"4x2"``: data 4, model 2) when it is set.
  """
  if config.parallelism != "mesh":
    return None
  auto = jax.sharding.AxisType.Auto
  if config.get("mesh_shape") is None:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(auto,))
  return jax.make_mesh(parse_mesh_shape(config.mesh_shape), MESH_AXES,
                       axis_types=(auto, auto))


MESH_AXES = ("data", "model")


def parse_mesh_shape(text: str) -> tuple[int, int]:
  """``"4x2"`` as ``(4, 2)``: the sizes of the ``"data"`` and ``"model"`` axes.

  Raises:
    ValueError: ``text`` is not two positive integers joined by ``x``.
  """
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
  if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f"mesh_shape={text!r} is not DATAxMODEL with positive sizes, e.g. "
                     "'4x2' (data 4, model 2); leave it unset for one data axis.")
  return int(m.group(1)), int(m.group(2))


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
  return _packed_spec(shape, fsdp_spec(shape, num_shards, axis_name), num_shards,
                      axis_name)


def _packed_spec(shape, param_spec: P, num_shards: int, axis_name: str) -> P:
  """``packed_fsdp_spec`` for a parameter split by ``param_spec``."""
  shape = tuple(shape)
  spec = tuple(param_spec)
  bits_ndim = 2 if len(shape) >= 2 else 1
  if axis_name not in spec or any(a not in (None, axis_name) for a in spec):
    return P()  # not split, or also over another axis: replicated
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


# Leaf-name regex (``re.search``ed at the end of the name) -> the axis, counted from
# the end, split over "model": Megatron's column/row split of attention by heads
# and of the MLP by hidden units, so each device computes whole heads and units.
TENSOR_PARALLEL = (
    (r"attn/(query|key|value)/kernel", -2),  # [.., width, heads, head_dim]
    (r"attn/out/kernel", -3),  # [.., heads, head_dim, width]
    (r"mlp_in/kernel", -1),  # [.., width, mlp]
    (r"mlp_out/kernel", -2),  # [.., mlp, width]
)


def tensor_parallel_axis(name: str, shape) -> int | None:
  """The axis of leaf ``name`` that ``TENSOR_PARALLEL`` splits over "model", if any.

  Example:
    >>> tensor_parallel_axis("blocks/attn/query/kernel", (4, 128, 4, 32))  # heads
    2
  """
  for pattern, axis in TENSOR_PARALLEL:
    if re.search(rf"(^|/){pattern}$", name) and len(shape) >= -axis:
      return len(shape) + axis
  return None


def num_layer_axes(name: str, layer_axes: Mapping[str, int] | None) -> int:
  """Leading layer axes of leaf ``name``: the first regex of ``layer_axes`` it fullmatches."""
  return next((int(n) for regex, n in (layer_axes or {}).items()
               if re.fullmatch(regex, name)), 0)


def mesh_spec(name: str, shape, mesh_shape: Mapping[str, int], *, fsdp: bool,
              layer_axes: Mapping[str, int] | None = None) -> P:
  """The ``PartitionSpec`` of a parameter on a ``("data", "model")`` mesh.

  The ``TENSOR_PARALLEL`` axis over "model" (if the model axis divides it); with
  ``fsdp``, the largest other axis the data axis divides over "data" (ties to the
  later axis, as ``fsdp_spec``), never one of the leaf's leading layer axes.

  Example:
    >>> mesh_spec("blocks/mlp_in/kernel", (4, 128, 512), {"data": 4, "model": 2},
    ...           fsdp=True, layer_axes={"blocks/.*": 1})
    PartitionSpec(None, 'data', 'model')

  Args:
    name: the leaf's name (``sparse_jax.path_to_name``).
    shape: its shape.
    mesh_shape: the mesh's axis sizes (``mesh.shape``).
    fsdp: also split over "data".
    layer_axes: leaf-name regex -> leading layer axes (``config.sparsity.layer_axes``).

  Returns:
    A spec naming "model" and/or "data", or ``P()``.
  """
  shape = tuple(shape)
  spec = [None] * len(shape)
  tp = tensor_parallel_axis(name, shape)
  if tp is not None and shape[tp] % mesh_shape["model"] == 0:
    spec[tp] = "model"
  if fsdp:
    taken = set(range(num_layer_axes(name, layer_axes))) | {i for i, a in enumerate(spec) if a}
    # A taken axis has size 0 for fsdp_spec: never divisible, never chosen.
    free = tuple(0 if i in taken else n for i, n in enumerate(shape))
    for i, a in enumerate(fsdp_spec(free, mesh_shape["data"])):
      spec[i] = spec[i] or a
  return P(*spec) if any(spec) else P()


def mesh_shardings(tree: PyTree, mesh: Mesh, params: PyTree, *, fsdp: bool,
                   layer_axes: Mapping[str, int] | None = None) -> PyTree:
  """A ``NamedSharding`` per leaf of ``tree`` (``params``, or a state holding param trees).

  A leaf whose name ends with a parameter's name (``"mu/blocks/mlp_in/kernel"``,
  ``"masks/blocks/mlp_in/kernel"``) and has its shape gets that parameter's
  ``mesh_spec``, so masks and moments live where their parameter does; a
  ``PackedMask`` of it gets the bits' spec (``packed_fsdp_spec``'s rule over
  "data"; replicated if the parameter is split over "model"). Other leaves:
  ``fsdp_spec`` over "data" if ``fsdp``, else replicated. ``None`` leaves stay
  ``None``.

  Example:
    >>> mesh = jax.make_mesh((4, 2), ("data", "model"))
    >>> opt_shardings = mesh_shardings(jax.eval_shape(tx.init, params), mesh, params,
    ...                                fsdp=True, layer_axes={"blocks/.*": 1})

  Args:
    tree: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    mesh: a ``("data", "model")`` mesh.
    params: the parameters (arrays or abstract), for their names and shapes.
    fsdp: also split over "data" (``mesh_spec``).
    layer_axes: leaf-name regex -> leading layer axes, never split.

  Returns:
    A pytree like ``tree`` of ``NamedSharding``.
  """
  n = mesh.shape["data"]
  is_packed = lambda x: isinstance(x, sparse_jax.PackedMask)
  shapes = {sparse_jax.path_to_name(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def param_spec(name, shape):
    """The spec of the parameter ``name`` ends with, if it has ``shape``; else None."""
    parts = name.split("/")
    for i in range(len(parts)):
      suffix = "/".join(parts[i:])
      if shapes.get(suffix) == tuple(shape):
        return mesh_spec(suffix, shape, mesh.shape, fsdp=fsdp, layer_axes=layer_axes)
    return None

  def leaf_sharding(path, x):
    name = sparse_jax.path_to_name(path)
    if is_packed(x):
      spec = param_spec(name, x.shape)
      spec = (packed_fsdp_spec(x.shape, n) if fsdp else P()) if spec is None else (
          _packed_spec(x.shape, spec, n, "data"))
      return sparse_jax.PackedMask(NamedSharding(mesh, spec), x.shape)
    spec = param_spec(name, np.shape(x))
    if spec is None:
      spec = fsdp_spec(np.shape(x), n) if fsdp else P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree, is_leaf=is_packed)
