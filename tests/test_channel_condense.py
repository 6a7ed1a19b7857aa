"""Channels(attach=True) and condensed training (issue 32 items 1 and 2).

A small conv net with batch norm (conv -> BN -> ReLU twice, a flatten, two Dense)
is trained with channel sparsity. References: plain optax updates on the alive
units, the masked model's own logits, and the cut arrays taken by hand with
NumPy; never the code under test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj
from sparse_jax import _attached
from sparse_jax import _layers

CHAIN = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
NORMS = {"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1"}


class Net(nn.Module):
  widths: tuple = (6, 8, 12)

  @nn.compact
  def __call__(self, x, train: bool):
    for w in self.widths[:2]:
      x = nn.Conv(w, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.widths[2])(x))
    return nn.Dense(3)(x)


def _data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
          jnp.asarray(rng.integers(0, 3, n)))


def _init(widths=(6, 8, 12)):
  v = Net(widths).init(jax.random.PRNGKey(0), _data()[0], train=False)
  return v["params"], v["batch_stats"]


def _gmp(structure=None, inner=None):
  inner = inner or optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9))
  return sj.gmp(inner, sparsity=0.5, end_step=9, update_every=3,
                structure=structure or sj.Channels(), keep_last_dense=True,
                scope="layerwise")


def _step_fn(model, tx):
  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    grads, new = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state
  return step


def _train(model, tx, params, stats, opt_state, steps, norms=NORMS):
  step, is_event = _step_fn(model, tx), sj.event_schedule(tx)
  x, y = _data()
  for _ in range(steps):
    t = int(sj.get_sparse_state(opt_state).count) + 1
    params, stats, opt_state = step(params, stats, opt_state, x, y)
    if is_event(t) and norms:
      stats = sj.mask_batch_stats(stats, sj.get_masks(opt_state), norms)
  return params, stats, opt_state


def _alive(masks, layer):
  m = np.asarray(masks[layer]["kernel"])
  return m.reshape(-1, m.shape[-1]).any(0)


def test_attached_leaves_are_the_bias_and_the_next_norm():
  params, _ = _init()
  masks = sj.get_masks(_gmp().init(params))
  found = {a.leaf: (a.kernel, a.restart)
           for a in _attached.find(sj.Channels(), params, masks, _layers.LayerAxes())}
  assert found == {
      "Conv_0/bias": ("Conv_0/kernel", 0.0), "BatchNorm_0/scale": ("Conv_0/kernel", 1.0),
      "BatchNorm_0/bias": ("Conv_0/kernel", 0.0), "Conv_1/bias": ("Conv_1/kernel", 0.0),
      "BatchNorm_1/scale": ("Conv_1/kernel", 1.0), "BatchNorm_1/bias": ("Conv_1/kernel", 0.0),
      "Dense_0/bias": ("Dense_0/kernel", 0.0)}  # Dense_1 is kept dense
  assert _attached.find(sj.Channels(attach=False), params, masks, _layers.LayerAxes()) == ()
  # Named explicitly: no norm for Conv_0; a module that does not exist is an error.
  named = _attached.find(sj.Channels(norms={"Conv_0": None}), params, masks,
                         _layers.LayerAxes())
  assert "BatchNorm_0/scale" not in {a.leaf for a in named}
  with pytest.raises(ValueError, match="no module 'BN_9'"):
    _gmp(sj.Channels(norms={"Conv_0": "BN_9"})).init(params)


def test_one_step_holds_dead_units_and_updates_alive_ones_like_optax():
  params, stats = _init()
  inner = optax.sgd(0.1)
  tx = sj.static(inner, sparsity=0.5, structure=sj.Channels(), keep_last_dense=True)
  opt_state = tx.init(params)
  params = sj.sparsify_params(params, opt_state)
  masks = sj.get_masks(opt_state)
  x, y = _data()

  def loss(p):
    logits, _ = Net().apply({"params": p, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grads = jax.grad(loss)(params)
  new, _, _ = _step_fn(Net(), tx)(params, stats, opt_state, x, y)
  plain = optax.apply_updates(params, inner.update(grads, inner.init(params))[0])
  for layer, norm in [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"),
                      ("Dense_0", None)]:
    alive = _alive(masks, layer)
    assert 0 < alive.sum() < alive.size
    leaves = [(layer, "bias", 0.0)] + ([(norm, "scale", 1.0), (norm, "bias", 0.0)]
                                       if norm else [])
    for module, leaf, held in leaves:
      got, want = np.asarray(new[module][leaf]), np.asarray(plain[module][leaf])
      np.testing.assert_allclose(got[alive], want[alive], rtol=1e-6, atol=1e-7)
      np.testing.assert_array_equal(got[~alive], held)


@pytest.mark.parametrize("attach", [True, False])
def test_gmp_channels_leave_dead_units_exactly_dead(attach):
  params, stats = _init()
  tx = _gmp(sj.Channels(attach=attach))
  opt_state = tx.init(params)
  params, stats, opt_state = _train(Net(), tx, params, stats, opt_state, 12,
                                    NORMS if attach else None)
  masks = sj.get_masks(opt_state)
  dead = {n: ~_alive(masks, n) for n in CHAIN[:-1]}
  assert all(d.any() for d in dead.values())
  variables = {"params": params, "batch_stats": stats}
  held = [np.asarray(params[n]["bias"])[dead[c]] for c, n in NORMS.items()]
  if not attach:  # the fault item 2 names: the norm's bias of a dead channel trains on
    assert any(np.any(h != 0) for h in held)
    with pytest.raises(ValueError, match="output"):
      sj.condense_channels(params, masks, CHAIN, batch_stats=stats, norms=NORMS)
    return
  assert all(np.all(h == 0) for h in held)
  for c, n in NORMS.items():
    np.testing.assert_array_equal(np.asarray(params[n]["scale"])[dead[c]], 1.0)
    np.testing.assert_array_equal(np.asarray(stats[n]["mean"])[dead[c]], 0.0)
  # Every dead channel outputs exactly 0 after its ReLU, in both modes.
  x, _ = _data()
  for train in (True, False):
    _, inter = Net().apply(variables, x, train=train, mutable=["intermediates", "batch_stats"],
                           capture_intermediates=lambda m, _: isinstance(m, nn.BatchNorm))
    for i, c in enumerate(NORMS):
      out = np.asarray(inter["intermediates"][f"BatchNorm_{i}"]["__call__"][0])
      assert np.all(np.maximum(out[..., dead[c]], 0) == 0)
  small = sj.condense_channels(params, masks, CHAIN, batch_stats=stats, norms=NORMS)
  got = Net(small.features[:3]).apply({"params": small.params,
                                       "batch_stats": small.batch_stats}, x, train=False)
  np.testing.assert_allclose(got, Net().apply(variables, x, train=False), atol=1e-5)


def _condensed_run(inner=None, packed=False, events=1):
  """GMP channels trained to its ``events``-th event, then condensed."""
  params, stats = _init()
  tx = sj.gmp(inner or optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9)),
              sparsity=0.5, end_step=9, update_every=3, structure=sj.Channels(),
              keep_last_dense=True, packed_masks=packed, scope="layerwise")
  opt_state = tx.init(params)
  params, stats, opt_state = _train(Net(), tx, params, stats, opt_state, 3 * events)
  c = sj.condense_train_state(params, opt_state, CHAIN, structure=sj.Channels(),
                              batch_stats=stats, norms=NORMS)
  return params, stats, opt_state, c


def _cut_by_hand(a, layer_keep, next_keep=None, positions=1):
  a = np.asarray(a)
  if layer_keep is not None:
    a = a[..., layer_keep]
  if next_keep is not None:
    n = len(next_keep[1])
    rows = (np.arange(positions)[:, None] * n + next_keep[0][None, :]).ravel()
    a = np.take(a, rows, axis=-2)
  return a


def test_condensed_state_computes_the_masked_models_logits():
  params, stats, opt_state, c = _condensed_run()
  masks = sj.get_masks(opt_state)
  keep = [np.flatnonzero(_alive(masks, n)) for n in CHAIN[:-1]]
  assert [len(k) for k in keep] == list(c.features[:3]) and c.features[3] == 3
  assert all(0 < len(k) < n for k, n in zip(keep, (6, 8, 12)))
  x, _ = _data(seed=1)
  small = Net(c.features[:3])
  for train in (True, False):
    kw = dict(mutable=["batch_stats"]) if train else {}
    want = Net().apply({"params": params, "batch_stats": stats}, x, train=train, **kw)
    got = small.apply({"params": c.params, "batch_stats": c.batch_stats}, x, train=train,
                      **kw)
    np.testing.assert_allclose(got[0] if train else got, want[0] if train else want,
                               atol=2e-5)
  # The cut arrays, taken by hand: Conv_1 loses Conv_0's dead inputs and its own dead
  # filters; Dense_0 a flatten of 2x2 positions of Conv_1's channels.
  alive0, alive1 = _alive(masks, "Conv_0"), _alive(masks, "Conv_1")
  np.testing.assert_array_equal(
      c.params["Conv_1"]["kernel"],
      np.asarray(params["Conv_1"]["kernel"])[:, :, alive0][..., alive1])
  np.testing.assert_array_equal(
      c.params["Dense_0"]["kernel"],
      _cut_by_hand(params["Dense_0"]["kernel"], keep[2], (keep[1], alive1), positions=4))
  np.testing.assert_array_equal(c.batch_stats["BatchNorm_1"]["var"],
                                np.asarray(stats["BatchNorm_1"]["var"])[alive1])
  # The structure remembers the original widths.
  assert dict(c.structure.units) == {"Conv_0/kernel": 6, "Conv_1/kernel": 8,
                                     "Dense_0/kernel": 12, "Dense_1/kernel": 3}


@pytest.mark.parametrize("packed", [False, True])
def test_condensed_optimizer_state_is_cut_like_the_params(packed):
  params, _, opt_state, c = _condensed_run(optax.adamw(1e-2), packed=packed)
  masks = sj.get_masks(opt_state)
  alive0 = _alive(masks, "Conv_0")
  old, new = sj.get_sparse_state(opt_state), sj.get_sparse_state(c.opt_state)
  is_packed = lambda x: isinstance(x, sj.PackedMask)
  assert is_packed(jax.tree.leaves(c.opt_state.masks, is_leaf=is_packed)[0]) == packed
  np.testing.assert_array_equal(new.masks["Conv_0"]["kernel"],
                                np.asarray(old.masks["Conv_0"]["kernel"])[..., alive0])
  mu_old, mu_new = old.inner_state[0].mu, new.inner_state[0].mu
  np.testing.assert_array_equal(mu_new["BatchNorm_0"]["scale"],
                                np.asarray(mu_old["BatchNorm_0"]["scale"])[alive0])
  np.testing.assert_array_equal(
      new.inner_state[0].nu["Conv_0"]["kernel"],
      np.asarray(old.inner_state[0].nu["Conv_0"]["kernel"])[..., alive0])
  assert int(new.count) == int(old.count)


def test_condensed_training_keeps_the_schedules_counts_of_the_original_widths():
  params, stats, opt_state, c = _condensed_run()
  # Masked: train on to the end of the schedule.
  tx = _gmp()
  _, _, masked_state = _train(Net(), tx, params, stats, opt_state, 9)
  # Condensed: a new transformation at the new widths and the original units.
  small = Net(c.features[:3])
  for structure, expect_equal in ((c.structure, True), (sj.Channels(), False)):
    tx2 = _gmp(structure)
    tx2.init(c.params)
    _, _, state2 = _train(small, tx2, c.params, c.batch_stats, c.opt_state, 9)
    units = lambda s: [int(_alive(sj.get_masks(s), n).sum()) for n in CHAIN[:-1]]
    same_total = sum(units(state2)) == sum(units(masked_state))
    assert same_total == expect_equal, (units(state2), units(masked_state))


def test_condense_refuses_what_it_cannot_cut():
  params, stats = _init()
  tx = _gmp(sj.Channels(attach=False))
  opt_state = tx.init(params)
  p, s, o = _train(Net(), tx, params, stats, opt_state, 6, norms=None)
  with pytest.raises(ValueError, match="Conv_0.*output.*mask_batch_stats"):
    sj.condense_train_state(p, o, CHAIN, batch_stats=s, norms=NORMS)
  with pytest.raises(TypeError, match="Channels"):
    sj.condense_train_state(p, o, CHAIN, structure=sj.NM(2, 4))
  # A factored second moment is not of the parameter's shape.
  tx = _gmp(inner=optax.adafactor(1e-2, min_dim_size_to_factor=4))
  opt_state = tx.init(params)
  p, s, o = _train(Net(), tx, params, stats, opt_state, 3)
  with pytest.raises(ValueError, match="does not have its shape"):
    sj.condense_train_state(p, o, CHAIN, batch_stats=s, norms=NORMS)
  # Every unit of a layer dead (masks set by hand).
  sparse = sj.get_sparse_state(opt_state)
  masks = dict(sparse.masks)
  masks["Conv_0"] = {"kernel": jnp.zeros_like(masks["Conv_0"]["kernel"])}
  with pytest.raises(ValueError, match="every unit of 'Conv_0' is dead"):
    sj.condense_train_state(params, sparse._replace(masks=masks), CHAIN,
                            batch_stats=stats, norms=NORMS)
