"""sparse_jax.scheduled_jit: the README's step as two programs, chosen on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import sparse_jax
from sparse_jax import _scheduled_jit
from sparse_jax import _transform


def make_params(hidden=8):
  """A 12-hidden-3 MLP's params (also used by tests/test_scheduled_jit_drift.py)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"Dense_0": {"kernel": jax.random.normal(k1, (12, hidden)), "bias": jnp.zeros(hidden)},
          "Dense_1": {"kernel": jax.random.normal(k2, (hidden, 3)), "bias": jnp.zeros(3)}}


def apply_mlp(variables, x):
  p = variables["params"]
  h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _step(state, x, y):
  def loss_fn(p):
    logits = state.apply_fn({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def _batches(n):
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  return [(jax.random.normal(k, (16, 12)), jax.random.randint(k, (16,), 0, 3)) for k in keys]


METHODS = {
    "granet": lambda: sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                        total_steps=20, end_step=12, update_every=4),
    "rigl": lambda: sparse_jax.rigl(optax.adam(1e-2), sparsity=0.7, total_steps=20,
                                    update_every=3),
    "set": lambda: sparse_jax.set(optax.sgd(0.1), sparsity=0.7, total_steps=20,
                                  update_every=5, start_step=4),
    # Weight decay before the momentum: decided in the graph by a cond (_inner_kind).
    "granet_coupled_decay": lambda: sparse_jax.granet(
        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)),
        sparsity=0.8, total_steps=20, end_step=12, update_every=4),
    "gmp_adamw_packed": lambda: sparse_jax.gmp(
        optax.adamw(1e-2, weight_decay=1e-2), sparsity=0.7, end_step=12, update_every=4,
        packed_masks=True),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_bits_as_the_in_graph_decision(method):
  runs = {}
  for kind in ("jit", "scheduled"):
    tx = METHODS[method]()
    state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
    step = jax.jit(_step) if kind == "jit" else sparse_jax.scheduled_jit(tx)(_step)
    for x, y in _batches(20):
      state = step(state, x, y)
    runs[kind] = state
  a, b = runs["jit"], runs["scheduled"]
  assert int(sparse_jax.get_sparse_state(b.opt_state).skipped_events) == 0
  for u, v in zip(jax.tree.leaves((a.params, a.opt_state)),
                  jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_in_graph_decision_moves_no_optimizer_state():
  """Plain jit's ordinary step neither copies the (donated) optimizer state nor hands
  it through control flow: the event is a loop of 0 or 1 iterations that the state
  enters in place (a lax.cond copied it on every step, 1.3-1.5x a dense step)."""
  tx = METHODS["granet"]()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  x, y = _batches(1)[0]
  text = jax.jit(_step, donate_argnums=0).lower(state, x, y).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  assert " while(" in entry
  assert " conditional(" not in entry
  copies = [line for line in entry.splitlines()
            if " copy(" in line and "= f32[" in line and "inner_state" in line.split(" copy(")[1]]
  assert not copies, copies


def test_programs_and_count():
  tx = METHODS["granet"]()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  traced = []

  def step(state, x, y):
    traced.append(_transform.MASK_UPDATE.get())
    return _step(state, x, y)

  scheduled = sparse_jax.scheduled_jit(tx)(step)
  for x, y in _batches(9):
    state = scheduled(state, x, y)
  # One trace per program: ordinary (False) first, the event (True) at update 4.
  assert traced == [False, True]
  assert scheduled.count == 9 == int(state.step)
  assert _transform.MASK_UPDATE.get() is None


@pytest.mark.parametrize("ahead", [True, False])
def test_event_program_alone_takes_the_event_compiler_options(monkeypatch, ahead):
  """The event program compiles with ``event_compiler_options`` (LLVM level 1 on a
  CPU), ahead in the background or by the jit at the first event; the ordinary
  program does not. An option XLA does not know shows where they go: the ordinary
  steps run, the event step fails naming it (the results with the real options are
  those of plain jit: ``test_same_bits_as_the_in_graph_decision``)."""
  expected = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}
  assert sparse_jax.event_compiler_options() == expected
  monkeypatch.setattr(_scheduled_jit, "event_compiler_options",
                      lambda: {"xla_no_such_option": 1})
  tx = METHODS["granet"]()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  # Ahead: jax.jit compiles the event program in the background after the first
  # call; a static argument turns that off (the jit compiles it at the first event).
  kwargs = {} if ahead else {"static_argnames": "unused"}
  step = sparse_jax.scheduled_jit(tx, **kwargs)(lambda s, x, y, unused=0: _step(s, x, y))
  batches = _batches(4)
  for x, y in batches[:3]:  # updates 1-3: ordinary
    state = step(state, x, y)
  with pytest.raises(Exception, match="xla_no_such_option"):
    step(state, *batches[3])  # update 4: the event


def test_pmap_event_program_compiles_ahead_with_the_event_compiler_options(
    monkeypatch, caplog):
  """pmap takes no compiler options: they go to the compile ahead. An unknown one
  makes that compile fail (logged), and the step falls back to plain pmap."""
  monkeypatch.setattr(_scheduled_jit, "event_compiler_options",
                      lambda: {"xla_no_such_option": 1})
  tx = METHODS["granet"]()
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  state = jax.tree.map(lambda a: jnp.asarray(a)[None], state)  # one device's copy
  step = sparse_jax.scheduled_jit(tx, jit=jax.pmap, axis_name="i")(_step)
  with caplog.at_level("INFO", logger="sparse_jax"):
    for x, y in _batches(4):  # update 4: the event
      state = step(state, x[None], y[None])
  assert "compiling ahead failed" in caplog.text and "xla_no_such_option" in caplog.text
  assert int(sparse_jax.get_sparse_state(state.opt_state).skipped_events[0]) == 0


def test_users_compiler_options_reach_both_programs():
  tx = METHODS["granet"]()
  step = sparse_jax.scheduled_jit(tx, compiler_options={"xla_no_such_option": 1})(_step)
  state = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  # The event program's options are merged into the user's, not put in their place.
  for program in (step.ordinary, step.event):
    with pytest.raises(Exception, match="xla_no_such_option"):
      program(state, *_batches(1)[0])


def test_resume_count_picks_the_right_program():
  tx = METHODS["granet"]()
  batches = _batches(8)
  full = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  step = sparse_jax.scheduled_jit(tx)(_step)
  for x, y in batches:
    full = step(full, x, y)
  part = train_state.TrainState.create(apply_fn=apply_mlp, params=make_params(), tx=tx)
  first = sparse_jax.scheduled_jit(tx)(_step)
  for x, y in batches[:3]:
    part = first(part, x, y)
  resumed = sparse_jax.scheduled_jit(tx, count=int(part.step))(_step)
  for x, y in batches[3:]:
    part = resumed(part, x, y)
  assert int(sparse_jax.get_sparse_state(part.opt_state).skipped_events) == 0
  for u, v in zip(jax.tree.leaves(full.params), jax.tree.leaves(part.params)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_nnx_step():
  def make():
    model = nnx.Sequential(nnx.Linear(12, 8, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    tx = sparse_jax.rigl(optax.adam(1e-2), sparsity=0.7, total_steps=20, update_every=3)
    return model, tx, nnx.Optimizer(model, tx, wrt=nnx.Param)

  def nnx_step(model, optimizer, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))

  (m1, _, o1), (m2, tx2, o2) = make(), make()
  plain = nnx.jit(nnx_step)
  scheduled = sparse_jax.scheduled_jit(tx2, jit=nnx.jit)(nnx_step)
  for x, y in _batches(10):
    plain(m1, o1, x, y)
    scheduled(m2, o2, x, y)
  assert int(sparse_jax.get_sparse_state(o2).skipped_events) == 0
  for u, v in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2))):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_mistakes_are_clear_errors():
  tx = METHODS["granet"]()
  with pytest.raises(TypeError, match="remove the @jax.jit"):
    sparse_jax.scheduled_jit(tx)(jax.jit(_step))
  with pytest.raises(TypeError, match="not a sparse_jax transformation"):
    sparse_jax.scheduled_jit(optax.chain(tx, optax.identity()))(_step)
  with pytest.raises(TypeError, match="not a sparse_jax transformation"):
    sparse_jax.scheduled_jit(optax.sgd(0.1))(_step)
