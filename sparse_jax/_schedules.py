"""Sparsity and regrowth schedules (docs/algorithms.md §3 and §5), plain functions of the step.

``t`` is the number of completed optimizer updates (1, 2, ...); a mask-update
event happens right after the update whose ``t`` is a multiple of
``update_every``. Every schedule here is jittable in ``t``. The checks of the
step and rate arguments that every factory shares are here too.
"""

from __future__ import annotations

import math
import numbers
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sparse_jax import _distributions


def check_int(value, name: str) -> int:
  """``int(value)``, or a ``TypeError`` naming ``name`` if it is not an integer.

  Python and NumPy integers pass; floats (also ``10.0``), bools, strings and
  ``None`` do not (a step count or seed is never fractional, and ``True`` is a
  flag passed in the wrong place).
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}={value!r} must be an int (a Python or NumPy integer), got "
                    f"{type(value).__name__}.")
  return int(value)


def check_number(value, name: str) -> float:
  """``float(value)``, or a ``TypeError`` naming ``name`` if it is not a real number."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name}={value!r} must be a real number, got {type(value).__name__}.")
  return float(value)


def check_rate(rate, name: str = "regrowth_rate") -> float:
  """``float(rate)`` if it is a regrowth (drop) rate in [0, 1], else a clear error."""
  r = check_number(rate, name)
  if not 0.0 <= r <= 1.0:  # also NaN
    raise ValueError(f"{name}={rate!r} is outside [0, 1]: it is the fraction of each "
                     "layer's active weights dropped and regrown at a mask update, e.g. 0.3.")
  return r


def check_steps(*, update_every: int, start_step: int = 0, end_step: int | None = None,
                total_steps: int | None = None) -> None:
  """Checks ``total_steps >= 1``, ``update_every >= 1``, ``0 <= start <= end <= total``.

  Raises ``TypeError`` for an argument that is not an int (see ``check_int``) and
  ``ValueError`` for an impossible value. ``check_events`` then checks that the
  window holds an event.
  """
  for name, value in (("total_steps", total_steps), ("update_every", update_every),
                      ("start_step", start_step), ("end_step", end_step)):
    if value is not None or name == "update_every":
      check_int(value, name)
  if total_steps is not None and total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1 (the number of optimizer "
                     "updates of the run).")
  if update_every < 1:
    raise ValueError(f"update_every={update_every} must be >= 1 (the ΔT between "
                     "mask updates, in optimizer steps).")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if end_step is not None and end_step < start_step:
    raise ValueError(f"start_step={start_step} is after end_step={end_step}: "
                     "the mask updates must start before they end.")
  if end_step is not None and total_steps is not None and end_step > total_steps:
    raise ValueError(f"end_step={end_step} is after total_steps={total_steps}.")


def count_events(update_every: int, start_step: int, end_step: int, *,
                 pruning: bool = False) -> int:
  """Number of mask-update events of a schedule's window.

  Events are the multiples ``t >= 1`` of ``update_every`` in ``[start_step,
  end_step]``; for the pruning schedule in ``(start_step, end_step]``, since the
  cubic schedule is still at ``s_i`` at ``k0 = start_step // update_every`` and
  prunes at ``k0 < k <= kf`` (``kf - k0`` events).

  Example:
    >>> count_events(60, 0, 50), count_events(20, 40, 60), count_events(20, 40, 60, pruning=True)
    (0, 2, 1)
  """
  first = start_step + 1 if pruning else max(start_step, 1)
  return max(0, end_step // update_every - (first - 1) // update_every)


def check_events(*, update_every: int, start_step: int, end_step: int, pruning: bool,
                 total_steps: int | None = None, note: str = "") -> None:
  """Raises a ``ValueError`` naming the fix if the window holds no event.

  Without an event the pruning schedule never prunes (the run stays dense), and
  RigL or SET never changes its mask (static sparse training), silently.
  ``note`` (e.g. where a default ``end_step`` came from) goes into the message.
  """
  if count_events(update_every, start_step, end_step, pruning=pruning) > 0:
    return
  first = start_step + 1 if pruning else max(start_step, 1)
  window = (f"({start_step}, {end_step}]" if pruning else f"[{start_step}, {end_step}]")
  fixes = []
  # Any end_step - first + 1 consecutive steps hold a multiple of that many.
  if end_step >= first:
    fixes.append(f"lower update_every to at most {end_step - first + 1}")
  first_event = -(-first // update_every) * update_every
  if total_steps is None or first_event <= total_steps:
    fixes.append(f"raise end_step to at least {first_event}")
  if not fixes:
    fixes.append(f"train longer (total_steps >= {first_event})")
  effect = ("the pruning schedule would never prune and the masks stay dense" if pruning
            else "the masks would never change (static sparse training)")
  raise ValueError(
      f"No mask-update event falls in {'(start_step' if pruning else '[start_step'}, "
      f"end_step] = {window} with update_every={update_every} (events are at its "
      f"multiples{', after start_step' if pruning else ''}): {effect}.{note} To fix it, "
      f"{' or '.join(fixes)}.")


@overload
def cubic_sparsity(k: int | np.integer, *, initial_sparsity: float,
                   final_sparsity: float, k0: int, kf: int) -> float: ...
@overload
def cubic_sparsity(k: jax.Array | np.ndarray, *, initial_sparsity: float,
                   final_sparsity: float, k0: int, kf: int) -> jax.Array: ...
@overload  # a float k: an array when kf <= k0
def cubic_sparsity(k: float, *, initial_sparsity: float,
                   final_sparsity: float, k0: int, kf: int) -> float | jax.Array: ...
def cubic_sparsity(k: float | np.integer | jax.Array | np.ndarray, *,
                   initial_sparsity: float, final_sparsity: float,
                   k0: int, kf: int) -> float | jax.Array:
  """Zhu & Gupta's cubic schedule in event units (docs/algorithms.md §3).

  ``s_k = s_f + (s_i - s_f) * (1 - (k - k0) / (kf - k0))**3`` for ``k0 < k <= kf``,
  ``s_i`` before, ``s_f`` after. Works on Python numbers, NumPy or JAX arrays.
  """
  if kf <= k0:
    return jnp.where(k >= kf, final_sparsity, initial_sparsity) if not isinstance(
        k, (int, np.integer)) else (final_sparsity if k >= kf else initial_sparsity)
  frac: float | jax.Array
  if isinstance(k, (int, np.integer, float)):
    frac = min(max((k - k0) / (kf - k0), 0.0), 1.0)
  else:
    frac = jnp.clip((k - k0) / (kf - k0), 0.0, 1.0)
  return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def gradual_active_counts(num_prunable: int, *, initial_sparsity: float,
                          final_sparsity: float, start_step: int, end_step: int,
                          update_every: int) -> np.ndarray:
  """Exact active-count target of every event ``k = 0 .. kf`` (int64 array).

  Entry ``k`` is ``round((1 - s_k) * N)`` computed in float64; the wrapper looks it
  up with ``k = t // update_every`` inside jit.

  Example:
    >>> gradual_active_counts(1000, initial_sparsity=0., final_sparsity=.9,
    ...                       start_step=0, end_step=300, update_every=100)
    array([1000,  367,  133,  100])
  """
  k0, kf = start_step // update_every, end_step // update_every
  return np.asarray([
      _distributions.active_count(
          cubic_sparsity(k, initial_sparsity=initial_sparsity,
                         final_sparsity=final_sparsity, k0=k0, kf=kf), num_prunable)
      for k in range(kf + 1)], np.int64)


@overload
def is_event(t: int, update_every: int, start_step: int = 0,
             end_step: int | None = None) -> bool: ...
@overload
def is_event(t: jax.Array, update_every: int, start_step: int = 0,
             end_step: int | None = None) -> jax.Array: ...
def is_event(t: int | jax.Array, update_every: int, start_step: int = 0,
             end_step: int | None = None) -> bool | jax.Array:
  """True after the update ``t`` (1-based) when a mask update is due.

  Events are at multiples of ``update_every`` from ``start_step`` on (not at
  ``start_step + j * update_every``) and, if ``end_step`` is given, up to it.
  """
  ok = (t % update_every == 0) & (t >= start_step) & (t >= 1)
  if end_step is not None:
    ok = ok & (t <= end_step)
  return ok


def cosine_regrowth_rate(t: ArrayLike, *, initial_rate: float, total_steps: int,
                         min_rate: float = 0.0) -> jax.Array:
  """``r(t) = r_min + (r0 - r_min) * (1 + cos(pi * t / T)) / 2`` (docs/algorithms.md §5).

  Stepped every update; ``t`` past ``total_steps`` stays at ``min_rate``.
  """
  frac = jnp.clip(jnp.asarray(t, jnp.float32) / total_steps, 0.0, 1.0)
  return min_rate + (initial_rate - min_rate) * 0.5 * (1.0 + jnp.cos(math.pi * frac))


def constant_rate(t: ArrayLike, *, initial_rate: float) -> jax.Array:
  """A constant regrowth rate (SET's zeta)."""
  return jnp.full((), initial_rate, jnp.float32) + 0.0 * jnp.asarray(t, jnp.float32)
