"""Exact top-k selection by bisection on counts: comparisons and sums only, no scatter.

The radix select of ``_select`` builds scatter-add histograms. XLA:CPU runs them
well, but scatters with many colliding indices (the non-candidates' key 0, the
ties) are known to be slow on GPUs (atomics on a few bins) and TPUs (scatters are
serialised). This module finds the same numbers with reductions only: the k-th
largest key is settled ``b`` bits per round, from the top, by comparing every
key with the ``2**b - 1`` candidate thresholds that extend the bits found so
far and summing the comparisons per group (one fused compare-and-sum per chunk
of each leaf). Under sharding each device sums its shard, then a small
all-reduce; no weight tensor is gathered.

The results are exactly ``_select``'s radix passes' (same threshold, counts and
tie cut, bit for bit), so the two are interchangeable; ``_select.selection_method``
chooses. The number of bits per round is ``SPARSE_JAX_BISECTION_BITS`` (1, 2, 4
or 8), read when a selection is traced: ``b`` bits take ``32 / b`` rounds of
``2**b - 1`` comparisons per key for the threshold, and ``ceil(log2(n) / b)`` more
rounds, only when the ties at the threshold must be split, for the cut in the flat
index (``n``: the largest group). The default, 1 bit, is the fastest measured so
far, on XLA:CPU: one compare-and-sum is a single vectorised pass there, while the
sums against 15 thresholds cost 60 times as much (not 15), and a prune at 1M
weights took 7-8x (4 bits) and ~90x (8 bits) the time of 1 bit.
``experiments/benchmarks/device_check.py`` measures 1, 4 and 8 bits on a GPU or
TPU, where fewer, wider rounds may win.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _lazy

DEFAULT_BITS = 1


def bits_per_round() -> int:
  """Bits settled per round (``SPARSE_JAX_BISECTION_BITS``, default ``DEFAULT_BITS``)."""
  bits = int(os.environ.get("SPARSE_JAX_BISECTION_BITS", "") or DEFAULT_BITS)
  if bits not in (1, 2, 4, 8):
    raise ValueError(f"SPARSE_JAX_BISECTION_BITS must be 1, 2, 4 or 8, got {bits}.")
  return bits


def in_every_pass(leaves, p, numbers):
  """The leaves, and ``numbers``, to be computed afresh in each pass of a loop on ``p``.

  XLA hoists loop-invariant work out of a while loop: every leaf's keys (and
  ranks) would be materialised before the passes, all leaves at once (8 bytes
  per weight). Sources and numbers (``_lazy.leaf_numbers``; a zero offsets the
  indices) that come out of a barrier with ``p`` are not invariant.
  """
  flat, tree = jax.tree.flatten([lk.sources for lk in leaves])
  # Each array once: the layers of a stacked leaf (``_lazy.Slice``) share theirs.
  unique = {id(x): x for x in flat}
  barred, zero, numbers, _ = lax.optimization_barrier(
      (list(unique.values()), jnp.uint32(0), numbers, p))
  after = dict(zip(unique, barred))
  sources = jax.tree.unflatten(tree, [after[id(x)] for x in flat])
  return [_lazy.Lazy(lambda index, *s, fn=lk.fn: fn(index + zero, *s), tuple(src))
          for lk, src in zip(leaves, sources)], zero, numbers


def group_offsets(leaves, groups, num_groups):
  """Per leaf, ``2**32 - 1 -`` its offset within its group (leaves concatenated)."""
  out, seen = [], [0] * num_groups
  for lk, g in zip(leaves, groups):
    out.append(np.uint32(2**32 - 1 - seen[g]))
    seen[g] += lk.size
  return out


class _Search(NamedTuple):
  """Loop state of a bisection after ``p`` rounds."""
  p: jax.Array  # int32 []
  v: jax.Array  # uint32 [G], the bits found so far (zeros below)
  ge: jax.Array  # int32 [G], #(values >= v)
  gt: jax.Array  # int32 [G], #(values > v with ones below the bits found)


def _count_at_least(values, cands):
  """int32 [J]: ``#(values >= c)`` for each of the thresholds ``cands`` [J].

  The thresholds are the minor axis: one read of each value feeds all J sums.
  """
  return jnp.sum(values[..., None] >= cands, axis=tuple(range(values.ndim)),
                 dtype=jnp.int32)


def _search(leaves, groups, num_groups, values, k, start, nbits, run=True) -> _Search:
  """Per group the largest ``v`` (``start`` above its low ``nbits`` bits) with
  ``#(values >= v) >= k``, and ``#(values >= v)``, ``#(values > v)``.

  ``values(keys, index, g, r, zero)`` gives a leaf's values (uint32) from its keys
  and flat index, its traced group number ``g`` and offset ``r`` (``group_offsets``).
  ``start`` must satisfy ``#(values >= start) >= k`` (else ``v = start``); the
  counts start as the group sizes and 0, the right ones for ``start = 0``. With
  ``run`` False (traced) no round runs.
  """
  bits = bits_per_round()
  width = (1 << bits) - 1
  js = jnp.arange(1, width + 1, dtype=jnp.uint32)
  sizes = [0] * num_groups
  for lk, g in zip(leaves, groups):
    sizes[g] += lk.size
  numbers = (_lazy.leaf_numbers(groups),
             _lazy.leaf_numbers(group_offsets(leaves, groups, num_groups), jnp.uint32))

  def body(s: _Search) -> _Search:
    shift = (nbits - bits * (s.p + 1)).astype(jnp.uint32)
    cands = s.v[:, None] | (js[None, :] << shift)  # [G, width], increasing
    leaves_now, zero, (gs, rs) = in_every_pass(leaves, s.p, numbers)
    per_group = [jnp.zeros((width,), jnp.int32) for _ in range(num_groups)]
    for lk, group, g, r in zip(leaves_now, groups, gs, rs):
      row = lax.dynamic_index_in_dim(cands, g, keepdims=False)
      per_group[group] = per_group[group] + _lazy.map_reduce_lazy(
          lambda index, keys, g=g, r=r, row=row: _count_at_least(
              values(keys, index, g, r, zero), row), lk)
    counts = jnp.stack(per_group)  # non-increasing along the thresholds
    d = jnp.sum(counts >= k[:, None], axis=1, dtype=jnp.int32)
    take = lambda i: jnp.take_along_axis(counts, jnp.clip(i, 0, width - 1)[:, None], 1)[:, 0]
    return _Search(s.p + 1, s.v | (d.astype(jnp.uint32) << shift),
                   jnp.where(d > 0, take(d - 1), s.ge), jnp.where(d < width, take(d), s.gt))

  init = _Search(jnp.int32(0), start, jnp.asarray(np.array(sizes, np.int32)),
                 jnp.zeros((num_groups,), jnp.int32))
  return lax.while_loop(lambda s: (s.p < nbits // bits) & run, body, init)


def threshold(leaves, groups, num_groups, k):
  """``(thresh, need, ties)`` per group, as ``_select``'s first two radix passes.

  ``thresh``: the largest ``t`` with ``#(key >= t) >= k``; ``need = k - #(key >
  thresh)``; ``ties = #(key == thresh)``. 32 bits in ``32 / b`` rounds.
  """
  keys = lambda keys, index, g, r, zero: keys
  s = _search(leaves, groups, num_groups, keys, k, jnp.zeros((num_groups,), jnp.uint32), 32)
  return s.v, k - s.gt, s.ge - s.gt


def tie_cut(leaves, groups, num_groups, thresh, need, ties):
  """The radix passes' ``cut``: the largest ``c`` with ``#(key == thresh, ~i >= c) >=
  need`` (``~i = 2**32 - 1 - i``, ``i`` the in-group flat index), 0 when no group
  splits its ties (every ``need == ties``), and 0 where ``need > ties``.

  Only the low ``nbits`` bits of ``~i`` vary (``2**nbits`` >= the largest group),
  so the search starts with the bits above them set and takes ``nbits / b``
  rounds.
  """
  bits = bits_per_round()
  largest = max(sum(lk.size for lk, g in zip(leaves, groups) if g == group)
                for group in range(num_groups))
  nbits = min(32, -(-max(1, (largest - 1).bit_length()) // bits) * bits)
  split = ~jnp.all(need == ties)
  start = jnp.where(split, np.uint32((2**32 - 2**nbits) % 2**32), np.uint32(0))

  def ranks(keys, index, g, r, zero):
    return jnp.where(keys == _lazy.entry(thresh, g), (r + zero) - index, np.uint32(0))

  s = _search(leaves, groups, num_groups, ranks, need,
              jnp.broadcast_to(start, (num_groups,)), nbits, run=split)
  return jnp.where(need > ties, np.uint32(0), s.v)
