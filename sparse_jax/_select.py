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
concatenation of a group's leaves in flattening order).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return index


RADIX_BITS = 16
_BINS = 1 << RADIX_BITS
# A NumPy scalar: a jnp constant at import time would start the XLA backend, after
# which jax.distributed.initialize() (multi-host training) refuses to run.
_LOW = np.uint32(_BINS - 1)


def _histograms(digits, valid, groups, num_groups):
  """Per-group histograms (int32 [G, 2**16]) of uint32 digits in [0, 2**16).

  ``valid`` (a bool array per leaf, or None) sends the other positions to an
  overflow bin that is dropped. A scatter-add histogram reads each key once and
  settles 16 bits of the answer per pass, where a counting pass settles one
  (bisection) and costs about half as much on CPU (measured: 115 ms per 2**16-bin
  histogram vs ~45 ms per count of 16.7M keys).
  """
  hist = [jnp.zeros((_BINS,), jnp.int32) for _ in range(num_groups)]
  for i, (d, g) in enumerate(zip(digits, groups)):
    idx = d.astype(jnp.int32)
    if valid is not None:
      idx = jnp.where(valid[i], idx, _BINS)
    # Indices keep the leaf's shape: reshape(-1) of an array sharded on a later
    # axis would all-gather it, while an n-d scatter-add into a replicated
    # histogram is partitioned into per-shard histograms and one all-reduce.
    hist[g] = hist[g] + jnp.zeros((_BINS + 1,), jnp.int32).at[idx].add(
        1, mode="drop")[:_BINS]
  return jnp.stack(hist)


def _select_digit(hist, k):
  """Largest digit ``d`` per group with ``#(digit >= d) >= k``, and counts around it.

  Returns ``(d, count_above_d, count_at_d)`` (int32 [G] each). With ``k == 0``
  the digit is the last one and both counts may be 0.
  """
  # above[g, d] = #(digit > d): exclusive suffix sums.
  incl = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), -1), -1)
  d = jnp.sum(incl >= k[:, None], axis=-1, dtype=jnp.int32) - 1
  d = jnp.maximum(d, 0)
  at = jnp.take_along_axis(hist, d[:, None], -1)[:, 0]
  above = jnp.take_along_axis(incl, d[:, None], -1)[:, 0] - at
  return d, above, at


def kth_largest_key(keys: Sequence[jax.Array], k: jax.Array, groups: Sequence[int]):
  """Per group, the largest ``t`` with ``#(keys >= t) >= k``, and counts around it.

  A radix select: one histogram of the high 16 bits of every key finds the high
  half of ``t``; one histogram of the low 16 bits of the keys sharing that high
  half finds the rest. Two passes over the keys, whatever their distribution.

  Returns:
    ``(t, count_ge_t, count_gt_t)``, uint32 [G] and int32 [G] twice.
  """
  groups = tuple(groups)
  num_groups = max(groups) + 1
  k = jnp.asarray(k, jnp.int32).reshape((num_groups,))
  high = [x >> RADIX_BITS for x in keys]
  d_hi, above_hi, _ = _select_digit(_histograms(high, None, groups, num_groups), k)
  d_hi_u = d_hi.astype(jnp.uint32)
  same = [h == d_hi_u[g] for h, g in zip(high, groups)]
  low_hist = _histograms([x & _LOW for x in keys], same, groups, num_groups)
  d_lo, above_lo, at_lo = _select_digit(low_hist, k - above_hi)
  t = (d_hi_u << RADIX_BITS) | d_lo.astype(jnp.uint32)
  count_gt = above_hi + above_lo
  return t, count_gt + at_lo, count_gt


def top_k_masks(keys: Sequence[jax.Array], k: jax.Array,
                groups: Sequence[int]) -> list[jax.Array]:
  """Selects exactly ``k[g]`` positions with the largest keys in each group.

  Example:
    >>> # one group per leaf (layer-wise): keep the 2 largest of each leaf
    >>> top_k_masks([keys_a, keys_b], jnp.array([2, 2]), groups=(0, 1))

  Args:
    keys: uint32 arrays (``score_keys``).
    k: int32 [G], how many to select in each group; must not exceed the group's
      size. Positions with key 0 are selected only if ``k`` exceeds the number of
      positions with a positive key.
    groups: static group index of each leaf (``(0, 0, ...)`` for one global
      ranking; ``(0, 1, ...)`` for a ranking per leaf).

  Returns:
    A bool array per leaf, True at the selected positions.
  """
  groups = tuple(groups)
  num_groups = max(groups) + 1
  k = jnp.asarray(k, jnp.int32).reshape((num_groups,))
  thresh, count_ge, count_gt = kth_largest_key(keys, k, groups)
  above = [x > thresh[g] for x, g in zip(keys, groups)]
  ties = [x == thresh[g] for x, g in zip(keys, groups)]
  need = k - count_gt
  n_ties = count_ge - count_gt

  def take_all_ties():
    return [a | t for a, t in zip(above, ties)]

  def take_first_ties():
    # Flat index of each position inside its group (leaves concatenated in order);
    # the ties with the ``need`` smallest indices are taken: a radix select of the
    # need-th smallest index among the ties, on the complemented index.
    offsets, seen = [], [0] * num_groups
    for x, g in zip(keys, groups):
      offsets.append(seen[g])
      seen[g] += x.size
    rev_index = [jnp.uint32(2**32 - 1 - off) - flat_index(x.shape)
                 for x, off in zip(keys, offsets)]
    high = [r >> RADIX_BITS for r in rev_index]
    d_hi, above_hi, _ = _select_digit(
        _histograms(high, ties, groups, num_groups), need)
    d_hi_u = d_hi.astype(jnp.uint32)
    same = [t & (h == d_hi_u[g]) for t, h, g in zip(ties, high, groups)]
    d_lo, _, _ = _select_digit(
        _histograms([r & _LOW for r in rev_index], same, groups, num_groups),
        need - above_hi)
    cut = (d_hi_u << RADIX_BITS) | d_lo.astype(jnp.uint32)
    take = need > 0
    return [a | (t & (r >= cut[g]) & take[g])
            for a, t, r, g in zip(above, ties, rev_index, groups)]

  return lax.cond(jnp.all(need == n_ties), take_all_ties, take_first_ties)
