"""Pure regrowth of mask trees (the grow step of docs/algorithms.md §5).

Regrowth switches on exactly ``num_grow[l]`` inactive positions of each layer,
never one that is already active, ranked by a score: the dense gradient's
magnitude (RigL / GraNet), the optimizer's momentum, or random keys (SET).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sparse_jax import _counts
from sparse_jax import _lazy
from sparse_jax import _masks
from sparse_jax import _prune
from sparse_jax import _select

PyTree = _masks.PyTree
GROWTH_MODES = ("gradient", "momentum", "random")


def growth_keys(ss, ms):
  """Lazy keys of |score| ``ss``, 0 where the masks ``ms`` are active (no candidate)."""
  return [_lazy.lazy_map(lambda index, s, m: _select.score_keys(s, ~m), s, m)
          for s, m in zip(ss, ms)]


def _grow_plan(keys, ms, num_grow, active=None) -> _select.Selection:
  if active is None:
    active = _counts.count_each(ms)
  inactive = jnp.asarray([m.size for m in ms], jnp.int32) - active
  n = jnp.clip(jnp.asarray(num_grow, jnp.int32), 0, inactive)
  return _select.top_k_selection(keys, n, tuple(range(len(ms))))


def _apply_grow(keys, ms, sel: _select.Selection) -> list[_lazy.Lazy]:
  picked = _select.selected_masks(keys, tuple(range(len(ms))), sel)
  # A position with key 0 (active) is picked only when n exceeds the candidates,
  # which the plan's clip rules out; the OR keeps the old mask regardless.
  return [_lazy.lazy_map(lambda index, m, p: m | p, m, p) for m, p in zip(ms, picked)]


def score_grow_plan(ss, ms, num_grow, active=None) -> _select.Selection:
  """Plan of ``regrow_by_score`` over leaf lists (masks: arrays or ``Lazy``).

  ``active``: the masks' per-layer counts if already known (saves a pass).
  """
  return _grow_plan(growth_keys(ss, ms), ms, num_grow, active)


def apply_score_grow(ss, ms, sel: _select.Selection) -> list[_lazy.Lazy]:
  return _apply_grow(growth_keys(ss, ms), ms, sel)


def regrow_by_score(scores: PyTree, masks: PyTree, num_grow: ArrayLike) -> PyTree:
  """Activates the ``num_grow[l]`` inactive positions of largest |score| per layer.

  Args:
    scores: a pytree like the params (e.g. dense gradients).
    masks: the current mask tree.
    num_grow: int32 [L] per prunable layer; clipped to the layer's inactive count.

  Returns:
    The new mask tree, a superset of ``masks`` with exactly
    ``active_l + num_grow[l]`` active weights per layer.
  """
  ss, ms, rebuild = _prune.split_prunable(scores, masks)
  ss = _prune.same_bits(ss)
  sel = score_grow_plan(ss, ms, num_grow)
  return rebuild([m.compute() for m in apply_score_grow(ss, ms, sel)])


def regrow_by_gradient(grads: PyTree, masks: PyTree, num_grow: ArrayLike) -> PyTree:
  """RigL/GraNet growth: inactive positions with the largest dense |gradient|.

  Example:
    >>> masks = regrow_by_gradient(grads, masks, jnp.array([30, 10, 1]))
  """
  return regrow_by_score(grads, masks, num_grow)


def regrow_by_momentum(momentum: PyTree, masks: PyTree, num_grow: ArrayLike) -> PyTree:
  """Sparse-momentum growth: inactive positions with the largest |momentum|."""
  return regrow_by_score(momentum, masks, num_grow)


def _mix32(x):
  """An invertible 32-bit integer hash (xor-shift-multiply, "lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


class RandomPlan(NamedTuple):
  words: jax.Array  # uint32 [L, 2], the seed words of each layer's hash stream
  sel: _select.Selection


def random_keys(ms, words):
  """Lazy random keys of the masks ``ms`` (0 where active) from each layer's ``words``."""
  def keys_fn(index, m, seed):
    bits = _mix32(_mix32(index ^ seed[0]) + seed[1])
    return jnp.where(m, jnp.uint32(0), (bits >> 1) + jnp.uint32(1))
  return [_lazy.lazy_map(lambda index, m, l=l: keys_fn(index, m, _lazy.entry(words, l)), m)
          for l, m in zip(_lazy.leaf_numbers(range(len(ms))), ms)]


def random_grow_plan(key, ms, num_grow, active=None) -> RandomPlan:
  """Plan of ``regrow_random`` over a list of masks (arrays or ``Lazy``)."""
  words = jax.random.bits(key, (len(ms), 2), jnp.uint32)
  return RandomPlan(words, _grow_plan(random_keys(ms, words), ms, num_grow, active))


def apply_random_grow(ms, plan: RandomPlan) -> list[_lazy.Lazy]:
  return _apply_grow(random_keys(ms, plan.words), ms, plan.sel)


def regrow_random(key: jax.Array, masks: PyTree, num_grow: ArrayLike) -> PyTree:
  """SET growth: ``num_grow[l]`` inactive positions of each layer uniformly at random.

  Each position's random key is a hash of its flat index and two words drawn from
  ``key`` per layer: a counter-based stream that the selector computes chunk by
  chunk, so no layer-sized array of random bits is materialised.
  """
  ms = [m for m in jax.tree.leaves(masks)]
  _, _, rebuild = _prune.split_prunable(masks, masks)
  plan = random_grow_plan(key, ms, num_grow)
  return rebuild([m.compute() for m in apply_random_grow(ms, plan)])
