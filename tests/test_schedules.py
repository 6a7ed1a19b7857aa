"""Tests of sparse_jax._schedules: the cubic schedule in event units, events, rates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from sparse_jax import _schedules


def test_gradual_active_counts_by_hand():
  # k0 = 0, kf = 3: s_k = 0.9 - 0.9 * (1 - k/3)^3.
  #  k=0: s = 0 -> 1000
  #  k=1: s = 0.9 - 0.9 * (2/3)^3 = 0.9 - 0.26667 = 0.63333 -> 366.67 -> 367
  #  k=2: s = 0.9 - 0.9 * (1/3)^3 = 0.9 - 0.03333 = 0.86667 -> 133.33 -> 133
  #  k=3: s = 0.9 -> 100
  got = sj.gradual_active_counts(1000, initial_sparsity=0.0, final_sparsity=0.9,
                                 start_step=0, end_step=300, update_every=100)
  assert got.dtype == np.int64
  assert got.tolist() == [1000, 367, 133, 100]
  # Same with a direct formula in float64.
  hand = [round((1 - (0.9 - 0.9 * (1 - k / 3) ** 3)) * 1000) for k in range(4)]
  assert hand == [1000, 367, 133, 100]


def test_gradual_active_counts_when_update_every_does_not_divide_end():
  # end_step = 350, dT = 100: kf = floor(350/100) = 3, so the schedule is the same as
  # for end_step = 300 (the last event is t = 300).
  got = sj.gradual_active_counts(1000, initial_sparsity=0.0, final_sparsity=0.9,
                                 start_step=0, end_step=350, update_every=100)
  assert got.tolist() == [1000, 367, 133, 100]
  # Counting in t/tf instead would give, at t = 100: s = 0.9 - 0.9*(1 - 100/350)^3 =
  # 0.9 - 0.9*(5/7)^3 = 0.57201 -> 428 active, not 367.
  t_over_tf = round((1 - (0.9 - 0.9 * (1 - 100 / 350) ** 3)) * 1000)
  assert t_over_tf == 428 != got[1]


def test_gradual_active_counts_start_step_not_multiple():
  # start 150, end 450, dT 100: k0 = 1, kf = 4. k = 0, 1 keep s_i; then k - k0 = 1, 2, 3
  # over kf - k0 = 3: the same 367, 133, 100 as above.
  got = sj.gradual_active_counts(1000, initial_sparsity=0.0, final_sparsity=0.9,
                                 start_step=150, end_step=450, update_every=100)
  assert got.tolist() == [1000, 1000, 367, 133, 100]


def test_gradual_active_counts_initial_sparsity():
  # s_i = 0.5, s_f = 0.9: s_k = 0.9 - 0.4 * (1 - k/3)^3.
  #  k=1: 0.9 - 0.4 * 8/27 = 0.781481 -> 218.52 -> 219
  #  k=2: 0.9 - 0.4 / 27 = 0.885185 -> 114.81 -> 115
  got = sj.gradual_active_counts(1000, initial_sparsity=0.5, final_sparsity=0.9,
                                 start_step=0, end_step=300, update_every=100)
  assert got.tolist() == [500, 219, 115, 100]


def test_gradual_active_counts_float64_exact_at_scale():
  # The final entry is exactly active_count(s_f, N) at 30M weights (float32 is off
  # by one there, see test_distributions).
  got = sj.gradual_active_counts(30_000_000, initial_sparsity=0.0, final_sparsity=0.98,
                                 start_step=0, end_step=1000, update_every=100)
  assert got[-1] == 600_000 and got[0] == 30_000_000
  assert np.all(np.diff(got) <= 0)  # monotone non-increasing


def test_cubic_sparsity_python_and_jax():
  kw = dict(initial_sparsity=0.0, final_sparsity=0.9, k0=1, kf=4)
  # Before k0: s_i; after kf: s_f; halfway-ish: 0.9 - 0.9*(1 - 1/3)^3.
  assert _schedules.cubic_sparsity(0, **kw) == 0.0
  assert _schedules.cubic_sparsity(1, **kw) == 0.0
  assert _schedules.cubic_sparsity(2, **kw) == pytest.approx(0.9 - 0.9 * (2 / 3) ** 3)
  assert _schedules.cubic_sparsity(4, **kw) == pytest.approx(0.9)
  assert _schedules.cubic_sparsity(9, **kw) == pytest.approx(0.9)
  f = jax.jit(lambda k: _schedules.cubic_sparsity(k, **kw))
  np.testing.assert_allclose(
      [float(f(jnp.int32(k))) for k in (0, 2, 4, 9)],
      [0.0, 0.9 - 0.9 * (2 / 3) ** 3, 0.9, 0.9], rtol=1e-6)
  # kf <= k0 (a one-event schedule) jumps to s_f at kf.
  kw1 = dict(initial_sparsity=0.2, final_sparsity=0.9, k0=2, kf=2)
  assert _schedules.cubic_sparsity(1, **kw1) == 0.2
  assert _schedules.cubic_sparsity(2, **kw1) == 0.9
  assert float(jax.jit(lambda k: _schedules.cubic_sparsity(k, **kw1))(jnp.int32(2))) == \
      pytest.approx(0.9)


def test_is_event_semantics():
  # update_every 100, start 150, end 450: events at multiples of 100 in [150, 450]:
  # 200, 300, 400 -- not 150 + 100j (250, 350, 450).
  f = jax.jit(lambda t: sj.is_event(t, 100, 150, 450))
  events = [t for t in range(0, 701) if bool(f(jnp.int32(t)))]
  assert events == [200, 300, 400]
  # Python ints work as well and agree.
  assert [t for t in range(0, 701) if sj.is_event(t, 100, 150, 450)] == [200, 300, 400]
  # A start step that is a multiple counts ("at or after"), and end is inclusive.
  g = jax.jit(lambda t: sj.is_event(t, 100, 200, 400))
  assert [t for t in range(0, 701) if bool(g(jnp.int32(t)))] == [200, 300, 400]
  # No end: events go on; t = 0 (no update yet) is never an event.
  h = jax.jit(lambda t: sj.is_event(t, 3))
  assert [t for t in range(0, 13) if bool(h(jnp.int32(t)))] == [3, 6, 9, 12]


def test_cosine_regrowth_rate_by_hand():
  # r(t) = 0.005 + 0.495 * (1 + cos(pi t / 1000)) / 2:
  #   t = 0: 0.5;  t = 500: 0.005 + 0.495/2 = 0.2525;  t = 1000: 0.005.
  r = jax.jit(lambda t: sj.cosine_regrowth_rate(t, initial_rate=0.5, total_steps=1000,
                                                min_rate=0.005))
  assert float(r(jnp.int32(0))) == pytest.approx(0.5, abs=1e-7)
  assert float(r(jnp.int32(500))) == pytest.approx(0.2525, abs=1e-7)
  assert float(r(jnp.int32(1000))) == pytest.approx(0.005, abs=1e-7)
  # t = 250: 0.005 + 0.495 * (1 + cos(pi/4)) / 2 = 0.42250...
  assert float(r(jnp.int32(250))) == pytest.approx(
      0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-6)
  # Past T it stays at the floor.
  assert float(r(jnp.int32(5000))) == pytest.approx(0.005, abs=1e-7)
  # Eager with Python ints agrees.
  assert float(sj.cosine_regrowth_rate(500, initial_rate=0.5, total_steps=1000,
                                       min_rate=0.005)) == pytest.approx(0.2525, abs=1e-7)


def test_constant_rate():
  r = jax.jit(lambda t: sj.constant_rate(t, initial_rate=0.3))
  assert float(r(jnp.int32(0))) == pytest.approx(0.3)
  assert float(r(jnp.int32(12345))) == pytest.approx(0.3)


def test_check_steps_errors():
  with pytest.raises(ValueError, match="update_every=0 must be >= 1"):
    _schedules.check_steps(update_every=0)
  with pytest.raises(ValueError, match="update_every=-3 must be >= 1"):
    _schedules.check_steps(update_every=-3)
  with pytest.raises(ValueError, match="start_step=500 is after end_step=400"):
    _schedules.check_steps(update_every=10, start_step=500, end_step=400)
  with pytest.raises(ValueError, match="start_step=-1 must be >= 0"):
    _schedules.check_steps(update_every=10, start_step=-1)
  with pytest.raises(ValueError, match="total_steps=0 must be >= 1"):
    _schedules.check_steps(update_every=10, total_steps=0)
  with pytest.raises(ValueError, match="end_step=900 is after total_steps=800"):
    _schedules.check_steps(update_every=10, end_step=900, total_steps=800)
  # Valid configurations pass silently (and return None).
  assert _schedules.check_steps(update_every=1, start_step=0, end_step=0, total_steps=1) is None
