"""_inner_kind.elementwise: which inner optimizers let the in-graph event come first."""

import jax
import jax.numpy as jnp
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
