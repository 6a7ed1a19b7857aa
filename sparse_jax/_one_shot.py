"""One-shot magnitude pruning at a given step, then fine-tuning with the mask fixed.

A one-shot prune is the gradual schedule of ``gmp`` with a single event: with
``update_every = end_step = prune_step`` and ``start_step = 0``, the only event is
``t = prune_step`` (k = 1 = kf), where the cubic schedule is already at its final
sparsity. So it reuses the wrapper of ``_transform`` unchanged.
"""

from __future__ import annotations

import optax

from sparse_jax import _schedules
from sparse_jax import _structure
from sparse_jax import _transform

PyTree = _transform.PyTree


def one_shot(inner: optax.GradientTransformation, *, sparsity: float | None = None,
             prune_step: int,
             scope: str = "global", include=None, exclude=None,
             keep_first_dense: bool = False, keep_last_dense: bool = False,
             embeddings: bool = False,
             initial_masks: PyTree | None = None, track_union: bool = False,
             packed_masks: bool = False, structure=None
             ) -> optax.GradientTransformationExtraArgs:
  """Trains dense, prunes once by magnitude after update ``prune_step``, then fine-tunes.

  After the event the mask never changes (the pruned weights stay exactly 0 with
  zeroed optimizer state), as in the one-shot baseline of SPEC §6 and the
  pruning-plasticity experiment of §7.

  Example:
    >>> tx = sparse_jax.one_shot(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
    ...                          prune_step=2000)

  Args:
    inner: the optimizer to wrap.
    sparsity: the sparsity reached at ``prune_step``, in [0, 1) (``1 - n/m``
      with ``NM(n, m)``, which may then omit it).
    prune_step: the update (1-based) after which the weights are pruned.
    scope: ``"global"`` (one magnitude ranking over the model) or ``"layerwise"``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable
      (see ``select_prunable``).
    initial_masks: a bool mask tree to start from instead of dense; ``sparsity``
      must not be below its sparsity.
    track_union: keep the union of all masks so far in ``SparseState.union``.
    packed_masks: store the masks 1 bit per weight (see ``granet``).
    structure: prune to N:M groups, blocks or channels (see ``granet``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity)
  s = _transform._check_sparsity(sparsity)  # pylint: disable=protected-access
  prune_step = _schedules.check_int(prune_step, "prune_step")
  if prune_step < 1:
    raise ValueError(f"prune_step={prune_step} must be >= 1: the prune happens after "
                     "that many updates (to prune before training use snip_masks, "
                     "synflow_masks, ... with sparse_jax.static).")
  _transform._check_common("erk", "gradient", scope, "exact")  # pylint: disable=protected-access
  _transform._check_initial_masks(initial_masks, final=s, structure=structure)  # pylint: disable=protected-access
  start = _transform._Start(  # pylint: disable=protected-access
      0.0, "erk", "exact", 0, initial_masks,
      _transform._selector(include, exclude, keep_first_dense, keep_last_dense,
                           embeddings))  # pylint: disable=protected-access
  pruning = _transform._Pruning(0.0, s, 0, prune_step, prune_step, scope)  # pylint: disable=protected-access
  return _transform._sparse_wrapper(inner, start, pruning, None, track_union,  # pylint: disable=protected-access
                                    packed_masks, structure)
