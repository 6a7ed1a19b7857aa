"""Properties of every method's masks in every float dtype (hypothesis).

Each method runs six updates on a three-kernel tree whose values hypothesis draws
(normal, or half-integers full of ties and zeros), in float32, bfloat16 and
float16, with the mask update decided in the graph (``mask_update=None``) or
always taken without the ``lax.cond`` (``mask_update=True``, the program that
``scheduled_jit`` and host-decided loops run at events). After every update:

* the active count is exactly the schedule's (constant for RigL, SET, static;
  the cubic schedule's for GraNet and GMP; ``sparsity`` after a one-shot prune);
* an event that only regrows keeps every layer's count (drop n, grow n);
* every masked weight is exactly 0 and no event is skipped.

Only values change between examples (traced arguments), so each case compiles
once: a ``lax.scan`` over the six updates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_jax as sj

SHAPES = {"l0": (2, 4), "l1": (4, 4), "l2": (4, 2)}
N = sum(int(np.prod(s)) for s in SHAPES.values())  # 32 prunable weights
STEPS = 6
SGD = optax.sgd(0.125, momentum=0.5)

# name: (factory, prune schedule (for the expected counts) or None, regrowth end).
# Events at every update. GraNet regrows until total_steps - 1 = 5, RigL until
# 0.75 * 6 = 4, SET until end_step.
CASES = {
    # The case of issue 28: a dense start, no pruning after update 1, every weight
    # dropped and regrown (rate 1) by momentum.
    "granet_momentum_dense": (
        functools.partial(sj.granet, SGD, sparsity=0.0, total_steps=STEPS, end_step=1,
                          update_every=1, regrowth_rate=1.0, growth="momentum"),
        dict(initial_sparsity=0.0, final_sparsity=0.0, end_step=1), 5),
    "granet": (
        functools.partial(sj.granet, SGD, sparsity=0.5, total_steps=STEPS, end_step=3,
                          update_every=1, regrowth_rate=0.5),
        dict(initial_sparsity=0.0, final_sparsity=0.5, end_step=3), 5),
    "granet_st": (
        functools.partial(sj.granet, SGD, sparsity=0.75, initial_sparsity=0.25,
                          total_steps=STEPS, end_step=3, update_every=1, regrowth_rate=0.5,
                          scope="layerwise", growth="random"),
        dict(initial_sparsity=0.25, final_sparsity=0.75, end_step=3), 5),
    "gmp": (
        functools.partial(sj.gmp, SGD, sparsity=0.75, end_step=4, update_every=1),
        dict(initial_sparsity=0.0, final_sparsity=0.75, end_step=4), 0),
    "rigl": (
        functools.partial(sj.rigl, SGD, sparsity=0.5, total_steps=STEPS, update_every=1,
                          regrowth_rate=0.5),
        None, 4),
    "rigl_momentum": (
        functools.partial(sj.rigl, SGD, sparsity=0.5, total_steps=STEPS, update_every=1,
                          regrowth_rate=0.5, growth="momentum"),
        None, 4),
    "set": (
        functools.partial(sj.set, SGD, sparsity=0.5, total_steps=STEPS, update_every=1,
                          end_step=5, regrowth_rate=0.5),
        None, 5),
    "static": (functools.partial(sj.static, SGD, sparsity=0.5), None, 0),
    "one_shot": (
        functools.partial(sj.one_shot, SGD, sparsity=0.5, prune_step=2),
        dict(initial_sparsity=0.0, final_sparsity=0.5, end_step=2, update_every=2), 0),
    # Structured: N:M groups (1 of every 2 inputs) and 2x2 blocks.
    "granet_nm": (
        functools.partial(sj.granet, SGD, structure=sj.NM(1, 2), total_steps=STEPS,
                          end_step=2, update_every=1, regrowth_rate=0.5,
                          growth="momentum"),
        None, 5),
    "rigl_block": (
        functools.partial(sj.rigl, SGD, sparsity=0.5, structure=sj.Block(2, 2),
                          total_steps=STEPS, update_every=1, regrowth_rate=0.5),
        None, 4),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def expected_totals(schedule, initial_total):
  """Active count after each update 0..STEPS (0: init), from the cubic schedule."""
  if schedule is None:
    return [initial_total] * (STEPS + 1)
  every = schedule.get("update_every", 1)
  counts = sj.gradual_active_counts(
      N, initial_sparsity=schedule["initial_sparsity"],
      final_sparsity=schedule["final_sparsity"], start_step=0,
      end_step=schedule["end_step"], update_every=every)
  out, now = [], int(counts[0])
  for t in range(STEPS + 1):
    if 1 <= t <= schedule["end_step"] and t % every == 0:
      now = int(counts[t // every])
    out.append(now)
  return out


@functools.lru_cache(maxsize=None)
def compiled_run(case: str, dtype: str, mask_update):
  """The jitted six-update run of a case: (params, grad key) -> per-update records."""
  tx = CASES[case][0]()

  def update(carry, key):
    params, state = carry
    grads = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape).astype(p.dtype), params,
        dict(zip(SHAPES, jax.random.split(key, len(SHAPES)))) | {"bias": key})
    updates, state = tx.update(grads, state, params, mask_update=mask_update)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, sj.get_masks(state))

  @jax.jit
  def run(params, key):
    state = tx.init(params)
    (_, state), (params_t, masks_t) = jax.lax.scan(
        update, (params, state), jax.random.split(key, STEPS))
    return sj.get_masks(tx.init(params)), params_t, masks_t, sj.get_sparse_state(
        state).skipped_events

  return run


def draw_params(data, dtype):
  seed = data.draw(st.integers(0, 2**16), label="seed")
  ties = data.draw(st.booleans(), label="ties")
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in SHAPES.items():
    w = rng.normal(size=shape)
    params[name] = jnp.asarray(np.round(2 * w) / 2 if ties else w, dtype)
  params["bias"] = jnp.zeros((2,), dtype)  # a dense leaf
  return params, jax.random.PRNGKey(seed)


def combinations():
  """Every (case, dtype, mask_update); those outside the quick set are slow.

  Each is a compiled program (~5 s cold on a 2-core CPU, ~1 s warm). The quick set
  runs every case in bfloat16 without the cond and in float16 in the graph, and the
  issue's case in every combination; float32 in the graph is also what the other
  test files run.
  """
  for case in CASES:
    for dtype in DTYPES:
      for mask_update, mode in ((None, "in_graph"), (True, "no_cond")):
        quick = (case == "granet_momentum_dense" or (dtype, mode) in (
            ("bfloat16", "no_cond"), ("float16", "in_graph")))
        yield pytest.param(case, dtype, mask_update, id=f"{case}-{dtype}-{mode}",
                           marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("case,dtype,mask_update", list(combinations()))
@settings(deadline=None, max_examples=6, derandomize=True)
@given(data=st.data())
def test_exact_counts_in_every_dtype(case, dtype, mask_update, data):
  params, key = draw_params(data, DTYPES[dtype])
  masks0, params_t, masks_t, skipped = jax.device_get(
      compiled_run(case, dtype, mask_update)(params, key))
  counts = [[int(masks0[n].sum()) for n in SHAPES]] + [
      [int(masks_t[n][t].sum()) for n in SHAPES] for t in range(STEPS)]
  _, schedule, regrow_end = CASES[case]
  want = expected_totals(schedule, sum(counts[0]))
  if case in ("rigl", "rigl_momentum", "set", "static", "rigl_block"):
    assert sum(counts[0]) == sj.active_count(0.5, N)
  if case == "granet_nm":
    want = [N] + [None] * 1 + [N // 2] * (STEPS - 1)  # update 1: partway
  for t in range(1, STEPS + 1):
    if want[t] is not None:
      assert sum(counts[t]) == want[t], (t, counts)
    prunes = want[t] != want[t - 1] or (case == "granet_nm" and t <= 2)
    if t <= regrow_end and not prunes and want[t - 1] is not None:
      assert counts[t] == counts[t - 1], (t, counts)  # drop n, grow n in each layer
  for name in SHAPES:
    w, m = np.asarray(params_t[name], np.float32), masks_t[name]
    assert np.all(np.isfinite(w))
    assert not np.any(w[~m]), name  # masked weights exactly 0
  assert skipped is None or int(skipped) == 0
