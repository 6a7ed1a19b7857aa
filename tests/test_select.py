"""Tests of sparse_jax._select: exact top-k by counting, ties to the lower index."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_jax import _lazy
from sparse_jax import _select
from sparse_jax import _sources

# Fixed leaf shapes so that hypothesis only changes values (traced), never shapes:
# a handful of compilations in total.
CONFIGS = {
    1: [(7,)],
    2: [(2, 3), (4,)],
    3: [(2, 3), (4,), (3, 2)],
}


@functools.partial(jax.jit, static_argnames="groups")
def _top_k(keys, k, groups):
  return _select.top_k_masks(keys, k, groups=groups)


def brute_force_top_k(keys, k, groups):
  """k[g] largest keys of each group, ties to the lower flat index (numpy)."""
  keys = [np.asarray(x) for x in keys]
  out = [np.zeros(x.shape, bool) for x in keys]
  for g in sorted(set(groups)):
    members = [i for i, gg in enumerate(groups) if gg == g]
    flat = np.concatenate([keys[i].reshape(-1).astype(np.int64) for i in members])
    index = np.arange(flat.size)
    order = np.lexsort((index, -flat))  # primary: key descending; then index ascending
    chosen = np.zeros(flat.size, bool)
    chosen[order[:int(k[g])]] = True
    off = 0
    for i in members:
      n = keys[i].size
      out[i] = chosen[off:off + n].reshape(keys[i].shape)
      off += n
  return out


# Mostly tiny values (lots of ties, including the non-candidate key 0), plus a few of
# the largest keys score_keys can produce and the FORCED key.
KEY_VALUES = st.one_of(
    st.integers(0, 4),
    st.sampled_from([2**31 - 1, 2**31, _select.FORCED]),
)


@settings(deadline=None, max_examples=30)
@given(
    num_leaves=st.sampled_from([1, 2, 3]),
    per_leaf=st.booleans(),
    data=st.data(),
)
def test_top_k_matches_brute_force(num_leaves, per_leaf, data):
  shapes = CONFIGS[num_leaves]
  keys = [
      np.asarray(data.draw(st.lists(KEY_VALUES, min_size=int(np.prod(s)),
                                    max_size=int(np.prod(s)))), np.uint32).reshape(s)
      for s in shapes]
  groups = tuple(range(num_leaves)) if per_leaf else (0,) * num_leaves
  sizes = [sum(int(np.prod(shapes[i])) for i in range(num_leaves) if groups[i] == g)
           for g in range(max(groups) + 1)]
  k = np.asarray([data.draw(st.integers(0, n)) for n in sizes], np.int32)
  got = _top_k([jnp.asarray(x) for x in keys], jnp.asarray(k), groups)
  want = brute_force_top_k(keys, k, groups)
  for g_leaf, w_leaf in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g_leaf), w_leaf)
  # Exactly k per group.
  for g in range(max(groups) + 1):
    assert sum(int(np.sum(got[i])) for i in range(num_leaves) if groups[i] == g) == k[g]


@settings(deadline=None, max_examples=20)
@given(data=st.data())
def test_top_k_mixed_groups(data):
  # Leaves 0 and 2 share group 0, leaf 1 is alone in group 1.
  shapes = CONFIGS[3]
  keys = [np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=int(np.prod(s)),
                                        max_size=int(np.prod(s)))), np.uint32).reshape(s)
          for s in shapes]
  groups = (0, 1, 0)
  k = np.asarray([data.draw(st.integers(0, 12)), data.draw(st.integers(0, 4))], np.int32)
  got = _top_k([jnp.asarray(x) for x in keys], jnp.asarray(k), groups)
  for g_leaf, w_leaf in zip(got, brute_force_top_k(keys, k, groups)):
    np.testing.assert_array_equal(np.asarray(g_leaf), w_leaf)


def test_tie_break_to_lower_flat_index_across_leaves():
  # All keys equal: the selection is the first k positions of the concatenation of
  # the leaves in list (flattening) order, row-major inside each leaf.
  keys = [jnp.full((2, 2), 5, jnp.uint32), jnp.full((3,), 5, jnp.uint32)]
  got = _top_k(keys, jnp.array([5]), (0, 0))
  np.testing.assert_array_equal(got[0], [[True, True], [True, True]])
  np.testing.assert_array_equal(got[1], [True, False, False])
  # With a larger key in the second leaf: it goes first, then the ties by index.
  keys = [jnp.array([[5, 5], [5, 5]], jnp.uint32), jnp.array([5, 5, 9], jnp.uint32)]
  got = _top_k(keys, jnp.array([3]), (0, 0))
  np.testing.assert_array_equal(got[0], [[True, True], [False, False]])
  np.testing.assert_array_equal(got[1], [False, False, True])


def test_top_k_exact_count_and_zero_keys():
  # 3 positive keys; asking for 5 takes the zero (non-candidate) keys by index.
  keys = [jnp.array([0, 7, 0, 3, 0, 0, 1], jnp.uint32)]
  got = _top_k(keys, jnp.array([5]), (0,))
  np.testing.assert_array_equal(got[0], [True, True, True, True, False, False, True])
  got = _top_k(keys, jnp.array([0]), (0,))
  assert not bool(got[0].any())
  got = _top_k(keys, jnp.array([7]), (0,))
  assert bool(got[0].all())


def test_top_k_larger_random_against_brute_force():
  # A larger single case with random 32-bit-ish keys and duplicates.
  rng = np.random.default_rng(0)
  keys = [rng.integers(0, 50, size=(40, 25)).astype(np.uint32),
          (rng.integers(0, 2**31, size=(300,)) | 1).astype(np.uint32)]
  for groups, k in [((0, 0), [517]), ((0, 1), [333, 17])]:
    got = _top_k([jnp.asarray(x) for x in keys], jnp.asarray(k, jnp.int32), groups)
    for g_leaf, w_leaf in zip(got, brute_force_top_k(keys, k, groups)):
      np.testing.assert_array_equal(np.asarray(g_leaf), w_leaf)


# ---------------------------------------------------------------------------
# score_keys
# ---------------------------------------------------------------------------


def _assert_same_order(x, keys):
  """Pairwise <, == of the values and of the keys agree (inf-safe, no subtraction)."""
  np.testing.assert_array_equal(x[:, None] < x[None, :], keys[:, None] < keys[None, :])
  np.testing.assert_array_equal(x[:, None] == x[None, :], keys[:, None] == keys[None, :])


# Non-negative float32 values (zero, subnormals, normals, +inf) drawn as their bit
# patterns: every draw is valid, so Hypothesis filters nothing (st.floats(width=32)
# rejects float64 draws and tripped the filter health check at random).
NON_NEGATIVE_FLOAT32_BITS = st.integers(0, 0x7F800000)


@settings(deadline=None, max_examples=25)
@given(st.lists(NON_NEGATIVE_FLOAT32_BITS, min_size=12, max_size=12))
def test_score_keys_preserve_order_float32(bits):
  x = np.asarray(bits, np.uint32).view(np.float32).copy()
  x[:2] = [0.0, 0.0]  # always include zeros
  keys = np.asarray(jax.jit(_select.score_keys)(jnp.asarray(x))).astype(np.int64)
  # Keys order exactly like the values (equal values <-> equal keys), and are > 0.
  assert np.all(keys > 0)
  _assert_same_order(x, keys)


def test_score_keys_bfloat16_zeros_negatives_and_candidates():
  vals = np.array([0.0, -0.0, 1e-40, 1e-3, 0.5, 1.0, 1.0078125, 3.0, 65504.0, np.inf],
                  np.float32)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    x = jnp.asarray(vals).astype(dtype)
    keys = np.asarray(jax.jit(_select.score_keys)(x)).astype(np.int64)
    xf = np.asarray(x.astype(jnp.float32))
    _assert_same_order(xf, keys)
    # Zero (and -0) map to key 1, the smallest candidate key.
    assert keys[0] == 1 and keys[1] == 1
  # Negative scores count by their magnitude.
  k_neg = np.asarray(_select.score_keys(jnp.array([-2.0, 2.0, -0.5])))
  assert k_neg[0] == k_neg[1] > k_neg[2]
  # Non-candidates get 0, candidates keep their key (also a zero score: key 1).
  cand = jnp.array([True, False, True, False])
  keys = np.asarray(jax.jit(_select.score_keys)(jnp.array([0.0, 5.0, 2.0, 0.0]), cand))
  assert keys.dtype == np.uint32
  assert keys[1] == 0 and keys[3] == 0
  assert keys[0] == 1 and keys[2] > 1


def _threshold(out):
  """kth_largest_key returns the threshold, or (threshold, #(>= t), #(> t))."""
  return out[0] if isinstance(out, tuple) else out


def test_kth_largest_key():
  keys = [jnp.array([3, 1, 4, 1, 5], jnp.uint32), jnp.array([9, 2, 6], jnp.uint32)]
  # Global: sorted desc 9 6 5 4 3 2 1 1 -> 3rd largest is 5 (3 keys >= 5, 2 keys > 5).
  out = jax.jit(lambda ks, k: _select.kth_largest_key(ks, k, (0, 0)))(keys, jnp.array([3]))
  assert _threshold(out).tolist() == [5]
  if isinstance(out, tuple):
    assert out[1].tolist() == [3] and out[2].tolist() == [2]
  # Per leaf: 2nd largest of [3,1,4,1,5] is 4; 1st of [9,2,6] is 9.
  out = jax.jit(lambda ks, k: _select.kth_largest_key(ks, k, (0, 1)))(keys, jnp.array([2, 1]))
  assert _threshold(out).tolist() == [4, 9]
  # Ties: the 3rd largest of [7, 7, 7, 2] is 7 (3 keys >= 7, none above).
  out = jax.jit(lambda ks, k: _select.kth_largest_key(ks, k, (0,)))(
      [jnp.array([7, 2, 7, 7], jnp.uint32)], jnp.array([3]))
  assert _threshold(out).tolist() == [7]
  if isinstance(out, tuple):
    assert out[1].tolist() == [3] and out[2].tolist() == [0]


def _digit_by_hand(hist, k):
  """The largest digit d with #(digit >= d) >= k (0 if none), and the counts above/at d."""
  incl = np.cumsum(hist[::-1])[::-1]
  reaching = np.nonzero(incl >= k)[0]
  d = int(reaching[-1]) if reaching.size else 0
  return d, int(incl[d] - hist[d]), int(hist[d])


def test_select_digit_matches_suffix_counts_by_hand():
  """The digit search (two steps over blocks of 2**8 bins) against plain suffix sums,
  on sparse and dense histograms, with k at 0, at a block edge, exact and beyond the total."""
  rng = np.random.default_rng(3)
  hists, ks = [], []
  for density in (1e-4, 0.01, 0.5, 1.0):
    for _ in range(3):
      h = rng.integers(0, 40, 2**16) * (rng.random(2**16) < density)
      total = int(h.sum())
      hists += [h] * 4
      ks += [0, total, total + 1, int(rng.integers(1, total + 1)) if total else 1]
  h = np.zeros(2**16, np.int64)
  h[[255, 256, 65535]] = [2**30, 5, 7]  # counts near int32's range, edge bins
  hists += [h] * 3
  ks += [7, 12, 2**30 + 12]
  got = jax.jit(_select._select_digit)(jnp.asarray(np.stack(hists), jnp.int32),
                                       jnp.asarray(ks, jnp.int32))
  got = np.stack([np.asarray(x) for x in got], axis=1)
  want = np.array([_digit_by_hand(h, k) for h, k in zip(hists, ks)])
  np.testing.assert_array_equal(got, want)
  assert want[-3:].tolist() == [[65535, 0, 7], [256, 7, 5], [255, 12, 2**30]]


@pytest.mark.parametrize("n", [0, 1])
def test_top_k_tiny(n):
  got = _top_k([jnp.array([2], jnp.uint32)], jnp.array([n]), (0,))
  assert got[0].tolist() == [bool(n)]


# chunked histograms (large leaves): forced on small leaves by lowering the bound


def test_chunk_plan_hand_values():
  # Below the bound: one piece.
  assert _lazy.chunk_plan((100, 10), 1000) is None
  # 4096x4096 at 2**20 per chunk: 16 chunks of rows (4096 / 16 = 256 = 2**8).
  assert _lazy.chunk_plan((4096, 4096), 2**20) == (0, 16)
  # 784 = 16 * 49 rows, need 4: the divisors 4..16 of 784 are 4, 7, 8, 14, 16,
  # leaving 196, 112, 98, 56, 49 rows per chunk with 2, 4, 1, 3, 0 factors of 2.
  assert _lazy.chunk_plan((784, 4096), 2**20) == (0, 7)
  # 2560 = 2**9 * 5 rows, need 10: divisors 10..40 of 2560: 10, 16, 20, 32, 40;
  # 2560/c = 256, 160, 128, 80, 64 -> factors of 2: 8, 5, 7, 4, 6 -> c = 10.
  assert _lazy.chunk_plan((2560, 4096), 2**20) == (0, 10)
  # The first axis too short (3 < need 5): split the next one.
  assert _lazy.chunk_plan((3, 3, 64, 64), 8192) == (2, 8)


def _assert_top_k_fractions_match_brute_force(keys, groups):
  """top_k_masks of 0%, 13%, 50%, 91% and 100% of each group equal brute force."""
  top_k = jax.jit(lambda ks, k: _select.top_k_masks(ks, k, groups))
  sizes = [sum(x.size for x, g_of in zip(keys, groups) if g_of == g)
           for g in range(max(groups) + 1)]
  for frac in (0.0, 0.13, 0.5, 0.91, 1.0):
    k = np.asarray([int(frac * n) for n in sizes], np.int32)
    got = top_k([jnp.asarray(x) for x in keys], jnp.asarray(k))
    for g_leaf, w_leaf in zip(got, brute_force_top_k(keys, k, groups)):
      np.testing.assert_array_equal(np.asarray(g_leaf), w_leaf)


CHUNKED_CASES = [
    # (shapes, groups, max elements per chunk)
    ([(12, 5), (7,), (4, 3, 2)], (0, 0, 0), 16),
    ([(12, 5), (7,), (4, 3, 2)], (0, 1, 2), 16),
    ([(30, 4), (9, 8)], (0, 1), 20),
]


@pytest.mark.parametrize("flat", [True, False], ids=["flat_chunks", "strided_chunks"])
@pytest.mark.parametrize("copies_from", [2**18, 1], ids=["one_copy", "interleaved_copies"])
@pytest.mark.parametrize("shapes,groups,bound", CHUNKED_CASES)
def test_chunked_top_k_matches_brute_force(monkeypatch, shapes, groups, bound, copies_from,
                                           flat):
  # copies_from=1: every group's histogram in _COPIES interleaved copies (as groups
  # of >= 2**18 elements are), summed at the end: the counts must not change.
  # flat: 1-d contiguous chunks (one device) or strided n-d ones (several devices).
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", bound)
  monkeypatch.setattr(_select, "_COPIES_FROM", copies_from)
  monkeypatch.setattr(_select, "_flat_indices", lambda: flat)
  assert all(_lazy.chunk_plan(s) is not None for s in shapes if np.prod(s) > bound)
  rng = np.random.default_rng(1)
  keys = [rng.integers(0, 4, size=s).astype(np.uint32) for s in shapes]  # many ties
  keys[0][0, 0] = _select.FORCED
  _assert_top_k_fractions_match_brute_force(keys, groups)


def test_flat_chunks_are_contiguous_pieces_of_the_flattened_leaf(monkeypatch):
  # (6, 10) at 20 elements a chunk: chunk_plan splits the rows by 3, so 3 pieces of
  # 20 flat positions each; a Slice of a stacked array is cut the same way.
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 20)
  stacked = np.arange(120, dtype=np.float32).reshape(2, 6, 10) * 0.5
  x = jnp.asarray(stacked[1] + 1000.0)
  sources = [x, _lazy.Slice(jnp.asarray(stacked), (1,))]
  c, chunk = _lazy.flat_chunks(sources)
  assert (c, _lazy.flat_chunk_size((6, 10))) == (3, 20)
  for i in range(3):
    index, new, a, b = chunk(jnp.int32(i))
    assert new is None  # exact pieces (a leaf below ROW_CHUNKS_FROM): every position new
    np.testing.assert_array_equal(np.asarray(index), np.arange(20 * i, 20 * i + 20))
    np.testing.assert_array_equal(np.asarray(a), stacked[1].reshape(-1)[20 * i:20 * i + 20] + 1000)
    np.testing.assert_array_equal(np.asarray(b), stacked[1].reshape(-1)[20 * i:20 * i + 20])


def test_row_chunk_plan_by_hand(monkeypatch):
  # 3679 x 3679 (the 30M scaling MLP): 13 pieces of 1041157 positions (odd). Rows
  # come in units of 32 (3679 is odd), k * 3679 <= 2**20 (k <= 285), and chunk i
  # costs its positions plus 2**16: ceil(3679 / k) * (3679 k + 65536) is 15.56M at
  # k = 128, 15.05M at 160, 15.44M at 192, 15.12M at 224, 15.11M at 256.
  assert _lazy.row_chunk_plan((3679, 3679)) == (160, 23)
  # 784 x 3679: 7 pieces of 412048 = 16 * 25753, not whole words; 5 chunks of 160
  # rows (3.27M) beat 4 of 224 (3.56M) and 7 of 128 (3.76M).
  assert _lazy.row_chunk_plan((784, 3679)) == (160, 5)
  assert _lazy.row_chunk_plan((4096, 4096)) is None  # pieces of 2**20
  assert _lazy.row_chunk_plan((535, 535)) == (288, 2)  # 286225 (odd): 2 chunks, 576 rows
  assert _lazy.row_chunk_plan((301, 300)) is None  # 90300 < 2**18: stays whole
  assert _lazy.row_chunk_plan((2**19 + 1,)) is None  # 1-d: no rows
  # 10 x 9 at 40 a chunk, units of 4 rows: k = 4 is the only size (8 * 9 > 40), 3
  # chunks reading 12 rows > 10 * 17 / 16: still the fewest rows read.
  monkeypatch.setattr(_lazy, "VECTOR_QUANTUM", 4)
  monkeypatch.setattr(_lazy, "ROW_CHUNKS_FROM", 1)
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 40)
  assert _lazy.row_chunk_plan((10, 9)) == (4, 3)
  assert _lazy.row_chunk_plan((10, 8)) is None  # 5 pieces of 16, a multiple of 4


def test_row_chunks_repeat_only_rows_an_earlier_chunk_read(monkeypatch):
  # (10, 9) in 3 chunks of 4 rows: rows 0-3, 4-7 and 6-9, of which rows 6 and 7
  # (positions 54-71) are not new. Arrays, Slices and Packed masks read alike.
  monkeypatch.setattr(_lazy, "VECTOR_QUANTUM", 4)
  monkeypatch.setattr(_lazy, "ROW_CHUNKS_FROM", 1)
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 40)
  rng = np.random.default_rng(4)
  stacked = rng.normal(size=(2, 10, 9)).astype(np.float32)
  mask = rng.random((10, 9)) < 0.5
  sources = [jnp.asarray(stacked[0]), _lazy.Slice(jnp.asarray(stacked), (1,)),
             _sources.pack(jnp.asarray(mask))]
  c, chunk = _lazy.flat_chunks(sources)
  assert c == 3
  c, n, starts = _lazy.flat_layout((10, 9))  # what the tie split reads
  assert (c, n, starts.tolist()) == (3, 36, [0, 36, 54])
  for i, first_row in enumerate((0, 4, 6)):
    index, new, a, b, m = chunk(jnp.int32(i))
    want = np.arange(first_row * 9, first_row * 9 + 36)
    np.testing.assert_array_equal(np.asarray(index), want)
    np.testing.assert_array_equal(np.asarray(new), want >= 36 * i)
    np.testing.assert_array_equal(np.asarray(a), stacked[0].reshape(-1)[want])
    np.testing.assert_array_equal(np.asarray(b), stacked[1].reshape(-1)[want])
    np.testing.assert_array_equal(np.asarray(m), mask.reshape(-1)[want])


ROW_CASES = [
    # (shapes, groups): at 32 elements a chunk and units of 4 rows, (13, 7) is read
    # in 4 chunks of 4 rows (3 repeated), (9, 5) in 3 (3 repeated), (11,) whole.
    ([(13, 7), (9, 5), (11,)], (0, 0, 0)),
    ([(13, 7), (9, 5), (11,)], (0, 1, 2)),
]


@pytest.mark.parametrize("copies_from", [2**18, 1], ids=["one_copy", "interleaved_copies"])
@pytest.mark.parametrize("shapes,groups", ROW_CASES)
def test_row_chunked_top_k_matches_brute_force(monkeypatch, shapes, groups, copies_from):
  monkeypatch.setattr(_lazy, "VECTOR_QUANTUM", 4)
  monkeypatch.setattr(_lazy, "ROW_CHUNKS_FROM", 1)
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 32)
  monkeypatch.setattr(_select, "_COPIES_FROM", copies_from)
  monkeypatch.setattr(_select, "_flat_indices", lambda: True)
  assert _lazy.row_chunk_plan((13, 7)) == (4, 4)
  assert _lazy.row_chunk_plan((9, 5)) == (4, 3)
  rng = np.random.default_rng(5)
  keys = [rng.integers(0, 4, size=s).astype(np.uint32) for s in shapes]  # many ties
  keys[0][10, 3] = _select.FORCED  # rows the last chunk reads again: counted once
  keys[1][6, 0] = _select.FORCED
  _assert_top_k_fractions_match_brute_force(keys, groups)


def test_lazy_keys_are_computed_from_their_sources(monkeypatch):
  # Lazy keys with the index: keys = |w| except a forced position picked by index,
  # selected chunk by chunk, equal the same keys given as a materialised array.
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 10)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 6)), jnp.float32)
  m = jnp.asarray(np.random.default_rng(3).random((8, 6)) < 0.7)
  fn = lambda index, w, m: jnp.where(index == 17, jnp.uint32(_select.FORCED),
                                     _select.score_keys(w, m))
  lazy = _lazy.Lazy(fn, (w, m))
  eager = np.asarray(fn(jnp.arange(48, dtype=jnp.uint32).reshape(8, 6), w, m))
  np.testing.assert_array_equal(np.asarray(lazy.compute()), eager)
  got = jax.jit(lambda: _select.top_k_masks([lazy], jnp.array([9]), (0,)))()[0]
  np.testing.assert_array_equal(np.asarray(got), brute_force_top_k([eager], [9], (0,))[0])
  assert bool(got.reshape(-1)[17])


def test_set_chunk_elements_sets_the_bound_and_rejects_nonsense():
  import sparse_jax
  old = sparse_jax.get_chunk_elements()
  try:
    sparse_jax.set_chunk_elements(1000)
    # 2000 elements, need 2: divisors 2..8 of 100 are 2, 4, 5, leaving 50, 25, 20
    # rows per chunk with 1, 0, 2 factors of 2 -> 5 chunks.
    assert _lazy.chunk_plan((100, 20)) == (0, 5)
    sparse_jax.set_chunk_elements(2**24)
    assert _lazy.chunk_plan((4096, 4096)) is None
    with pytest.raises(ValueError, match=">= 1"):
      sparse_jax.set_chunk_elements(0)
  finally:
    sparse_jax.set_chunk_elements(old)
  assert sparse_jax.get_chunk_elements() == old
