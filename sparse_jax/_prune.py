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


def layer_active_counts(masks: PyTree) -> jax.Array:
  """Active weights per prunable layer (int32 [L], flattening order)."""
  return jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(masks)])


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
  keys = [_select.score_keys(w, m) for w, m in zip(ws, ms)]
  # Force each layer's largest active weight in (the lowest flat index on ties,
  # matching the selector's tie-breaking). Max and min reductions instead of an
  # argmax over x.reshape(-1): the reshape would all-gather a sharded leaf.
  forced = []
  for x in keys:
    index = _select.flat_index(x.shape)
    top = jnp.max(x)
    first = jnp.min(jnp.where(x == top, index, jnp.uint32(2**32 - 1)))
    forced.append(jnp.where((index == first) & (top > 0), jnp.uint32(_select.FORCED), x))
  active = sum(jnp.sum(m, dtype=jnp.int32) for m in ms)
  # At least one weight per non-empty layer: with num_active below the number of
  # layers the forced weights alone exceed it, and a plain minimum would let the
  # selector drop some of them (emptying layers).
  nonempty = sum(jnp.any(m).astype(jnp.int32) for m in ms)
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
  keys = [_select.score_keys(w, m) for w, m in zip(ws, ms)]
  active = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in ms])
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
