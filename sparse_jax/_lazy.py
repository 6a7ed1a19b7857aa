"""Lazy arrays, and passes over large leaves in chunks.

The mask update computes keys and masks of every prunable leaf several times
(histogram passes, then the final masks). A ``Lazy`` array is computed where it
is needed, from arrays that exist anyway, so none of them is materialised whole;
the passes that reduce a large leaf (counts, histograms) go over it in chunks
(``chunk_plan``), so their temporaries stay chunk-sized. Both keep a sharded
leaf on its devices: flat indices are built per shard (``flat_index``) and chunks
are strided slices of a sharded axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _sources


def _two_adic(n: int) -> int:
  return (n & -n).bit_length() - 1


def _index(chunk_shape, full_shape, axis=None, step=1, offset=None):
  """Row-major flat index in ``full_shape`` of the positions of a (strided) chunk.

  Along ``axis`` the chunk holds positions ``j * step + offset``; along every other
  axis it holds all of them. Built from one iota per axis (see ``flat_index``).
  """
  index = jnp.zeros(chunk_shape, jnp.uint32)
  stride = 1
  for a in reversed(range(len(full_shape))):
    coord = lax.broadcasted_iota(jnp.uint32, chunk_shape, a)
    if a == axis:
      coord = coord * jnp.uint32(step) + offset.astype(jnp.uint32)
    index = index + coord * jnp.uint32(stride)
    stride *= full_shape[a]
  return index


def flat_index(shape: Sequence[int]) -> jax.Array:
  """Row-major flat index (``uint32``) of every position of an array of ``shape``.

  Equal to ``jnp.arange(size).reshape(shape)``, but built from one iota per axis:
  it needs no reshape, so each device of a sharded computation computes only its
  own shard of it (a reshape of the 1-d ``arange`` gathers it onto every device).

  Example:
    >>> flat_index((2, 3))
    Array([[0, 1, 2], [3, 4, 5]], dtype=uint32)

  Args:
    shape: the array's shape (fewer than 2**32 elements).

  Returns:
    A ``uint32`` array of ``shape``.
  """
  shape = tuple(int(n) for n in shape)
  return _index(shape, shape)


Slice = _sources.Slice
Packed = _sources.Packed


class Lazy(NamedTuple):
  """An array computed where it is needed, from arrays that exist anyway.

  ``fn(index, *sources)`` must be elementwise: it returns the values of any slice
  of the ``sources`` (arrays, or ``Slice``s of stacked arrays, of one shape), given
  the slice's flat row-major
  ``index`` in the full array. Keys and masks of the mask update are ``Lazy``:
  the selector histograms large leaves chunk by chunk and calls ``fn`` per
  chunk, and the final masks are computed in one elementwise pass, so no keys,
  scatter indices or intermediate masks of a whole leaf are ever materialised.

  Example:
    >>> keys = Lazy(lambda index, w, m: score_keys(w, m), (w, m))
    >>> pruned = lazy_map(lambda index, x: x > t, keys)   # still lazy
    >>> pruned.compute()                                  # a bool array
  """
  fn: Callable[..., jax.Array]
  sources: tuple  # arrays, Slices or Packed (_sources), of one shape

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.sources[0].shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def compute(self) -> jax.Array:
    """The whole array (fused into its consumer when that is elementwise)."""
    return self.fn(flat_index(self.shape), *[_sources.read(x) for x in self.sources])


def lazy(x) -> Lazy:
  """``x`` itself if it is ``Lazy``, else a ``Lazy`` that reads the array ``x``."""
  if isinstance(x, Lazy):
    return x
  return Lazy(lambda index, x: x, (_sources.as_source(x),))


def lazy_map(f, *inputs) -> Lazy:
  """The ``Lazy`` of ``f(index, *values)`` over arrays or ``Lazy`` inputs of one shape.

  Sources shared by several inputs (the same array object) are passed once.
  """
  ins = [lazy(x) for x in inputs]
  sources: list = []
  slots: list[list[int]] = []
  for l in ins:
    slot = []
    for src in l.sources:
      j = next((j for j, known in enumerate(sources) if known is src), None)
      if j is None:
        sources.append(src)
        j = len(sources) - 1
      slot.append(j)
    slots.append(slot)

  def fn(index, *srcs):
    return f(index, *[l.fn(index, *[srcs[j] for j in slot]) for l, slot in zip(ins, slots)])

  return Lazy(fn, tuple(sources))


# Leaves with more elements are histogrammed in chunks of about this many, so the
# per-leaf temporaries of a selection (keys, scatter indices) stay this small.
CHUNK_ELEMENTS = 1 << 20


def set_chunk_elements(n: int) -> None:
  """Sets how many elements a leaf may have before selections process it in chunks.

  Smaller chunks bound the mask update's temporaries (about 4 bytes per element of
  a chunk, a few at a time); larger ones are faster on CPU. Read when a mask update
  is traced: set it before ``jax.jit`` compiles the training step.

  Example:
    >>> sparse_jax.set_chunk_elements(2**24)   # faster, more memory
  """
  global CHUNK_ELEMENTS
  if int(n) < 1:
    raise ValueError(f"chunk elements must be >= 1, got {n}.")
  CHUNK_ELEMENTS = int(n)


def get_chunk_elements() -> int:
  """The current chunk size of ``set_chunk_elements`` (default 2**20)."""
  return CHUNK_ELEMENTS


def chunk_plan(shape: Sequence[int], max_elements: int | None = None):
  """How a leaf of ``shape`` is split into chunks: ``None`` or ``(axis, count)``.

  Chunk ``i`` of ``(axis, c)`` holds the positions whose index along ``axis`` is
  ``i`` modulo ``c`` (a strided chunk): viewing the axis ``n`` as ``(n // c, c)``
  is free, and slicing the minor factor keeps a sharding of the axis on the major
  factor, so each device reads only its own shard. The first axis with a divisor
  ``c`` in ``[need, 4 need]`` (``need = ceil(size / max_elements)``) is split, by
  the divisor leaving the most factors of 2 in ``n // c`` (device counts divide
  it), then the smallest. With no such divisor (e.g. prime sizes) the leaf stays
  whole: many tiny chunks would each pay a full 2**16-bin histogram.

  Example:
    >>> chunk_plan((4096, 4096), 2**20)
    (0, 16)
  """
  shape = tuple(int(n) for n in shape)
  max_elements = CHUNK_ELEMENTS if max_elements is None else int(max_elements)
  size = math.prod(shape)
  if size <= max_elements:
    return None
  need = -(-size // max_elements)
  for axis, n in enumerate(shape):
    divisors = [c for c in range(need, min(4 * need, n) + 1) if n % c == 0]
    if divisors:
      return axis, max(divisors, key=lambda c: (_two_adic(n // c), -c))
  return None


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _chunks(sources: Sequence):
  """``(c, chunk)``: the number of chunks of ``sources`` (``chunk_plan``) and a
  function of the chunk number returning its flat indices and slices.

  ``sources``: arrays, ``Slice``s or ``Packed`` masks (``_sources``) of one shape.
  """
  sources = [_sources.as_source(x) for x in sources]
  shape = tuple(sources[0].shape)
  plan = chunk_plan(shape)
  if plan is None:
    return 1, lambda i: (flat_index(shape), *[_sources.read(x) for x in sources])
  axis, c = plan
  chunk_shape = shape[:axis] + (shape[axis] // c,) + shape[axis + 1:]

  def chunk(i):
    return (_index(chunk_shape, shape, axis, c, i),
            *[_sources.strided(x, axis, c, i) for x in sources])

  return c, chunk


def flat_chunks(sources: Sequence):
  """``_chunks`` in 1-d pieces: ``(c, chunk)``, ``chunk(i)`` returning the chunk's flat
  indices, whether each position is new (``None``: all are) and its pieces.

  The same number and size of chunks as ``chunk_plan``'s (flat positions ``[i n,
  (i+1) n)``), or ``row_chunk_plan``'s overlapping rows where that applies, but
  contiguous and 1-d, so a consumer that wants a 1-d array (XLA:CPU canonicalises a
  scatter's indices to ``[n, 1]``) gets one without a reshape in the fusion
  computing it. Such a reshape makes XLA:CPU loop over the 1-d output and recover
  each position's coordinates by division, unvectorised (~1.7 ns an element instead
  of ~0.3 when the last axis is not a power of 2). Only for unsharded leaves: a
  reshape of an array sharded on a later axis would gather it.
  """
  sources = [_sources.as_source(x) for x in sources]
  shape = tuple(sources[0].shape)
  plan = row_chunk_plan(shape)
  if plan is not None:
    return _row_chunks(sources, shape, plan)
  c, n, _ = flat_layout(shape)

  def chunk(i):
    return (lax.iota(jnp.uint32, n) + i.astype(jnp.uint32) * jnp.uint32(n), None,
            *[_sources.flat(x, c, i) for x in sources])

  return c, chunk


def _pieces(shape, max_elements=None) -> int:
  plan = chunk_plan(shape, max_elements)
  return 1 if plan is None else plan[1]


def flat_layout(shape: Sequence[int]) -> tuple[int, int, np.ndarray]:
  """``(c, n, starts)``: ``flat_chunks``' ``c`` chunks of ``n`` positions of a leaf of
  ``shape``, chunk ``i`` from flat position ``starts[i]``."""
  shape = tuple(int(d) for d in shape)
  plan = row_chunk_plan(shape)
  if plan is None:
    c = _pieces(shape)
    n = math.prod(shape) // c
    return c, n, np.arange(c) * n
  k, c = plan
  rows, cols = math.prod(shape[:-1]), shape[-1]
  return c, k * cols, np.minimum(np.arange(c) * k, rows - k) * cols


def flat_chunk_size(shape: Sequence[int]) -> int:
  """Elements of each of ``flat_chunks``' chunks of a leaf of ``shape``."""
  return flat_layout(shape)[1]


# XLA:CPU splits a large 1-d loop into parallel tasks; when their count does not
# divide its length, every element checks the bound and LLVM does not vectorise the
# loop: a scatter's index kernel then costs ~4 ns an element instead of ~1 (30M-weight
# MLP, 3679 x 3679 leaves: 13 pieces of 1041157). Row chunks hold a multiple of
# VECTOR_QUANTUM positions, so splits into 2, 4, 8, 16 or 32 tasks are exact (and
# the tie split's words of 32 positions, ``_ties``, need no padding).
VECTOR_QUANTUM = 32
ROW_CHUNKS_FROM = 1 << 18  # smaller leaves stay whole (their scalar loops cost little)
_CHUNK_COST = 1 << 16


@functools.lru_cache(maxsize=None)
def _row_plan(shape: tuple[int, ...], max_elements: int, quantum: int,
              smallest: int) -> tuple[int, int] | None:
  rows, cols = math.prod(shape[:-1]), shape[-1]
  if len(shape) < 2 or rows * cols < smallest:
    return None
  if math.prod(shape) // _pieces(shape, max_elements) % quantum == 0:
    return None
  unit = quantum // math.gcd(cols, quantum)
  ks = [k for k in range(unit, min(rows, max_elements // cols + 1), unit)]
  if not ks:
    return None
  # Positions read plus a chunk's fixed cost (its loop step and kernels' launches),
  # counted as _CHUNK_COST positions.
  k = min(ks, key=lambda k: (-(-rows // k) * (k * cols + _CHUNK_COST), -k))
  return k, -(-rows // k)


def row_chunk_plan(shape: Sequence[int]) -> tuple[int, int] | None:
  """``(k, c)``: ``c`` overlapping 1-d chunks of ``k`` rows (of the last axis), or None.

  For leaves whose ``flat_chunks`` pieces are not a multiple of ``VECTOR_QUANTUM``
  positions (odd widths): chunk ``i`` holds rows ``[s, s + k)`` with ``s = min(i k,
  rows - k)``, so the last chunk repeats rows of the one before it (``k * shape[-1]
  <= CHUNK_ELEMENTS``, the ``k`` with the fewest positions read counting 2**16 for
  each chunk's fixed cost). ``None`` where the pieces already vectorise or the leaf is small.
  """
  return _row_plan(tuple(int(n) for n in shape), CHUNK_ELEMENTS, VECTOR_QUANTUM,
                   ROW_CHUNKS_FROM)


def _row_chunks(sources: Sequence, shape: tuple[int, ...], plan: tuple[int, int]):
  """``flat_chunks`` of ``row_chunk_plan``'s rows: a position is new where no earlier
  chunk read it."""
  k, c = plan
  rows, cols = math.prod(shape[:-1]), shape[-1]

  def chunk(i):
    start = jnp.minimum(i * k, rows - k)
    index = lax.iota(jnp.uint32, k * cols) + start.astype(jnp.uint32) * jnp.uint32(cols)
    new = index >= (i * k).astype(jnp.uint32) * jnp.uint32(cols)
    return (index, new, *[_sources.rows(x, start, k) for x in sources])

  return c, chunk


def map_reduce_chunks(fn, sources: Sequence, combine=_tree_add):
  """``combine``-reduction of ``fn(index, *chunk)`` over the chunks of ``sources``.

  ``sources`` are arrays (or ``Slice``s) of one shape, split by ``chunk_plan``;
  ``fn`` gets each chunk's slices and flat indices and returns a (small) pytree,
  and the results are folded with ``combine`` (an associative, commutative
  function). Elementwise work inside ``fn`` then allocates chunk-sized
  temporaries only: XLA:CPU materialises a whole converted array before many
  reductions and scatters.

  Example:
    >>> count = map_reduce_chunks(lambda i, m: jnp.sum(m, dtype=jnp.int32), [mask])
  """
  c, chunk = _chunks(sources)
  first = fn(*chunk(jnp.int32(0)))
  if c == 1:
    return first
  return lax.fori_loop(1, c, lambda i, acc: combine(acc, fn(*chunk(i))), first)


def fold_lazy(f, init, x: Lazy, flat: bool = False):
  """``f(acc, index, values, new)`` folded over a ``Lazy``'s chunks, from ``init``.

  For an accumulator that each chunk updates in place (a histogram it scatters
  into), where ``map_reduce_lazy`` would add a whole new one per chunk. ``flat``:
  1-d contiguous chunks (``flat_chunks``; unsharded leaves only). ``new``: whether
  each position is new, ``None`` unless the chunks overlap (``row_chunk_plan``).
  """
  c, chunk = (flat_chunks if flat else _chunks)(x.sources)

  def step(i, acc):
    index, *parts = chunk(i)
    new = parts.pop(0) if flat else None
    return f(acc, index, x.fn(index, *parts), new)

  if c == 1:
    return step(jnp.int32(0), init)
  return lax.fori_loop(0, c, step, init)


def map_reduce_lazy(f, x: Lazy, combine=_tree_add):
  """``map_reduce_chunks`` of ``f(index, values)`` over a ``Lazy``'s chunks."""
  return map_reduce_chunks(lambda index, *s: f(index, x.fn(index, *s)), x.sources, combine)


def leaf_numbers(values, dtype=jnp.int32) -> tuple[jax.Array, ...]:
  """Python numbers, one per leaf, as scalars behind a barrier.

  XLA:CPU compiles one kernel for identical fused computations, but a leaf's
  number folded in as a constant (or as a static index into a vector of per-layer
  values) makes every leaf's kernels distinct. Inside the selections' while loops
  numbers passed this way stay kernel operands, and leaves of one shape share
  their kernels (ResNet-50's event: 156 -> 74 key kernels for 54 leaves of 21
  shapes); outside loops XLA folds them back in. Index vectors with ``entry``.
  """
  return lax.optimization_barrier(tuple(jnp.asarray(v, dtype) for v in values))


def entry(vec: jax.Array, i: jax.Array) -> jax.Array:
  """``vec[i]`` for a traced scalar ``i`` (from ``leaf_numbers``)."""
  return lax.dynamic_index_in_dim(vec, i, keepdims=False)


def zero_after(x: jax.Array) -> jax.Array:
  """A 0 (int32 scalar) computed from ``x``'s first element, which must be >= 0.

  Added to, or compared in, a computation it makes that computation wait for ``x``:
  a value dependency XLA cannot see through, where an optimization barrier did not
  order work inside loops and cond branches on XLA:CPU. The mask update chains its
  per-layer counts, histogram scatters and tie stagings with it, so one layer's
  temporaries are live at a time. On one device only: on a mesh ``x`` is summed over
  the devices, and each all-reduce would wait for the previous one.
  """
  return jnp.minimum(jnp.ravel(x)[0].astype(jnp.int32), 0)


def materialise(masks: Sequence, packed: bool) -> list:
  """Bool masks (arrays, ``Lazy`` or ``Packed``) computed once: bool arrays, or
  ``Packed`` words (1 bit a weight) when ``packed``; a ``Packed`` mask is kept.

  Packed, each mask is computed into a bool array and packed only after the
  previous one's words exist (a barrier), so one layer's bool array is live at a
  time; the mask update's pruned and dropped masks take 1/8 of the bytes they
  would as bool arrays (~210 MiB less at the scanned 126M language model's event).
  Only masks whose last axis is a multiple of 32 are packed (``packs``); the others
  stay bool. Either way the results are arrays and pytrees (a cond may return them).
  """
  if not packed:
    return [lazy(m).compute() for m in masks]
  out: list = []
  words: tuple = ()
  for m in masks:
    if isinstance(m, _sources.Packed):
      out.append(m)
      continue
    m = lazy(m)
    if not packs(m.shape):
      out.append(m.compute())
      continue
    words, sources = lax.optimization_barrier((words, m.sources))
    p = _sources.pack(Lazy(m.fn, sources).compute())
    words = (*words, p.words)
    out.append(p)
  return out


def packs(shape: Sequence[int]) -> bool:
  """Whether ``materialise`` packs a mask of ``shape``: its last axis a multiple of 32.

  Then every read (whole, strided, flat) unpacks whole words. Other masks would
  read their padded rows through a slice and a reshape, which XLA:CPU computes
  unvectorised: a 30M-weight MLP of 3679-wide layers took 16% longer per event.
  """
  return len(shape) > 0 and shape[-1] % _sources.WORD == 0
