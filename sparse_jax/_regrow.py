"""Pure regrowth of mask trees (the grow step of SPEC §5).

Regrowth switches on exactly ``num_grow[l]`` inactive positions of each layer,
never one that is already active, ranked by a score: the dense gradient's
magnitude (RigL / GraNet), the optimizer's momentum, or random keys (SET).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax import _masks
from sparse_jax import _prune
from sparse_jax import _select

PyTree = _masks.PyTree
GROWTH_MODES = ("gradient", "momentum", "random")


def regrow_by_score(scores: PyTree, masks: PyTree, num_grow) -> PyTree:
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
  keys = [_select.score_keys(s, ~m) for s, m in zip(ss, ms)]
  return rebuild(_grow(keys, ms, num_grow))


def _grow(keys, ms, num_grow):
  inactive = jnp.stack([m.size - jnp.sum(m, dtype=jnp.int32) for m in ms])
  n = jnp.clip(jnp.asarray(num_grow, jnp.int32), 0, inactive)
  picked = _select.top_k_masks(keys, n, groups=tuple(range(len(ms))))
  # A position with key 0 (active) is picked only when n exceeds the candidates,
  # which the clip above rules out; the OR keeps the old mask regardless.
  return [m | p for m, p in zip(ms, picked)]


def regrow_by_gradient(grads: PyTree, masks: PyTree, num_grow) -> PyTree:
  """RigL/GraNet growth: inactive positions with the largest dense |gradient|.

  Example:
    >>> masks = regrow_by_gradient(grads, masks, jnp.array([30, 10, 1]))
  """
  return regrow_by_score(grads, masks, num_grow)


def regrow_by_momentum(momentum: PyTree, masks: PyTree, num_grow) -> PyTree:
  """Sparse-momentum growth: inactive positions with the largest |momentum|."""
  return regrow_by_score(momentum, masks, num_grow)


def regrow_random(key: jax.Array, masks: PyTree, num_grow) -> PyTree:
  """SET growth: ``num_grow[l]`` inactive positions of each layer uniformly at random."""
  ms = [m for m in jax.tree.leaves(masks)]
  _, _, rebuild = _prune.split_prunable(masks, masks)
  subkeys = jax.random.split(key, len(ms))
  keys = [jnp.where(m, jnp.uint32(0),
                    (jax.random.bits(k, m.shape, jnp.uint32) >> 1) + jnp.uint32(1))
          for k, m in zip(subkeys, ms)]
  return rebuild(_grow(keys, ms, num_grow))
