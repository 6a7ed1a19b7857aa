"""Sparsity and regrowth schedules (SPEC §3 and §5), plain functions of the step.

``t`` is the number of completed optimizer updates (1, 2, ...); a mask-update
event happens right after the update whose ``t`` is a multiple of
``update_every``. Every schedule here is jittable in ``t``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sparse_jax import _distributions


def check_steps(*, update_every: int, start_step: int = 0, end_step: int | None = None,
                total_steps: int | None = None) -> None:
  """Raises a clear ``ValueError`` for an impossible step configuration."""
  if int(update_every) < 1:
    raise ValueError(f"update_every={update_every} must be >= 1 (the ΔT between "
                     "mask updates, in optimizer steps).")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if end_step is not None and end_step < start_step:
    raise ValueError(f"start_step={start_step} is after end_step={end_step}: "
                     "pruning must start before it ends.")
  if total_steps is not None and total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1.")
  if end_step is not None and total_steps is not None and end_step > total_steps:
    raise ValueError(f"end_step={end_step} is after total_steps={total_steps}.")


def cubic_sparsity(k, *, initial_sparsity: float, final_sparsity: float,
                   k0: int, kf: int):
  """Zhu & Gupta's cubic schedule in event units (SPEC §3).

  ``s_k = s_f + (s_i - s_f) * (1 - (k - k0) / (kf - k0))**3`` for ``k0 < k <= kf``,
  ``s_i`` before, ``s_f`` after. Works on Python numbers, NumPy or JAX arrays.
  """
  if kf <= k0:
    return jnp.where(k >= kf, final_sparsity, initial_sparsity) if not isinstance(
        k, (int, np.integer)) else (final_sparsity if k >= kf else initial_sparsity)
  frac = (k - k0) / (kf - k0)
  if isinstance(k, (int, np.integer, float)):
    frac = min(max(frac, 0.0), 1.0)
  else:
    frac = jnp.clip(frac, 0.0, 1.0)
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


def is_event(t, update_every: int, start_step: int = 0, end_step: int | None = None):
  """True after the update ``t`` (1-based) when a mask update is due.

  Events are at multiples of ``update_every`` from ``start_step`` on (not at
  ``start_step + j * update_every``) and, if ``end_step`` is given, up to it.
  """
  ok = (t % update_every == 0) & (t >= start_step) & (t >= 1)
  if end_step is not None:
    ok = ok & (t <= end_step)
  return ok


def cosine_regrowth_rate(t, *, initial_rate: float, total_steps: int,
                         min_rate: float = 0.0):
  """``r(t) = r_min + (r0 - r_min) * (1 + cos(pi * t / T)) / 2`` (SPEC §5).

  Stepped every update; ``t`` past ``total_steps`` stays at ``min_rate``.
  """
  frac = jnp.clip(jnp.asarray(t, jnp.float32) / total_steps, 0.0, 1.0)
  return min_rate + (initial_rate - min_rate) * 0.5 * (1.0 + jnp.cos(math.pi * frac))


def constant_rate(t, *, initial_rate: float):
  """A constant regrowth rate (SET's zeta)."""
  return jnp.full((), initial_rate, jnp.float32) + 0.0 * jnp.asarray(t, jnp.float32)
