"""Pure magnitude pruning of mask trees (docs/algorithms.md §4 and the drop step of §5).

Every public function maps (params, masks, counts) to new masks, is jittable
with counts that are traced int32 values (they change with the step), and
selects exact counts with deterministic tie-breaking (lower flat index first)
through the radix selector of ``_select``.

Each is built from a *plan* (a few numbers per layer: the selection's thresholds,
computed by histogram passes over chunks) and an *apply* step that turns a plan
into lazy masks (``_lazy.Lazy``). The optimizer wrapper computes plans inside a
``lax.cond`` (only scalars leave it) and materialises a stage's bool masks only
where a later stage reads them, so no keys or scatter indices of a whole model
are ever allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from sparse_jax import _counts
from sparse_jax import _lazy
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _select

PyTree = _masks.PyTree
_NONE = np.uint32(2**32 - 1)  # an index no position has


def split_prunable(tree: PyTree, masks: PyTree):
  """Leaves of ``tree`` that have a mask, those masks, and a function to rebuild.

  ``rebuild(new_masks_list)`` returns a mask tree with the new masks in place and
  ``None`` on the dense leaves.
  """
  tree = _masks.unwrap_variables(tree)
  masks = _masks.unwrap_variables(masks)
  leaves, treedef = jax.tree.flatten(tree)
  mask_leaves = _paths.flatten_up_to(treedef, masks)
  idx = [i for i, m in enumerate(mask_leaves) if m is not None]

  def rebuild(new):
    out = [None] * len(leaves)
    for i, m in zip(idx, new):
      out[i] = m
    return jax.tree.unflatten(treedef, out)

  return [leaves[i] for i in idx], [mask_leaves[i] for i in idx], rebuild


def same_bits(xs: list) -> list:
  """``xs`` behind an optimization barrier: every pass that ranks them reads the same bits.

  A selection reads its scores in several passes (histograms, then the masks), each
  its own fusion. Scores computed in the same program are recomputed in each, and
  XLA may round them differently there: bfloat16 arithmetic kept in float32 in one
  fusion and rounded in another (excess precision), or a multiply-add contracted
  into an FMA in one only. The counts are then off by one or more. The barrier
  computes them once. Costs nothing on arrays that are already materialised.
  """
  return lax.optimization_barrier(list(xs))


def _magnitude_keys(w, m) -> _lazy.Lazy:
  """Lazy keys of |w| on the positions active in ``m`` (array or Lazy)."""
  return _lazy.lazy_map(lambda index, w, m: _select.score_keys(w, m), w, m)


def _top_and_first(index, x):
  """The largest key of a chunk and the first flat index holding it.

  One variadic reduction over (key, index) pairs. With a max and then a min over
  the positions holding it, XLA:CPU materialised each layer's keys and indices (8
  bytes a weight), even with the min's keys recomputed behind a barrier: on the
  scanned 32M language model those were the global prune's peak
  (experiments/benchmarks/README.md, Memory). XLA:CPU does not vectorise a variadic
  reduction: ~20 ms more of the 30M MLP's event.
  """
  return lax.reduce((x, index), (np.uint32(0), _NONE), _larger, tuple(range(x.ndim)))


def _larger(a, b):
  """Combines two (largest key, first index) pairs."""
  first = jnp.where(a[0] == b[0], jnp.minimum(a[1], b[1]),
                    jnp.where(a[0] > b[0], a[1], b[1]))
  return jnp.maximum(a[0], b[0]), first


def layer_active_counts(masks: PyTree) -> jax.Array:
  """Active weights per prunable layer (int32 [L], flattening order)."""
  return _counts.count_each(jax.tree.leaves(masks))


class GlobalPlan(NamedTuple):
  """A global magnitude prune: each layer's forced weight and the selection."""
  first: jax.Array  # uint32 [L], flat index of each layer's forced (largest) weight
  sel: _select.Selection  # one group


def _forced_keys(ws, ms, first):
  def forced(index, x, l):
    return jnp.where(index == _lazy.entry(first, l), jnp.uint32(_select.FORCED), x)
  return [_lazy.lazy_map(lambda index, x, l=l: forced(index, x, l), _magnitude_keys(w, m))
          for l, w, m in zip(_lazy.leaf_numbers(range(len(ws))), ws, ms)]


def global_prune_plan(ws, ms, num_active) -> GlobalPlan:
  """Plan of ``global_magnitude_prune`` over leaf lists (masks: arrays or Lazy)."""
  firsts = []
  for w, m in zip(ws, ms):
    top, first = _lazy.map_reduce_lazy(_top_and_first, _magnitude_keys(w, m), _larger)
    firsts.append(jnp.where(top > 0, first, _NONE))  # an empty layer forces nothing
  first = jnp.stack(firsts)
  counts = _counts.count_each(ms)
  active = jnp.sum(counts)
  # At least one weight per non-empty layer: with num_active below the number of
  # layers the forced weights alone exceed it, and a plain minimum would let the
  # selector drop some of them (emptying layers).
  nonempty = jnp.sum(counts > 0, dtype=jnp.int32)
  k = jnp.clip(jnp.asarray(num_active, jnp.int32), nonempty, active)
  sel = _select.top_k_selection(_forced_keys(ws, ms, first), k[None], (0,) * len(ws))
  return GlobalPlan(first, sel)


def keep_all_global_plan(num_layers: int) -> GlobalPlan:
  """The plan that prunes nothing."""
  return GlobalPlan(jnp.full((num_layers,), _NONE), _select.Selection.all_positive(1))


def apply_global_plan(ws, ms, plan: GlobalPlan) -> list[_lazy.Lazy]:
  return _select.selected_masks(_forced_keys(ws, ms, plan.first), (0,) * len(ws), plan.sel)


def _planned_masks(params: PyTree, masks: PyTree, counts, plan_fn, apply_fn) -> PyTree:
  """The mask tree of ``apply_fn(ws, ms, plan_fn(ws, ms, counts))`` on the prunable leaves.

  The one-call form of a selection (plan, then apply, both reading the same bits
  of the params); the optimizer wrapper calls the plan and apply functions itself.
  """
  ws, ms, rebuild = split_prunable(params, masks)
  ws = same_bits(ws)
  plan = plan_fn(ws, ms, counts)
  return rebuild([m.compute() for m in apply_fn(ws, ms, plan)])


def global_magnitude_prune(params: PyTree, masks: PyTree, num_active: ArrayLike) -> PyTree:
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
  return _planned_masks(params, masks, num_active, global_prune_plan, apply_global_plan)


def layerwise_keep_counts(num_active, active) -> jax.Array:
  """How many weights per layer a layer-wise prune keeps: ``num_active`` clipped to
  ``[min(active, 1), active]`` (never emptied, never grown). The selection keeps
  exactly this many, so callers need not count its result."""
  active = jnp.asarray(active, jnp.int32)
  return jnp.clip(jnp.asarray(num_active, jnp.int32), jnp.minimum(active, 1), active)


def layerwise_prune_plan(ws, ms, num_active, active=None) -> _select.Selection:
  """Plan of ``layerwise_magnitude_prune`` over leaf lists (masks: arrays or Lazy).

  ``active``: the masks' per-layer counts if already known (saves a pass).
  """
  if active is None:
    active = _counts.count_each(ms)
  k = layerwise_keep_counts(num_active, active)
  keys = [_magnitude_keys(w, m) for w, m in zip(ws, ms)]
  return _select.top_k_selection(keys, k, tuple(range(len(ws))))


def apply_layerwise_plan(ws, ms, sel: _select.Selection) -> list[_lazy.Lazy]:
  keys = [_magnitude_keys(w, m) for w, m in zip(ws, ms)]
  return _select.selected_masks(keys, tuple(range(len(ws))), sel)


def layerwise_magnitude_prune(params: PyTree, masks: PyTree,
                              num_active: ArrayLike) -> PyTree:
  """Keeps the ``num_active[l]`` largest-magnitude active weights of each layer.

  Args:
    params: the params pytree.
    masks: the current mask tree.
    num_active: int32 [L], per prunable layer (flattening order); clipped to
      [1, active_l] so a layer is never emptied nor grown.

  Returns:
    The new mask tree, a subset of ``masks``.
  """
  return _planned_masks(params, masks, num_active, layerwise_prune_plan,
                        apply_layerwise_plan)


def drop_plan(ws, ms, num_drop) -> _select.Selection:
  """Plan of ``drop_smallest`` over leaf lists (masks: arrays or Lazy)."""
  active = _counts.count_each(ms)
  return layerwise_prune_plan(ws, ms, active - jnp.asarray(num_drop, jnp.int32))


def drop_smallest(params: PyTree, masks: PyTree, num_drop: ArrayLike) -> PyTree:
  """Drops the ``num_drop[l]`` smallest-magnitude active weights of each layer.

  The drop count is clipped so each layer keeps at least one active weight.

  Args:
    params: the params pytree.
    masks: the current mask tree.
    num_drop: int32 [L] per prunable layer (flattening order).

  Returns:
    The new mask tree, a subset of ``masks``.
  """
  return _planned_masks(params, masks, num_drop, drop_plan, apply_layerwise_plan)
