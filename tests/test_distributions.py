"""Tests of sparse_jax._distributions: ERK/ER/uniform densities, exact counts, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_jax as sj
from sparse_jax import _distributions
from sparse_jax._masks import LayerInfo

LENET = [(784, 300), (300, 100), (100, 10)]


def _layers(shapes, names=None):
  names = names or [f"Dense_{i}/kernel" for i in range(len(shapes))]
  return [LayerInfo(n, tuple(s), int(np.prod(s))) for n, s in zip(names, shapes)]


# ---------------------------------------------------------------------------
# ERK / ER / uniform densities
# ---------------------------------------------------------------------------


def test_erk_lenet_hand_solve():
  # Raw scores sum(shape)/prod(shape): 1084/235200, 400/30000, 110/1000.
  # Budget D*N = 0.1 * 266200 = 26620.
  # First solve: eps = 26620 / (1084 + 400 + 110) = 16.70; eps * 110/1000 = 1.84 > 1,
  # so the last layer is dense (1000 weights).
  # Re-solve: eps = (26620 - 1000) / (1084 + 400) = 25620 / 1484 = 17.2642...
  #   d0 = eps * 1084 / 235200 = 0.079568, d1 = eps * 400 / 30000 = 0.230189 (< 1, done).
  eps = 25620 / 1484
  expected = [eps * 1084 / 235200, eps * 400 / 30000, 1.0]
  got = sj.erk_densities(LENET, 0.1)
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  np.testing.assert_allclose(got, [0.0795677705, 0.2301886792, 1.0], rtol=1e-9)
  # The overall density is exactly the target.
  sizes = [np.prod(s) for s in LENET]
  assert sum(d * n for d, n in zip(got, sizes)) == pytest.approx(26620, abs=1e-6)
  # Without the re-solve the last layer would get 1.84 > 1: make sure that was the case.
  assert 26620 / 1594 * 110 / 1000 > 1


def test_erk_lenet_exact_counts():
  # d0 * n0 = 25620 * 1084 / 1484 = 18714.34, d1 * n1 = 25620 * 400 / 1484 = 6905.66,
  # n2 = 1000. Floors 18714 + 6905 + 1000 = 26619; the one missing unit goes to the
  # largest remainder (0.66, layer 1): [18714, 6906, 1000].
  layers = _layers(LENET)
  dens = sj.layer_densities_for(layers, 0.9, "erk")
  counts = sj.layer_counts(layers, dens, sj.active_count(0.9, 266200))
  assert counts == [18714, 6906, 1000]
  assert sum(counts) == 26620


def test_er_and_erk_for_a_conv():
  # conv (3,3,16,32): n = 4608; dense (128,10): n = 1280; N = 5888, D = 0.2,
  # budget 1177.6.
  # ER counts channels only: raw_conv = (16+32)/(16*32) = 0.09375,
  #   raw_dense = 138/1280 = 0.1078125; denom = 0.09375*4608 + 138 = 570.
  #   eps = 1177.6/570; d_conv = eps*0.09375 = 0.193684, d_dense = eps*0.1078125 = 0.222737.
  # ERK counts kernel dims too: raw_conv = 54/4608; denom = 54 + 138 = 192;
  #   eps = 1177.6/192 = 6.1333; d_conv = 0.071875, d_dense = 0.66125.
  shapes = [(3, 3, 16, 32), (128, 10)]
  er = sj.erk_densities(shapes, 0.2, kind="er")
  np.testing.assert_allclose(er, [1177.6 / 570 * 0.09375, 1177.6 / 570 * 0.1078125],
                             rtol=1e-12)
  np.testing.assert_allclose(er, [0.193684, 0.222737], rtol=1e-5)
  erk = sj.erk_densities(shapes, 0.2)
  np.testing.assert_allclose(erk, [0.071875, 0.66125], rtol=1e-12)
  # Through layer_densities_for with the names.
  layers = _layers(shapes, ["conv/kernel", "dense/kernel"])
  np.testing.assert_allclose(sj.layer_densities_for(layers, 0.8, "er"), er, rtol=1e-12)
  np.testing.assert_allclose(sj.layer_densities_for(layers, 0.8, "erk"), erk, rtol=1e-12)


def test_erk_several_dense_layers_resolve_repeatedly():
  # Tiny layers: raw (2+2)/4 = 1 and 4/4... at density 0.9 both small layers go dense
  # and the big one takes the rest: (0.9 * (10000 + 4 + 4) - 8) / 10000.
  shapes = [(100, 100), (2, 2), (2, 2)]
  got = sj.erk_densities(shapes, 0.9)
  assert got[1:] == [1.0, 1.0]
  assert got[0] == pytest.approx((0.9 * 10008 - 8) / 10000, rel=1e-12)


def test_uniform():
  layers = _layers(LENET)
  assert sj.layer_densities_for(layers, 0.75, "uniform") == [0.25, 0.25, 0.25]
  counts = sj.layer_counts(layers, [0.25] * 3, sj.active_count(0.75, 266200))
  # 0.25 * n is an integer for every layer here.
  assert counts == [58800, 7500, 250]


def test_custom_map_by_name_and_regex():
  layers = _layers(LENET)
  dmap = {"Dense_0/kernel": 0.05, r"Dense_[12]/kernel": 0.5}
  assert sj.layer_densities_for(layers, 0.9, dmap) == [0.05, 0.5, 0.5]
  # The first matching key wins (dict order).
  dmap = {r"Dense_.*": 0.3, "Dense_2/kernel": 1.0}
  assert sj.layer_densities_for(layers, 0.9, dmap) == [0.3, 0.3, 0.3]


def test_custom_map_errors():
  layers = _layers(LENET)
  with pytest.raises(ValueError, match="no entry for layer 'Dense_2/kernel'"):
    sj.layer_densities_for(layers, 0.9, {"Dense_0/kernel": 0.1, "Dense_1/kernel": 0.1})
  with pytest.raises(ValueError, match=r"Density 0.0 for layer 'Dense_0/kernel' is outside \(0, 1\]"):
    sj.layer_densities_for(layers, 0.9, {".*": 0.0})
  with pytest.raises(ValueError, match="outside"):
    sj.layer_densities_for(layers, 0.9, {".*": 1.5})


def test_unknown_distribution_and_bad_sparsity():
  layers = _layers(LENET)
  with pytest.raises(ValueError, match="Unknown distribution 'erdos'"):
    sj.layer_densities_for(layers, 0.9, "erdos")
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    sj.layer_densities_for(layers, 1.0, "erk")
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    sj.layer_densities_for(layers, -0.1, "erk")
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    sj.layer_densities_for(layers, float("nan"), "erk")


# ---------------------------------------------------------------------------
# Exact counts
# ---------------------------------------------------------------------------


def test_active_count_is_float64_exact():
  # (1 - 0.98) * 30e6 = 600000 (600000.0000000005 in float64).
  assert sj.active_count(0.98, 30_000_000) == 600_000
  # The same computation in float32 is off by one: 1 - 0.98 = 0.01999998 in float32,
  # times 3e7 = 599999.44, which rounds to 599999. So the check above can fail.
  f = np.float32
  f32 = (f(1) - f(0.98)) * f(30_000_000)
  assert int(np.floor(f32 + f(0.5))) == 599_999
  # Round half up (not to even): 0.5 * 5 = 2.5 -> 3, 0.5 * 3 = 1.5 -> 2.
  assert sj.active_count(0.5, 5) == 3
  assert sj.active_count(0.5, 3) == 2
  assert sj.active_count(0.0, 7) == 7


@settings(deadline=None, max_examples=30)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
    data=st.data(),
)
def test_layer_counts_exact_and_in_range(sizes, data):
  layers = _layers([(n, 1) for n in sizes])
  dens = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(sizes), max_size=len(sizes)))
  total = data.draw(st.integers(len(sizes), sum(sizes)))
  counts = sj.layer_counts(layers, dens, total)
  assert sum(counts) == total
  assert all(1 <= c <= n for c, n in zip(counts, sizes))
  # total=None: round(sum density_l * n_l), clipped to [L, N].
  counts = sj.layer_counts(layers, dens)
  ideal = sum(d * n for d, n in zip(dens, sizes))
  expect = min(max(math.floor(ideal + 0.5), len(sizes)), sum(sizes))
  assert sum(counts) == expect
  assert all(1 <= c <= n for c, n in zip(counts, sizes))


def test_layer_counts_exact_for_erk():
  # ERK counts add up to active_count for several sparsities.
  shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (512, 10)]
  layers = _layers(shapes)
  n = sum(l.size for l in layers)
  for s in (0.5, 0.8, 0.9, 0.95, 0.99):
    dens = sj.layer_densities_for(layers, s, "erk")
    counts = sj.layer_counts(layers, dens, sj.active_count(s, n))
    assert sum(counts) == sj.active_count(s, n)
    assert all(1 <= c <= l.size for c, l in zip(counts, layers))
    # Each count is within one unit of the ideal d_l * n_l (largest remainders).
    assert all(abs(c - d * l.size) < 1 for c, d, l in zip(counts, dens, layers))


def test_proportional_counts_by_hand():
  # 41 of 410: 10% of each layer exactly.
  assert sj.proportional_counts([300, 100, 10], 41) == [30, 10, 1]
  # 50 of 111: ideal 45.04.., 4.50.., 0.45.. -> floors 45, 4 and 1 (every layer
  # keeps one) add up to 50.
  assert sj.proportional_counts([100, 10, 1], 50) == [45, 4, 1]
  # 7 of 12 over [5, 7]: ideal 2.91.., 4.08.. -> floors 2, 4; the one left goes to
  # the larger remainder (layer 0).
  assert sj.proportional_counts([5, 7], 7) == [3, 4]


# ---------------------------------------------------------------------------
# random_masks
# ---------------------------------------------------------------------------


def _params():
  return {"a": {"kernel": jnp.zeros((20, 30)), "bias": jnp.zeros((30,))},
          "b": {"kernel": jnp.zeros((30, 10)), "bias": jnp.zeros((10,))}}


# One compiled sampler for the exact tests; the counts are traced, so they may change.
_exact_masks = jax.jit(
    lambda key, counts: sj.random_masks(key, _params(), sj.select_prunable(_params()), counts))


def test_random_masks_exact_counts_and_seeds():
  counts = jnp.array([123, 7])
  make = lambda key: _exact_masks(key, counts)
  m0 = make(jax.random.PRNGKey(0))
  m1 = make(jax.random.PRNGKey(1))
  for m in (m0, m1):
    assert m["a"]["bias"] is None and m["b"]["bias"] is None
    assert m["a"]["kernel"].dtype == jnp.bool_ and m["a"]["kernel"].shape == (20, 30)
    assert int(m["a"]["kernel"].sum()) == 123
    assert int(m["b"]["kernel"].sum()) == 7
  assert not np.array_equal(m0["a"]["kernel"], m1["a"]["kernel"])
  assert not np.array_equal(m0["b"]["kernel"], m1["b"]["kernel"])
  # Same seed, same mask.
  np.testing.assert_array_equal(make(jax.random.PRNGKey(0))["a"]["kernel"], m0["a"]["kernel"])


def test_random_masks_exact_extremes():
  m = _exact_masks(jax.random.PRNGKey(3), jnp.array([600, 1]))
  assert bool(m["a"]["kernel"].all())
  assert int(m["b"]["kernel"].sum()) == 1


def test_random_masks_bernoulli_is_roughly_the_density():
  params = {"w": jnp.zeros((100, 100)), "v": jnp.zeros((50, 40))}
  prunable = sj.select_prunable(params)
  counts = [2500, 1000]  # densities 0.25 and 0.5
  m = jax.jit(lambda k: sj.random_masks(k, params, prunable, counts, sampling="bernoulli"))(
      jax.random.PRNGKey(0))
  # Leaves flatten as v, w; counts follow flattening order: v gets 2500/2000 -> all,
  # so use the order explicitly.
  names = sj.leaf_names(params)
  assert names == ["v", "w"]
  # v: p = 2500/2000 > 1 -> all ones; w: p = 1000/10000 = 0.1.
  assert bool(m["v"].all())
  # Binomial(10000, 0.1): sd = 30; allow 5 sd.
  assert abs(int(m["w"].sum()) - 1000) < 150
  assert int(m["w"].sum()) != 0


def test_random_masks_unknown_sampling():
  params = _params()
  with pytest.raises(ValueError, match="Unknown sampling 'uniform'"):
    sj.random_masks(jax.random.PRNGKey(0), params, sj.select_prunable(params), [1, 1],
                    sampling="uniform")


def test_check_sparsity_message():
  with pytest.raises(ValueError, match="keeps 10% of them"):
    _distributions.check_sparsity(1.0)
