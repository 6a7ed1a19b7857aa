"""The pruning-plasticity runner's prune, regrowth and rewound schedule, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from experiments.studies import plasticity


def tree():
  params = {"a": {"kernel": jnp.array([[1.0, -5.0], [3.0, 0.5]]), "bias": jnp.zeros(2)},
            "b": {"kernel": jnp.array([[0.1], [-0.2]])}}
  masks = {"a": {"kernel": jnp.ones((2, 2), bool), "bias": None},
           "b": {"kernel": jnp.ones((2, 1), bool)}}
  return params, masks


def test_global_prune_keeps_the_largest_of_the_whole_model():
  params, masks = tree()
  # p = 0.5 of 6 weights: keep 3. The global prune forces each layer's largest
  # weight in (5 in a, 0.2 in b; no layer is emptied), then the largest other: 3.
  new, keep = plasticity.prune_once(params, masks, None, 0.5, scope="global",
                                    regrow=False, regrowth_rate=0.0)
  np.testing.assert_array_equal(new["a"]["kernel"], [[False, True], [True, False]])
  np.testing.assert_array_equal(new["b"]["kernel"], [[False], [True]])
  np.testing.assert_array_equal(keep["a"]["kernel"], new["a"]["kernel"])


def test_layerwise_prune_keeps_half_of_each_layer():
  params, masks = tree()
  # a keeps 2 of 4 (5, 3), b keeps 1 of 2 (0.2).
  new, _ = plasticity.prune_once(params, masks, None, 0.5, scope="layerwise",
                                 regrow=False, regrowth_rate=0.0)
  np.testing.assert_array_equal(new["a"]["kernel"], [[False, True], [True, False]])
  np.testing.assert_array_equal(new["b"]["kernel"], [[False], [True]])


def test_regrowth_after_the_prune_keeps_the_density():
  params, masks = tree()
  grads = {"a": {"kernel": jnp.array([[0.1, 0.0], [0.2, 0.8]]), "bias": jnp.zeros(2)},
           "b": {"kernel": jnp.array([[7.0], [7.0]])}}
  # The global prune leaves a = {-5, 3} (2 active), b = {-0.2} (1 active).
  # Rate 0.5: a drops ceil(1.0) = 1, its smallest (3 at [1,0]); b's ceil(0.5) = 1 is
  # clipped to 0 (a layer keeps one weight). a regrows 1 among its inactive [0,0]
  # (0.1), [1,0] (0.2), [1,1] (0.8): [1,1]. b grows none, however large its gradient.
  new, keep = plasticity.prune_once(params, masks, grads, 0.5, scope="global",
                                    regrow=True, regrowth_rate=0.5)
  np.testing.assert_array_equal(new["a"]["kernel"], [[False, True], [False, True]])
  np.testing.assert_array_equal(new["b"]["kernel"], [[False], [True]])
  # [1,1] is newly grown: it restarts at 0 (not in keep).
  np.testing.assert_array_equal(keep["a"]["kernel"], [[False, True], [False, False]])
  assert int(sparse_jax.count_active(new)) == 3


def test_bad_arguments_name_the_problem():
  params, masks = tree()
  with pytest.raises(ValueError, match="scope"):
    plasticity.prune_once(params, masks, None, 0.5, scope="uniform", regrow=False,
                          regrowth_rate=0.0)
  with pytest.raises(ValueError, match="fraction"):
    plasticity.prune_once(params, masks, None, 1.0, scope="global", regrow=False,
                          regrowth_rate=0.0)
  with pytest.raises(ValueError, match="Unknown setting"):
    plasticity.pruned_run(None, None, 1, 0.5, "prune+regrowth", "global")
  with pytest.raises(ValueError, match="Unknown settings"):
    plasticity.main(["--workdir=/nonexistent", "--settings=prune,rewind"])


def test_rewound_schedule_restarts_the_whole_shape_after_the_prune():
  config = plasticity.plasticity_config(num_epochs=1)
  config.num_train_steps = 20
  sched = plasticity.rewound_schedule(config, 10, prune_step=8)
  # 12 steps remain; milestones at 0.5 and 0.75 of 12 = 6 and 9 steps after the prune,
  # and optax's piecewise schedule scales from the boundary count on: 0.1 for counts
  # 8..13, 0.01 from 8 + 6 = 14, 0.001 from 8 + 9 = 17.
  got = [float(sched(t)) for t in (8, 13, 14, 16, 17, 19)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_mask_state_zeroes_momentum_outside_keep():
  params, masks = tree()
  inner = optax.sgd(0.1, momentum=0.9)
  tx = sparse_jax.static(inner, sparsity=0.0)
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(ones, state, params)  # momentum = 1 everywhere
  keep = {"a": {"kernel": jnp.array([[True, False], [False, True]]), "bias": None},
          "b": {"kernel": jnp.array([[False], [True]])}}
  out = plasticity._mask_state(inner, state, keep, keep)  # pylint: disable=protected-access
  trace = out.inner_state[0].trace
  np.testing.assert_array_equal(trace["a"]["kernel"], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(trace["b"]["kernel"], [[0], [1]])
  np.testing.assert_array_equal(trace["a"]["bias"], [1, 1])  # dense leaves untouched
  assert out.masks is keep
