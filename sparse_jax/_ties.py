"""Splitting the ties at a selection's threshold by flat index, from packed tie bits.

A top-k selection takes every position whose key is above its group's threshold
and, of the ``ties`` positions at it, the ``need`` with the lowest in-group flat
indices (``_select.Selection``'s ``cut`` is ``~i`` of the last one taken). The radix
passes find that cut with two more scatter histograms of the index bits, bisection
with ``log2(n)`` more counting rounds. On one device this takes one pass over the
keys instead:

1. every leaf's ``key == thresh`` is packed 32 positions to a ``uint32`` word, chunk
   by chunk (1/32 of the keys' size; an elementwise kernel and a small product);
2. the words' population counts, summed in blocks of ``BLOCK_WORDS`` words, and a
   bisection over each group's blocks give the block holding the ``need``-th tie
   and how many ties come before it;
3. prefix counts over that block's words, then over the word's bits, give its
   position; no leaf is read again.

Ties are common: bfloat16 weights, and gradients that are exactly 0 (dead ReLU
units) at a regrowth. At 30M weights the radix index passes are two more scatter
passes over every leaf (the 30M GraNet event update: 588 ms with them, 497 ms with
this split, on vectorised row chunks, ``_lazy.row_chunk_plan``). With several devices
a leaf may be sharded and a 1-d view of it would gather it, so there the selection
method splits the ties itself.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _bisect
from sparse_jax import _lazy

WORD = 32
# Ties are counted in blocks of this many words (4096 positions): a group's block
# counts stay a short vector, and one block's words are few.
BLOCK_WORDS = 128
# Radix selections split their ties here from this many elements in a group: there
# the two index passes cost more (30M-weight GraNet event update: 588 -> 497 ms; 1.18-1.22
# -> 0.90-0.96 s before the row chunks); below it they cost little, and these kernels
# would add compile time (LeNet-300-100's event: 2.1 -> 3.0 s).
RADIX_FROM = 1 << 22


SPLITS = ("auto", "packed", "passes")


def tie_split() -> str:
  """``SPARSE_JAX_TIE_SPLIT``: ``auto`` (unset), ``packed`` or ``passes``.

  ``packed`` splits every selection's ties here (on one device), ``passes`` leaves
  them to the selection method's own passes; read when a selection is traced.
  """
  split = os.environ.get("SPARSE_JAX_TIE_SPLIT", "").strip().lower() or "auto"
  if split not in SPLITS:
    raise ValueError(f"SPARSE_JAX_TIE_SPLIT must be auto, packed or passes, got {split!r}.")
  return split


def applies(leaves, groups, method: str) -> bool:
  """Whether ``tie_cut`` splits the ties of this selection (``method``: its method).

  On one device, unless ``tie_split()`` says otherwise: for bisection (whose own
  split takes ``log2(n)`` rounds) and for radix selections with a group of at least
  ``RADIX_FROM`` elements. Smaller radix selections keep their two index passes:
  they cost little there, and these kernels would add compile time.
  """
  split = tie_split()
  if jax.device_count() != 1 or split == "passes":
    return False
  if split == "packed" or method != "radix":
    return True
  sizes = np.bincount(np.asarray(groups), weights=[lk.size for lk in leaves])
  return sizes.max() >= RADIX_FROM


def _tie_words(lk: _lazy.Lazy, thresh: jax.Array) -> jax.Array:
  """uint32 [c * ceil(n / 32)]: ``key == thresh``, 32 positions a word, chunk by chunk.

  Bit ``k`` of word ``w`` of chunk ``i`` is flat position ``starts[i] + 32 w + k``
  (``_lazy.flat_layout``; the chunk's last word padded with zeros, positions an
  earlier chunk holds are 0): 1/32 of the keys' size.
  """
  c, n, _ = _lazy.flat_layout(lk.shape)
  per_chunk = -(-n // WORD)

  def pack(acc, index, keys, new):
    words, chunk = acc
    ties = keys == thresh
    ties = ties if new is None else ties & new
    if WORD * per_chunk != n:
      ties = jnp.pad(ties, (0, WORD * per_chunk - n))
    # Packed by a product with the powers of two, 16 bits at a time: the keys stay
    # an elementwise kernel. A sum over the 32 bits made XLA:CPU unroll the keys'
    # computation 32 times in one kernel, slow to compile (ResNet-50's event: ~+4 s).
    # Exact at any matmul precision: 0, 1 and 2**0..2**15 are exact in bfloat16 and
    # TF32, and the sums (< 2**16) in the float32 accumulator.
    halves = jnp.where(ties, np.float32(1), np.float32(0)).reshape(2 * per_chunk, WORD // 2)
    half = (halves @ jnp.asarray(2.0 ** np.arange(WORD // 2), jnp.float32)).astype(jnp.uint32)
    half = half.reshape(per_chunk, 2)
    words = lax.dynamic_update_index_in_dim(words, half[:, 0] | (half[:, 1] << 16), chunk, 0)
    return words, chunk + 1

  words = jnp.zeros((c, per_chunk), jnp.uint32)
  return _lazy.fold_lazy(pack, (words, jnp.int32(0)), lk, flat=True)[0].reshape(-1)


def _first_reaching(count_below, length: int, rank):
  """Smallest ``m`` in ``[0, length]`` with ``count_below(m) >= rank`` (``length`` if
  none), by bisection: ``count_below`` is non-decreasing; arrays of ``rank``'s shape.
  """
  lo = jnp.zeros(jnp.shape(rank), jnp.int32)
  hi = jnp.full(jnp.shape(rank), length, jnp.int32)

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    reached = count_below(mid) >= rank
    return jnp.where(reached, lo, mid + 1), jnp.where(reached, mid, hi)

  return lax.fori_loop(0, max(1, length.bit_length()), body, (lo, hi))[0]


def _nth_bit(words, rank):
  """Per row of ``words`` (uint32 [rows, width]), the position ``32 w + k`` of its
  ``rank``-th (1-based) set bit. Loop-free: prefix counts as masked sums over a
  ``[rows, width, width]`` square (``width`` is small)."""
  counts = lax.population_count(words).astype(jnp.int32)
  width = words.shape[1]
  upto = (lax.broadcasted_iota(jnp.int32, (width, width), 1)
          <= lax.broadcasted_iota(jnp.int32, (width, width), 0))
  incl = jnp.sum(jnp.where(upto, counts[:, None, :], 0), axis=2, dtype=jnp.int32)
  w = jnp.sum(incl < rank[:, None], axis=1, dtype=jnp.int32)  # the word holding it
  before = jnp.sum(jnp.where(lax.iota(jnp.int32, width) < w[:, None], counts, 0), axis=1,
                   dtype=jnp.int32)
  word = jnp.take_along_axis(words, jnp.minimum(w, width - 1)[:, None], 1)
  # Bits 0..k of the word hold popcount(word & (2**(k+1) - 1)) set bits.
  low = (jnp.uint32(2) << lax.iota(jnp.uint32, WORD)) - jnp.uint32(1)
  k = jnp.sum(lax.population_count(word & low) < (rank - before)[:, None], axis=1,
              dtype=jnp.int32)
  return WORD * w + k


def _split(leaves, groups, gs, num_groups, thresh, need):
  """``~i`` of each group's ``need``-th tie (groups with ``1 <= need <= ties``).

  ``gs``: the leaves' group numbers as traced scalars (``_lazy.leaf_numbers``), so
  leaves of one shape share their kernels.
  """
  order = sorted(range(len(leaves)), key=lambda i: groups[i])  # stable: leaf order
  leaf_group = np.array([groups[i] for i in order])
  layouts = [_lazy.flat_layout(leaves[i].shape) for i in order]
  c, n = np.array([lay[:2] for lay in layouts]).T
  per_chunk = -(-n // WORD)
  # Where each chunk starts, all leaves' chunks in one table, and each leaf's first.
  starts = np.concatenate([lay[2] for lay in layouts]).astype(np.int32)
  first_chunk = (np.cumsum(c) - c).astype(np.int32)
  nblocks = -(-(c * per_chunk) // BLOCK_WORDS)  # each leaf padded to whole blocks
  parts: list = []
  for i, pad in zip(order, nblocks * BLOCK_WORDS - c * per_chunk):
    t = _lazy.entry(thresh, gs[i])
    if parts:
      # + 0 that depends on the previous leaf's words: one leaf's staging (4 bytes a
      # position of an unchunked leaf) live at a time; computed independently, XLA
      # staged the 126M language model's 40 attention layers at once (160 MiB).
      t = t + _lazy.zero_after(lax.population_count(parts[-1][0])).astype(jnp.uint32)
    parts.append(jnp.pad(_tie_words(leaves[i], t), (0, int(pad))))
  words = jnp.concatenate(parts)
  blocks = words.reshape(-1, BLOCK_WORDS)
  counts = jnp.sum(lax.population_count(blocks).astype(jnp.int32), axis=1, dtype=jnp.int32)
  group_blocks = np.bincount(leaf_group, weights=nblocks, minlength=num_groups).astype(int)
  start = (np.cumsum(group_blocks) - group_blocks).astype(np.int32)  # each group's first
  column = lax.broadcasted_iota(jnp.int32, (num_groups, counts.size), 1)
  # Ties in the first m[g] blocks of each group g.
  below = lambda m: jnp.sum(jnp.where((column >= start[:, None])
                                      & (column < (start + m)[:, None]),
                                      counts, 0), axis=1, dtype=jnp.int32)
  block = start + _first_reaching(below, int(group_blocks.max()), need) - 1
  rank = need - below(block - start)  # the need-th tie's rank within its block
  in_block = _nth_bit(blocks[jnp.clip(block, 0, counts.size - 1)], rank)
  word, bit = BLOCK_WORDS * block + in_block // WORD, in_block % WORD
  # The leaf holding that word, and the position: chunk, word in the chunk, bit.
  first = np.cumsum(nblocks * BLOCK_WORDS) - nblocks * BLOCK_WORDS
  leaf = jnp.sum(word[:, None] >= first[None, :], axis=1) - 1
  at = word - jnp.asarray(first.astype(np.int32))[leaf]
  per = jnp.asarray(per_chunk.astype(np.int32))[leaf]
  chunk = jnp.asarray(first_chunk)[leaf] + at // per
  flat = jnp.asarray(starts)[chunk] + WORD * (at % per) + bit
  offsets = np.array(_bisect.group_offsets(leaves, groups, num_groups), np.uint32)[order]
  return jnp.asarray(offsets)[leaf] - flat.astype(jnp.uint32)  # ~ the in-group index


def tie_cut(leaves, groups, num_groups, thresh, need, ties):
  """The radix passes' ``cut`` (``_select._radix_passes``), bit for bit.

  Per group ``~i`` of the ``need``-th tie (``i`` the in-group flat index, ``~i =
  2**32 - 1 - i``); ``2**32 - 1`` where ``need == 0``, ``0`` where ``need > ties``;
  ``0`` for every group when none splits its ties (every ``need == ties``), and
  then no pass over the keys runs. For leaves where ``applies``.
  """
  def body(state):
    p, _ = state
    # Sources and numbers through a barrier with ``p``: nothing is hoisted out of the
    # loop, and leaves of one shape share their kernels.
    leaves_now, _, (gs,) = _bisect.in_every_pass(leaves, p, (_lazy.leaf_numbers(groups),))
    cut = _split(leaves_now, groups, gs, num_groups, thresh, need)
    cut = jnp.where(need <= 0, np.uint32(2**32 - 1), cut)
    return p + 1, jnp.where(need > ties, np.uint32(0), cut)

  split = ~jnp.all(need == ties)
  return lax.while_loop(lambda s: (s[0] < 1) & split, body,
                        (jnp.int32(0), jnp.zeros_like(thresh)))[1]
