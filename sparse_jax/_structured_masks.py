"""Masks under a structure (``_structure``): units, N:M groups, random start masks.

Blocks and channels work on *unit arrays* (one entry per block or output unit),
scored by their RMS; N:M ranks within each group of ``m`` inputs. Every function
takes the ``LeafStructure`` of the prunable leaves (``_structure.leaf_structure``)
and lists of their arrays, in flattening order; unstructured, each is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _distributions
from sparse_jax import _lazy
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _regrow
from sparse_jax import _select
from sparse_jax import _structure

PyTree = Any


# ---------------------------------------------------------------------------
# Units: blocks and channels
# ---------------------------------------------------------------------------


def _unit_rms(structure, v: _structure.KernelView, x) -> jax.Array:
  split, axes = _structure.unit_split(structure, v)
  x = jnp.reshape(x, split).astype(jnp.float32)
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes))


def _unit_any(structure, v: _structure.KernelView, m) -> jax.Array:
  split, axes = _structure.unit_split(structure, v)
  return jnp.any(jnp.reshape(m, split), axis=axes)


def _expand(structure, v: _structure.KernelView, u) -> jax.Array:
  split, axes = _structure.unit_split(structure, v)
  return jnp.broadcast_to(jnp.expand_dims(u, axes), split).reshape(v.shape)


def unit_scores(st: _structure.LeafStructure, xs: list) -> list:
  """Per-unit RMS of each leaf for blocks and channels; ``xs`` itself otherwise.

  Behind a barrier: every ranking pass must read the same bits (see
  ``_mask_update``'s note on ``w + u``).
  """
  if not st.units:
    return xs
  return lax.optimization_barrier(
      [_unit_rms(st.structure, v, x) for v, x in zip(st.views, xs)])


def unit_masks(st: _structure.LeafStructure, ms: list) -> list:
  """Each leaf's unit mask for blocks and channels (a unit is active if any of its
  weights is: all are); ``ms`` itself otherwise."""
  if not st.units:
    return ms
  return [_unit_any(st.structure, v, _lazy.lazy(m).compute()) for v, m in zip(st.views, ms)]


def from_units(st: _structure.LeafStructure, ms: list) -> list:
  """Full masks of unit masks for blocks and channels; ``ms`` itself otherwise."""
  if not st.units:
    return ms
  return [_expand(st.structure, v, m) for v, m in zip(st.views, ms)]


# ---------------------------------------------------------------------------
# N:M groups
# ---------------------------------------------------------------------------


def _groups(m: int, v: _structure.KernelView, x) -> jax.Array:
  """``x`` as ``[*receptive, fan_in / m, m, fan_out]``."""
  *rec, fan_in, fan_out = v.view
  return jnp.reshape(x, (*rec, fan_in // m, m, fan_out))


def _ranks_in_groups(keys: jax.Array) -> jax.Array:
  """Rank of each key in its group (axis -2): how many beat it (larger, or equal
  at a lower index). An ``m x m`` comparison per group; ``m`` is small."""
  m = keys.shape[-2]
  other, this = keys[..., None, :, :], keys[..., :, None, :]
  earlier = (lax.broadcasted_iota(jnp.int32, (m, m, 1), 1)
             < lax.broadcasted_iota(jnp.int32, (m, m, 1), 0))
  beats = (other > this) | ((other == this) & earlier)
  return jnp.sum(beats, axis=-2, dtype=jnp.int32)


def select_in_groups(m: int, v: _structure.KernelView, keys, count) -> jax.Array:
  """True at the ``count`` largest keys of every group (``count``: int32 scalar or
  one per group, ``[*receptive, fan_in / m, 1, fan_out]``), in the kernel's shape."""
  ranks = _ranks_in_groups(_groups(m, v, _lazy.lazy(keys).compute()))
  return (ranks < count).reshape(v.shape)


def count_in_groups(m: int, v: _structure.KernelView, mask) -> jax.Array:
  """Active weights per group, int32 ``[*receptive, fan_in / m, 1, fan_out]``."""
  return jnp.sum(_groups(m, v, _lazy.lazy(mask).compute()), axis=-2, keepdims=True,
                 dtype=jnp.int32)


def prune_in_groups(st: _structure.LeafStructure, ws: list, ms: list, count) -> list:
  """Keeps the ``count`` largest-magnitude active weights of every group.

  A group with fewer active weights keeps them all (pruning only shrinks).
  """
  m = st.structure.m
  out = []
  for v, w, mask in zip(st.views, ws, ms):
    mask = _lazy.lazy(mask).compute()
    out.append(mask & select_in_groups(m, v, _select.score_keys(w, mask), count))
  return out


def grow_in_groups(st: _structure.LeafStructure, keys: list, before: list,
                   dropped: list) -> list:
  """Regrows, in every group, as many positions as the drop took from it.

  ``keys``: the growth keys per leaf (0 where not a candidate, i.e. active in
  ``dropped``), so every group of ``dropped | grown`` has its count of ``before``.
  """
  m = st.structure.m
  out = []
  for v, k, b, d in zip(st.views, keys, before, dropped):
    d = _lazy.lazy(d).compute()
    need = count_in_groups(m, v, b) - count_in_groups(m, v, d)
    out.append(d | (select_in_groups(m, v, k, need) & ~d))
  return out


def group_growth(st: _structure.LeafStructure, mode: str, rng, scores, before: list):
  """``(plan, apply, nothing)``: the growth stage of a mask update for N:M.

  ``plan(dropped, num, kept)`` returns what a ``lax.cond`` hands out (the random
  words of ``growth="random"``, else nothing); ``apply(dropped, plan)`` the grown
  masks. The drop is the layer-wise one of every method; growth then refills each
  group inside it (as SRigL keeps a constant fan-in), so groups keep their count.
  """
  num_layers = len(before)
  if mode == "random":
    plan = lambda dropped, num, kept: jax.random.bits(rng, (num_layers, 2), jnp.uint32)
    nothing = jnp.zeros((num_layers, 2), jnp.uint32)
    keys = lambda dropped, words: _regrow.random_keys(dropped, words)
  else:
    plan = lambda dropped, num, kept: jnp.zeros((), jnp.int32)
    nothing = jnp.zeros((), jnp.int32)
    keys = lambda dropped, _: _regrow.growth_keys(scores, dropped)

  def apply(dropped, plan_value):
    dropped = [_lazy.lazy(d).compute() for d in dropped]
    return grow_in_groups(st, keys(dropped, plan_value), before, dropped)

  return plan, apply, nothing


# ---------------------------------------------------------------------------
# Start masks
# ---------------------------------------------------------------------------


def random_masks(structure, key, params: PyTree, prunable: PyTree, sparsity: float,
                 distribution, sampling: str) -> PyTree:
  """Random structured start masks at ``sparsity`` (a tree like ``params``;
  ``random_layer_masks`` of its prunable leaves)."""
  params = _masks.unwrap_variables(params)
  st = _structure.leaf_structure(structure, params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  flags = _paths.flatten_up_to(treedef, prunable)
  it = iter(random_layer_masks(st, key, sparsity, distribution, sampling))
  return jax.tree.unflatten(treedef, [next(it) if f else None for f in flags])


def random_layer_masks(st: _structure.LeafStructure, key, sparsity: float, distribution,
                       sampling: str) -> list:
  """Random structured start masks at ``sparsity``, one per layer of ``st``.

  N:M: ``group_count(sparsity, m)`` random weights in every group. Blocks and
  channels: ``_distributions.random_masks`` on the unit arrays, with the layer
  densities of ``distribution`` (read from the kernels' shapes) turned into exact
  unit counts that add up to ``active_count(sparsity, total units)``.
  """
  structure = st.structure
  if st.grouped:
    c = _structure.group_count(sparsity, structure.m)
    keys = jax.random.split(key, len(st.views))
    return [select_in_groups(structure.m, v,
                             (jax.random.bits(k, v.shape, jnp.uint32) >> 1) + 1, c)
            for k, v in zip(keys, st.views)]
  layers = [_masks.LayerInfo(v.name, v.shape, math.prod(v.shape)) for v in st.views]
  densities = _distributions.layer_densities_for(layers, sparsity, distribution)
  shapes = [_structure.unit_shape(structure, v) for v in st.views]
  unit_layers = [_masks.LayerInfo(v.name, s, math.prod(s)) for v, s in zip(st.views, shapes)]
  total = None if isinstance(distribution, Mapping) else _distributions.active_count(
      sparsity, sum(l.size for l in unit_layers))
  counts = _distributions.layer_counts(unit_layers, densities, total)
  units = _distributions.random_masks(key, [np.zeros(s, bool) for s in shapes],
                                      [True] * len(shapes), counts, sampling=sampling)
  return from_units(st, units)
