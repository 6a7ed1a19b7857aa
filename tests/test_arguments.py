"""Argument checks of every factory (issue 13, items 7-11).

The same mistake gets the same kind of error, with the same wording, from every
factory, when the factory is called (before ``init`` or any compile): ``TypeError``
for a value of the wrong type, ``ValueError`` for a value out of range or a
schedule that would never update the masks.
"""

import builtins

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj

SGD = optax.sgd(0.1)

# Each factory with its step arguments at valid values (events at 10, 20, ...).
STEP_FACTORIES = {
    "granet": lambda **kw: sj.granet(SGD, **{**dict(sparsity=0.9, total_steps=100,
                                                    end_step=50, update_every=10), **kw}),
    "gmp": lambda **kw: sj.gmp(SGD, **{**dict(sparsity=0.9, end_step=50, update_every=10),
                                        **kw}),
    "rigl": lambda **kw: sj.rigl(SGD, **{**dict(sparsity=0.9, total_steps=100,
                                                update_every=10), **kw}),
    "set": lambda **kw: sj.set(SGD, **{**dict(sparsity=0.9, total_steps=100,
                                              update_every=10), **kw}),
}
ALL_FACTORIES = {
    **STEP_FACTORIES,
    "static": lambda **kw: sj.static(SGD, **{**dict(sparsity=0.9), **kw}),
    "one_shot": lambda **kw: sj.one_shot(SGD, **{**dict(sparsity=0.9, prune_step=10), **kw}),
}
TOTAL = ("granet", "rigl", "set")  # the factories that take total_steps


def _params():
  # 10 x 10 and 5 x 4 kernels: 120 prunable weights; biases stay dense.
  return {"a": {"kernel": jnp.ones((10, 10)), "bias": jnp.zeros((10,))},
          "b": {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros((4,))}}


def _masks(active_a, active_b):
  """Bool masks with the first ``active_a`` / ``active_b`` weights (flat order) on."""
  a = np.zeros(100, bool)
  a[:active_a] = True
  b = np.zeros(20, bool)
  b[:active_b] = True
  return {"a": {"kernel": a.reshape(10, 10), "bias": None},
          "b": {"kernel": b.reshape(5, 4), "bias": None}}


# ---------------------------------------------------------------------------
# 7. A schedule without a single event in its window
# ---------------------------------------------------------------------------


def test_pruning_window_without_event_is_rejected():
  # update_every=60 > end_step=50: events at 60, 120, ... all after end_step.
  msg = (r"No mask-update event falls in \(start_step, end_step\] = \(0, 50\] with "
         r"update_every=60 .*lower update_every to at most 50 or raise end_step to at "
         r"least 60")
  with pytest.raises(ValueError, match=msg):
    sj.granet(SGD, sparsity=0.9, total_steps=100, end_step=50, update_every=60)
  with pytest.raises(ValueError, match=msg):
    sj.gmp(SGD, sparsity=0.9, end_step=50, update_every=60)
  # t = 40 is a multiple of 20, but the cubic schedule is at s_i there (k0 = 2);
  # the next event, 60, is after end_step: no prune at all.
  with pytest.raises(ValueError, match=r"\(40, 50\] with update_every=20 .*at most 10 "
                                       r"or raise end_step to at least 60"):
    sj.granet(SGD, sparsity=0.9, total_steps=100, start_step=40, end_step=50,
              update_every=20)
  # The fix would need end_step = 120 > total_steps = 100: only update_every is named.
  with pytest.raises(ValueError, match=r"lower update_every to at most 100\.$"):
    sj.granet(SGD, sparsity=0.9, total_steps=100, end_step=100, update_every=120)
  # start_step == end_step: an empty window, whatever update_every.
  with pytest.raises(ValueError, match=r"\(50, 50\] .*raise end_step to at least 60\.$"):
    sj.gmp(SGD, sparsity=0.9, start_step=50, end_step=50, update_every=10)


def test_mask_update_window_without_event_is_rejected():
  # rigl's defaults: update_every=100, end_step = 75% of total_steps = 75.
  with pytest.raises(ValueError, match=r"No mask-update event falls in \[start_step, "
                                       r"end_step\] = \[0, 75\] with update_every=100 .*"
                                       r"75% of total_steps.*at most 75 or raise end_step "
                                       r"to at least 100"):
    sj.rigl(SGD, sparsity=0.9, total_steps=100)
  # set's default end_step = total_steps - 1 = 49 < update_every = 60, and 60 is past
  # total_steps: only update_every is named.
  with pytest.raises(ValueError, match=r"\[0, 49\] with update_every=60 .*"
                                       r"lower update_every to at most 49\.$"):
    sj.set(SGD, sparsity=0.9, total_steps=50, update_every=60)
  with pytest.raises(ValueError, match=r"\[31, 39\] with update_every=10 .*at most 9 "
                                       r"or raise end_step to at least 40"):
    sj.rigl(SGD, sparsity=0.9, total_steps=100, start_step=31, end_step=39, update_every=10)


def test_one_event_is_enough():
  # The boundaries of the checks above: exactly one event, and it happens.
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = sj.granet(SGD, sparsity=0.9, total_steps=100, end_step=60, update_every=60)
  step = jax.jit(lambda s: tx.update(grads, s, params)[1])
  state = tx.init(params)
  for _ in range(60):
    state = step(state)
  # One event, at k = kf: the final sparsity, exactly round(0.1 * 120) = 12 kept.
  assert int(sj.count_active(sj.get_masks(state))) == 12
  # Window [40, 40]: the event at t = 40 is the only one, and it is valid.
  sj.rigl(SGD, sparsity=0.9, total_steps=100, start_step=40, end_step=40, update_every=20)
  sj.rigl(SGD, sparsity=0.9, total_steps=100, update_every=75)  # event at 75 = end_step
  sj.gmp(SGD, sparsity=0.9, start_step=40, end_step=60, update_every=20)  # prunes at 60


# ---------------------------------------------------------------------------
# 8. Step arguments: the same checks, in the same words, everywhere
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOTAL)
@pytest.mark.parametrize("total", [0, -5])
def test_total_steps_must_be_positive(name, total):
  with pytest.raises(ValueError, match=rf"^total_steps={total} must be >= 1 \(the number "
                                       r"of optimizer updates of the run\)"):
    STEP_FACTORIES[name](total_steps=total, end_step=None if name != "granet" else 0)


@pytest.mark.parametrize("name", TOTAL)
def test_end_step_after_total_steps(name):
  with pytest.raises(ValueError, match=r"^end_step=150 is after total_steps=100\."):
    STEP_FACTORIES[name](end_step=150)


@pytest.mark.parametrize("name", list(STEP_FACTORIES))
def test_start_and_end_step(name):
  with pytest.raises(ValueError, match=r"^start_step=-1 must be >= 0\."):
    STEP_FACTORIES[name](start_step=-1)
  with pytest.raises(ValueError, match=r"^start_step=60 is after end_step=50: "):
    STEP_FACTORIES[name](start_step=60, end_step=50)


@pytest.mark.parametrize("name", list(STEP_FACTORIES))
@pytest.mark.parametrize("every", [0, -3])
def test_update_every_must_be_positive(name, every):
  with pytest.raises(ValueError, match=rf"^update_every={every} must be >= 1 "):
    STEP_FACTORIES[name](update_every=every)


def test_prune_step_must_be_positive():
  with pytest.raises(ValueError, match=r"^prune_step=0 must be >= 1: "):
    sj.one_shot(SGD, sparsity=0.9, prune_step=0)


# ---------------------------------------------------------------------------
# 9. Regrowth rates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["granet", "rigl", "set"])
@pytest.mark.parametrize("rate", [-1, 2, 1.5, float("nan")])
def test_regrowth_rate_outside_unit_interval(name, rate):
  with pytest.raises(ValueError, match=rf"^regrowth_rate={rate!r} is outside \[0, 1\]: "):
    STEP_FACTORIES[name](regrowth_rate=rate)


def test_min_regrowth_rate():
  with pytest.raises(ValueError, match=r"^min_regrowth_rate=5 is outside \[0, 1\]: "):
    STEP_FACTORIES["granet"](min_regrowth_rate=5)
  with pytest.raises(ValueError, match=r"^min_regrowth_rate=-0.1 is outside \[0, 1\]: "):
    STEP_FACTORIES["granet"](min_regrowth_rate=-0.1)
  with pytest.raises(ValueError, match=r"^min_regrowth_rate=0.6 is above regrowth_rate=0.5: "):
    STEP_FACTORIES["granet"](regrowth_rate=0.5, min_regrowth_rate=0.6)
  # The edges are valid.
  STEP_FACTORIES["granet"](regrowth_rate=0.0, min_regrowth_rate=0.0)
  STEP_FACTORIES["granet"](regrowth_rate=1.0, min_regrowth_rate=1.0)
  STEP_FACTORIES["rigl"](regrowth_rate=0.0)
  STEP_FACTORIES["set"](regrowth_rate=1)


# ---------------------------------------------------------------------------
# 10. Types of integer and real arguments
# ---------------------------------------------------------------------------

INT_ARGS = {
    "granet": ("total_steps", "end_step", "update_every", "start_step", "seed"),
    "gmp": ("end_step", "update_every", "start_step"),
    "rigl": ("total_steps", "end_step", "update_every", "start_step", "seed"),
    "set": ("total_steps", "end_step", "update_every", "start_step", "seed"),
    "static": ("seed",),
    "one_shot": ("prune_step",),
}


@pytest.mark.parametrize("name,arg,bad", [
    (n, a, bad) for n, args in INT_ARGS.items() for a in args
    for bad in (2.5, 10.0, True, np.bool_(True), "10", None)
    # None is the default end_step of rigl and set.
    if not (bad is None and a == "end_step" and n in ("rigl", "set"))])
def test_integer_arguments_reject_other_types(name, arg, bad):
  kind = type(bad).__name__
  with pytest.raises(TypeError, match=rf"^{arg}={bad!r} must be an int \(a Python or "
                                      rf"NumPy integer\), got {kind}\."):
    ALL_FACTORIES[name](**{arg: bad})


def test_numpy_integers_are_accepted_and_give_the_same_run():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)

  def run(tx):
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grads, s, params))
    for _ in range(20):
      updates, state = step(state)
    return updates, state

  py = sj.granet(SGD, sparsity=0.9, total_steps=30, end_step=20, update_every=5, seed=3)
  numpy = sj.granet(SGD, sparsity=np.float64(0.9), total_steps=np.int64(30),
                    end_step=np.int32(20), update_every=np.int64(5), seed=np.int64(3))
  for a, b in zip(jax.tree.leaves(run(py)), jax.tree.leaves(run(numpy))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_sparsity_must_be_a_number(name):
  with pytest.raises(TypeError, match=r"^sparsity='0.9' must be a real number, got str\."):
    ALL_FACTORIES[name](sparsity="0.9")
  with pytest.raises(TypeError, match=r"^sparsity=True must be a real number, got bool\."):
    ALL_FACTORIES[name](sparsity=True)


@pytest.mark.parametrize("name", ["granet", "rigl", "set"])
def test_regrowth_rate_must_be_a_number(name):
  with pytest.raises(TypeError, match=r"^regrowth_rate='0.3' must be a real number"):
    STEP_FACTORIES[name](regrowth_rate="0.3")


# ---------------------------------------------------------------------------
# 10. initial_masks: bool only, and a sparsity that agrees with them
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_non_bool_initial_masks_are_rejected(name):
  params = _params()
  # The params tree itself (float arrays, also on the biases).
  with pytest.raises(TypeError, match=r"initial_masks\['a/bias'\] has dtype float32: masks "
                                      r"must be bool .*jax.tree.map\(lambda x: x != 0, "):
    ALL_FACTORIES[name](sparsity=0.0, initial_masks=params)
  ints = jax.tree.map(lambda m: None if m is None else m.astype(np.int32), _masks(10, 2))
  with pytest.raises(TypeError, match=r"initial_masks\['a/kernel'\] has dtype int32"):
    ALL_FACTORIES[name](sparsity=0.0, initial_masks=ints)


def test_initial_masks_without_mask_array_are_rejected_at_the_factory():
  none = {"a": {"kernel": None, "bias": None}, "b": {"kernel": None, "bias": None}}
  with pytest.raises(ValueError, match="initial_masks has no mask array"):
    sj.rigl(SGD, sparsity=0.9, total_steps=100, update_every=10, initial_masks=none)


@pytest.mark.parametrize("name", ["rigl", "set", "static"])
def test_sparsity_must_agree_with_initial_masks(name):
  dense = _masks(100, 20)  # all 120 weights active: sparsity 0
  with pytest.raises(ValueError, match=r"^sparsity=0.9 disagrees with initial_masks, whose "
                                       r"sparsity is 0.0000 \(120 of 120 weights active\)"):
    ALL_FACTORIES[name](sparsity=0.9, initial_masks=dense)
  # 12 of 120 active: sparsity 0.9 exactly; packed masks count the same.
  tenth = _masks(10, 2)
  ALL_FACTORIES[name](sparsity=0.9, initial_masks=tenth)
  ALL_FACTORIES[name](sparsity=0.9, initial_masks=sj.pack_masks(tenth))
  with pytest.raises(ValueError, match=r"^sparsity=0.8 disagrees with initial_masks, whose "
                                       r"sparsity is 0.9000 \(12 of 120"):
    ALL_FACTORIES[name](sparsity=0.8, initial_masks=sj.pack_masks(tenth))
  # sparsity=0 asks for no mask of its own: the masks are taken as they are.
  ALL_FACTORIES[name](sparsity=0.0, initial_masks=tenth)


def test_sparsity_agreement_allows_float32_rounding():
  # 1 - 12 / 120 in float32 is 0.9 to within 1e-7; the tolerance is 1e-4.
  masks = _masks(10, 2)
  s32 = float(sj.sparsity(masks))
  assert s32 != 0.9
  sj.static(SGD, sparsity=s32, initial_masks=masks)
  sj.static(SGD, sparsity=0.90005, initial_masks=masks)
  sj.static(SGD, sparsity=0.89995, initial_masks=masks)
  with pytest.raises(ValueError, match="disagrees with initial_masks"):
    sj.static(SGD, sparsity=0.9002, initial_masks=masks)


@pytest.mark.parametrize("name", ["granet", "gmp", "one_shot"])
def test_final_sparsity_cannot_be_below_initial_masks(name):
  tenth = _masks(10, 2)  # sparsity 0.9
  with pytest.raises(ValueError, match=r"^sparsity=0.5 is below the sparsity 0.9000 of "
                                       r"initial_masks \(12 of 120 weights active\): "):
    ALL_FACTORIES[name](sparsity=0.5, initial_masks=tenth)
  ALL_FACTORIES[name](sparsity=0.9, initial_masks=tenth)
  ALL_FACTORIES[name](sparsity=0.95, initial_masks=tenth)


@pytest.mark.parametrize("name", ["granet", "gmp"])
def test_initial_sparsity_must_agree_with_initial_masks(name):
  half = _masks(60, 0)  # 60 of 120 active: sparsity 0.5
  with pytest.raises(ValueError, match=r"^initial_sparsity=0.7 disagrees with "
                                       r"initial_masks, whose sparsity is 0.5000"):
    STEP_FACTORIES[name](initial_sparsity=0.7, initial_masks=half)
  STEP_FACTORIES[name](initial_sparsity=0.5, initial_masks=half)
  STEP_FACTORIES[name](initial_masks=half)  # 0: the schedule starts from 0


def test_traced_initial_masks_skip_the_count_but_not_the_dtype():
  masks = _masks(10, 2)

  @jax.jit
  def build(m):
    # Only the dtype can be checked on tracers; the count needs values.
    sj.static(SGD, sparsity=0.5, initial_masks=m)
    with pytest.raises(TypeError, match="has dtype float32"):
      sj.static(SGD, initial_masks=jax.tree.map(lambda x: x.astype(jnp.float32), m))
    return 0

  build(masks)


# ---------------------------------------------------------------------------
# 11. from sparse_jax import *
# ---------------------------------------------------------------------------


def test_star_import_keeps_the_builtin_set():
  namespace = {}
  exec("from sparse_jax import *", namespace)  # pylint: disable=exec-used
  assert "set" not in namespace
  exec("s = set([1, 2, 2])", namespace)  # pylint: disable=exec-used
  assert namespace["s"] == {1, 2}
  assert builtins.set is set
  # The attribute stays, for sparse_jax.set(...).
  assert sj.set is sj.sparse_evolutionary_training
  public = sorted(n for n in dir(sj) if not n.startswith("_") and n != "set"
                  and not isinstance(getattr(sj, n), type(builtins)))
  assert sorted(sj.__all__) == public
  for n in public:
    assert namespace[n] is getattr(sj, n)
  for n in ("granet", "gmp", "rigl", "sparse_evolutionary_training", "static", "one_shot",
            "get_masks", "apply_updates", "SparseState", "METHODS"):
    assert n in sj.__all__
