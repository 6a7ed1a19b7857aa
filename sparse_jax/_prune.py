"""Pure magnitude pruning of mask trees (SPEC §4 and the drop step of §5).

Every function maps (params, masks, counts) to new masks, is jittable with
counts that are traced int32 values (they change with the step), and selects
exact counts with deterministic tie-breaking (lower flat index first) through the
counting selector of ``_select``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax import _masks
from sparse_jax import _select

PyTree = _masks.PyTree


def split_prunable(tree: PyTree, masks: PyTree):
  """Leaves of ``tree`` that have a mask, those masks, and a function to rebuild.

  ``rebuild(new_masks_list)`` returns a mask tree with the new masks in place and
  ``None`` on the dense leaves.
  """
  tree = _masks.unwrap_variables(tree)
  masks = _masks.unwrap_variables(masks)
  leaves, treedef = jax.tree.flatten(tree)
  mask_leaves = treedef.flatten_up_to(masks)
  idx = [i for i, m in enumerate(mask_leaves) if m is not None]

  def rebuild(new):
    out = [None] * len(leaves)
    for i, m in zip(idx, new):
      out[i] = m
    return jax.tree.unflatten(treedef, out)

  return [leaves[i] for i in idx], [mask_leaves[i] for i in idx], rebuild


def _magnitude_keys(index, w, m):
  del index
  return _select.score_keys(w, m)


def _top_and_first(index, w, m):
  """The largest key of a chunk and the first flat index holding it."""
  x = _select.score_keys(w, m)
  top = jnp.max(x)
  return top, jnp.min(jnp.where(x == top, index, jnp.uint32(2**32 - 1)))


def _larger(a, b):
  """Combines two (largest key, first index) pairs."""
  first = jnp.where(a[0] == b[0], jnp.minimum(a[1], b[1]),
                    jnp.where(a[0] > b[0], a[1], b[1]))
  return jnp.maximum(a[0], b[0]), first


def layer_active_counts(masks: PyTree) -> jax.Array:
  """Active weights per prunable layer (int32 [L], flattening order)."""
  return jnp.stack([_select.count_true(m) for m in jax.tree.leaves(masks)])


def global_magnitude_prune(params: PyTree, masks: PyTree, num_active) -> PyTree:
  """Keeps the ``num_active`` largest-magnitude active weights of the whole model.

  One ranking of |w| over all prunable layers together (no per-layer
  normalisation). The new mask is a subset of the old one; when ``num_active`` is
  not below the current active count nothing is pruned. Each layer keeps at
  least its largest active weight, so no layer is ever emptied (these forced
  weights count towards ``num_active``; if ``num_active`` is below the number of
  non-empty layers, exactly one weight per such layer is kept).

  Example:
    >>> masks = global_magnitude_prune(params, masks, num_active=26_661)

  Args:
    params: the params pytree (float32 or bfloat16).
    masks: the current mask tree.
    num_active: int (may be traced), the exact number of weights to keep.

  Returns:
    The new mask tree.
  """
  ws, ms, rebuild = split_prunable(params, masks)
  # Force each layer's largest active weight in (the lowest flat index on ties,
  # matching the selector's tie-breaking). Max and min reductions instead of an
  # argmax over x.reshape(-1): the reshape would all-gather a sharded leaf. The
  # keys stay lazy: the selector computes them chunk by chunk from (w, m).
  forced = []
  for w, m in zip(ws, ms):
    top, first = _select.map_reduce_chunks(_top_and_first, (w, m), combine=_larger)
    first = jnp.where(top > 0, first, jnp.uint32(2**32 - 1))  # an empty layer: none

    def keys_fn(index, w, m, first=first):
      return jnp.where(index == first, jnp.uint32(_select.FORCED), _select.score_keys(w, m))

    forced.append(_select.LazyKeys(keys_fn, (w, m)))
  counts = [_select.count_true(m) for m in ms]
  active = sum(counts)
  # At least one weight per non-empty layer: with num_active below the number of
  # layers the forced weights alone exceed it, and a plain minimum would let the
  # selector drop some of them (emptying layers).
  nonempty = sum((c > 0).astype(jnp.int32) for c in counts)
  k = jnp.clip(jnp.asarray(num_active, jnp.int32), nonempty, active)
  new = _select.top_k_masks(forced, k[None], groups=(0,) * len(ws))
  return rebuild(new)


def layerwise_magnitude_prune(params: PyTree, masks: PyTree, num_active) -> PyTree:
  """Keeps the ``num_active[l]`` largest-magnitude active weights of each layer.

  Args:
    params: the params pytree.
    masks: the current mask tree.
    num_active: int32 [L], per prunable layer (flattening order); clipped to
      [1, active_l] so a layer is never emptied nor grown.

  Returns:
    The new mask tree, a subset of ``masks``.
  """
  ws, ms, rebuild = split_prunable(params, masks)
  keys = [_select.LazyKeys(_magnitude_keys, (w, m)) for w, m in zip(ws, ms)]
  active = jnp.stack([_select.count_true(m) for m in ms])
  k = jnp.clip(jnp.asarray(num_active, jnp.int32), jnp.minimum(active, 1), active)
  return rebuild(_select.top_k_masks(keys, k, groups=tuple(range(len(ws)))))


def drop_smallest(params: PyTree, masks: PyTree, num_drop) -> PyTree:
  """Drops the ``num_drop[l]`` smallest-magnitude active weights of each layer.

  The drop count is clipped so each layer keeps at least one active weight.

  Args:
    params: the params pytree.
    masks: the current mask tree.
    num_drop: int32 [L] per prunable layer (flattening order).

  Returns:
    The new mask tree, a subset of ``masks``.
  """
  active = layer_active_counts(masks)
  return layerwise_magnitude_prune(params, masks, active - jnp.asarray(num_drop, jnp.int32))
