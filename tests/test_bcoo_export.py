"""BCOO export: unstructured masked Dense kernels and their forward (issue 14)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import sparse as jsparse

import sparse_jax as sj


class MLP(nn.Module):
  features: tuple = (32, 24, 10)

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def bcoo_mlp(params, x):
  """The MLP's forward with its BCOO kernels (``bcoo_kernels``)."""
  for i in range(3):
    layer = params[f"Dense_{i}"]
    x = sj.bcoo_dense(x, layer["kernel"]) + layer["bias"]
    if i < 2:
      x = jax.nn.relu(x)
  return x


def test_bcoo_compress_by_hand():
  kernel = np.arange(1.0, 7.0).reshape(3, 2)  # [in=3, out=2]
  mask = np.array([[True, False], [False, True], [True, True]])
  k = sj.bcoo_compress(kernel, mask)
  assert isinstance(k, jsparse.BCOO) and k.shape == (2, 3) and k.nse == 4
  np.testing.assert_array_equal(np.asarray(k.todense()), (kernel * mask).T)
  assert sj.bcoo_nbytes(k) == 4 * 4 + 4 * 2 * 4  # float32 values, int32 (row, col)
  x = np.array([[1.0, 2.0, 3.0]])
  np.testing.assert_allclose(np.asarray(sj.bcoo_dense(jnp.asarray(x), k)),
                             x @ (kernel * mask))


def test_bcoo_forward_equals_the_dense_masked_forward():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 20))
  model = MLP()
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
  state = sj.static(optax.sgd(0.1), sparsity=0.9, distribution="erk").init(params)
  params = sj.sparsify_params(params, state)
  masks = sj.get_masks(state)
  sparse = sj.bcoo_kernels(params, masks)
  for i in range(3):
    k = sparse[f"Dense_{i}"]["kernel"]
    assert isinstance(k, jsparse.BCOO)
    assert k.nse == int(np.asarray(masks[f"Dense_{i}"]["kernel"]).sum())
    assert not isinstance(sparse[f"Dense_{i}"]["bias"], jsparse.BCOO)
  want = model.apply({"params": params}, x)
  got = jax.jit(bcoo_mlp)(sparse, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Batch 1 and a leading batch shape go through the same forward.
  np.testing.assert_allclose(np.asarray(bcoo_mlp(sparse, x[:1])), np.asarray(want[:1]),
                             rtol=1e-5, atol=1e-5)
  x3 = x.reshape(4, 4, 20)
  np.testing.assert_allclose(np.asarray(sj.bcoo_dense(x3, sparse["Dense_0"]["kernel"])),
                             np.asarray(x3 @ params["Dense_0"]["kernel"]),
                             rtol=1e-5, atol=1e-5)


def test_bcoo_rejects_conv_kernels():
  with pytest.raises(ValueError, match="'Conv_0/kernel'.*2-D.*1-D only"):
    sj.bcoo_compress(np.ones((3, 3, 4, 8)), np.ones((3, 3, 4, 8), bool), "Conv_0/kernel")
