"""scheduled_jit follows the optimizer state's count: no event is lost to drift.

Its host count used to be the number of calls, so a state resumed without
``count=``, a step skipped for non-finite gradients (``optax.apply_if_finite`` or
the step's own skip) or ``optax.MultiSteps`` moved every later event onto an
ordinary program, and the masks stopped changing. Plain ``jax.jit`` (the event
decided in the graph) is the reference: the same masks, the same params.
"""

import json
import subprocess
import sys
import textwrap
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import sparse_jax
from sparse_jax import _scheduled_jit
from sparse_jax import _transform
from tests import multidevice
from tests.test_scheduled_jit import apply_mlp
from tests.test_scheduled_jit import make_params

STEPS = 24


def grads_of(state, x, y):
  def loss_fn(p):
    logits = state.apply_fn({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.grad(loss_fn)(state.params)


def train_step(state, x, y):
  return state.apply_gradients(grads=grads_of(state, x, y))


def skipping_step(state, x, y):
  """A client's own skip: the whole state kept when a gradient is not finite."""
  grads = grads_of(state, x, y)
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  new = state.apply_gradients(grads=grads)
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)


def granet():
  return sparse_jax.granet(optax.sgd(0.05, momentum=0.9), sparsity=0.9,
                           total_steps=STEPS, end_step=16, update_every=4)


def batches(n, nan_at=()):
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  out = []
  for i, k in enumerate(keys):
    x = jax.random.normal(k, (16, 12))
    out.append((x * jnp.nan if i in nan_at else x, jax.random.randint(k, (16,), 0, 3)))
  return out


def run(step_fn, wrap, data, scheduled: bool, resume_at=None):
  """Trains on ``data``; ``resume_at``: a fresh step function from that call on."""
  tx = granet()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(hidden=16),
                                        tx=wrap(tx))
  new = (lambda: sparse_jax.scheduled_jit(tx)(step_fn)) if scheduled else (
      lambda: jax.jit(step_fn))
  step = new()
  for i, (x, y) in enumerate(data):
    if i == resume_at:
      step = new()  # a restored run: no count= given
    state = step(state, x, y)
  return state


def assert_same(a, b):
  np.testing.assert_array_equal(
      sparse_jax.density(sparse_jax.get_masks(a.opt_state)),
      sparse_jax.density(sparse_jax.get_masks(b.opt_state)))
  for u, v in zip(jax.tree.leaves(sparse_jax.get_masks(a.opt_state)),
                  jax.tree.leaves(sparse_jax.get_masks(b.opt_state))):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert int(sparse_jax.get_sparse_state(b.opt_state).skipped_events) == 0


def test_resume_without_count():
  data = batches(STEPS)
  plain = run(train_step, lambda tx: tx, data, scheduled=False)
  resumed = run(train_step, lambda tx: tx, data, scheduled=True, resume_at=6)
  assert float(sparse_jax.density(sparse_jax.get_masks(resumed.opt_state))) < 0.15
  assert_same(plain, resumed)


@pytest.mark.parametrize("skip", ["apply_if_finite", "own_skip"])
def test_a_skipped_step_loses_no_event(skip):
  data = batches(STEPS + 1, nan_at=(2,))
  step_fn = train_step if skip == "apply_if_finite" else skipping_step
  wrap = (lambda tx: optax.apply_if_finite(tx, 3)) if skip == "apply_if_finite" else (
      lambda tx: tx)
  plain = run(step_fn, wrap, data, scheduled=False)
  with pytest.warns(RuntimeWarning, match="some calls did not apply an update"):
    scheduled = run(step_fn, wrap, data, scheduled=True)
  assert int(sparse_jax.get_sparse_state(scheduled.opt_state).count) == STEPS
  assert float(sparse_jax.density(sparse_jax.get_masks(scheduled.opt_state))) < 0.15
  assert_same(plain, scheduled)


def test_multi_steps():
  data = batches(2 * STEPS)
  wrap = lambda tx: optax.MultiSteps(tx, every_k_schedule=2).gradient_transformation()
  plain = run(train_step, wrap, data, scheduled=False)
  with pytest.warns(RuntimeWarning, match="optax.MultiSteps accumulating"):
    scheduled = run(train_step, wrap, data, scheduled=True)
  assert int(sparse_jax.get_sparse_state(scheduled.opt_state).count) == STEPS
  assert_same(plain, scheduled)


def test_one_read_per_event_and_the_event_program_compiled_ahead(monkeypatch):
  reads, traced = [], []
  read = _scheduled_jit.read_counts
  monkeypatch.setattr(_scheduled_jit, "read_counts",
                      lambda *a: reads.append(1) or read(*a))

  def step(state, x, y):
    traced.append((_transform.MASK_UPDATE.get(), threading.current_thread().name))
    return train_step(state, x, y)

  tx = granet()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(hidden=16), tx=tx)
  scheduled = sparse_jax.scheduled_jit(tx)(step)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no drift here: nothing to warn about
    for x, y in batches(STEPS):
      state = scheduled(state, x, y)
  events = sum(sparse_jax.event_schedule(tx)(t) for t in range(1, STEPS + 1))
  assert events == 5 and len(reads) == 1 + events  # the first call, then after each
  assert scheduled.count == STEPS == int(state.step)
  # The ordinary program traced by the call, the event program in the background.
  assert [m for m, _ in traced] == [False, True]
  assert traced[0][1] == threading.main_thread().name != traced[1][1]


PMAP_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import sparse_jax
    from sparse_jax import _transform

    def loss_fn(p, x, y):
      logits = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (20, 32)) / 4.5, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 5)) / 5.7}
    xs = jax.random.normal(k3, (20, 64, 20))
    ys = jax.random.randint(k4, (20, 64), 0, 5)
    n = jax.device_count()
    out, traced = {}, []
    # Placed as pmap places its outputs, so that pass-through outputs match inputs.
    devices = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), "i"),
                                         jax.sharding.PartitionSpec("i"))
    rep = lambda tree: jax.device_put(jax.tree.map(lambda a: jnp.stack([a] * n), tree),
                                      devices)
    for kind in ("pmap", "scheduled"):
      tx = sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                             total_steps=20, end_step=12, update_every=4)

      def step(p, s, x, y):
        traced.append(_transform.MASK_UPDATE.get())
        g = jax.lax.pmean(jax.grad(loss_fn)(p, x, y), "i")
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      run = (jax.pmap(step, axis_name="i") if kind == "pmap" else
             sparse_jax.scheduled_jit(tx, jit=jax.pmap, axis_name="i")(step))
      p, s = rep((params, tx.init(params)))
      for t in range(20):
        p, s = run(p, s, xs[t].reshape(n, -1, 20), ys[t].reshape(n, -1))
      masks = sparse_jax.get_masks(s)
      out[kind] = {"leaves": [np.asarray(a).tolist() for a in jax.tree.leaves((p, masks))],
                   "skipped": np.asarray(sparse_jax.get_sparse_state(s).skipped_events).tolist(),
                   "density": float(sparse_jax.density(jax.tree.map(lambda a: a[0], masks)))}
    print(json.dumps({"devices": n, "traced": traced, **out}))
""")


@pytest.mark.multidevice
def test_pmap_on_8_devices_same_bits_as_plain_pmap():
  proc = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=multidevice.env(8),
                        capture_output=True, text=True, timeout=600, cwd=multidevice.REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  # Plain pmap traces once; each program once (the event's compiled ahead is used).
  assert out["traced"] == [None, False, True]
  assert out["scheduled"]["skipped"] == [0] * 8
  assert abs(out["scheduled"]["density"] - 0.2) < 0.02
  assert out["scheduled"]["leaves"] == out["pmap"]["leaves"]
