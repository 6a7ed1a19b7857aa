"""The event's layer-wise selections run in parts (``_mask_update._layer_parts``).

Splitting bounds the selection's temporaries; since every layer is its own group,
the masks must be exactly those of one selection over all layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from sparse_jax import _mask_update


def test_layer_parts_close_a_run_before_it_would_pass_the_target(monkeypatch):
  monkeypatch.setattr(_mask_update, "_SPLIT_FROM", 1)
  monkeypatch.setattr(_mask_update, "_PARTS", 4)
  ms = [np.zeros(n) for n in (10, 30, 5, 5, 40, 10)]  # total 100, target 25
  # 10 | 30 (10 + 30 > 25) | 5 + 5 | 40 | 10
  parts = [list(p) for p in _mask_update._layer_parts(ms)]
  assert parts == [[0], [1], [2, 3], [4], [5]]


def test_small_models_are_one_part():
  ms = [np.zeros(1000) for _ in range(5)]
  assert [list(p) for p in _mask_update._layer_parts(ms)] == [[0, 1, 2, 3, 4]]


def _params():
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  shapes = [(24, 32), (32, 16), (16, 40), (40, 8), (8, 24)]
  return {f"l{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}


def _run(tx, params, steps=6):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, mask_update=True))
  for i in range(steps):
    # Random, not a function of the params: masked weights are 0, and a gradient of
    # them would be 0 too, so growth would restore exactly the dropped positions.
    keys = jax.random.split(jax.random.PRNGKey(i), len(params))
    grads = {k: jax.random.normal(key, p.shape)
             for key, (k, p) in zip(keys, sorted(params.items()))}
    updates, state = step(params, state, grads)
    params = optax.apply_updates(params, updates)
  return params, sparse_jax.get_masks(state)


@pytest.mark.parametrize("make", [
    lambda: sparse_jax.rigl(optax.adam(1e-2), sparsity=0.8, total_steps=12, update_every=2),
    lambda: sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=12,
                              end_step=8, update_every=2, scope="layerwise"),
    lambda: sparse_jax.rigl(optax.adam(1e-2), sparsity=0.8, total_steps=12, update_every=2,
                            growth="momentum"),
])
def test_parts_select_exactly_what_one_selection_does(monkeypatch, make):
  whole = _run(make(), _params())
  monkeypatch.setattr(_mask_update, "_SPLIT_FROM", 1)
  monkeypatch.setattr(_mask_update, "_PARTS", 3)
  assert len(_mask_update._layer_parts(jax.tree.leaves(_params()))) == 4
  parts = _run(make(), _params())
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The masks changed at the events (the comparison is not of untouched masks).
  start = sparse_jax.get_masks(make().init(_params()))
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(whole[1])))
