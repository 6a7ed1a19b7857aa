"""sparsify_params, apply_updates and get_masks on what Flax NNX users hold.

An ``nnx.State`` of ``nnx.Param`` (``nnx.state(model, nnx.Param)``), the model
itself and the ``nnx.Optimizer``: the masks are plain arrays while the state's
leaves are ``Variable`` wrappers, which used to stop ``sparsify_params`` with a
pytree-structure error (issue 34, item 2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax as sj


def _model():
  return nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))


def _optimizer(model):
  # Half the 8*16 + 16*4 = 192 kernel weights pruned at init (ERK off: uniform).
  tx = sj.static(optax.sgd(0.1), sparsity=0.5, distribution="uniform")
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _arrays(state):
  """{"0/kernel": np.ndarray, ...} of an nnx.State (Variables or raw arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {sj.path_to_name(path): np.asarray(x) for path, x in flat}


def _expected(state, masks):
  """The hand computation: 0 where the mask is False, the value elsewhere."""
  mask_arrays = _arrays(masks)
  return {name: np.where(mask_arrays[name], x, 0) if name in mask_arrays else x
          for name, x in _arrays(state).items()}


def _check_masked(got, want, masks):
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name, m in _arrays(masks).items():
    assert not m.all() and m.any(), name
    assert np.all(got[name][~m] == 0), name


def test_get_masks_of_optimizer_is_plain_bool_state():
  model = _model()
  optimizer = _optimizer(model)
  for masks in (sj.get_masks(optimizer), sj.get_masks(optimizer.opt_state)):
    assert isinstance(masks, nnx.State)
    assert sj.leaf_names(masks) == ["layers/0/kernel", "layers/2/kernel"]
    assert masks["layers"][0]["bias"] is None
    for leaf in jax.tree.leaves(masks):
      assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.bool_
    # 50% of each layer (uniform): 64 of 128 and 32 of 64.
    assert int(sj.count_active(masks)) == 96


@pytest.mark.parametrize("from_optimizer", [True, False])
def test_sparsify_params_on_nnx_state(from_optimizer):
  model = _model()
  optimizer = _optimizer(model)
  params = nnx.state(model, nnx.Param)
  masks = sj.get_masks(optimizer)
  want = _expected(params, masks)
  opt_state = optimizer if from_optimizer else optimizer.opt_state

  sparse = sj.sparsify_params(params, opt_state)

  # The same structure (an nnx.State of nnx.Param), values masked by hand.
  assert isinstance(sparse, nnx.State)
  assert jax.tree.structure(sparse) == jax.tree.structure(params)
  assert isinstance(sparse["layers"][0]["kernel"], nnx.Param)
  _check_masked(_arrays(sparse), want, masks)
  # Pure: the model keeps its dense weights until the user updates it.
  assert np.all(np.asarray(model.layers[0].kernel[...]) != 0)
  nnx.update(model, sparse)
  _check_masked(_arrays(nnx.state(model, nnx.Param)), want, masks)


def test_sparsify_params_on_nnx_split_state():
  model = _model()
  optimizer = _optimizer(model)
  graphdef, state = nnx.split(model)  # only Params in this model
  masks = sj.get_masks(optimizer)
  sparse = sj.sparsify_params(state, optimizer)
  _check_masked(_arrays(sparse), _expected(state, masks), masks)
  model = nnx.merge(graphdef, sparse)
  _check_masked(_arrays(nnx.state(model, nnx.Param)), _expected(state, masks), masks)


@pytest.mark.parametrize("from_optimizer", [True, False])
def test_sparsify_params_on_nnx_model_updates_it_in_place(from_optimizer):
  model = _model()
  optimizer = _optimizer(model)
  masks = sj.get_masks(optimizer)
  want = _expected(nnx.state(model, nnx.Param), masks)

  out = sj.sparsify_params(model, optimizer if from_optimizer else optimizer.opt_state)

  assert out is model
  _check_masked(_arrays(nnx.state(model, nnx.Param)), want, masks)
  # The optimizer still steps the sparse model, and it stays exactly masked.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  optimizer.update(model, grads)
  for name, m in _arrays(sj.get_masks(optimizer)).items():
    assert np.all(_arrays(nnx.state(model, nnx.Param))[name][~m] == 0), name


class _WithBatchNorm(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(8, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


def test_sparsify_params_names_what_to_pass_on_mismatch():
  model = _WithBatchNorm(nnx.Rngs(0))
  tx = sj.static(optax.sgd(0.1), sparsity=0.5, distribution="uniform")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # nnx.state(model) also holds the BatchStat mean and var that tx.init never saw.
  for wrong in (nnx.state(model), {"w": jnp.ones((8, 16))}):
    with pytest.raises(ValueError, match=r"nnx\.state\(model, nnx\.Param\)") as info:
      sj.sparsify_params(wrong, optimizer)
    message = str(info.value)
    assert "\n" not in message and type(wrong).__name__ in message
  # The BatchNorm model itself is fine: only its Params are masked.
  sj.sparsify_params(model, optimizer)
  m = np.asarray(sj.get_masks(optimizer)["linear"]["kernel"])
  assert np.all(np.asarray(model.linear.kernel[...])[~m] == 0)
  np.testing.assert_array_equal(np.asarray(model.norm.mean[...]), 0)
  np.testing.assert_array_equal(np.asarray(model.norm.var[...]), 1)


def test_sparsify_params_wrong_shape_is_a_value_error():
  model = _model()
  optimizer = _optimizer(model)
  params = nnx.state(model, nnx.Param)
  params["layers"][0]["kernel"] = nnx.Param(jnp.ones((16, 8)))
  with pytest.raises(ValueError, match="whose leaves do not match the masks"):
    sj.sparsify_params(params, optimizer)


def _as_pure(state):
  """Raw arrays in the State's structure (``nnx.pure`` in older flax, ``as_pure`` in newer)."""
  return (getattr(nnx, "as_pure", None) or nnx.pure)(state)


@pytest.mark.parametrize("wrapped_updates", [True, False])
def test_apply_updates_on_nnx_state(wrapped_updates):
  model = _model()
  optimizer = _optimizer(model)
  params = nnx.state(model, nnx.Param)
  masks = sj.get_masks(optimizer)
  # Updates as tx.update returns them inside nnx.Optimizer (raw arrays) or as an
  # nnx.State of Params (a user's own loop); 0.5 everywhere, biases included.
  raw = jax.tree.map(lambda p: jnp.full_like(p, 0.5), _as_pure(params))
  updates = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params) if wrapped_updates else raw

  new = jax.jit(sj.apply_updates)(params, updates, optimizer.opt_state)

  assert isinstance(new, nnx.State)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  stepped = {name: x + 0.5 for name, x in _arrays(params).items()}
  mask_arrays = _arrays(masks)
  for name, x in _arrays(new).items():
    want = np.where(mask_arrays[name], stepped[name], 0) if name in mask_arrays else stepped[name]
    np.testing.assert_array_equal(x, want, err_msg=name)
