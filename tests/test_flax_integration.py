"""The sparse wrappers used through Flax: linen TrainState and NNX Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import sparse_jax as sj


def _data(seed=0, n=64):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, 8))
  y = jnp.argmax(x @ jax.random.normal(kw, (8, 4)), axis=-1)
  return x, y


# ---------------------------------------------------------------------------
# linen + TrainState
# ---------------------------------------------------------------------------


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(4)(x)


def test_linen_train_state():
  model = LinenMLP()
  x, y = _data()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  # Prunable: Dense_0/kernel 8x16, Dense_1/kernel 16x12, Dense_2/kernel 12x4: N = 368.
  n = 128 + 192 + 48
  tx = sj.granet(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=30, end_step=20,
                 update_every=5)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  traces = []

  @jax.jit
  def train_step(state, x, y):
    traces.append(1)

    def loss_fn(p):
      logits = state.apply_fn({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for i in range(30):
    b = slice(16 * (i % 4), 16 * (i % 4 + 1))
    state, loss = train_step(state, x[b], y[b])
    losses.append(float(loss))
    masks = sj.get_masks(state.opt_state)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
      m = np.asarray(masks[name]["kernel"])
      p = np.asarray(state.params[name]["kernel"])
      assert np.all(p[~m] == 0), (i, name)
      assert masks[name]["bias"] is None
  assert len(traces) == 1
  assert state.step == 30
  # Target reached exactly: round(0.2 * 368) = 73.6 -> 74 active.
  assert int(sj.count_active(masks)) == sj.active_count(0.8, n) == 74
  zeros = sum(int((np.asarray(state.params[k]["kernel"]) == 0).sum())
              for k in ("Dense_0", "Dense_1", "Dense_2"))
  assert zeros >= n - 74
  assert float(sj.params_sparsity(state.params)) * n >= n - 74 - 1e-3
  assert set(sj.layer_densities(masks)) == {"Dense_0/kernel", "Dense_1/kernel",
                                            "Dense_2/kernel"}
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


# ---------------------------------------------------------------------------
# NNX + nnx.Optimizer
# ---------------------------------------------------------------------------


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def nnx_train_step():
  """An ``nnx.jit`` step (mean cross-entropy on integer labels), and its list of traces.

  ``train_step(model, optimizer, x, y)`` updates both in place and returns the loss;
  every trace appends to the list, so a test can check it compiled once.
  """
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)

    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return train_step, traces


def test_nnx_optimizer():
  model = NnxMLP(nnx.Rngs(0))
  # N = 8*16 + 16*4 = 192; round(0.2 * 192) = 38.4 -> 38.
  n = 192
  tx = sj.granet(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=20, end_step=10,
                 update_every=5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # get_masks on the optimizer and on its opt_state: plain bool arrays keyed by name.
  for masks in (sj.get_masks(optimizer), sj.get_masks(optimizer.opt_state)):
    assert sj.leaf_names(masks) == ["l1/kernel", "l2/kernel"]
    for leaf in jax.tree.leaves(masks):
      assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.bool_
    assert masks["l1"]["kernel"].shape == (8, 16)
    assert masks["l2"]["kernel"].shape == (16, 4)
    assert masks["l1"]["bias"] is None
    assert int(sj.count_active(masks)) == n  # dense start

  x, y = _data()
  train_step, traces = nnx_train_step()
  losses = []
  for i in range(20):
    b = slice(16 * (i % 4), 16 * (i % 4 + 1))
    losses.append(float(train_step(model, optimizer, x[b], y[b])))
    masks = sj.get_masks(optimizer)
    for name, layer in (("l1", model.l1), ("l2", model.l2)):
      m = np.asarray(masks[name]["kernel"])
      w = np.asarray(layer.kernel[...])
      assert np.all(w[~m] == 0), (i, name)
      if i >= 9:
        assert not m.all()
  assert len(traces) == 1
  assert int(sj.count_active(sj.get_masks(optimizer))) == sj.active_count(0.8, n) == 38
  assert int(sj.count_active(sj.get_masks(optimizer.opt_state))) == 38
  # The measured sparsity of the model's params matches (or exceeds) the mask's.
  param_state = nnx.state(model, nnx.Param)
  zeros = sum(int((np.asarray(layer.kernel[...]) == 0).sum()) for layer in (model.l1, model.l2))
  assert zeros >= n - 38
  assert float(sj.params_sparsity(param_state)) * n >= n - 38 - 1e-3
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
