"""Exact top-k selection by radix select on histograms, without sorting.

Mask updates need "the k largest scores" with a k that changes with the step, so
``lax.top_k`` (static k) does not fit, and a full sort of 30M weights takes seconds
on a CPU and gathers a sharded tensor onto one device. Instead the k-th largest
key is found digit by digit: a 2**16-bin histogram of the high half of every key
fixes the high half of the threshold, a histogram of the low half of the keys in
that bin fixes the rest. Two passes, static shapes, and under sharding each
device histograms its own shard before a small all-reduce, so no weight tensor
is gathered.

Keys are ``uint32``. A float score ``x >= 0`` maps to ``bitcast(x) + 1``, which
keeps the order of non-negative floats; key 0 marks a position that is not a
candidate. Ties at the threshold go to the lower flat index (the index within the
concatenation of a group's leaves in flattening order). Keys may be ``Lazy``
(``_lazy``): the histograms then compute them chunk by chunk.

Scatter-add histograms suit XLA:CPU; on GPUs and TPUs, where scatters with
colliding indices are slow, the same numbers (bit for bit) come from ``_bisect``'s
bisection, which only compares and sums. ``selection_method`` picks one when a
selection is traced: ``SPARSE_JAX_SELECTION=radix`` or ``bisection`` forces one,
unset (or ``auto``) it is radix when ``jax.default_backend()`` is ``"cpu"``, else
bisection. A program already compiled keeps the method it was traced with.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _bisect
from sparse_jax import _lazy
from sparse_jax import _placement
from sparse_jax import _ties

NOT_CANDIDATE = 0
# Keys of finite and NaN scores are at most bitcast(NaN)+1 <= 2**31; FORCED is
# above all of them and is used to force a position into the selection.
FORCED = 2**31 + 1


def score_keys(scores: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
  """Order-preserving ``uint32`` keys of non-negative ``scores``.

  Args:
    scores: float array (any float dtype; bfloat16 and float16 are upcast
      exactly to float32). Negative values are treated as their magnitude.
    candidates: optional bool array; non-candidates get key 0.
  """
  s = jnp.abs(scores.astype(jnp.float32))
  keys = lax.bitcast_convert_type(s, jnp.uint32) + jnp.uint32(1)
  if candidates is not None:
    keys = jnp.where(candidates, keys, jnp.uint32(NOT_CANDIDATE))
  return keys


RADIX_BITS = 16
_BINS = 1 << RADIX_BITS
# A NumPy scalar: a jnp constant at import time would start the XLA backend, after
# which jax.distributed.initialize() (multi-host training) refuses to run.
_LOW = np.uint32(_BINS - 1)
# A group's histogram is kept in _COPIES interleaved copies (position ``i`` counts
# in copy ``i % _COPIES``) when the group has at least _COPIES_FROM elements, and
# the copies are summed once at the end. XLA:CPU's scatter is a serial loop of
# read-add-writes, and runs of positions with one digit (the non-candidates' key
# 0) chain each update on the store before it: 2.6 ns an element, against 1.4 ns
# with four copies (a 2**20-element chunk, 90% of it one digit). Smaller groups
# keep one copy: their histograms' memory (1 MB each with four) would outweigh
# the gain (models with many small layers have one group per layer). On several
# devices one copy: there each group's histogram is summed over the devices as soon
# as it is scattered, and XLA combines those sums into one all-reduce whose
# histograms are all live at once (~30 MiB per device at the scanned 32M language
# model's event on the 4x2 mesh with four copies).
_COPIES = 4
_COPIES_FROM = 1 << 18


def _flat_indices() -> bool:
  """Whether histograms scatter from 1-d chunks (``_lazy.flat_chunks``): on one device.

  With several devices a leaf may be sharded, and the indices keep its shape: a
  reshape to 1-d would gather it onto every device.
  """
  return jax.device_count() == 1


def _chunk_ones_shape(shape, flat: bool) -> tuple[int, ...]:
  """The shape of the scatter's all-ones updates for one chunk of a leaf of ``shape``.

  The updates are built once per shape, behind a barrier, so XLA does not rebuild
  (materialise) them in every iteration of the chunk loop, as it does with a
  broadcast constant. ``flat``: for 1-d chunks.
  """
  if flat:
    return (_lazy.flat_chunk_size(shape),)
  plan = _lazy.chunk_plan(shape)
  if plan is not None:
    axis, c = plan
    shape = tuple(shape[:axis]) + (shape[axis] // c,) + tuple(shape[axis + 1:])
  return tuple(shape)


def _add_to_histogram(hist, lk: _lazy.Lazy, digits_fn, ones, flat: bool,
                      after=None) -> jax.Array:
  """``hist`` (int32 [copies * 2**16]) plus the counts of ``digits_fn(keys, index)``.

  ``digits_fn`` returns ``(digits, valid)``; ``valid`` (bool or None) drops the
  other positions: they scatter beyond the histogram (``mode="drop"``), where a
  skipped update costs about 1 ns and one counted in a shared overflow bin 2.7
  ns. A scatter-add histogram reads each key once and settles 16 bits of the
  answer per pass, where a counting pass settles one (bisection) and costs about
  half as much on CPU (measured: 115 ms per 2**16-bin histogram vs ~45 ms per
  count of 16.7M keys). The leaves of a group scatter into one buffer, one after
  another. ``after``: a histogram this one's scatter indices wait for (see
  ``_histograms``).
  """
  copies = hist.shape[0] // _BINS
  # 0, but XLA cannot know it (counts are >= 0): the indices depend on ``after``.
  zero = None if after is None else _lazy.zero_after(after).astype(jnp.uint32)

  def scatter(hist, index, keys, new):
    digits, valid = digits_fn(keys, index)
    if new is not None:  # positions an earlier chunk of the leaf counted
      valid = new if valid is None else valid & new
    idx = digits.astype(jnp.uint32)
    if copies > 1:
      idx = idx + (index % copies) * jnp.uint32(_BINS)
    if valid is not None:
      idx = jnp.where(valid, idx, np.uint32(copies * _BINS))
    if zero is not None:
      idx = idx + zero
    # Indices keep the leaf's shape: reshape(-1) of an array sharded on a later
    # axis would all-gather it, while an n-d scatter-add into a replicated
    # histogram is partitioned into per-shard histograms and one all-reduce.
    # Unsigned indices need no wrapping of negative ones.
    sharding = _placement.explicit_sharding(idx)
    if sharding is None:
      return hist.at[idx].add(ones, mode="drop")
    # Under explicit axes JAX wants the updates sharded like the indices and the
    # (replicated) result named; the program is the same per-shard scatter.
    return hist.at[idx].add(jax.sharding.reshard(ones, sharding), mode="drop",
                            out_sharding=_placement.replicated_like(idx))

  return _lazy.fold_lazy(scatter, hist, lk, flat)


def _histograms(leaves, groups, num_groups, digits_fns):
  """Per-group histograms (int32 [G, 2**16]) of the digits of each group's leaves.

  The leaves scatter one after another: each leaf's sources pass a barrier with
  the histograms scattered so far, and its scatter indices depend on the previous
  leaf's histogram (plus a 0 XLA cannot see through), so they are computed only
  after the previous leaf's scatter and one leaf's (4 bytes a weight of an
  unchunked leaf) are live at a time. Inside the selections' loops the barrier
  alone did not order them: the scanned 126M language model's global prune held
  its 40 attention layers' indices at once (160 MiB). A group's copies are summed
  when its last leaf is done, and leaves of one (chunk) shape share their all-ones
  updates. Before, XLA held every layer's indices and its own all-ones updates
  together (~240 MiB on the scanned 32M language model's event;
  experiments/benchmarks/README.md, Memory).
  """
  sizes = [0] * num_groups
  last = {}
  for i, (lk, g) in enumerate(zip(leaves, groups)):
    sizes[g] += lk.size
    last[g] = i
  flat = _flat_indices()
  copies = [_COPIES if n >= _COPIES_FROM and flat else 1 for n in sizes]
  hist: list = [None] * num_groups
  ones: dict = {}
  previous = None
  for i, (lk, g, fn) in enumerate(zip(leaves, groups, digits_fns)):
    if hist[g] is None:
      hist[g] = jnp.zeros((copies[g] * _BINS,), jnp.int32)
    hist, sources = lax.optimization_barrier((hist, lk.sources))
    key = _chunk_ones_shape(lk.shape, flat)
    if key not in ones:
      ones[key] = lax.optimization_barrier(jnp.ones(key, jnp.int32))
    hist[g] = _add_to_histogram(hist[g], _lazy.Lazy(lk.fn, sources), fn, ones[key], flat,
                                previous)
    # On one device only: reading a histogram on a mesh needs its per-device parts
    # summed, an all-reduce per leaf (RigL's event on the 4x2 mesh: 101 -> 497).
    previous = hist[g] if flat else None
    if last[g] == i:
      hist[g] = hist[g].reshape(copies[g], _BINS).sum(0, dtype=jnp.int32)
  return jnp.stack([jnp.zeros((_BINS,), jnp.int32) if h is None else h for h in hist])


_BLOCK = 1 << (RADIX_BITS // 2)  # _BINS = _BLOCK**2


def _suffix_sums(x):
  """Inclusive suffix sums along the last axis, as one masked sum (no cumsum).

  XLA:CPU expands a cumsum of 2**16 bins into a tree of reduce-window kernels,
  slow to compile (LeNet's mask update: 23 such kernels with cumsums, 13 without);
  over 2**8 entries the square masked sum is small.
  """
  shape = x.shape[:-1] + (x.shape[-1], x.shape[-1])
  later = lax.broadcasted_iota(jnp.int32, shape, x.ndim) >= lax.broadcasted_iota(
      jnp.int32, shape, x.ndim - 1)
  return jnp.sum(jnp.where(later, x[..., None, :], 0), axis=-1, dtype=x.dtype)


def _last_reaching(incl, k):
  """Per row, the last column with ``incl >= k`` (0 if none; ``incl`` non-increasing)."""
  return jnp.maximum(jnp.sum(incl >= k[:, None], axis=-1, dtype=jnp.int32) - 1, 0)


def _take(x, i):
  return jnp.take_along_axis(x, i[:, None], -1)[:, 0]


def _select_digit(hist, k):
  """Largest digit ``d`` per group with ``#(digit >= d) >= k``, and counts around it.

  Returns ``(d, count_above_d, count_at_d)`` (int32 [G] each). With ``k == 0``
  the digit is the last one and both counts may be 0. Found in two steps of 2**8
  bins: the block of 2**8 digits holding ``d``, then ``d`` within it.
  """
  blocks = hist.reshape(hist.shape[0], _BLOCK, _BLOCK)
  # dtype: with jax_enable_x64 a plain sum of int32 is int64 (a loop carry must not change).
  block_sums = jnp.sum(blocks, axis=-1, dtype=hist.dtype)
  block_incl = _suffix_sums(block_sums)  # #(digit >= first digit of the block)
  c = _last_reaching(block_incl, k)
  row = jnp.take_along_axis(blocks, c[:, None, None], 1)[:, 0]
  row_incl = (_take(block_incl, c) - _take(block_sums, c))[:, None] + _suffix_sums(row)
  j = _last_reaching(row_incl, k)
  at = _take(row, j)
  return c * _BLOCK + j, _take(row_incl, j) - at, at


# Pass p of a radix select histograms 16 bits of the 64-bit word (key, ~index):
# the high and low half of the key, then of the complemented in-group index
# ``~i = 2**32 - 1 - i`` among the ties. It counts the positions whose bits above
# the digit equal those already found (the masks of key and ~i bits compared).
_SHIFTS = np.array([RADIX_BITS, 0, RADIX_BITS, 0], np.uint32)
_KEY_MASKS = np.array([0, 0xFFFF0000, 0xFFFFFFFF, 0xFFFFFFFF], np.uint32)
_INDEX_MASKS = np.array([0, 0, 0, 0xFFFF0000], np.uint32)


class _Radix(NamedTuple):
  """Loop state of a radix select after ``p`` passes."""
  p: jax.Array  # int32 []
  thresh: jax.Array  # uint32 [G], the key bits found so far
  cut: jax.Array  # uint32 [G], the ~index bits found so far
  rest: jax.Array  # int32 [G], k minus the positions above the bits found so far
  need: jax.Array  # int32 [G], from pass 2 on: k - #(key > thresh)
  ties: jax.Array  # int32 [G], from pass 2 on: #(key == thresh)


def _radix_passes(leaves, groups, num_groups, k, passes: int) -> _Radix:
  """The largest ``(thresh, cut)`` per group with ``#((key, ~i) >= it) >= k``.

  One ``lax.while_loop`` whose body histograms every leaf once (unrolled passes
  made the compile time grow with the keys' lazy chains). Passes 0 and 1 find the
  key halves; with ``passes=4``, passes 2 and 3 split the ties at ``thresh`` by
  index, and do not run, leaving ``cut = 0``, when every group takes all its ties.
  They share the key passes' body (a second loop held every leaf's histogram
  kernels again: event compile -15% on ResNet-50, -11% on LeNet-300-100, same run
  time; experiments/benchmarks/README.md).
  """
  offsets = _bisect.group_offsets(leaves, groups, num_groups)
  shifts, key_masks, index_masks = (jnp.asarray(a) for a in (_SHIFTS, _KEY_MASKS,
                                                             _INDEX_MASKS))

  def body(s: _Radix, ties: bool) -> _Radix:
    shift, key_mask, index_mask = shifts[s.p], key_masks[s.p], index_masks[s.p]
    # All ones in a tie pass (p >= 2): the pass's digits and bits found are the index's.
    rank_bits = jnp.where(s.p >= 2, np.uint32(2**32 - 1), np.uint32(0))
    leaves_now, zero, (gs, rs) = _bisect.in_every_pass(
        leaves, s.p,
        (_lazy.leaf_numbers(groups), _lazy.leaf_numbers(offsets, jnp.uint32)))

    def digits(r, g):
      def fn(keys, index):
        valid = (keys & key_mask) == (_lazy.entry(s.thresh, g) & key_mask)
        if not ties:
          return (keys >> shift) & _LOW, valid
        rank = (r + zero) - index
        # index_mask is 0 in the key passes: every rank matches there.
        valid &= (rank & index_mask) == (_lazy.entry(s.cut, g) & index_mask)
        # Key or index bits by pass; not a select (it refuses differing shardings).
        return ((keys ^ ((keys ^ rank) & rank_bits)) >> shift) & _LOW, valid
      return fn

    hist = _histograms(leaves_now, groups, num_groups,
                       [digits(r, g) for r, g in zip(rs, gs)])
    d, above, at = _select_digit(hist, s.rest)
    found = d.astype(jnp.uint32) << shift
    rest = s.rest - above
    return _Radix(s.p + 1, s.thresh | (found & ~rank_bits), s.cut | (found & rank_bits), rest,
                  jnp.where(s.p == 1, rest, s.need), jnp.where(s.p == 1, at, s.ties))

  zeros_u, zeros_i = jnp.zeros((num_groups,), jnp.uint32), jnp.zeros((num_groups,), jnp.int32)
  s = _Radix(jnp.int32(0), zeros_u, zeros_u, k, zeros_i, zeros_i)
  if passes == 2:
    return lax.while_loop(lambda s: s.p < 2, functools.partial(body, ties=False), s)
  return lax.while_loop(lambda s: (s.p < 2) | ((s.p < 4) & ~jnp.all(s.need == s.ties)),
                        functools.partial(body, ties=True), s)


METHODS = ("radix", "bisection")


def selection_method() -> str:
  """``"radix"`` or ``"bisection"``: ``SPARSE_JAX_SELECTION``, else by backend.

  ``auto`` (or unset): radix (scatter histograms) on CPU, bisection (comparisons
  and sums, ``_bisect``) on GPU and TPU. Read when a selection is traced.
  """
  method = os.environ.get("SPARSE_JAX_SELECTION", "").strip().lower() or "auto"
  if method == "auto":
    return "radix" if jax.default_backend() == "cpu" else "bisection"
  if method not in METHODS:
    raise ValueError(f"SPARSE_JAX_SELECTION must be auto, radix or bisection, got {method!r}.")
  return method


def _passes(leaves, groups, num_groups, k, passes: int):
  """``(thresh, cut, need, ties)`` of ``_radix_passes``, by ``selection_method``'s method.

  Where ``_ties.applies`` (one device; large groups for radix) the tie split
  (``passes=4``) is ``_ties``': the ties packed to bits in one pass over the keys.
  """
  method = selection_method()
  packed = passes == 4 and _ties.applies(leaves, groups, method)
  if method == "radix":
    s = _radix_passes(leaves, groups, num_groups, k, 2 if packed else passes)
    thresh, cut, need, ties = s.thresh, s.cut, s.need, s.ties
  else:
    thresh, need, ties = _bisect.threshold(leaves, groups, num_groups, k)
    cut = jnp.zeros_like(thresh)
    if passes == 4 and not packed:
      cut = _bisect.tie_cut(leaves, groups, num_groups, thresh, need, ties)
  if packed:
    cut = _ties.tie_cut(leaves, groups, num_groups, thresh, need, ties)
  return thresh, cut, need, ties


def kth_largest_key(keys: Sequence, k: jax.Array, groups: Sequence[int]):
  """Per group, the largest ``t`` with ``#(keys >= t) >= k``, and counts around it.

  A radix select: one histogram of the high 16 bits of every key finds the high
  half of ``t``; one histogram of the low 16 bits of the keys sharing that high
  half finds the rest. Two passes over the keys, whatever their distribution.

  Args:
    keys: uint32 arrays or ``Lazy``, one per leaf.
    k: int32 [G].
    groups: static group index of each leaf.

  Returns:
    ``(t, count_ge_t, count_gt_t)``, uint32 [G] and int32 [G] twice.
  """
  groups = tuple(groups)
  num_groups = max(groups) + 1
  k = jnp.asarray(k, jnp.int32).reshape((num_groups,))
  thresh, _, need, ties = _passes([_lazy.lazy(x) for x in keys], groups, num_groups, k,
                                  passes=2)
  count_gt = k - need
  return thresh, count_gt + ties, count_gt


class Selection(NamedTuple):
  """The outcome of a top-k selection, as a few numbers per group.

  A position with key ``x`` and in-group flat index ``i`` is selected iff
  ``x > thresh`` or (``x == thresh`` and ``take`` and ``~i >= cut``), where
  ``~i = 2**32 - 1 - i`` (ties go to the lower index). ``selected_masks`` turns it
  into lazy masks; being a few scalars, it is what a ``lax.cond`` should return.
  """
  thresh: jax.Array  # uint32 [G]
  cut: jax.Array  # uint32 [G]
  take: jax.Array  # bool [G]

  @classmethod
  def all_positive(cls, num_groups: int) -> "Selection":
    """Selects every position with a positive key (the candidates)."""
    return cls(jnp.ones((num_groups,), jnp.uint32), jnp.zeros((num_groups,), jnp.uint32),
               jnp.ones((num_groups,), bool))

  @classmethod
  def nothing(cls, num_groups: int) -> "Selection":
    """Selects no position (keys never reach 2**32 - 1)."""
    top = jnp.full((num_groups,), 2**32 - 1, jnp.uint32)
    return cls(top, top, jnp.zeros((num_groups,), bool))


def top_k_selection(keys: Sequence, k: jax.Array, groups: Sequence[int]) -> Selection:
  """The ``Selection`` of exactly ``k[g]`` positions with the largest keys per group.

  Two histogram passes find the threshold key; only when the ties at the
  threshold must be split, two more find the cut in the flat index (or, on one
  device for large groups, one pass packing the ties to bits: ``_ties``).
  """
  groups = tuple(groups)
  num_groups = max(groups) + 1
  k = jnp.asarray(k, jnp.int32).reshape((num_groups,))
  thresh, cut, need, _ = _passes([_lazy.lazy(x) for x in keys], groups, num_groups, k,
                                 passes=4)
  return Selection(thresh, cut, need > 0)


def selected_masks(keys: Sequence, groups: Sequence[int],
                   sel: Selection) -> list[_lazy.Lazy]:
  """Lazy bool masks of the positions ``sel`` selects (see ``Selection``)."""
  groups = tuple(groups)
  leaves = [_lazy.lazy(x) for x in keys]
  out = []
  gs = _lazy.leaf_numbers(groups)
  rs = _lazy.leaf_numbers(_bisect.group_offsets(leaves, groups, max(groups) + 1), jnp.uint32)
  for lk, g, r in zip(leaves, gs, rs):
    def pick(index, x, g=g, r=r):
      t = _lazy.entry(sel.thresh, g)
      take = _lazy.entry(sel.take, g)
      return (x > t) | ((x == t) & take & (r - index >= _lazy.entry(sel.cut, g)))
    out.append(_lazy.lazy_map(pick, lk))
  return out


def top_k_masks(keys: Sequence, k: jax.Array, groups: Sequence[int]) -> list[jax.Array]:
  """Selects exactly ``k[g]`` positions with the largest keys in each group.

  Example:
    >>> # one group per leaf (layer-wise): keep the 2 largest of each leaf
    >>> top_k_masks([keys_a, keys_b], jnp.array([2, 2]), groups=(0, 1))

  Args:
    keys: uint32 arrays (``score_keys``) or ``Lazy`` keys (computed per chunk
      from their sources, never materialised whole).
    k: int32 [G], how many to select in each group; must not exceed the group's
      size. Positions with key 0 are selected only if ``k`` exceeds the number of
      positions with a positive key.
    groups: static group index of each leaf (``(0, 0, ...)`` for one global
      ranking; ``(0, 1, ...)`` for a ranking per leaf).

  Returns:
    A bool array per leaf, True at the selected positions.
  """
  sel = top_k_selection(keys, k, groups)
  return [m.compute() for m in selected_masks(keys, groups, sel)]
