"""Checks of the factories' arguments, run when a factory is called (before tracing).

``TypeError`` for a value of the wrong type (an integer argument must be a Python
or NumPy int, masks must be bool), ``ValueError`` for an impossible value. Each
check returns the value it checked in the form the wrapper uses (ints, floats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from sparse_jax import _distributions
from sparse_jax import _masks
from sparse_jax import _regrow
from sparse_jax import _schedules
from sparse_jax import _structure

SCOPES = ("global", "layerwise")
# How far a sparsity given with initial_masks may be from theirs: a value computed
# from the masks in float32 (sparse_jax.sparsity) is off by ~1e-7.
MASK_SPARSITY_TOLERANCE = 1e-4

# The types of the factories' include= / exclude= and structure= arguments.
Regexes = str | Sequence[str] | None  # regexes over leaf names (select_prunable)
StructureArg = _structure.Structure | None  # None: unstructured


def selector(include, exclude, keep_first_dense, keep_last_dense, embeddings=False):
  """The keyword arguments of ``select_prunable`` a factory was given."""
  return dict(include=include, exclude=exclude, keep_first_dense=keep_first_dense,
              keep_last_dense=keep_last_dense, embeddings=embeddings)


def check_common(distribution, growth, scope, sampling) -> None:
  """Checks the names every factory takes: distribution, growth, scope, sampling."""
  if not isinstance(distribution, Mapping) and distribution not in _distributions.DISTRIBUTIONS:
    raise ValueError(f"Unknown distribution {distribution!r}; use one of "
                     f"{_distributions.DISTRIBUTIONS} or a mapping from layer name to density.")
  if growth not in _regrow.GROWTH_MODES:
    raise ValueError(f"Unknown growth mode {growth!r}; use one of {_regrow.GROWTH_MODES}.")
  if scope not in SCOPES:
    hint = " ('uniform' names a density distribution; the per-layer scope is 'layerwise')" \
        if scope == "uniform" else ""
    raise ValueError(f"Unknown pruning scope {scope!r}; use one of {SCOPES}{hint}.")
  if sampling not in ("exact", "bernoulli"):
    raise ValueError(f"Unknown sampling {sampling!r}; use 'exact' or 'bernoulli'.")


def check_sparsity(sparsity, name: str = "sparsity") -> float:
  """A sparsity in [0, 1), as a float."""
  return _distributions.check_sparsity(_schedules.check_number(sparsity, name), name)


def check_steps(**steps) -> tuple[int, ...]:
  """``_schedules.check_steps(**steps)``, all required; the steps as ints, in order."""
  steps = {name: _schedules.check_int(v, name) for name, v in steps.items()}
  _schedules.check_steps(**steps)
  return tuple(steps.values())


def check_final_and_initial(sparsity, initial_sparsity) -> tuple[float, float]:
  """The final and the initial sparsity of a pruning schedule, initial <= final."""
  s_f = check_sparsity(sparsity)
  s_i = check_sparsity(initial_sparsity, "initial_sparsity")
  if s_i > s_f:
    raise ValueError(f"initial_sparsity={s_i} is above the final sparsity={s_f}.")
  return s_f, s_i


def check_rates(rate, min_rate) -> tuple[float, float]:
  """The regrowth rate and its floor, both in [0, 1], floor <= rate."""
  r = _schedules.check_rate(rate, "regrowth_rate")
  r_min = _schedules.check_rate(min_rate, "min_regrowth_rate")
  if r_min > r:
    raise ValueError(f"min_regrowth_rate={min_rate!r} is above regrowth_rate={rate!r}: "
                     "the rate decays from regrowth_rate down to min_regrowth_rate.")
  return r, r_min


def check_initial_masks(initial_masks, *, start: float | None = None,
                        start_name: str = "sparsity", final: float | None = None,
                        structure=None) -> None:
  """Checks ``initial_masks`` and the sparsities given with them, at the factory.

  The masks must be bool arrays or ``PackedMask`` leaves (None on dense leaves),
  never cast: a float tree would be all True. ``start`` describes the start mask
  (``sparsity`` of rigl, set and static, ``initial_sparsity`` of granet and gmp):
  0 takes the masks as they are, any other value must be their sparsity (to within
  ``MASK_SPARSITY_TOLERANCE``). ``final``, the end of a pruning schedule, must not
  be below their sparsity: pruning only removes weights. The sparsities are only
  checked on concrete masks (not on tracers, not on arrays spread over hosts), and
  so is their fit to ``structure`` (``_structure.check_initial_masks``).
  """
  if initial_masks is None:
    return
  is_packed = lambda x: isinstance(x, _masks.PackedMask)
  flat = jax.tree_util.tree_flatten_with_path(_masks.unwrap_variables(initial_masks),
                                              is_leaf=is_packed)[0]
  if not flat:
    raise ValueError("initial_masks has no mask array: give a bool array for at "
                     "least one parameter (None marks a dense leaf).")
  for path, m in flat:
    dtype = m.bits.dtype if is_packed(m) else (
        m.dtype if hasattr(m, "dtype") else np.asarray(m).dtype)
    if not is_packed(m) and dtype != np.bool_:
      raise TypeError(
          f"initial_masks[{_masks.path_to_name(path)!r}] has dtype {dtype}: masks must be "
          "bool (True = active weight) and are not cast. Convert 0/1 or float masks "
          "with jax.tree.map(lambda x: x != 0, masks), or take the nonzero prunable "
          "weights of a params tree with sparse_jax.masks_from_params(params).")
  arrays = [m.bits if is_packed(m) else m for _, m in flat]
  if any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array)
                                            and not a.is_fully_addressable)
         for a in arrays):
    return
  # Counted in NumPy: jnp would compile a reduction for every distinct leaf shape.
  active = sum(int(np.bitwise_count(np.asarray(m.bits)).sum()) if is_packed(m)
               else int(np.count_nonzero(np.asarray(m))) for _, m in flat)
  total = _masks.count_prunable([m for _, m in flat])
  have = 1.0 - active / total
  of = f"({active} of {total} weights active)"
  if start and abs(start - have) > MASK_SPARSITY_TOLERANCE:
    raise ValueError(
        f"{start_name}={start} disagrees with initial_masks, whose sparsity is "
        f"{have:.4f} {of}: with initial_masks the start mask is initial_masks. Pass "
        f"{start_name}=0 to take the masks as they are, or masks at that sparsity.")
  if final is not None and final < have - MASK_SPARSITY_TOLERANCE:
    raise ValueError(
        f"sparsity={final} is below the sparsity {have:.4f} of initial_masks {of}: "
        f"pruning only removes weights, so the run would end at {have:.4f}. Give a "
        "final sparsity at least that of the masks.")
  _structure.check_initial_masks(structure, initial_masks)


def check_warmup(warmup, update_every: int) -> int:
  """``regrowth_warmup`` as an int in [0, update_every]."""
  warmup = _schedules.check_int(warmup, "regrowth_warmup")
  if not 0 <= warmup <= update_every:
    raise ValueError(
        f"regrowth_warmup={warmup} must be in [0, update_every={update_every}]: one "
        "cohort of regrown weights warms up at a time, before the next event grows "
        "another. Lower it (or raise update_every).")
  return warmup
