"""What a lazy array reads: arrays, layers of stacked arrays, bit-packed masks.

A ``_lazy.Lazy`` computes its values from sources of one shape, read whole, in
strided chunks along one axis (``strided``), or in 1-d contiguous pieces (``flat``).
Each kind of source reads such a piece without materialising more than it:

- an array is reshaped (free) and indexed;
- a ``Slice`` (layer ``at`` of a stacked array) is chunked in the stacked array and
  then indexed, so a scanned leaf is never copied layer by layer;
- a ``Packed`` bool array (32 positions to a ``uint32`` word along its last axis)
  unpacks only the words of the piece. The mask update keeps its intermediate
  masks (the pruned and the dropped ones) this way: 1/8 of a bool mask's bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

WORD = 32  # positions a Packed word holds


@dataclasses.dataclass(frozen=True)
class Slice:
  """Layer ``at`` of a stacked ``array`` (``array[at]``), sliced only where it is read.

  A pytree whose only leaf is ``array`` (``at`` is static), so it goes through
  barriers and loops as the stacked array itself.
  """
  array: jax.Array
  at: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape[len(self.at):])

  def read(self) -> jax.Array:
    """The slice itself (fused into its consumer when that is elementwise)."""
    return _index_leading(self.array, self.at)


jax.tree_util.register_dataclass(Slice, data_fields=["array"], meta_fields=["at"])


@dataclasses.dataclass(frozen=True)
class Packed:
  """A bool array of ``shape`` stored 32 positions to a ``uint32`` word.

  Packed along the last axis: bit ``k`` of ``words[..., j]`` is position ``32 j + k``
  of the last axis (padding bits 0), so the words keep every leading axis (and its
  sharding) and unpacking is elementwise plus a reshape of the last two axes.
  """
  words: jax.Array  # uint32 shape[:-1] + (ceil(shape[-1] / 32),)
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def read(self) -> jax.Array:
    return _unpack(self.words, self.shape[-1])


jax.tree_util.register_dataclass(Packed, data_fields=["words"], meta_fields=["shape"])


def pack(mask: jax.Array) -> Packed:
  """``mask`` (bool, at least 1-d) as a ``Packed`` source."""
  shape = tuple(mask.shape)
  n = shape[-1]
  width = -(-n // WORD)
  m = mask
  if width * WORD != n:
    m = jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, width * WORD - n)])
  bits = m.reshape(shape[:-1] + (width, WORD)).astype(jnp.uint32)
  shifts = lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1)
  # Distinct powers of two: the sum is their bitwise or.
  return Packed(jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32), shape)


def _unpack(words: jax.Array, n: int) -> jax.Array:
  """The bool array of last axis ``n`` that ``words`` pack (see ``Packed``)."""
  shifts = lax.broadcasted_iota(jnp.uint32, words.shape + (WORD,), words.ndim)
  bits = ((words[..., None] >> shifts) & 1).astype(bool)
  bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * WORD,))
  return bits if bits.shape[-1] == n else bits[..., :n]


def _index_leading(x: jax.Array, at: Sequence[int]) -> jax.Array:
  for i in at:
    x = lax.index_in_dim(x, i, 0, keepdims=False)
  return x


def as_source(x):
  """``x`` itself if it is a source kind, else ``jnp.asarray(x)``."""
  return x if isinstance(x, (Slice, Packed)) else jnp.asarray(x)


def read(x) -> jax.Array:
  """The whole of a source."""
  return x.read() if isinstance(x, (Slice, Packed)) else x


def strided(x, axis: int, c: int, i) -> jax.Array:
  """Chunk ``i`` of ``c`` along ``axis``: the positions ``j c + i`` of that axis.

  Viewing the axis ``n`` as ``(n // c, c)`` is free and keeps its sharding on the
  major factor (``_lazy.chunk_plan``).
  """
  if isinstance(x, Packed) and axis < len(x.shape) - 1:
    return _unpack(_strided_array(x.words, axis, c, i), x.shape[-1])
  if isinstance(x, Slice):
    return _index_leading(_strided_array(x.array, len(x.at) + axis, c, i), x.at)
  return _strided_array(read(x), axis, c, i)


def rows(x, start, k: int) -> jax.Array:
  """Rows ``[start, start + k)`` of the source viewed as ``(rows, shape[-1])``, 1-d."""
  cols = x.shape[-1]
  if isinstance(x, Packed):
    words = x.words.reshape(-1, x.words.shape[-1])
    return _unpack(lax.dynamic_slice_in_dim(words, start, k, 0), cols).reshape(k * cols)
  if isinstance(x, Slice):
    lead = x.array.shape[:len(x.at)]
    flat = x.array.reshape(lead + (-1,))
    return _index_leading(lax.dynamic_slice_in_dim(flat, start * cols, k * cols, len(lead)),
                          x.at)
  return lax.dynamic_slice_in_dim(read(x).reshape(-1), start * cols, k * cols, 0)


def _strided_array(x: jax.Array, axis: int, c: int, i) -> jax.Array:
  split = x.shape[:axis] + (x.shape[axis] // c, c) + x.shape[axis + 1:]
  return lax.dynamic_index_in_dim(x.reshape(split), i, axis + 1, keepdims=False)


def flat(x, c: int, i) -> jax.Array:
  """Piece ``i`` of ``c`` of the flattened source: positions ``[i n, (i + 1) n)``."""
  shape = tuple(x.shape)
  n = math.prod(shape) // c
  if isinstance(x, Packed) and n % shape[-1] == 0:
    words = x.words.reshape((c, -1) + x.words.shape[-1:])
    return _unpack(lax.dynamic_index_in_dim(words, i, 0, keepdims=False),
                   shape[-1]).reshape(n)
  if isinstance(x, Slice):
    view = x.array.reshape(x.array.shape[:len(x.at)] + (c, n))
    return _index_leading(lax.dynamic_index_in_dim(view, i, len(x.at), keepdims=False),
                          x.at)
  return lax.dynamic_index_in_dim(read(x).reshape(c, n), i, 0, keepdims=False)
