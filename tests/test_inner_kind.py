"""_inner_kind.elementwise: which inner optimizers let the mask update come first."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from sparse_jax import _inner_kind


def _decay_mask(tree):
  return jax.tree.map(lambda x: x.ndim >= 2, tree)


# True: elementwise, a zero state at zero gradients, a state without the params.
INNERS = {
    "sgd": (lambda: optax.sgd(0.1), True),
    "nesterov": (lambda: optax.sgd(0.1, momentum=0.9, nesterov=True), True),
    "scheduled_momentum": (
        lambda: optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9), True),
    "adam": (lambda: optax.adam(1e-3), True),
    "adamw": (lambda: optax.adamw(1e-3, weight_decay=1e-2), True),  # decay in the update
    "rmsprop": (lambda: optax.rmsprop(1e-3), True),
    "adagrad": (lambda: optax.adagrad(1e-2), True),
    "lion": (lambda: optax.lion(1e-3), True),
    "inject_hyperparams": (lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), True),
    # Weight decay added to the gradient before the momentum: the state reads the params.
    "coupled_weight_decay": (lambda: optax.chain(
        optax.add_decayed_weights(5e-4, _decay_mask), optax.sgd(0.1, momentum=0.9)), False),
    # The README's decoupled SGD recipe: decay added after the momentum.
    "decoupled_weight_decay": (lambda: optax.chain(
        optax.trace(decay=0.9), optax.add_decayed_weights(5e-4, _decay_mask),
        optax.scale(-0.1)), True),
    "global_norm_clip": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), False),
    "adafactor": (lambda: optax.adafactor(1e-2), False),  # factored moments: reductions
    "lamb": (lambda: optax.lamb(1e-3), False),  # per-leaf trust ratio: a reduction
    "adabelief": (lambda: optax.adabelief(1e-3), False),  # eps inside the state
    "multisteps": (
        lambda: optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(), False),
}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_classification(name):
  make, expected = INNERS[name]
  params = {"k": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  masks = {"k": jnp.ones((4, 3), bool), "b": None}
  tx = optax.with_extra_args_support(make())
  assert _inner_kind.elementwise(tx, params, tx.init(params), params, masks, {}) is expected


@pytest.mark.parametrize("name", ["adamw", "coupled_weight_decay"])
def test_the_program_follows_the_classification(name):
  """Plain jit's step holds the event in a loop where allowed, else in a cond."""
  make, expected = INNERS[name]
  tx = sparse_jax.rigl(make(), sparsity=0.5, total_steps=20, update_every=3)
  params = {"k": jax.random.normal(jax.random.PRNGKey(0), (6, 4)), "b": jnp.zeros(4)}

  def step(params, state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  assert (" while(" in entry) is expected
  assert (" conditional(" in entry) is not expected


LATE_VS_EARLY = {
    "granet_sgd_momentum": lambda: sparse_jax.granet(
        optax.sgd(0.1, momentum=0.9, nesterov=True), sparsity=0.8, total_steps=20,
        end_step=12, update_every=4, track_union=True),
    "rigl_adam_warmup": lambda: sparse_jax.rigl(
        optax.adam(1e-2), sparsity=0.7, total_steps=20, update_every=3, regrowth_warmup=2),
    "set_sgd": lambda: sparse_jax.set(optax.sgd(0.1), sparsity=0.7, total_steps=20,
                                      update_every=5, start_step=4),
    "gmp_adamw_packed": lambda: sparse_jax.gmp(
        optax.adamw(1e-2, weight_decay=1e-2), sparsity=0.7, end_step=12, update_every=4,
        packed_masks=True),
}


@pytest.mark.parametrize("name", sorted(LATE_VS_EARLY))
def test_early_mask_update_same_bits_as_the_late_order(name, monkeypatch):
  """``mask_update=True`` (host-decided events) runs the mask update before the inner
  update for elementwise inners: every array equal to the late order's (forced here by
  classifying the inner as not elementwise), at events and at a wrong ``True``."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"a": {"kernel": jax.random.normal(k1, (12, 10)), "bias": jnp.zeros(10)},
            "b": {"kernel": jax.random.normal(k2, (10, 4)), "bias": jnp.zeros(4)}}
  grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.fold_in(k3, i), p.shape),
                        params) for i in range(20)]

  def run():
    tx = LATE_VS_EARLY[name]()
    step = jax.jit(lambda p, s, g, flag: _apply(tx, p, s, g, flag), static_argnums=3)
    p, s = params, tx.init(params)
    for i, g in enumerate(grads):
      # True at every third step too: a wrong True must leave the masks as they are.
      p, s = step(p, s, g, sparse_jax.event_schedule(tx)(i + 1) or i % 3 == 0)
    return p, s, step.lower(params, tx.init(params), grads[0], True).as_text()

  early = run()
  monkeypatch.setattr(_inner_kind, "elementwise", lambda *a, **k: False)
  late = run()
  assert early[2] != late[2]  # two different programs
  for u, v in zip(jax.tree.leaves(early[:2]), jax.tree.leaves(late[:2])):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _apply(tx, params, state, grads, flag):
  updates, state = tx.update(grads, state, params, mask_update=flag)
  return optax.apply_updates(params, updates), state
