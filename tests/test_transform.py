"""End-to-end tests of the Optax wrappers (sparse_jax._transform).

Each wrapper is driven through a jitted train step (grad -> tx.update ->
optax.apply_updates) on a small MLP-like pytree with a softmax cross-entropy
loss. The GraNet run with plain SGD is replayed event by event by an independent
NumPy implementation of docs/algorithms.md §3-§5 (prune -> drop -> grow, keep semantics).
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj
from tests.test_structured import np_drop
from tests.test_structured import np_global_prune
from tests.test_structured import np_top

# ---------------------------------------------------------------------------
# Models, data, and a generic runner
# ---------------------------------------------------------------------------

KERNELS3 = ("l1", "l2", "out")


def _params3(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"l1": {"kernel": jax.random.normal(k[0], (8, 16)) * 0.4, "bias": jnp.zeros((16,))},
          "l2": {"kernel": jax.random.normal(k[1], (16, 12)) * 0.3, "bias": jnp.zeros((12,))},
          "out": {"kernel": jax.random.normal(k[2], (12, 4)) * 0.3, "bias": jnp.zeros((4,))}}


def _loss3(p, x, y):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  h = jax.nn.relu(h @ p["l2"]["kernel"] + p["l2"]["bias"])
  logits = h @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


KERNELS2 = ("l1", "out")


def _params2(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return {"l1": {"kernel": jax.random.normal(k[0], (8, 10)) * 0.4, "bias": jnp.zeros((10,))},
          "out": {"kernel": jax.random.normal(k[1], (10, 4)) * 0.3, "bias": jnp.zeros((4,))}}


def _loss2(p, x, y):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = h @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data(num_batches=4, batch=16, seed=1):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (num_batches, batch, 8))
  # Labels from a fixed random linear map, so there is something to learn.
  y = jnp.argmax(x @ jax.random.normal(kw, (8, 4)), axis=-1)
  return x, y


def make_step(tx, loss_fn):
  """A jitted train step and a list that grows by one at every trace."""
  traces = []

  @jax.jit
  def step(params, opt_state, x, y):
    traces.append(1)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads, loss

  return step, traces


def run(tx, params, steps, loss_fn):
  """Trains for ``steps`` updates; returns the step, traces and per-step records.

  Record 0 is the initial state; record t is after the update t.
  """
  step, traces = make_step(tx, loss_fn)
  x, y = _data()
  state = jax.jit(tx.init)(params)
  recs = [dict(t=0, params=jax.device_get(params), masks=jax.device_get(sj.get_masks(state)),
               state=state, grads=None, loss=None)]
  for t in range(1, steps + 1):
    b = t % x.shape[0]
    params, state, grads, loss = step(params, state, x[b], y[b])
    recs.append(dict(t=t, params=jax.device_get(params),
                     masks=jax.device_get(sj.get_masks(state)), state=state,
                     grads=jax.device_get(grads), loss=float(loss)))
  return step, traces, recs


def kmasks(rec, names):
  return [np.asarray(rec["masks"][n]["kernel"]) for n in names]


def kparams(rec, names, key="params"):
  return [np.asarray(rec[key][n]["kernel"]) for n in names]


def counts_per_layer(rec, names):
  return [int(m.sum()) for m in kmasks(rec, names)]


def assert_params_masked(rec, names):
  for n, m in zip(names, kmasks(rec, names)):
    p = np.asarray(rec["params"][n]["kernel"])
    assert np.all(p[~m] == 0), f"step {rec['t']}: {n} has nonzero inactive weights"
    # Biases have no mask.
    assert rec["masks"][n]["bias"] is None


def param_shaped_state(inner_state, names, shapes):
  """[(state leaf name, kernel name, array)] for every param-shaped kernel state leaf."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(inner_state)[0]:
    name = sj.path_to_name(path)
    for n, s in zip(names, shapes):
      if name.endswith(f"{n}/kernel") and np.shape(leaf) == s:
        out.append((name, n, np.asarray(leaf)))
  return out


# ---------------------------------------------------------------------------
# An independent NumPy replica of a GraNet step with plain SGD
# ---------------------------------------------------------------------------


def np_granet_step(p_prev, g, m_old, t, *, lr, counts, update_every, start_step,
                   end_step, total_steps, r0, rmin, rate_fn):
  """Masks and kernel params after update t (lists over prunable layers)."""
  # 1. inner update on masked gradients (SGD: u = -lr * g), then mask.
  w = [np.where(m, pp + np.float32(-lr) * np.where(m, gg, np.float32(0)), np.float32(0))
       for pp, gg, m in zip(p_prev, g, m_old)]
  is_ev = t % update_every == 0 and t >= start_step
  if not is_ev:
    return m_old, w
  # 2. prune (global magnitude) at events with k0 < k <= kf.
  k, k0, kf = t // update_every, start_step // update_every, end_step // update_every
  m_pruned = m_old
  if k0 < k <= kf:
    m_pruned = np_global_prune([np.abs(x) for x in w], m_old, counts[k])
  # 3. drop ceil(r * active_l) smallest per layer, 4. grow as many by dense |g|.
  if not 1 <= t <= total_steps - 1:
    return m_pruned, [np.where(m, x, np.float32(0)) for x, m in zip(w, m_pruned)]
  r = np.float32(rate_fn(t))
  m_new = []
  for x, gg, m in zip(w, g, m_pruned):
    dropped = np_drop(np.abs(x), m, r)
    n_dropped = int(m.sum()) - int(dropped.sum())
    (grown,) = np_top([np.where(dropped, -1.0, np.abs(gg))], n_dropped)
    m_new.append(dropped | grown)
  keep = [a & b for a, b in zip(m_new, m_pruned)]
  return m_new, [np.where(kp, x, np.float32(0)) for x, kp in zip(w, keep)]


# ---------------------------------------------------------------------------
# GraNet with plain SGD: the main run, shared by several tests
# ---------------------------------------------------------------------------

G = dict(sparsity=0.9, total_steps=40, end_step=20, update_every=5)
LR = 0.1
N3 = 8 * 16 + 16 * 12 + 12 * 4  # 368 prunable weights
# s_k = 0.9 - 0.9 (1 - k/4)^3, active = round((1 - s_k) * 368):
#   k=1: 0.4796875 * 368 = 176.53 -> 177;  k=2: 0.2125 * 368 = 78.2 -> 78;
#   k=3: 0.1140625 * 368 = 41.98 -> 42;    k=4: 0.1 * 368 = 36.8 -> 37.
G_COUNTS = [368, 177, 78, 42, 37]
STEPS = 45  # runs past total_steps to check that nothing changes any more


@pytest.fixture(scope="module")
def granet_run():
  tx = sj.granet(optax.sgd(LR), **G)
  return run(tx, _params3(), STEPS, _loss3)


def test_granet_schedule_by_hand():
  got = sj.gradual_active_counts(N3, initial_sparsity=0.0, final_sparsity=0.9,
                                 start_step=0, end_step=20, update_every=5)
  assert got.tolist() == G_COUNTS


def test_granet_params_masked_after_every_step(granet_run):
  _, _, recs = granet_run
  for rec in recs[1:]:
    assert_params_masked(rec, KERNELS3)
  # The loss goes down (the training does something).
  assert recs[-1]["loss"] < recs[1]["loss"]


def test_granet_matches_numpy_replica(granet_run):
  _, _, recs = granet_run
  rate_fn = lambda t: float(jax.jit(
      lambda t: sj.cosine_regrowth_rate(t, initial_rate=0.5, total_steps=40,
                                        min_rate=0.005))(jnp.int32(t)))
  changed_after_end = 0
  for prev, rec in zip(recs[:-1], recs[1:]):
    t = rec["t"]
    m_want, p_want = np_granet_step(
        kparams(prev, KERNELS3), kparams(rec, KERNELS3, "grads"), kmasks(prev, KERNELS3), t,
        lr=LR, counts=G_COUNTS, update_every=5, start_step=0, end_step=20,
        total_steps=40, r0=0.5, rmin=0.005, rate_fn=rate_fn)
    for n, mw, mg, pw, pg in zip(KERNELS3, m_want, kmasks(rec, KERNELS3), p_want,
                                 kparams(rec, KERNELS3)):
      np.testing.assert_array_equal(mg, mw, err_msg=f"mask of {n} after update {t}")
      np.testing.assert_allclose(pg, pw, rtol=1e-6, atol=0,
                                 err_msg=f"params of {n} after update {t}")
      assert np.all((pg == 0) | mw)
    if t > 20 and any(not np.array_equal(a, b) for a, b in
                      zip(kmasks(prev, KERNELS3), kmasks(rec, KERNELS3))):
      changed_after_end += 1
  assert changed_after_end >= 2  # regrowth goes on after end_step (t = 25, 30, 35)


def test_granet_counts_at_events_and_masks_only_change_at_events(granet_run):
  _, _, recs = granet_run
  for prev, rec in zip(recs[:-1], recs[1:]):
    t = rec["t"]
    changed = any(not np.array_equal(a, b)
                  for a, b in zip(kmasks(prev, KERNELS3), kmasks(rec, KERNELS3)))
    is_event = t % 5 == 0 and t <= 39
    if not is_event:
      assert not changed, f"masks changed at t={t}, not an event"
    else:
      assert changed, f"masks did not change at event t={t}"
    active = int(sj.count_active(rec["masks"]))
    if is_event and t <= 20:
      assert active == G_COUNTS[t // 5], t
    if t >= 20:
      assert active == G_COUNTS[-1] == 37  # exact final sparsity, then constant
  # Exact final sparsity: 37 of 368.
  assert float(sj.sparsity(recs[20]["masks"])) == pytest.approx(1 - 37 / 368)


def test_granet_regrowth_after_end_keeps_layer_counts(granet_run):
  _, _, recs = granet_run
  for t in (25, 30, 35):
    before, after = recs[t - 1], recs[t]
    assert counts_per_layer(after, KERNELS3) == counts_per_layer(before, KERNELS3)
    n_drop = n_grow = 0
    for a, b in zip(kmasks(before, KERNELS3), kmasks(after, KERNELS3)):
      dropped, grown = int((a & ~b).sum()), int((b & ~a).sum())
      assert dropped == grown  # per layer
      n_drop += dropped
      n_grow += grown
    assert n_drop > 0
  # After total_steps - 1 no event any more: t = 40 (== total_steps) and beyond.
  for t in range(40, STEPS + 1):
    for a, b in zip(kmasks(recs[39], KERNELS3), kmasks(recs[t], KERNELS3)):
      np.testing.assert_array_equal(a, b)


def test_granet_new_weights_start_at_zero(granet_run):
  _, _, recs = granet_run
  grown_total = 0
  for t in range(5, 40, 5):
    for a, b, p in zip(kmasks(recs[t - 1], KERNELS3), kmasks(recs[t], KERNELS3),
                       kparams(recs[t], KERNELS3)):
      grown = b & ~a
      grown_total += int(grown.sum())
      assert np.all(p[grown] == 0)
      assert np.all(p[a & ~b] == 0)
  assert grown_total > 0


def test_train_step_traced_once(granet_run):
  step, traces, recs = granet_run
  assert len(recs) - 1 == STEPS >= 20
  assert len(traces) == 1
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------
# Any inner optimizer
# ---------------------------------------------------------------------------

INNERS = {
    "sgd": (lambda: optax.sgd(0.05), 0),
    "sgd_nesterov": (lambda: optax.sgd(0.05, momentum=0.9, nesterov=True), 2),
    "adam": (lambda: optax.adam(1e-2), 4),
    "adamw": (lambda: optax.adamw(1e-2, weight_decay=1e-2), 4),
    "rmsprop": (lambda: optax.rmsprop(1e-2), 2),
    "adagrad": (lambda: optax.adagrad(1e-2), 2),
    "lion": (lambda: optax.lion(1e-3), 2),
    "adafactor": (lambda: optax.adafactor(1e-2), 2),
    "inject_hyperparams_sgd": (lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.05), 0),
    "chain_clip_adam": (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), 4),
    "multisteps_adam": (
        lambda: optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(), 6),
}
SHAPES2 = ((8, 10), (10, 4))


@pytest.mark.parametrize("name", list(INNERS))
def test_any_inner_optimizer(name):
  make_inner, num_state_leaves = INNERS[name]
  # Events at t = 3, 6 (prune + regrow) and 9 (regrow only); N = 120, final 24.
  tx = sj.granet(make_inner(), sparsity=0.8, total_steps=12, end_step=6, update_every=3)
  step, traces, recs = run(tx, _params2(), 12, _loss2)
  assert len(traces) == 1
  events_with_change = 0
  for prev, rec in zip(recs[:-1], recs[1:]):
    assert_params_masked(rec, KERNELS2)
    inner = sj.get_sparse_state(rec["state"]).inner_state
    leaves = param_shaped_state(inner, KERNELS2, SHAPES2)
    assert len(leaves) == num_state_leaves, [l[0] for l in leaves]
    masks = dict(zip(KERNELS2, kmasks(rec, KERNELS2)))
    # The wrapper zeroes the state off the mask at events only. Between events a
    # masked gradient keeps it at zero for every optimizer here except Adafactor,
    # whose second moment adds eps1 even to a zero gradient; that drift never reaches
    # a weight, since a position that grows again is zeroed at its event (checked below).
    if name != "adafactor" or rec["t"] in (3, 6, 9):  # the events
      for leaf_name, kname, arr in leaves:
        assert np.all(arr[~masks[kname]] == 0), f"{leaf_name} nonzero off the mask at t={rec['t']}"
    old = dict(zip(KERNELS2, kmasks(prev, KERNELS2)))
    if any(not np.array_equal(old[n], masks[n]) for n in KERNELS2):
      assert rec["t"] % 3 == 0
      events_with_change += 1
      params = dict(zip(KERNELS2, kparams(rec, KERNELS2)))
      for n in KERNELS2:
        grown = masks[n] & ~old[n]
        assert np.all(params[n][grown] == 0)
        for leaf_name, kname, arr in leaves:
          if kname == n:
            assert np.all(arr[grown] == 0), f"{leaf_name} nonzero at grown positions"
  assert events_with_change == 3
  assert int(sj.count_active(recs[6]["masks"])) == sj.active_count(0.8, 120) == 24
  assert int(sj.count_active(recs[-1]["masks"])) == 24
  assert all(np.isfinite(r["loss"]) for r in recs[1:])


# ---------------------------------------------------------------------------
# Other methods
# ---------------------------------------------------------------------------


def _erk_counts(params, sparsity):
  layers = sj.prunable_layers(params, sj.select_prunable(params))
  dens = sj.layer_densities_for(layers, sparsity, "erk")
  return sj.layer_counts(layers, dens, sj.active_count(sparsity, sum(l.size for l in layers)))


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_rigl_and_set_keep_exact_layer_counts(method):
  params = _params3()
  expected = _erk_counts(params, 0.8)
  assert sum(expected) == sj.active_count(0.8, N3) == 74
  if method == "rigl":
    # end_step defaults to 0.75 * 30 = 22: events at 5, 10, 15, 20.
    tx = sj.rigl(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=30, update_every=5)
    events = {5, 10, 15, 20}
  else:
    # end_step defaults to total_steps - 1 = 29: events at 5, ..., 25.
    tx = sj.set(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=30, update_every=5)
    events = {5, 10, 15, 20, 25}
  _, traces, recs = run(tx, params, 30, _loss3)
  assert len(traces) == 1
  assert counts_per_layer(recs[0], KERNELS3) == expected
  for prev, rec in zip(recs[:-1], recs[1:]):
    assert counts_per_layer(rec, KERNELS3) == expected
    assert_params_masked(rec, KERNELS3)
    changed = any(not np.array_equal(a, b)
                  for a, b in zip(kmasks(prev, KERNELS3), kmasks(rec, KERNELS3)))
    assert changed == (rec["t"] in events), rec["t"]


def test_momentum_growth_grows_new_positions():
  # Sparse-momentum growth ranks inactive positions by the momentum of the dense
  # gradient (kept by the wrapper, since the inner optimizer sees masked ones). Over
  # four RigL events at 80% sparsity some never-active position must be grown.
  tx = sj.rigl(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=30, update_every=5,
               growth="momentum")
  _, _, recs = run(tx, _params3(), 20, _loss3)
  new_positions = 0
  for t in (5, 10, 15, 20):
    assert counts_per_layer(recs[t], KERNELS3) == counts_per_layer(recs[0], KERNELS3)
    for a, b in zip(kmasks(recs[t - 1], KERNELS3), kmasks(recs[t], KERNELS3)):
      new_positions += int((b & ~a).sum())
  assert new_positions > 0, (
      "growth='momentum' never changed the mask in 4 events: the inner optimizer only "
      "sees masked gradients, so its momentum is exactly 0 at every inactive position "
      "and the grow step just re-picks the weights the drop step removed (the only "
      "candidates with nonzero momentum). Momentum growth needs a momentum of the "
      "dense gradients.")


def test_static_never_changes_masks():
  params = _params3()
  tx = sj.static(optax.adam(1e-2), sparsity=0.75, distribution="uniform")
  _, _, recs = run(tx, params, 10, _loss3)
  # Uniform: every layer keeps exactly 25%: 32, 48, 12.
  assert counts_per_layer(recs[0], KERNELS3) == [32, 48, 12]
  for rec in recs[1:]:
    for a, b in zip(kmasks(recs[0], KERNELS3), kmasks(rec, KERNELS3)):
      np.testing.assert_array_equal(a, b)
    assert_params_masked(rec, KERNELS3)


def test_gmp_reaches_exact_target():
  tx = sj.gmp(optax.sgd(0.05, momentum=0.9), sparsity=0.9, end_step=20, update_every=5)
  _, _, recs = run(tx, _params3(), 25, _loss3)
  for prev, rec in zip(recs[:-1], recs[1:]):
    t = rec["t"]
    assert_params_masked(rec, KERNELS3)
    for a, b in zip(kmasks(prev, KERNELS3), kmasks(rec, KERNELS3)):
      assert not np.any(b & ~a)  # GMP only prunes: the mask shrinks
    active = int(sj.count_active(rec["masks"]))
    assert active == G_COUNTS[min(t // 5, 4)]
  assert int(sj.count_active(recs[20]["masks"])) == 37
  assert int(sj.count_active(recs[25]["masks"])) == 37


def test_granet_st_starts_from_erk_exact_counts():
  params = _params3()
  tx = sj.granet(optax.sgd(LR), sparsity=0.9, initial_sparsity=0.5, total_steps=30,
                 end_step=20, update_every=5)
  _, _, recs = run(tx, params, 20, _loss3)
  assert counts_per_layer(recs[0], KERNELS3) == _erk_counts(params, 0.5)
  assert int(sj.count_active(recs[0]["masks"])) == 184  # round(0.5 * 368)
  counts = sj.gradual_active_counts(N3, initial_sparsity=0.5, final_sparsity=0.9,
                                    start_step=0, end_step=20, update_every=5)
  # s_k = 0.9 - 0.4 (1 - k/4)^3: k=1: 0.73125 -> 0.26875*368 = 98.9 -> 99;
  # k=2: 0.85 -> 55.2 -> 55; k=3: 0.89375 -> 39.1 -> 39; k=4: 36.8 -> 37.
  assert counts.tolist() == [184, 99, 55, 39, 37]
  for t in (5, 10, 15, 20):
    assert int(sj.count_active(recs[t]["masks"])) == counts[t // 5]
    assert_params_masked(recs[t], KERNELS3)
  # The initial random mask is applied by sparsify_params before training.
  state = jax.jit(tx.init)(params)
  sparse = sj.sparsify_params(params, state)
  for n in KERNELS3:
    m = np.asarray(sj.get_masks(state)[n]["kernel"])
    p = np.asarray(sparse[n]["kernel"])
    assert np.all(p[~m] == 0) and np.all(p[m] == np.asarray(params[n]["kernel"])[m])
    np.testing.assert_array_equal(sparse[n]["bias"], params[n]["bias"])


def test_granet_layerwise_scope_and_start_step():
  # start_step 7, dT 5: events at 10, 15, 20 (multiples of 5 at or after 7), not 7, 12.
  # k0 = 1, kf = 4: counts = [368, 368, then the 3-event cubic].
  tx = sj.granet(optax.sgd(LR), sparsity=0.9, total_steps=25, end_step=20, update_every=5,
                 start_step=7, scope="layerwise")
  _, _, recs = run(tx, _params3(), 24, _loss3)
  counts = sj.gradual_active_counts(N3, initial_sparsity=0.0, final_sparsity=0.9,
                                    start_step=7, end_step=20, update_every=5)
  # k=2: 0.9 - 0.9 (2/3)^3 -> 0.36667*368 = 134.9 -> 135; k=3: 49.1 -> 49; k=4: 37.
  assert counts.tolist() == [368, 368, 135, 49, 37]
  sizes = [128, 192, 48]
  for prev, rec in zip(recs[:-1], recs[1:]):
    t = rec["t"]
    changed = any(not np.array_equal(a, b)
                  for a, b in zip(kmasks(prev, KERNELS3), kmasks(rec, KERNELS3)))
    assert changed == (t in (10, 15, 20)), t
    assert_params_masked(rec, KERNELS3)
    if t in (10, 15, 20):
      # Each layer keeps the same fraction: round(target / N * n_l) (float32 as in the
      # library; e.g. t=20: 37/368 * [128, 192, 48] = [12.87, 19.30, 4.83] -> [13, 19, 5]).
      dens = np.float32(counts[t // 5]) / np.float32(N3)
      want = [int(np.round(dens * np.float32(n))) for n in sizes]
      assert counts_per_layer(rec, KERNELS3) == want, t
  assert counts_per_layer(recs[20], KERNELS3) == [13, 19, 5]


# ---------------------------------------------------------------------------
# get_masks / sparsify_params in composite states
# ---------------------------------------------------------------------------


def test_get_masks_direct_chain_and_multisteps():
  params = _params3()
  rng = np.random.default_rng(0)
  given = {n: {"kernel": rng.random(params[n]["kernel"].shape) < 0.5, "bias": None}
           for n in KERNELS3}
  # Every optimizer below starts from these masks (no random sampling to compile).
  make = lambda: sj.static(optax.sgd(0.1), initial_masks=given)
  ref = sj.get_masks(make().init(params))
  assert jax.tree.structure(ref) == jax.tree.structure(
      {n: {"bias": None, "kernel": 0} for n in KERNELS3})
  for n in KERNELS3:
    np.testing.assert_array_equal(ref[n]["kernel"], given[n]["kernel"])

  def same(masks):
    for n in KERNELS3:
      np.testing.assert_array_equal(masks[n]["kernel"], ref[n]["kernel"])
      assert masks[n]["bias"] is None

  x, y = _data()
  grads = jax.jit(jax.grad(_loss3))(params, x[0], y[0])
  for tx in (make(),
             optax.chain(optax.clip_by_global_norm(1.0), make()),
             optax.chain(make(), optax.scale(1.0)),
             optax.MultiSteps(make(), every_k_schedule=2)):
    state = tx.init(params)
    same(sj.get_masks(state))
    update = jax.jit(tx.update)
    for _ in range(2):  # through a (jitted) update too
      updates, state = update(grads, state, params)
      same(sj.get_masks(state))
    assert isinstance(sj.get_sparse_state(state), sj.SparseState)
  with pytest.raises(ValueError, match="found 0"):
    sj.get_masks(optax.adam(1e-3).init(params))
  two = optax.chain(make(), make()).init(params)
  with pytest.raises(ValueError, match="found 2"):
    sj.get_masks(two)


def test_sparsify_params_zeroes_off_mask():
  params = _params3()
  tx = sj.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=100, update_every=10)
  state = jax.jit(tx.init)(params)
  sparse = jax.jit(sj.sparsify_params)(params, state)
  masks = sj.get_masks(state)
  assert int(sj.count_active(masks)) == 37
  for n in KERNELS3:
    m = np.asarray(masks[n]["kernel"])
    p = np.asarray(sparse[n]["kernel"])
    assert np.all(p[~m] == 0)
    np.testing.assert_array_equal(p[m], np.asarray(params[n]["kernel"])[m])
  assert float(sj.params_sparsity(sparse)) == pytest.approx(1 - 37 / 368)


def test_mask_inner_state_by_hand():
  # Two leaves: "w" masked [T, F, T], "b" dense (mask None). One update with the
  # gradient g: SGD's momentum trace is g; Adam's mu = 0.1 g and nu = 0.001 g**2
  # (b1 = 0.9, b2 = 0.999), its count 1. Zeroed exactly where the mask is False.
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([1.0, 2.0, -4.0]), "b": jnp.array([0.5, -1.0])}
  masks = {"w": jnp.array([True, False, True]), "b": None}

  def masked(inner):
    _, state = inner.update(grads, inner.init(params), params)
    return jax.jit(lambda s, m: sj.mask_inner_state(inner, s, m))(state, masks)

  trace = masked(optax.sgd(0.1, momentum=0.9))[0].trace
  np.testing.assert_array_equal(np.asarray(trace["w"]), [1.0, 0.0, -4.0])
  np.testing.assert_array_equal(np.asarray(trace["b"]), [0.5, -1.0])

  adam = masked(optax.adam(1e-3))[0]
  assert int(adam.count) == 1  # not a per-parameter entry: kept
  np.testing.assert_allclose(np.asarray(adam.mu["w"]), [0.1, 0.0, -0.4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adam.nu["w"]), [0.001, 0.0, 0.016], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adam.mu["b"]), [0.05, -0.1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adam.nu["b"]), [0.00025, 0.001], rtol=1e-6)
  assert float(adam.mu["w"][1]) == 0.0 and float(adam.nu["w"][1]) == 0.0

  # Entries not of the parameter's shape (factored statistics: v_row and v_col
  # of a vector are [1]) are kept; packed masks work as bool ones.
  factored = optax.scale_by_factored_rms()
  _, state = factored.update(grads, factored.init(params), params)
  out = sj.mask_inner_state(factored, state, sj.pack_masks(masks))
  np.testing.assert_array_equal(np.asarray(out.v_row["w"]), np.asarray(state.v_row["w"]))
  np.testing.assert_array_equal(np.asarray(out.v["w"])[[1]], [0.0])
  np.testing.assert_array_equal(np.asarray(out.v["w"])[[0, 2]],
                                np.asarray(state.v["w"])[[0, 2]])


def test_initial_masks_are_used():
  params = _params3()
  masks = {n: {"kernel": jnp.ones(params[n]["kernel"].shape, bool).at[0].set(False),
               "bias": None} for n in KERNELS3}
  tx = sj.static(optax.sgd(0.1), initial_masks=masks)
  state = tx.init(params)
  for n in KERNELS3:
    np.testing.assert_array_equal(sj.get_masks(state)[n]["kernel"], masks[n]["kernel"])


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_input_errors():
  inner = optax.sgd(0.1)
  kw = dict(total_steps=100, end_step=50, update_every=10)
  with pytest.raises(ValueError, match=r"sparsity=1.0 is outside \[0, 1\)"):
    sj.granet(inner, sparsity=1.0, **kw)
  with pytest.raises(ValueError, match=r"sparsity=-0.1 is outside \[0, 1\)"):
    sj.granet(inner, sparsity=-0.1, **kw)
  with pytest.raises(ValueError, match="initial_sparsity=0.95 is above the final"):
    sj.granet(inner, sparsity=0.9, initial_sparsity=0.95, **kw)
  with pytest.raises(ValueError, match="start_step=60 is after end_step=50"):
    sj.granet(inner, sparsity=0.9, start_step=60, **kw)
  with pytest.raises(ValueError, match="update_every=0 must be >= 1"):
    sj.granet(inner, sparsity=0.9, total_steps=100, end_step=50, update_every=0)
  with pytest.raises(ValueError, match="end_step=150 is after total_steps=100"):
    sj.granet(inner, sparsity=0.9, total_steps=100, end_step=150, update_every=10)
  with pytest.raises(ValueError, match="Unknown distribution 'erdos'"):
    sj.granet(inner, sparsity=0.9, distribution="erdos", **kw)
  with pytest.raises(ValueError, match="Unknown distribution"):
    sj.rigl(inner, sparsity=0.9, total_steps=100, distribution="normal")
  with pytest.raises(ValueError, match="Unknown growth mode 'magnitude'"):
    sj.granet(inner, sparsity=0.9, growth="magnitude", **kw)
  with pytest.raises(ValueError, match="per-layer scope is 'layerwise'"):
    sj.granet(inner, sparsity=0.9, scope="uniform", **kw)
  with pytest.raises(ValueError, match="layerwise"):
    sj.gmp(inner, sparsity=0.9, end_step=50, update_every=10, scope="uniform")
  with pytest.raises(ValueError, match="Unknown sampling"):
    sj.static(inner, sparsity=0.9, sampling="poisson")
  with pytest.raises(ValueError, match=r"regrowth_rate=1.5 is outside \[0, 1\]"):
    sj.rigl(inner, sparsity=0.9, total_steps=100, regrowth_rate=1.5)
  with pytest.raises(ValueError, match="Unknown regrowth_schedule"):
    sj.set(inner, sparsity=0.9, total_steps=100, regrowth_schedule="linear")
  with pytest.raises(ValueError, match="gmp starts dense"):
    sj.gmp(inner, sparsity=0.9, initial_sparsity=0.5, end_step=50, update_every=10)


def test_bad_initial_masks_and_missing_params():
  params = _params3()
  # Wrong structure (a missing layer).
  bad = {n: {"kernel": jnp.ones(params[n]["kernel"].shape, bool), "bias": None}
         for n in ("l1", "l2")}
  with pytest.raises(ValueError, match="does not match the params tree"):
    sj.static(optax.sgd(0.1), initial_masks=bad).init(params)
  # Wrong shape: the message names the leaf.
  bad = {n: {"kernel": jnp.ones(params[n]["kernel"].shape, bool), "bias": None}
         for n in KERNELS3}
  bad["l2"]["kernel"] = jnp.ones((12, 16), bool)
  with pytest.raises(ValueError, match=r"Mask for 'l2/kernel' has shape \(12, 16\)"):
    sj.granet(optax.sgd(0.1), sparsity=0.9, total_steps=10, end_step=5, update_every=5,
              initial_masks=bad).init(params)
  # No mask array at all.
  none = {n: {"kernel": None, "bias": None} for n in KERNELS3}
  with pytest.raises(ValueError, match="initial_masks has no mask array"):
    sj.static(optax.sgd(0.1), initial_masks=none).init(params)
  # Nothing prunable.
  with pytest.raises(ValueError, match="No prunable leaf selected"):
    sj.static(optax.sgd(0.1), sparsity=0.5, include="nothing").init(params)
  # update without params.
  tx = sj.static(optax.sgd(0.1), sparsity=0.5)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"need the params: call tx.update\(grads, opt_state, params\)"):
    tx.update(params, state)


# mask_update: the event decided on the host (static) instead of in the graph


def _mask_update_run(tx, choose, steps=20):
  params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(12, 8)),
                                        jnp.float32)},
            "b": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)),
                                        jnp.float32), "bias": jnp.zeros(4)}}
  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 12)), jnp.float32)

  def loss(p):
    return jnp.sum((jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)

  @jax.jit
  def grads_of(p):
    return jax.grad(loss)(p)

  updates = {mu: jax.jit(lambda g, s, p, mu=mu: tx.update(g, s, p, mask_update=mu))
             for mu in (None, False, True)}
  p, s = params, tx.init(params)
  for i in range(steps):
    u, s = updates[choose(i)](grads_of(p), s, p)
    p = optax.apply_updates(p, u)
  return p, s


@pytest.mark.parametrize("make", [
    lambda: sj.granet(optax.sgd(0.05, momentum=0.9), sparsity=0.8, total_steps=20,
                      end_step=10, update_every=4),
    lambda: sj.set(optax.sgd(0.05, momentum=0.9), sparsity=0.7, total_steps=20,
                   update_every=4),
], ids=["granet", "set"])
def test_mask_update_on_the_host_gives_the_same_run(make):
  # Events at t = 4, 8, ... (update i is t = i + 1). In-graph (None), host-decided
  # (True exactly at events, False elsewhere) and always-True runs are identical
  # with SGD (other optimizers may differ in the last float bit: the programs are
  # fused differently).
  tx = make()
  ref = _mask_update_run(tx, lambda i: None)
  for choose in (lambda i: (i + 1) % 4 == 0, lambda i: True):
    got = _mask_update_run(tx, choose)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mask_update_false_at_an_event_is_counted():
  tx = sj.rigl(optax.sgd(0.05), sparsity=0.5, total_steps=20, update_every=4, end_step=12)
  p0 = {"a": {"kernel": jnp.zeros((12, 8))}, "b": {"kernel": jnp.zeros((8, 4))}}
  masks0 = sj.get_masks(tx.init(p0))
  _, s = _mask_update_run(tx, lambda i: False, steps=14)
  # Updates 4, 8 and 12 were events (end_step 12); none was applied.
  assert int(sj.get_sparse_state(s).skipped_events) == 3
  for a, b in zip(jax.tree.leaves(masks0), jax.tree.leaves(sj.get_masks(s))):
    np.testing.assert_array_equal(a, b)
  # Host-decided correctly: nothing skipped.
  _, s = _mask_update_run(tx, lambda i: (i + 1) % 4 == 0, steps=14)
  assert int(sj.get_sparse_state(s).skipped_events) == 0


def test_mask_update_must_be_static():
  tx = sj.rigl(optax.sgd(0.05), sparsity=0.5, total_steps=20, update_every=4)
  p = {"w": jnp.ones((4, 4))}
  s = tx.init(p)
  with pytest.raises(TypeError, match="Python bool known when tracing"):
    jax.jit(lambda flag: tx.update(p, s, p, mask_update=flag))(jnp.array(True))
