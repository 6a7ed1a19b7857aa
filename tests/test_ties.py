"""The tie split from packed bits (``_ties``) against the selection methods' own index
passes and a brute-force stable sort.

Blocks are made tiny (1-3 words of 32 positions) so that leaves span many blocks,
chunks and groups; the index passes (``SPARSE_JAX_TIE_SPLIT=passes``) are the
reference, bit for bit, for both selection methods.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from tests import mask_runs
from sparse_jax import _lazy
from sparse_jax import _select
from sparse_jax import _ties
from tests.test_selection_bisection import brute_force

SHAPES = [(6, 10), (7,), (4, 3, 2), (40, 50)]
GROUPINGS = [(0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 2, 3)]


@pytest.fixture
def tiny_blocks(monkeypatch):
  def set_blocks(block_words, chunk=None):
    monkeypatch.setattr(_ties, "BLOCK_WORDS", block_words)
    monkeypatch.setenv("SPARSE_JAX_TIE_SPLIT", "packed")
    if chunk:
      monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", chunk)
  return set_blocks


def _selections(keys, ks, groups, blocks, monkeypatch):
  """Masks and ``Selection`` numbers for each ``k`` in ``ks``, with the block split
  (``blocks``) or the index passes; one program, traced under the chosen path."""
  with monkeypatch.context() as m:
    if not blocks:
      m.setenv("SPARSE_JAX_TIE_SPLIT", "passes")
    f = jax.jit(lambda k: (_select.top_k_masks(keys, k, groups),
                           tuple(_select.top_k_selection(keys, k, groups))))
    return [f(k) for k in ks]


def _keys(seed):
  rng = np.random.default_rng(seed)
  keys = [rng.integers(0, 3, size=s).astype(np.uint32) for s in SHAPES]  # many ties
  keys[0][2, 3] = _select.FORCED
  keys[3][4, 7] = 9
  keys[3][30:] = rng.integers(0, 2, size=(10, 50))  # ties further on
  return [jnp.asarray(x) for x in keys]


def _ks(groups):
  sizes = np.bincount(groups, weights=[np.prod(s) for s in SHAPES]).astype(int)
  for frac in (0.0, 0.2, 0.5, 0.77, 1.0):
    yield jnp.asarray((frac * sizes).astype(np.int32))
  yield jnp.asarray(np.r_[sizes[:1] // 3, sizes[1:]].astype(np.int32))  # one splits, others all


@pytest.mark.parametrize("method,block_words,chunk", [
    ("radix", 1, None), ("radix", 2, 16), ("bisection", 3, 24), ("bisection", 128, 16)])
def test_block_cut_equals_the_index_passes_and_brute_force(monkeypatch, tiny_blocks, method,
                                                           block_words, chunk):
  monkeypatch.setenv("SPARSE_JAX_SELECTION", method)
  tiny_blocks(block_words, chunk)
  for seed, groups in enumerate(GROUPINGS):
    keys = _keys(seed)
    assert _ties.applies([_lazy.lazy(x) for x in keys], groups, method)
    ks = list(_ks(groups))
    got = _selections(keys, ks, groups, True, monkeypatch)
    want = _selections(keys, ks, groups, False, monkeypatch)
    for k, (masks, sel), (want_masks, want_sel) in zip(ks, got, want):
      for a, b in zip(sel, want_sel):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{groups} {k}")
      for a, b, c in zip(masks, want_masks, brute_force(keys, np.asarray(k), groups)):
        np.testing.assert_array_equal(np.asarray(a), c)
        np.testing.assert_array_equal(np.asarray(b), c)


ROW_SHAPES = [(13, 7), (9, 5), (11,), (41, 7)]


@pytest.mark.parametrize("method,block_words", [("radix", 1), ("radix", 3), ("bisection", 2)])
def test_block_cut_with_overlapping_row_chunks(monkeypatch, tiny_blocks, method, block_words):
  # Rows in units of 4 at 32 positions a chunk (_lazy.row_chunk_plan): (13, 7) in 4
  # chunks of 4 rows, (9, 5) in 3 and (41, 7) in 11, each last chunk reading again
  # 3 rows of the one before; ties there must count once, and each chunk's words
  # start at its own first row.
  monkeypatch.setenv("SPARSE_JAX_SELECTION", method)
  tiny_blocks(block_words, chunk=32)
  monkeypatch.setattr(_lazy, "VECTOR_QUANTUM", 4)
  monkeypatch.setattr(_lazy, "ROW_CHUNKS_FROM", 1)
  assert [_lazy.row_chunk_plan(s) for s in ROW_SHAPES] == [(4, 4), (4, 3), None, (4, 11)]
  rng = np.random.default_rng(7)
  keys = [jnp.asarray(rng.integers(0, 3, size=s).astype(np.uint32)) for s in ROW_SHAPES]
  for groups in [(0, 0, 0, 0), (0, 1, 0, 1), (0, 1, 2, 3)]:
    sizes = np.bincount(groups, weights=[np.prod(s) for s in ROW_SHAPES]).astype(int)
    ks = [jnp.asarray((f * sizes).astype(np.int32)) for f in (0.1, 0.45, 0.8)]
    got = _selections(keys, ks, groups, True, monkeypatch)
    want = _selections(keys, ks, groups, False, monkeypatch)
    for k, (masks, sel), (_, want_sel) in zip(ks, got, want):
      for a, b in zip(sel, want_sel):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{groups} {k}")
      for a, c in zip(masks, brute_force(keys, np.asarray(k), groups)):
        np.testing.assert_array_equal(np.asarray(a), c)


def test_hand_worked_cut(monkeypatch, tiny_blocks):
  tiny_blocks(1)
  keys = [jnp.full((2, 2), 5, jnp.uint32), jnp.full((3,), 5, jnp.uint32)]
  # One group of 7 ties, 5 taken: indices 0..4, cut ~4; the 5th tie is bit 0 of the
  # second leaf's word.
  [(masks, (thresh, cut, take))] = _selections(keys, [jnp.array([5])], (0, 0), True,
                                                monkeypatch)
  assert (thresh.tolist(), cut.tolist(), take.tolist()) == ([5], [2**32 - 1 - 4], [True])
  assert np.asarray(masks[1]).tolist() == [True, False, False]
  # Two groups: the first takes 3 of its 4 ties (cut ~2), the second all 3 (cut ~2,
  # its last tie), k = 0 would give ~0 = 2**32 - 1.
  ks = [jnp.array(k) for k in ([3, 3], [3, 0], [4, 3])]
  (_, (_, cut1, _)), (_, (_, cut2, take2)), (_, (_, cut3, _)) = _selections(
      keys, ks, (0, 1), True, monkeypatch)
  assert cut1.tolist() == [2**32 - 1 - 2, 2**32 - 1 - 2]
  assert cut2.tolist() == [2**32 - 1 - 2, 2**32 - 1] and take2.tolist() == [True, False]
  # No group splits: no pass runs, the cut is 0 as the index passes leave it.
  assert cut3.tolist() == [0, 0]


def test_stacked_slices_chunked(monkeypatch, tiny_blocks):
  tiny_blocks(1, chunk=24)  # each 8x12 layer in 4 chunks of 24, a word each
  rng = np.random.default_rng(3)
  w = jnp.asarray(np.round(rng.normal(size=(3, 8, 12)), 1), jnp.float32)
  m = jnp.asarray(rng.random((3, 8, 12)) < 0.6)
  lazy = [_lazy.Lazy(lambda index, w, m: _select.score_keys(w, m),
                     (_lazy.Slice(w, (i,)), _lazy.Slice(m, (i,)))) for i in range(3)]
  eager = [np.asarray(_select.score_keys(w[i], m[i])) for i in range(3)]
  for groups, k in [((0, 1, 2), [10, 0, 96]), ((0, 0, 0), [150]), ((0, 1, 0), [77, 40])]:
    k = jnp.asarray(k, jnp.int32)
    [(masks, sel)] = _selections(lazy, [k], groups, True, monkeypatch)
    [(_, want)] = _selections(lazy, [k], groups, False, monkeypatch)
    for a, b in zip(sel, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(masks, brute_force(eager, np.asarray(k), groups)):
      np.testing.assert_array_equal(np.asarray(a), b)


def test_where_the_packed_split_applies(monkeypatch):
  small = [_lazy.lazy(jnp.zeros((300, 100), jnp.uint32))]
  assert not _ties.applies(small, (0,), "radix")  # below RADIX_FROM: index passes
  assert _ties.applies(small, (0,), "bisection")
  big = [_lazy.lazy(jnp.zeros((2048, 1024), jnp.uint32))] * 2  # 2**22 together
  assert _ties.applies(big, (0, 0), "radix") and not _ties.applies(big, (0, 1), "radix")
  monkeypatch.setenv("SPARSE_JAX_TIE_SPLIT", "packed")
  assert _ties.applies(small, (0,), "radix")
  monkeypatch.setenv("SPARSE_JAX_TIE_SPLIT", "passes")
  assert not _ties.applies(big, (0, 0), "radix") and not _ties.applies(small, (0,), "bisection")
  monkeypatch.setenv("SPARSE_JAX_TIE_SPLIT", "bits")
  with pytest.raises(ValueError, match="SPARSE_JAX_TIE_SPLIT must be auto, packed or passes"):
    _ties.applies(small, (0,), "radix")


def _rounded_mlp(seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  sizes = (20, 32, 16, 4)
  return {f"Dense_{i}": {"kernel": jnp.round(4 * jax.random.normal(k, (a, b))) / 4,
                         "bias": jnp.zeros((b,))}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


@pytest.mark.parametrize("method", ["granet", "rigl"])
def test_mask_updates_equal_with_the_index_passes(monkeypatch, tiny_blocks, method):
  tiny_blocks(1, chunk=128)
  make = {"granet": lambda: sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
                                              initial_sparsity=0.5, total_steps=12,
                                              end_step=8, update_every=2),
          "rigl": lambda: sparse_jax.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                          total_steps=12, update_every=2)}[method]

  def masks_over_updates(blocks):
    with monkeypatch.context() as m:
      if not blocks:
        m.setenv("SPARSE_JAX_TIE_SPLIT", "passes")
      tx, params = make(), _rounded_mlp(0)
      state, update, out = tx.init(params), jax.jit(tx.update), []
      for t in range(5):
        updates, state = update(_rounded_mlp(10 + t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.tree.leaves(sparse_jax.get_masks(state)))
      return out

  got, want = masks_over_updates(True), masks_over_updates(False)
  mask_runs.assert_same_masks_that_change(got, want)
