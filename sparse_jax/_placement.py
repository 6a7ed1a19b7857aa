"""Where arrays live: helpers for leaves sharded over a mesh with explicit axes.

Under explicit axes JAX types every array with its sharding and checks it when
tracing, so arrays the mask update builds from a shape (iotas, constants, packed
masks) must be placed like the parameters they meet. Off explicit axes (auto
axes, or one device) these helpers leave the program as it is, for XLA to
propagate shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_sharding(x) -> NamedSharding | None:
  """The sharding in ``x``'s type when its mesh has explicit axes, else None.

  Under explicit axes JAX checks shardings when tracing: arrays built from a shape
  (iotas, constants) are replicated and may not meet a sharded leaf in a select
  or a scatter, so they are built with this sharding. Under auto axes (None) the
  program is left as it was, for XLA to propagate.
  """
  s = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(s, NamedSharding) or s.mesh.empty:
    return None
  if AxisType.Explicit not in tuple(s.mesh.axis_types):
    return None
  return s


def replicated_like(x) -> NamedSharding | None:
  """Replicated over ``x``'s mesh when it has explicit axes (``explicit_sharding``)."""
  s = explicit_sharding(x)
  return None if s is None else NamedSharding(s.mesh, PartitionSpec())


def split_last_axis_only(x: jax.Array) -> jax.Array:
  """``x`` split along its last axis only (gathered along the others) under explicit axes.

  Merging a split axis into another is no reshape JAX can type under explicit axes,
  so a ``PackedMask`` packs rows (its leading axes, merged) gathered; its users
  place the unpacked mask like their parameter again (``shard_like``). Off explicit
  axes, ``x`` itself.
  """
  s = explicit_sharding(x)
  if s is None:
    return x
  explicit = {n for n, t in zip(s.mesh.axis_names, s.mesh.axis_types)
              if t == AxisType.Explicit}
  spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
  last = spec[-1] if jnp.ndim(x) > 1 else None
  last = tuple(n for n in ((last,) if isinstance(last, str) else last or ()) if n in explicit)
  return jax.sharding.reshard(x, NamedSharding(
      s.mesh, PartitionSpec(*(None,) * (jnp.ndim(x) - 1), last or None)))


def shard_like(x: jax.Array, ref) -> jax.Array:
  """``x`` with the sharding of ``ref`` (an array of ``x``'s shape).

  A concrete ``ref`` on a mesh is matched exactly (``device_put``); one on a single
  device leaves ``x`` uncommitted (committing it would pin it to that device, and
  ``jax.pmap`` then refuses the stacked state). A traced ``ref`` is matched only
  under explicit axes, where the types must agree (``reshard``).
  """
  if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
    if isinstance(ref.sharding, jax.sharding.SingleDeviceSharding):
      return x
    return jax.device_put(x, ref.sharding)
  s = explicit_sharding(ref)
  return x if s is None else jax.sharding.reshard(x, s)
