"""Tests of sparse_jax._masks: which leaves are prunable, and mask helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax as sj


def _mlp_params():
  return {
      "Dense_0": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros((5,))},
      "Dense_1": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros((3,))},
      "BatchNorm_0": {"scale": jnp.ones((3,)), "bias": jnp.zeros((3,))},
      "Dense_2": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))},
  }


def _flag_dict(tree):
  """{name: flag} of a tree of Python bools."""
  names = sj.leaf_names(tree)
  return dict(zip(names, jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------
# select_prunable
# ---------------------------------------------------------------------------


def test_select_prunable_default_is_ndim_at_least_2():
  flags = _flag_dict(sj.select_prunable(_mlp_params()))
  assert flags == {
      "BatchNorm_0/bias": False, "BatchNorm_0/scale": False,
      "Dense_0/bias": False, "Dense_0/kernel": True,
      "Dense_1/bias": False, "Dense_1/kernel": True,
      "Dense_2/bias": False, "Dense_2/kernel": True,
  }


def test_select_prunable_conv_and_min_ndim():
  # "w" and "scalar" are unknown names: prunable when ndim >= 2.
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "w": jnp.ones((7, 4)),
            "scalar": jnp.ones(())}
  assert _flag_dict(sj.select_prunable(params)) == {
      "conv/kernel": True, "w": True, "scalar": False}
  # min_ndim=3 keeps only the 4-d conv kernel.
  assert _flag_dict(sj.select_prunable(params, min_ndim=3)) == {
      "conv/kernel": True, "w": False, "scalar": False}


def test_select_prunable_include_regex():
  params = _mlp_params()
  flags = _flag_dict(sj.select_prunable(params, include=r"Dense_[01]/kernel"))
  assert [n for n, f in flags.items() if f] == ["Dense_0/kernel", "Dense_1/kernel"]
  # A list of regexes: any match is enough; fullmatch, so "kernel" alone matches nothing
  # with a prefix.
  flags = _flag_dict(sj.select_prunable(params, include=[r"Dense_0/.*", r".*_2/kernel"]))
  # Dense_0/bias matches the regex but has ndim 1, so it stays dense.
  assert [n for n, f in flags.items() if f] == ["Dense_0/kernel", "Dense_2/kernel"]


def test_select_prunable_include_is_fullmatch():
  with pytest.raises(ValueError, match="No prunable leaf selected"):
    sj.select_prunable(_mlp_params(), include="kernel")


def test_select_prunable_exclude_regex():
  flags = _flag_dict(sj.select_prunable(_mlp_params(), exclude=r"Dense_2/.*"))
  assert [n for n, f in flags.items() if f] == ["Dense_0/kernel", "Dense_1/kernel"]
  flags = _flag_dict(sj.select_prunable(_mlp_params(), exclude=[r"Dense_0/.*", "Dense_1/kernel"]))
  assert [n for n, f in flags.items() if f] == ["Dense_2/kernel"]


def test_select_prunable_keep_first_and_last_dense():
  params = _mlp_params()
  first = _flag_dict(sj.select_prunable(params, keep_first_dense=True))
  assert [n for n, f in first.items() if f] == ["Dense_1/kernel", "Dense_2/kernel"]
  last = _flag_dict(sj.select_prunable(params, keep_last_dense=True))
  assert [n for n, f in last.items() if f] == ["Dense_0/kernel", "Dense_1/kernel"]
  both = _flag_dict(sj.select_prunable(params, keep_first_dense=True, keep_last_dense=True))
  assert [n for n, f in both.items() if f] == ["Dense_1/kernel"]
  # First/last are among the *selected* leaves (after include/exclude).
  sel = _flag_dict(sj.select_prunable(params, exclude="Dense_0/kernel", keep_first_dense=True))
  assert [n for n, f in sel.items() if f] == ["Dense_2/kernel"]


def test_select_prunable_error_when_nothing_selected():
  params = {"a": {"bias": jnp.zeros((3,))}, "w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="No prunable leaf selected") as e:
    sj.select_prunable(params, keep_first_dense=True)
  # The message lists the leaf names to help the user.
  assert "a/bias" in str(e.value) and "'w'" in str(e.value)
  with pytest.raises(ValueError, match="Loosen the selector"):
    sj.select_prunable({"b": jnp.zeros((3,))})
  with pytest.raises(ValueError, match="No prunable leaf selected"):
    sj.select_prunable(params, exclude=".*")


def test_select_prunable_tuples_and_lists():
  params = (jnp.ones((2, 3)), [jnp.zeros((3,)), {"k": jnp.ones((3, 1))}])
  flags = sj.select_prunable(params)
  assert isinstance(flags, tuple) and isinstance(flags[1], list)
  assert jax.tree.leaves(flags) == [True, False, True]
  assert sj.leaf_names(params) == ["0", "1/0", "1/1/k"]
  flags = sj.select_prunable(params, include=r"1/.*")
  assert jax.tree.leaves(flags) == [False, False, True]


class _NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)
    self.l2 = nnx.Linear(3, 2, rngs=rngs)


def test_select_prunable_nnx_state_names_drop_value():
  state = nnx.state(_NnxMLP(nnx.Rngs(0)), nnx.Param)
  # The raw jax path of an nnx leaf ends in a `value` attribute ...
  raw_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert all(isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name == "value"
             for p in raw_paths)
  # ... which the names drop, so selectors written for linen also work for nnx.
  assert sj.leaf_names(state) == [
      "l1/bias", "l1/kernel", "l2/bias", "l2/kernel", "norm/bias", "norm/scale"]
  flags = _flag_dict(sj.select_prunable(state))
  assert flags == {"l1/bias": False, "l1/kernel": True, "l2/bias": False,
                   "l2/kernel": True, "norm/bias": False, "norm/scale": False}
  flags = _flag_dict(sj.select_prunable(state, include=r"l1/kernel"))
  assert [n for n, f in flags.items() if f] == ["l1/kernel"]
  flags = _flag_dict(sj.select_prunable(state, keep_last_dense=True))
  assert [n for n, f in flags.items() if f] == ["l1/kernel"]


def test_prunable_layers_and_path_to_name():
  params = _mlp_params()
  layers = sj.prunable_layers(params, sj.select_prunable(params))
  assert [(l.name, l.shape, l.size) for l in layers] == [
      ("Dense_0/kernel", (4, 5), 20), ("Dense_1/kernel", (5, 3), 15),
      ("Dense_2/kernel", (3, 2), 6)]
  path = (jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(2),
          jax.tree_util.GetAttrKey("kernel"), jax.tree_util.GetAttrKey("value"))
  assert sj.path_to_name(path) == "a/2/kernel"


# ---------------------------------------------------------------------------
# Mask helpers on a hand-made tree
# ---------------------------------------------------------------------------

# a: 2x3 with 4 active; b: 2x2 with 1 active; c: bias (dense, mask None).
A = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]], np.float32)
MA = np.array([[True, False, True], [True, True, False]])
B = np.array([[0.5, 0.25], [-1.0, 2.0]], np.float32)
MB = np.array([[False, False], [True, False]])
C = np.array([7.0, 8.0], np.float32)


def _tree():
  params = {"a": jnp.asarray(A), "b": jnp.asarray(B), "c": jnp.asarray(C)}
  masks = {"a": jnp.asarray(MA), "b": jnp.asarray(MB), "c": None}
  return params, masks


def test_apply_masks_by_hand():
  params, masks = _tree()
  out = jax.jit(sj.apply_masks)(params, masks)
  np.testing.assert_array_equal(out["a"], [[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]])
  np.testing.assert_array_equal(out["b"], [[0.0, 0.0], [-1.0, 0.0]])
  np.testing.assert_array_equal(out["c"], C)  # dense leaf untouched
  assert out["a"].dtype == jnp.float32
  # bfloat16 params keep their dtype.
  bf = jax.jit(sj.apply_masks)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), masks)
  assert bf["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(bf["a"], np.float32), np.asarray(out["a"]))


def test_count_density_and_layer_densities_by_hand():
  _, masks = _tree()
  # active: 4 in a + 1 in b = 5; prunable: 6 + 4 = 10; c (None) is not counted.
  assert int(jax.jit(sj.count_active)(masks)) == 5
  assert sj.count_prunable(masks) == 10
  assert float(jax.jit(sj.density)(masks)) == pytest.approx(0.5)
  assert float(jax.jit(sj.sparsity)(masks)) == pytest.approx(0.5)
  ld = jax.jit(sj.layer_densities)(masks)
  assert set(ld) == {"a", "b"}
  assert float(ld["a"]) == pytest.approx(4 / 6)
  assert float(ld["b"]) == pytest.approx(1 / 4)


def test_params_sparsity_and_masks_from_params_by_hand():
  params, masks = _tree()
  sparse = sj.apply_masks(params, masks)
  # Default selector: a and b are prunable (ndim 2), c is not; zeros: 2 in a, 3 in b.
  assert float(jax.jit(sj.params_sparsity)(sparse)) == pytest.approx(5 / 10)
  # The dense bias c has no zeros but would not count anyway; with a zero in c the
  # measure is unchanged.
  sparse_c0 = dict(sparse, c=jnp.array([0.0, 8.0]))
  assert float(sj.params_sparsity(sparse_c0)) == pytest.approx(0.5)
  # An explicit selector: only b -> 3 zeros of 4.
  only_b = {"a": False, "b": True, "c": False}
  assert float(sj.params_sparsity(sparse, only_b)) == pytest.approx(0.75)

  rebuilt = jax.jit(sj.masks_from_params)(sparse)
  assert rebuilt["c"] is None
  np.testing.assert_array_equal(rebuilt["a"], MA)
  np.testing.assert_array_equal(rebuilt["b"], MB)
  assert rebuilt["a"].dtype == jnp.bool_
  rebuilt_b = sj.masks_from_params(sparse, only_b)
  assert rebuilt_b["a"] is None and rebuilt_b["c"] is None
  np.testing.assert_array_equal(rebuilt_b["b"], MB)


def test_helpers_on_nnx_state():
  model = _NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  masks = sj.masks_from_params(state)
  names = sj.leaf_names(masks)
  assert names == ["l1/kernel", "l2/kernel"]
  assert all(isinstance(m, jax.Array) and m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
  ld = sj.layer_densities(masks)
  assert set(ld) == {"l1/kernel", "l2/kernel"}
  sj.check_mask_tree(state, masks)
  assert sj.count_prunable(masks) == 4 * 3 + 3 * 2


# ---------------------------------------------------------------------------
# check_mask_tree
# ---------------------------------------------------------------------------


def test_check_mask_tree_accepts_fitting_tree():
  params, masks = _tree()
  sj.check_mask_tree(params, masks)  # no error
  sj.check_mask_tree(params, {"a": None, "b": None, "c": None})


def test_check_mask_tree_wrong_structure():
  params, masks = _tree()
  bad = {"a": masks["a"], "b": masks["b"]}  # missing "c"
  with pytest.raises(ValueError, match="does not match the params tree"):
    sj.check_mask_tree(params, bad)
  with pytest.raises(ValueError, match="does not match the params tree"):
    sj.check_mask_tree(params, [masks["a"], masks["b"], None])


def test_check_mask_tree_wrong_shape_names_leaf():
  params, masks = _tree()
  bad = dict(masks, b=jnp.ones((4, 1), bool))
  with pytest.raises(ValueError, match=r"Mask for 'b' has shape \(4, 1\).*\(2, 2\)"):
    sj.check_mask_tree(params, bad)
  nested = {"x": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="'x/kernel'"):
    sj.check_mask_tree(nested, {"x": {"kernel": jnp.ones((2, 3), bool)}})


def test_keep_first_and_last_dense_follow_the_model_order_not_sorted_keys():
  """A ResNet-like tree: created stem, stage, head; jax flattens head before stem/stage."""
  params = {"stem": {"kernel": jnp.ones((3, 3, 3, 8))},
            "stage1": {"kernel": jnp.ones((3, 3, 8, 8))},
            "head": {"kernel": jnp.ones((8, 10))}}
  assert sj.leaf_names(params) == ["head/kernel", "stage1/kernel", "stem/kernel"]
  flags = sj.select_prunable(params, keep_first_dense=True)
  assert flags == {"stem": {"kernel": False}, "stage1": {"kernel": True},
                   "head": {"kernel": True}}
  flags = sj.select_prunable(params, keep_last_dense=True)
  assert flags == {"stem": {"kernel": True}, "stage1": {"kernel": True},
                   "head": {"kernel": False}}
