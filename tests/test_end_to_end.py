"""GraNet end to end: an MLP on scikit-learn's bundled 8x8 digits at 90% sparsity."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import sparse_jax as sj

BATCH = 64
EPOCHS = 30
SIZES = (64, 128, 64, 10)


def _digits():
  x, y = load_digits(return_X_y=True)
  assert x.shape == (1797, 64)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm].astype(np.float32), y[perm].astype(np.int32)
  x_tr, y_tr, x_te, y_te = x[:1437], y[:1437], x[1437:], y[1437:]
  mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6  # constant border pixels have std 0
  return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _init(key):
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * np.sqrt(2.0 / a),
                            "bias": jnp.zeros((b,))}
  return params


def _apply(params, x):
  for i in range(len(SIZES) - 1):
    x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
    if i < len(SIZES) - 2:
      x = jax.nn.relu(x)
  return x


def test_granet_digits_reaches_exact_sparsity_and_accuracy():
  start = time.time()
  x_tr, y_tr, x_te, y_te = _digits()
  steps_per_epoch = len(x_tr) // BATCH  # 22
  total = EPOCHS * steps_per_epoch  # 660
  end_step = int(0.6 * total)  # 396: the last prune event is t = 380 (k = 19)
  tx = sj.granet(optax.sgd(0.05, momentum=0.9, nesterov=True), sparsity=0.9,
                 total_steps=total, end_step=end_step, update_every=20)
  params = _init(jax.random.PRNGKey(0))
  n = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))  # 17024
  target = sj.active_count(0.9, n)
  assert target == round(0.1 * n) == 1702
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(1)
  t = 0
  for _ in range(EPOCHS):
    order = rng.permutation(len(x_tr))
    for b in range(steps_per_epoch):
      idx = order[b * BATCH:(b + 1) * BATCH]
      params, opt_state, loss = train_step(params, opt_state, x_tr[idx], y_tr[idx])
      t += 1
      if t == 380:
        # The last prune event (t multiple of 20, k = 19 = kf) hits the target.
        assert int(sj.count_active(sj.get_masks(opt_state))) == target
  assert t == total
  assert np.isfinite(float(loss))

  masks = sj.get_masks(opt_state)
  assert int(sj.count_active(masks)) == target
  nonzero = sum(int(jnp.count_nonzero(params[k]["kernel"])) for k in params)
  assert nonzero <= target
  for k in params:
    p, m = np.asarray(params[k]["kernel"]), np.asarray(masks[k]["kernel"])
    assert np.all(p[~m] == 0)
    assert m.any()  # no layer emptied
  acc = float(jnp.mean(jnp.argmax(jax.jit(_apply)(params, x_te), -1) == y_te))
  print(f"test accuracy {acc:.4f}, active {target}/{n}, {time.time() - start:.1f}s")
  assert acc >= 0.85
