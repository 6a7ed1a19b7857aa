"""Regrowth warm-up: a regrown weight's update is scaled by j / N, j updates after its event.

Checked by hand with plain SGD (update = -lr * g): with the same gradients, a
weight grown at the event reaches ``-lr * sum_j min(1, j / N) g_j`` instead of
``-lr * sum_j g_j``; every other weight moves exactly as without warm-up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax

LR, N, EVERY = 0.1, 4, 5


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"a": {"kernel": jax.random.normal(k1, (12, 10))},
          "b": {"kernel": jax.random.normal(k2, (10, 8))}}


def _grads(t):
  keys = jax.random.split(jax.random.PRNGKey(50 + t), 2)
  return {"a": {"kernel": jax.random.normal(keys[0], (12, 10))},
          "b": {"kernel": jax.random.normal(keys[1], (10, 8))}}


def _run(warmup, steps, **kw):
  tx = sparse_jax.rigl(optax.sgd(LR), sparsity=0.7, total_steps=40, update_every=EVERY,
                       regrowth_warmup=warmup, **kw)
  params, state = _params(), None
  state = tx.init(params)
  out = []
  for t in range(steps):
    updates, state = jax.jit(tx.update)(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((params, sparse_jax.unpack_masks(sparse_jax.get_masks(state)), state))
  return out


@pytest.mark.parametrize("packed", [False, True])
def test_grown_weights_warm_up_by_hand(packed):
  steps = EVERY + N  # the event at update 5, then N more (the last at full rate)
  plain, warm = _run(0, steps, packed_masks=packed), _run(N, steps, packed_masks=packed)
  before = plain[EVERY - 2][1]  # masks before the event
  after = plain[EVERY - 1][1]
  jax.tree.map(np.testing.assert_array_equal, after, warm[EVERY - 1][1])
  for name in ("a", "b"):
    grown = np.asarray(after[name]["kernel"]) & ~np.asarray(before[name]["kernel"])
    assert grown.sum() > 0
    # Grown weights restart at 0 at the event, then take scaled SGD steps.
    expected = np.zeros(grown.shape, np.float32)
    for t in range(EVERY, steps):
      j = t + 1 - EVERY
      expected = expected - LR * min(1.0, j / N) * np.asarray(_grads(t)[name]["kernel"])
      got = np.asarray(warm[t][0][name]["kernel"])
      np.testing.assert_allclose(got[grown], expected[grown], rtol=1e-5, atol=1e-6)
      # Everything else moves as without warm-up.
      np.testing.assert_array_equal(got[~grown], np.asarray(plain[t][0][name]["kernel"])[~grown])
  assert int(warm[-1][2].regrown.at) == EVERY


def test_warmup_with_static_mask_update_flags_equals_the_cond():
  """scheduled_jit's two programs (mask_update=True/False) warm up as the cond does."""
  tx = sparse_jax.rigl(optax.sgd(LR), sparsity=0.7, total_steps=40, update_every=EVERY,
                       regrowth_warmup=N)

  @sparse_jax.scheduled_jit(tx)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = _params(), tx.init(_params())
  ref = _run(N, EVERY + N)
  for t in range(EVERY + N):
    params, state = step(params, state, _grads(t))
  jax.tree.map(np.testing.assert_array_equal, params, ref[-1][0])


def test_warmup_longer_than_update_every_is_refused():
  with pytest.raises(ValueError, match=r"regrowth_warmup=6 must be in \[0, update_every=5\]"):
    sparse_jax.rigl(optax.sgd(LR), sparsity=0.7, total_steps=40, update_every=EVERY,
                    regrowth_warmup=6)
  with pytest.raises(TypeError, match="regrowth_warmup"):
    sparse_jax.granet(optax.sgd(LR), sparsity=0.9, total_steps=40, end_step=20,
                      update_every=EVERY, regrowth_warmup=1.5)
