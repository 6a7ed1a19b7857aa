"""Tests of sparse_jax._prune and sparse_jax._regrow (docs/algorithms.md §4 and §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_jax as sj

# Every function under test is jitted once; counts are traced arguments.
global_prune = jax.jit(sj.global_magnitude_prune)
layerwise_prune = jax.jit(sj.layerwise_magnitude_prune)
drop_smallest = jax.jit(sj.drop_smallest)
regrow_by_gradient = jax.jit(sj.regrow_by_gradient)
regrow_by_momentum = jax.jit(sj.regrow_by_momentum)
regrow_random = jax.jit(sj.regrow_random)


def _hand_tree():
  # a = [[0.1, -0.5], [0.3, 0.0]] with a[1,1] inactive; b all active; c dense bias.
  params = {"a": jnp.array([[0.1, -0.5], [0.3, 0.0]]),
            "b": jnp.array([[2.0, -0.05, 0.2]]),
            "c": jnp.array([1.0, -1.0])}
  masks = {"a": jnp.array([[True, True], [True, False]]),
           "b": jnp.array([[True, True, True]]),
           "c": None}
  return params, masks


def _np(masks):
  return {k: (None if v is None else np.asarray(v)) for k, v in masks.items()}


# ---------------------------------------------------------------------------
# Global magnitude prune
# ---------------------------------------------------------------------------


def test_global_prune_hand_tree():
  params, masks = _hand_tree()
  # Active magnitudes: a00 .1, a01 .5, a10 .3, b0 2.0, b1 .05, b2 .2 (6 active).
  # K = 3 keeps the three largest: b0 (2.0), a01 (0.5), a10 (0.3).
  new = _np(global_prune(params, masks, jnp.int32(3)))
  assert new["c"] is None
  np.testing.assert_array_equal(new["a"], [[False, True], [True, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, False]])
  # K = 4 adds b2 (0.2); K = 5 adds a00 (0.1); b1 (0.05) is the smallest.
  new = _np(global_prune(params, masks, jnp.int32(4)))
  np.testing.assert_array_equal(new["a"], [[False, True], [True, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, True]])
  new = _np(global_prune(params, masks, jnp.int32(5)))
  np.testing.assert_array_equal(new["a"], [[True, True], [True, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, True]])


def test_global_prune_k_at_or_above_active_prunes_nothing():
  params, masks = _hand_tree()
  for k in (6, 7, 100):
    new = _np(global_prune(params, masks, jnp.int32(k)))
    np.testing.assert_array_equal(new["a"], masks["a"])  # a[1,1] stays off
    np.testing.assert_array_equal(new["b"], masks["b"])


def test_global_prune_zero_weight_eligible_inactive_never_on():
  # a: three active weights, all exactly 0; b: position 0 is inactive with |w| = 7
  # (larger than anything active), position 1 active with 3.
  params = {"a": jnp.zeros((1, 3)), "b": jnp.array([[7.0, 3.0]])}
  masks = {"a": jnp.array([[True, True, True]]), "b": jnp.array([[False, True]])}
  # K = 3 of 4 active: keep b1 (3.0), then the zeros by index: a00, a01. b0 stays off.
  new = _np(global_prune(params, masks, jnp.int32(3)))
  np.testing.assert_array_equal(new["a"], [[True, True, False]])
  np.testing.assert_array_equal(new["b"], [[False, True]])
  # K = 4 (= active): nothing pruned, the zero weights stay active, b0 still off.
  new = _np(global_prune(params, masks, jnp.int32(4)))
  np.testing.assert_array_equal(new["a"], [[True, True, True]])
  np.testing.assert_array_equal(new["b"], [[False, True]])


def test_global_prune_every_layer_keeps_one():
  params, masks = _hand_tree()
  # Two layers; K = 1 and K = 0 are below the number of layers: each layer still
  # keeps its largest active weight (a01 = -0.5, b0 = 2.0).
  for k in (0, 1, 2):
    new = _np(global_prune(params, masks, jnp.int32(k)))
    np.testing.assert_array_equal(new["a"], [[False, True], [False, False]],
                                  err_msg=f"K={k}")
    np.testing.assert_array_equal(new["b"], [[True, False, False]], err_msg=f"K={k}")
  # A layer whose largest weight is globally tiny also survives a large prune.
  params = {"x": jnp.full((4, 4), 10.0), "y": jnp.full((2, 2), 1e-6)}
  masks = {"x": jnp.ones((4, 4), bool), "y": jnp.ones((2, 2), bool)}
  new = _np(global_prune(params, masks, jnp.int32(5)))
  assert new["y"].sum() == 1 and new["y"][0, 0]  # ties -> lowest index
  assert new["x"].sum() == 4  # the forced weight of y counts towards K = 5


def np_global_prune(ws, ms, k):
  """Brute force: per-layer argmax forced in, then the largest |w| by (|w|, index)."""
  flat_w = np.concatenate([np.abs(np.asarray(w, np.float32)).reshape(-1) for w in ws])
  flat_m = np.concatenate([np.asarray(m).reshape(-1) for m in ms])
  forced = np.zeros(flat_w.size, bool)
  off = 0
  for w, m in zip(ws, ms):
    n = np.size(w)
    mm = np.asarray(m).reshape(-1)
    if mm.any():
      aw = np.where(mm, np.abs(np.asarray(w, np.float32)).reshape(-1), -1.0)
      forced[off + int(np.argmax(aw))] = True  # argmax: lowest index on ties
    off += n
  active = int(flat_m.sum())
  k = min(max(k, int(forced.sum())), active)
  idx = np.arange(flat_w.size)
  # Rank: forced first, then |w| descending, then index ascending; inactive last.
  order = np.lexsort((idx, -flat_w, ~forced, ~flat_m))
  keep = np.zeros(flat_w.size, bool)
  keep[order[:k]] = True
  out, off = [], 0
  for w in ws:
    out.append(keep[off:off + np.size(w)].reshape(np.shape(w)))
    off += np.size(w)
  return out


SHAPES = [(2, 3), (1, 4), (3, 2)]


def _draw_tree(data, values=st.integers(-3, 3)):
  ws, ms = [], []
  for s in SHAPES:
    n = int(np.prod(s))
    ws.append(np.asarray(data.draw(st.lists(values, min_size=n, max_size=n)),
                         np.float32).reshape(s))
    ms.append(np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                         bool).reshape(s))
  return ws, ms


# The drawn values (small integers) are exact in every float dtype.
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                                 ids=["float32", "bfloat16", "float16"])


def _as_tree(ws, ms, dtype=jnp.float32):
  params = {"l0": jnp.asarray(ws[0], dtype), "l1": jnp.asarray(ws[1], dtype),
            "l2": jnp.asarray(ws[2], dtype), "z_bias": jnp.ones((3,), dtype)}
  masks = {"l0": jnp.asarray(ms[0]), "l1": jnp.asarray(ms[1]), "l2": jnp.asarray(ms[2]),
           "z_bias": None}
  return params, masks


def _layerwise_case(data, dtype, fn):
  """Draws a tree and a count per layer, applies ``fn`` (jitted, counts int32 [L]).

  Returns (values, mask, count, new flat mask) for each drawn layer.
  """
  vs, ms = _draw_tree(data)
  ns = [data.draw(st.integers(0, int(np.prod(s)))) for s in SHAPES]
  values, masks = _as_tree(vs, ms, dtype)
  new = fn(values, masks, jnp.asarray(ns, jnp.int32))
  return [(v, m, n, np.asarray(new[name]).reshape(-1))
          for name, v, m, n in zip(("l0", "l1", "l2"), vs, ms, ns)]


def _np_largest(values, eligible, n):
  """Brute force, flat: the ``n`` eligible positions of largest |value| (ties: lower index)."""
  flat = np.abs(values).reshape(-1)
  order = np.lexsort((np.arange(flat.size), -flat, ~eligible.reshape(-1)))  # eligible first
  out = np.zeros(flat.size, bool)
  out[order[:n]] = True
  return out


@DTYPES
@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_global_prune_matches_brute_force(data, dtype):
  ws, ms = _draw_tree(data)
  k = data.draw(st.integers(0, 16))
  params, masks = _as_tree(ws, ms, dtype)
  new = global_prune(params, masks, jnp.int32(k))
  want = np_global_prune(ws, ms, k)
  got = [np.asarray(new[n]) for n in ("l0", "l1", "l2")]
  for g, w, m in zip(got, want, ms):
    np.testing.assert_array_equal(g, w)
    assert not np.any(g & ~m)  # subset of the old mask
  assert new["z_bias"] is None
  active = int(sum(m.sum() for m in ms))
  nonempty = sum(bool(m.any()) for m in ms)
  assert sum(int(g.sum()) for g in got) == min(max(k, nonempty), active)


def test_global_prune_bfloat16():
  params, masks = _hand_tree()
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  new = _np(global_prune(params, masks, jnp.int32(3)))
  np.testing.assert_array_equal(new["a"], [[False, True], [True, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, False]])


# ---------------------------------------------------------------------------
# Layer-wise prune and drop
# ---------------------------------------------------------------------------


def test_layerwise_prune_hand_tree():
  params, masks = _hand_tree()
  # a keeps its largest active (a01 = -0.5); b keeps 2.0 and 0.2.
  new = _np(layerwise_prune(params, masks, jnp.array([1, 2])))
  np.testing.assert_array_equal(new["a"], [[False, True], [False, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, True]])
  assert new["c"] is None
  # Clipped to [1, active_l]: 0 keeps one; 10 keeps all active (never grows a[1,1]).
  new = _np(layerwise_prune(params, masks, jnp.array([10, 0])))
  np.testing.assert_array_equal(new["a"], masks["a"])
  np.testing.assert_array_equal(new["b"], [[True, False, False]])


@DTYPES
@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_layerwise_prune_matches_brute_force(data, dtype):
  for w, m, k, got in _layerwise_case(data, dtype, layerwise_prune):
    active = int(m.sum())
    want = _np_largest(w, m, min(max(k, min(active, 1)), active))
    np.testing.assert_array_equal(got, want)


def test_drop_smallest_hand_tree():
  params, masks = _hand_tree()
  # a has 3 active (0.1, 0.5, 0.3): drop 2 -> keep a01. b: drop 1 -> b1 (0.05) goes.
  new = _np(drop_smallest(params, masks, jnp.array([2, 1])))
  np.testing.assert_array_equal(new["a"], [[False, True], [False, False]])
  np.testing.assert_array_equal(new["b"], [[True, False, True]])
  # Dropping more than the active count keeps one weight; dropping 0 keeps all.
  new = _np(drop_smallest(params, masks, jnp.array([5, 0])))
  np.testing.assert_array_equal(new["a"], [[False, True], [False, False]])
  np.testing.assert_array_equal(new["b"], masks["b"])


def test_layer_active_counts():
  _, masks = _hand_tree()
  assert jax.jit(sj.layer_active_counts)(masks).tolist() == [3, 3]


# ---------------------------------------------------------------------------
# Regrowth
# ---------------------------------------------------------------------------


def test_regrow_by_gradient_hand():
  _, masks = _hand_tree()
  masks = dict(masks, a=jnp.array([[True, False], [False, False]]),
               b=jnp.array([[True, False, True]]))
  # The active a00 has the largest gradient but must never be picked.
  grads = {"a": jnp.array([[100.0, 1.0], [-3.0, 2.0]]),
           "b": jnp.array([[50.0, -0.1, 9.0]]),
           "c": jnp.array([1e9, 1e9])}
  new = _np(regrow_by_gradient(grads, masks, jnp.array([2, 1])))
  # a grows the inactive positions with largest |g|: a10 (3) and a11 (2).
  np.testing.assert_array_equal(new["a"], [[True, False], [True, True]])
  # b has one inactive position (b1); it is grown whatever its gradient.
  np.testing.assert_array_equal(new["b"], [[True, True, True]])
  assert new["c"] is None
  # Clipped to the inactive count: asking for 10 grows the 3 inactive of a, b full.
  new = _np(regrow_by_gradient(grads, masks, jnp.array([10, 10])))
  assert new["a"].all() and new["b"].all()
  # Zero growth: unchanged.
  new = _np(regrow_by_gradient(grads, masks, jnp.array([0, 0])))
  np.testing.assert_array_equal(new["a"], masks["a"])
  np.testing.assert_array_equal(new["b"], masks["b"])


@DTYPES
@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_regrow_by_gradient_matches_brute_force(data, dtype):
  for g, m, n, got in _layerwise_case(data, dtype, regrow_by_gradient):
    flat_m = m.reshape(-1)
    grown = min(n, int((~flat_m).sum()))
    want = flat_m | _np_largest(g, ~m, grown)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == flat_m.sum() + grown  # exactly n grown (clipped)
    assert np.all(got[flat_m])  # a superset: active positions stay active


def test_regrow_by_momentum_hand():
  masks = {"w": jnp.array([[True, False, False, False]]), "v": None}
  momentum = {"w": jnp.array([[9.0, -0.5, 4.0, 0.25]]), "v": jnp.ones((2,))}
  new = regrow_by_momentum(momentum, masks, jnp.array([2]))
  # Inactive |momentum|: 0.5, 4.0, 0.25 -> grow w2 (4.0) and w1 (0.5).
  np.testing.assert_array_equal(new["w"], [[True, True, True, False]])
  assert new["v"] is None


def test_regrow_random_exact_count_and_seed():
  masks = {"w": jnp.zeros((10, 10), bool).at[0, :5].set(True),
           "v": jnp.zeros((3, 4), bool).at[1, 1].set(True),
           "bias": None}
  n = jnp.array([3, 20])  # flattening order: bias (None), v, w
  m0 = regrow_random(jax.random.PRNGKey(0), masks, n)
  m1 = regrow_random(jax.random.PRNGKey(1), masks, n)
  for m in (m0, m1):
    assert m["bias"] is None
    assert int(m["w"].sum()) == 25 and int(m["v"].sum()) == 4
    assert bool(m["w"][0, :5].all()) and bool(m["v"][1, 1])  # old mask kept
  assert not np.array_equal(m0["w"], m1["w"])
  np.testing.assert_array_equal(regrow_random(jax.random.PRNGKey(0), masks, n)["w"], m0["w"])
  # Clipped to the inactive count.
  full = regrow_random(jax.random.PRNGKey(2), masks, jnp.array([1000, 1000]))
  assert bool(full["w"].all()) and bool(full["v"].all())


def test_regrow_random_is_roughly_uniform():
  # Growing 1 of 8 inactive positions over many seeds hits every position.
  masks = {"w": jnp.zeros((1, 8), bool)}
  grow = jax.jit(jax.vmap(lambda k: sj.regrow_random(k, masks, jnp.array([1]))["w"]))
  hits = np.asarray(grow(jax.random.split(jax.random.PRNGKey(0), 400))).sum(axis=0)
  assert hits.sum() == 400
  assert np.all(hits[0] > 20)  # expected 50 each


def test_regrow_random_hash_stream_is_uniform_and_chunk_invariant(monkeypatch):
  # The random keys are a hash of (flat index, two words per layer). Grow 60 of
  # 600 positions (p = 0.1) with 500 keys: each position's hit count is ~
  # Binomial(500, 0.1) (mean 50, variance 45), so the chi-square ratio is ~1
  # (sd ~0.06), and neighbours are hit together as often as independence says
  # (500 * 0.1**2 = 5 per pair, 599 pairs).
  masks = {"w": jnp.zeros((20, 30), bool)}
  grow = jax.jit(jax.vmap(lambda k: sj.regrow_random(k, masks, jnp.array([60]))["w"]))
  keys = jax.random.split(jax.random.PRNGKey(3), 500)
  picks = np.asarray(grow(keys)).reshape(500, -1)
  assert np.all(picks.sum(axis=1) == 60)
  hits = picks.sum(axis=0)
  ratio = np.sum((hits - 50.0) ** 2 / 45.0) / hits.size
  assert 0.75 < ratio < 1.25, ratio
  together = np.sum(picks[:, 1:] & picks[:, :-1])
  assert 0.8 * 2995 < together < 1.2 * 2995, together
  # Chunked selection (forced by a tiny chunk bound) picks the same positions.
  monkeypatch.setattr(sj._lazy, "CHUNK_ELEMENTS", 64)
  chunked = jax.jit(lambda k: sj.regrow_random(k, masks, jnp.array([60]))["w"])
  np.testing.assert_array_equal(np.asarray(chunked(keys[7])).reshape(-1), picks[7])


def test_drop_then_grow_keeps_per_layer_counts_bfloat16():
  # The RigL/GraNet exchange on bfloat16 params: drop n, regrow n by gradient.
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (8, 6)).astype(jnp.bfloat16),
            "u": jax.random.normal(jax.random.PRNGKey(1), (6, 4)).astype(jnp.bfloat16)}
  masks = sj.masks_from_params(
      jax.tree.map(lambda p: jnp.where(jnp.abs(p) > 0.5, p, 0), params))
  grads = jax.tree.map(lambda p: jnp.cos(p.astype(jnp.float32) * 7).astype(jnp.bfloat16),
                       params)

  @jax.jit
  def exchange(params, masks, grads, n):
    dropped = sj.drop_smallest(params, masks, n)
    grown = sj.regrow_by_gradient(grads, dropped, sj.layer_active_counts(masks)
                                  - sj.layer_active_counts(dropped))
    return dropped, grown

  n = jnp.array([3, 2])  # leaves flatten as u, w
  dropped, grown = exchange(params, masks, grads, n)
  before = sj.layer_active_counts(masks)
  assert (before - sj.layer_active_counts(dropped)).tolist() == [3, 2]
  assert sj.layer_active_counts(grown).tolist() == before.tolist()
  # The dropped weights are the smallest active ones in each layer.
  for name, k in (("u", 3), ("w", 2)):
    w = np.abs(np.asarray(params[name], np.float32)).reshape(-1)
    m = np.asarray(masks[name]).reshape(-1)
    gone = m & ~np.asarray(dropped[name]).reshape(-1)
    order = np.lexsort((np.arange(w.size), w, ~m))  # active first, ascending |w|
    np.testing.assert_array_equal(np.flatnonzero(gone), np.sort(order[:k]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_exact_counts_on_values_computed_in_the_same_program(dtype):
  # The values ranked are computed in the caller's jit (p * 0.9 + u, as after an
  # update). Each selection pass is its own fusion; in bfloat16 XLA kept the
  # values in float32 in one and rounded them in another, and 44 of 100 such
  # prunes (and growths) missed their count by one or more.
  wrap = lambda f: jax.jit(lambda p, u, m, n: f({"w": p * 0.9 + u}, m, n))
  fns = {"global": wrap(sj.global_magnitude_prune), "layer": wrap(sj.layerwise_magnitude_prune),
         "drop": wrap(sj.drop_smallest), "grow": wrap(sj.regrow_by_gradient)}
  rng = np.random.default_rng(0)
  for _ in range(30):
    p = jnp.asarray(rng.normal(size=(4, 5)), dtype)
    u = jnp.asarray(rng.normal(size=(4, 5)) * 0.05, dtype)
    m = {"w": jnp.asarray(rng.random((4, 5)) < 0.6)}
    a = int(m["w"].sum())
    k = max(a // 2, 1)
    count = lambda name, n: int(fns[name](p, u, m, n)["w"].sum())
    assert count("global", jnp.int32(k)) == k
    assert count("layer", jnp.array([k])) == k
    assert count("drop", jnp.array([a - k])) == k
    assert count("grow", jnp.array([3])) == min(a + 3, 20)
