"""Counting the True entries of masks (the mask update's per-layer counts).

Masks are counted in ``uint8`` runs (``sum_bools``), large ones in chunks
(``_lazy.chunk_plan``), and the layers one after another (``count_each``), so the
counts' temporaries at the mask update's peak are one layer's 1-byte copy at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sparse_jax import _lazy


def sum_bools(m: jax.Array) -> jax.Array:
  """Number of True entries (int32) of the bool array ``m``.

  Summed in ``uint8`` over runs of at most 255 along the last axis, then in int32.
  XLA:CPU does not fuse a convert into an int32 (or float) sum: ``jnp.sum(m,
  dtype=jnp.int32)`` materialises a 4-byte copy of ``m`` (and a reduce-window tree);
  this materialises at most a 1-byte one and ran 12x faster (25 masks of 2**20).
  Only the last axis is split, so a sharded leaf is not gathered.
  """
  if m.ndim == 0:
    return m.astype(jnp.int32)
  n = m.shape[-1]
  run = max(d for d in range(1, min(n, 255) + 1) if n % d == 0)
  if run < 16:  # short runs: the uint8 sums would not pay
    return jnp.sum(m, dtype=jnp.int32)
  runs = jnp.sum(m.reshape(m.shape[:-1] + (n // run, run)), axis=-1, dtype=jnp.uint8)
  return jnp.sum(runs, dtype=jnp.int32)


def count_true(mask) -> jax.Array:
  """Number of True entries (int32) of a bool array or ``Lazy``, in chunks (see above)."""
  return _lazy.map_reduce_lazy(lambda index, m: sum_bools(m), _lazy.lazy(mask))


def count_each(masks: Sequence) -> jax.Array:
  """``count_true`` of each of ``masks`` (int32 [L]), one after another.

  Each mask's sources pass a barrier with the counts so far, so each count's
  temporaries (a mask's ``uint8`` copy, see ``sum_bools``) are freed before the
  next one's: computed independently, XLA:CPU's scheduler converted every layer's
  mask before summing any (4 bytes a weight of every unchunked layer at once:
  ~220 MiB at the scanned 126M language model's event peak). On one device each
  mask is also read only once the previous count exists (below).
  """
  counts: list[jax.Array] = []
  for m in masks:
    m = _lazy.lazy(m)
    done, sources = lax.optimization_barrier((tuple(counts), m.sources))
    m = _lazy.Lazy(m.fn, sources)
    if done and jax.device_count() == 1:
      # Read only once the previous count exists (``_lazy.zero_after``): inside a
      # cond branch the barrier alone did not order the counts, and the scanned 126M
      # LM's event with packed masks held 60 layers' uint8 copies (60 MiB) at its peak.
      wait = _lazy.zero_after(done[-1]) == 0
      m = _lazy.lazy_map(lambda index, x: jnp.where(wait, x, jnp.zeros((), x.dtype)), m)
    counts = [*done, count_true(m)]
  return jnp.stack(counts) if counts else jnp.zeros((0,), jnp.int32)
