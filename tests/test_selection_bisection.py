"""The two exact selectors, radix (scatter histograms) and bisection (only comparisons
and sums), against a brute-force top-k and against each other, bit for bit.

``SPARSE_JAX_SELECTION`` picks the method when a selection is traced, so each case
jits afresh under the method it names. Ties go to the lower flat index in the
concatenation of a group's leaves (flattening order).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from sparse_jax import _lazy
from sparse_jax import _select
from tests import multidevice

# (method, bits per bisection round); radix first (the reference), it ignores the bits.
PATHS = [("radix", 4), ("bisection", 1), ("bisection", 4), ("bisection", 8)]


@pytest.fixture
def use(monkeypatch):
  def set_path(method, bits=None):  # bits None: the default
    monkeypatch.setenv("SPARSE_JAX_SELECTION", method)
    if bits is None:
      monkeypatch.delenv("SPARSE_JAX_BISECTION_BITS", raising=False)
    else:
      monkeypatch.setenv("SPARSE_JAX_BISECTION_BITS", str(bits))
  return set_path


def brute_force(keys, k, groups):
  """Masks of the k[g] largest keys per group, ties to the lower index: a stable sort."""
  keys = [np.asarray(x).astype(np.int64) for x in keys]
  out = [None] * len(keys)
  for g in sorted(set(groups)):
    members = [i for i, gg in enumerate(groups) if gg == g]
    flat = np.concatenate([keys[i].reshape(-1) for i in members])
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(-flat, kind="stable")[:int(k[g])]] = True
    parts = np.split(chosen, np.cumsum([keys[i].size for i in members])[:-1])
    for i, part in zip(members, parts):
      out[i] = part.reshape(keys[i].shape)
  return out


def _selector(groups):
  """A jitted ``(keys, k) -> (masks, Selection, kth_largest_key's triple)``.

  Traced (so its method fixed) at its first call.
  """
  return jax.jit(lambda ks, k: (_select.top_k_masks(ks, k, groups),
                                tuple(_select.top_k_selection(ks, k, groups)),
                                _select.kth_largest_key(ks, k, groups)))


def _select_all(keys, k, groups):
  return _selector(groups)(keys, k)


# Mostly keys 0..3 (many ties, non-candidates), a few of the largest keys.
SHAPES = [(12, 5), (7,), (4, 3, 2)]
GROUPINGS = [(0, 0, 0), (1, 0, 1)]  # one global ranking; two groups, one of two leaves


def _random_keys(seed):
  rng = np.random.default_rng(seed)
  keys = [rng.integers(0, 4, size=s).astype(np.uint32) for s in SHAPES]
  keys[0][0, 0] = _select.FORCED
  keys[2][1, 1, 1] = 2**32 - 2
  keys[1][3] = 2**31
  return keys


def _cases(groups):
  sizes = [sum(int(np.prod(s)) for s, g in zip(SHAPES, groups) if g == group)
           for group in range(max(groups) + 1)]
  for frac in (0.0, 0.13, 0.5, 0.91, 1.0):  # k = 0 and k = all included
    yield np.asarray([int(frac * n) for n in sizes], np.int32)
  yield np.asarray([0] + sizes[1:], np.int32)  # one group empty, the others whole


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
def test_masks_equal_brute_force_and_numbers_equal_radix(use, monkeypatch, chunk):
  if chunk:
    monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", chunk)
    assert _lazy.chunk_plan(SHAPES[0]) is not None and _lazy.chunk_plan(SHAPES[2]) is not None
  for seed, groups in enumerate(GROUPINGS):
    keys = [jnp.asarray(x) for x in _random_keys(seed)]
    cases = [jnp.asarray(k) for k in _cases(groups)]
    want = [brute_force(keys, k, groups) for k in cases]
    radix = None
    for path in PATHS:
      use(*path)
      selector = _selector(groups)  # traced with this path
      got = [selector(keys, k) for k in cases]
      radix = radix or got
      for k, w, (masks, sel, kth), (_, sel_r, kth_r) in zip(cases, want, got, radix):
        for a, b in zip(masks, w):
          np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{path} {groups} {k}")
        # The same numbers as the radix passes, bit for bit (tie cut included).
        for a, b in zip(sel + kth, sel_r + kth_r):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                        err_msg=f"{path} {groups} {k}")


@pytest.mark.parametrize("path", [PATHS[0], PATHS[2]], ids=["radix", "bisection4"])
def test_hand_worked_ties_and_thresholds(use, path):
  use(*path)
  # All equal: the first 5 of the concatenation, leaf 0 row-major, then leaf 1.
  keys = [jnp.full((2, 2), 5, jnp.uint32), jnp.full((3,), 5, jnp.uint32)]
  masks, (thresh, cut, take), (t, ge, gt) = _select_all(keys, jnp.array([5]), (0, 0))
  assert np.asarray(masks[0]).all() and np.asarray(masks[1]).tolist() == [True, False, False]
  # Threshold 5, 7 ties, 5 needed: the cut is ~4 (indices 0..4 kept).
  assert (thresh.tolist(), cut.tolist(), take.tolist()) == ([5], [2**32 - 1 - 4], [True])
  assert (t.tolist(), ge.tolist(), gt.tolist()) == ([5], [7], [0])
  # Sorted 9 6 5 4 3 2 1 1: the 3rd largest is 5, no tie to split (cut 0).
  keys = [jnp.array([3, 1, 4, 1, 5], jnp.uint32), jnp.array([9, 2, 6], jnp.uint32)]
  _, (thresh, cut, take), (t, ge, gt) = _select_all(keys, jnp.array([3]), (0, 0))
  assert (thresh.tolist(), cut.tolist(), take.tolist()) == ([5], [0], [True])
  assert (ge.tolist(), gt.tolist()) == ([3], [2])
  # k = 0: nothing, threshold 2**32 - 1.
  masks, (thresh, _, take), _ = _select_all(keys, jnp.array([0]), (0, 0))
  assert not any(np.asarray(m).any() for m in masks)
  assert (thresh.tolist(), take.tolist()) == ([2**32 - 1], [False])


@pytest.mark.parametrize("path", [PATHS[0], PATHS[2]], ids=["radix", "bisection4"])
def test_lazy_keys_of_stacked_slices_chunked(use, monkeypatch, path):
  """Keys computed per chunk from layer slices of a stacked array, per layer and global."""
  use(*path)
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 24)  # each 8x12 layer in 4 chunks
  rng = np.random.default_rng(5)
  w = jnp.asarray(np.round(rng.normal(size=(3, 8, 12)), 1), jnp.float32)  # ties
  m = jnp.asarray(rng.random((3, 8, 12)) < 0.6)
  lazy = [_lazy.Lazy(lambda index, w, m: _select.score_keys(w, m),
                     (_lazy.Slice(w, (i,)), _lazy.Slice(m, (i,)))) for i in range(3)]
  eager = [np.asarray(_select.score_keys(w[i], m[i])) for i in range(3)]
  for groups, k in [((0, 1, 2), [10, 0, 96]), ((0, 0, 0), [150]), ((0, 0, 0), [200])]:
    got = jax.jit(lambda k: _select.top_k_masks(lazy, k, groups))(jnp.asarray(k, jnp.int32))
    for a, b in zip(got, brute_force(eager, k, groups)):
      np.testing.assert_array_equal(np.asarray(a), b)


def test_method_by_backend_and_override(monkeypatch):
  monkeypatch.delenv("SPARSE_JAX_SELECTION", raising=False)
  assert jax.default_backend() == "cpu" and _select.selection_method() == "radix"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _select.selection_method() == "bisection"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert _select.selection_method() == "bisection"
  monkeypatch.setenv("SPARSE_JAX_SELECTION", "radix")
  assert _select.selection_method() == "radix"
  monkeypatch.setenv("SPARSE_JAX_SELECTION", "sort")
  with pytest.raises(ValueError, match="SPARSE_JAX_SELECTION"):
    _select.selection_method()
  monkeypatch.setenv("SPARSE_JAX_SELECTION", "bisection")
  monkeypatch.setenv("SPARSE_JAX_BISECTION_BITS", "3")
  with pytest.raises(ValueError, match="SPARSE_JAX_BISECTION_BITS"):
    jax.jit(lambda k: _select.top_k_masks([jnp.arange(4, dtype=jnp.uint32)], k, (0,)))(
        jnp.array([2]))


def test_cpu_default_is_the_radix_program_and_bisection_has_no_scatter(use, monkeypatch):
  keys = [jnp.arange(60, dtype=jnp.uint32).reshape(12, 5) % 7, jnp.ones((7,), jnp.uint32)]
  lower = lambda: jax.jit(lambda ks, k: _select.top_k_masks(ks, k, (0, 1))).lower(
      keys, jnp.array([9, 3])).as_text()
  monkeypatch.delenv("SPARSE_JAX_SELECTION", raising=False)
  default = lower()
  use("radix")
  assert lower() == default and "scatter" in default
  use("bisection")
  assert "scatter" not in lower()


def _mlp_grads(seed):
  sizes = (20, 32, 16, 4)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
  params = {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)), "bias": jnp.zeros((b,))}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}
  # Rounded: equal magnitudes, so the updates' selections split ties.
  return jax.tree.map(lambda x: jnp.round(x * 4) / 4, params)


METHODS = {
    "granet": lambda: sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
                                        initial_sparsity=0.5, total_steps=12, end_step=8,
                                        update_every=2),
    "rigl": lambda: sparse_jax.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                    total_steps=12, update_every=2),
}


def _masks_over_updates(method):
  """Masks after each of 4 updates (events at t = 2, 4) of a small MLP."""
  tx = METHODS[method]()
  params = _mlp_grads(0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = [jax.tree.leaves(sparse_jax.get_masks(state))]
  for t in range(4):
    updates, state = update(_mlp_grads(10 + t), state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.leaves(sparse_jax.get_masks(state)))
  return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mask_updates_equal_with_either_path(use, method):
  use("radix")
  radix = _masks_over_updates(method)
  use("bisection")
  bisection = _masks_over_updates(method)
  for step, (a, b) in enumerate(zip(radix, bisection)):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"update {step}")
  assert any(not np.array_equal(x, y) for x, y in zip(radix[0], radix[-1]))  # events ran


SHARDED = textwrap.dedent(r"""
    import json, os, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sparse_jax import _lazy, _select
    os.environ["SPARSE_JAX_SELECTION"] = "bisection"
    _lazy.CHUNK_ELEMENTS = 256  # the 64x32 kernels in 8 strided chunks
    rng = np.random.default_rng(0)
    w = [np.round(rng.normal(size=(64, 32)), 1).astype(np.float32) for _ in range(2)]
    ref = [np.asarray(_select.score_keys(jnp.asarray(x))) for x in w]
    out = {}
    for mode in ("explicit", "auto"):
      t = AxisType.Explicit if mode == "explicit" else AxisType.Auto
      mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(t, t))
      ws = [jax.device_put(w[0], NamedSharding(mesh, P(None, "model"))),
            jax.device_put(w[1], NamedSharding(mesh, P("data", None)))]
      f = jax.jit(lambda ws, k: _select.top_k_masks(
          [_lazy.lazy_map(lambda i, x: _select.score_keys(x), x) for x in ws], k, (0, 0)))
      k = jnp.array([1500])
      text = f.lower(ws, k).compile().as_text()
      got = f(ws, k)
      out[mode] = {"masks": [np.asarray(m).astype(int).tolist() for m in got],
                   "gathers": len(re.findall(r" all-gather(?:-start)?\(", text)),
                   "all_reduces": len(re.findall(r" all-reduce(?:-start)?\(", text)),
                   "scatters": text.count(" scatter(")}
    out["reference_keys"] = [x.astype(np.int64).tolist() for x in ref]
    print(json.dumps(out))
""")


@pytest.mark.multidevice
def test_sharded_bisection_sums_shards_and_gathers_nothing():
  out = multidevice.run_json(SHARDED, timeout=300)
  want = brute_force([np.asarray(x) for x in out["reference_keys"]], [1500], (0, 0))
  for mode in ("explicit", "auto"):
    r = out[mode]
    for got, w in zip(r["masks"], want):
      np.testing.assert_array_equal(np.asarray(got, bool), w, err_msg=mode)
    assert r["gathers"] == 0 and r["scatters"] == 0 and r["all_reduces"] > 0, (mode, r)
