"""The factory of each method: GraNet, GMP, RigL, SET, static, one-shot.

Every factory returns the wrapper of ``_transform`` around any inner optax
transformation, with the start mask (``_transform.Start``) and the events
(``_mask_update.Pruning``, ``_mask_update.Regrowth``) of its method.

Every factory checks its arguments when it is called, before any tracing
(``_arguments``): ``TypeError`` for a value of the wrong type (an integer argument
must be a Python or NumPy int, masks must be bool), ``ValueError`` for an
impossible value: steps with ``total_steps >= 1``, ``update_every >= 1``, ``0 <=
start_step <= end_step <= total_steps`` and at least one mask-update event in the
window, rates in [0, 1] with ``min_regrowth_rate <= regrowth_rate``, and
sparsities that agree with ``initial_masks`` (see ``initial_masks`` in each
factory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from sparse_jax import _arguments
from sparse_jax import _layers
from sparse_jax import _mask_update
from sparse_jax import _schedules
from sparse_jax import _structure
from sparse_jax import _transform

PyTree = Any
Regexes = _arguments.Regexes
StructureArg = _arguments.StructureArg
LayerAxesArg = _layers.LayerAxesArg


def granet(inner: optax.GradientTransformation, *, sparsity: float | None = None,
           total_steps: int, end_step: int, update_every: int, initial_sparsity: float = 0.0,
           start_step: int = 0, distribution: str | Mapping[str, float] = "erk",
           regrowth_rate: float = 0.5, min_regrowth_rate: float = 0.005,
           growth: str = "gradient", scope: str = "global", seed: int = 0,
           sampling: str = "exact", initial_masks: PyTree | None = None,
           include: Regexes = None, exclude: Regexes = None,
           keep_first_dense: bool = False, keep_last_dense: bool = False,
           embeddings: bool = False, track_union: bool = False,
           packed_masks: bool = False, structure: StructureArg = None,
           layer_axes: LayerAxesArg = None,
    regrowth_warmup: int = 0) -> optax.GradientTransformationExtraArgs:
  """GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

  Prunes globally by magnitude on Zhu & Gupta's cubic schedule from
  ``initial_sparsity`` to ``sparsity``, and at every event (also after
  ``end_step``, until the end of training) drops ``ceil(r(t) * active_l)`` of the
  smallest weights of each layer and regrows as many by dense |gradient|, with
  the cosine-decayed rate ``r(t)`` (docs/algorithms.md §3-§5). ``initial_sparsity > 0`` gives
  GraNet-ST, which starts from a random ``distribution`` mask.

  Deliberate differences from the authors' code: the final event prunes to
  ``sparsity`` exactly (the authors stop one event short); the prune keeps exactly
  the K largest weights (the authors keep ``|w| >`` the K-th, i.e. K - 1 or fewer
  on ties); no regrowth happens at ``t == total_steps`` (grown weights would never
  be trained).

  Example:
    >>> tx = sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.98,
    ...                        total_steps=1000, end_step=700, update_every=100)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)  # exactly masked
    >>> # or, masked weights exactly 0 even when some values are NaN or inf:
    >>> params = sparse_jax.apply_updates(params, updates, opt_state)

  Args:
    inner: the optimizer to wrap (any optax transformation).
    sparsity: final overall sparsity in [0, 1).
    total_steps: total optimizer updates of the run (sets the rate's decay).
    end_step: last update of the pruning schedule (tf).
    update_every: ΔT, updates between mask-update events.
    initial_sparsity: s_i; 0 = dense start (GraNet), > 0 = GraNet-ST.
    start_step: t0, first update at which an event may happen.
    distribution: layer densities of the random start mask (GraNet-ST).
    regrowth_rate: r0 of the cosine-decayed regeneration rate.
    min_regrowth_rate: r_min, its floor.
    growth: ``"gradient"`` (default), ``"momentum"`` or ``"random"``.
    scope: ``"global"`` (one ranking over the model) or ``"layerwise"``.
    seed: seed of the start mask and of random growth.
    sampling: ``"exact"`` counts or ``"bernoulli"`` (the authors') start masks.
    initial_masks: a bool (or packed) mask tree to start from instead (e.g. a
      pretrained sparse model). ``initial_sparsity`` is then 0 (the schedule starts
      from 0) or the masks' sparsity (to within 1e-4), and ``sparsity`` is not below
      it; anything else is a ``ValueError``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable
      (see ``select_prunable``).
    track_union: keep the union of all masks so far in ``SparseState.union``
      (ITOP; every method takes this option).
    packed_masks: store the masks (and the union) 1 bit per weight, as
      ``PackedMask`` leaves, instead of a bool byte; for very large models (every
      method takes this option). ``get_masks`` still returns bool masks, and the
      results are the same either way.
    structure: ``None`` (unstructured, the default), ``sparse_jax.NM(n, m)``,
      ``sparse_jax.Block(rows, cols)`` or ``sparse_jax.Channels()``; every method
      takes it (see ``sparse_jax._structure``). ``NM``: the schedule keeps
      ``ceil((1 - s_k) m)`` weights per group at event k, ending at exactly ``n``
      (``sparsity`` is ``1 - n/m`` and may be omitted); regeneration drops per layer
      and regrows inside each group, so every group keeps its count. ``Block`` and
      ``Channels``: counts, sparsities and the global ranking are in units (blocks,
      output units), ranked by their RMS.
    regrowth_warmup: updates over which a regrown weight's learning rate warms
      up from 0 (its update scaled by j / regrowth_warmup at the j-th update after
      the event; at most ``update_every``). 0 (default, the papers): full steps at
      once, which with Adam's empty moments are ~3 learning rates each
      (docs/algorithms.md §5).
    layer_axes: which prunable leaves hold stacked layers (scan over layers): a
      mapping from leaf-name regex to its number of leading layer axes, e.g.
      ``{"blocks/.*": 1}`` for ``nn.scan``/``nnx.scan`` over ``blocks``, or one
      regex (1 axis). Each slice along those axes is then a layer for every
      per-layer rule (densities, counts, the global ranking's one weight kept per
      layer, structure). Leaves whose partitioning metadata names a leading axis
      ``"layers"`` (``sparse_jax.LAYER_AXIS_NAMES``) are found at ``tx.init``
      without it; ``sparse_jax.layer_axes_of(params)`` shows what was found.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling)
  s_f, s_i = _arguments.check_final_and_initial(sparsity, initial_sparsity)
  update_every, start_step, end_step, total_steps = _arguments.check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step,
      total_steps=total_steps)
  seed = _schedules.check_int(seed, "seed")
  rate, min_rate = _arguments.check_rates(regrowth_rate, min_regrowth_rate)
  _arguments.check_common(distribution, growth, scope, sampling)
  _arguments.check_initial_masks(initial_masks, start=s_i, start_name="initial_sparsity",
                                 final=s_f, structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=True, total_steps=total_steps)
  start = _transform.Start(s_i, distribution, sampling, seed, initial_masks,
                           _arguments.selector(include, exclude, keep_first_dense,
                                               keep_last_dense, embeddings),
                           _layers.check_layer_axes(layer_axes))
  pruning = _mask_update.Pruning(s_i, s_f, start_step, end_step, update_every, scope)
  regrowth = _mask_update.Regrowth(growth, rate, "cosine", min_rate, total_steps,
                                   start_step, total_steps - 1, update_every,
                                   warmup=_arguments.check_warmup(regrowth_warmup, update_every))
  return _transform.sparse_wrapper(inner, start, pruning, regrowth, track_union,
                                   packed_masks, structure)


def gmp(inner: optax.GradientTransformation, *, sparsity: float | None = None,
        end_step: int, update_every: int, initial_sparsity: float = 0.0,
        start_step: int = 0, scope: str = "global", include: Regexes = None,
        exclude: Regexes = None, keep_first_dense: bool = False,
        keep_last_dense: bool = False, embeddings: bool = False,
        initial_masks: PyTree | None = None, track_union: bool = False,
        packed_masks: bool = False, structure: StructureArg = None,
        layer_axes: LayerAxesArg = None) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu & Gupta) from dense, no regrowth.

  The same cubic schedule and global (or layer-wise) magnitude prune as
  ``granet``, without neuroregeneration.

  Example:
    >>> tx = sparse_jax.gmp(optax.adam(1e-3), sparsity=0.9, end_step=800,
    ...                     update_every=100)

  Args:
    inner: the optimizer to wrap.
    sparsity, end_step, update_every, initial_sparsity, start_step, scope: the
      pruning schedule, as in ``granet``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable.
    initial_masks: a mask tree to start from instead of dense (as in ``granet``).
    track_union: keep the union of all masks so far in ``SparseState.union``.
    packed_masks: store the masks (and the union) 1 bit per weight, as
      ``PackedMask`` leaves, instead of a bool byte (see ``granet``).
    structure: N:M, blocks or channels, as in ``granet`` (default unstructured).
    layer_axes: which prunable leaves hold stacked layers, as in ``granet``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity)
  s_f, s_i = _arguments.check_final_and_initial(sparsity, initial_sparsity)
  update_every, start_step, end_step = _arguments.check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step)
  _arguments.check_common("erk", "gradient", scope, "exact")
  if s_i > 0 and initial_masks is None:
    raise ValueError("gmp starts dense: initial_sparsity > 0 needs initial_masks "
                     "(or use granet(..., initial_sparsity=...)).")
  _arguments.check_initial_masks(initial_masks, start=s_i, start_name="initial_sparsity",
                                 final=s_f, structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=True)
  start = _transform.Start(0.0, "erk", "exact", 0, initial_masks,
                           _arguments.selector(include, exclude, keep_first_dense,
                                               keep_last_dense, embeddings),
                           _layers.check_layer_axes(layer_axes))
  pruning = _mask_update.Pruning(s_i, s_f, start_step, end_step, update_every, scope)
  return _transform.sparse_wrapper(inner, start, pruning, None, track_union, packed_masks,
                                   structure)


def _dst(inner, *, sparsity, total_steps, update_every, start_step, end_step, end_note,
         distribution, rate, rate_schedule, growth, seed, sampling, initial_masks,
         selector, track_union=False, packed_masks=False, structure=None,
         layer_axes=None, regrowth_warmup=0):
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling)
  s = _arguments.check_sparsity(sparsity)
  update_every, start_step, end_step, total_steps = _arguments.check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step,
      total_steps=total_steps)
  seed = _schedules.check_int(seed, "seed")
  _arguments.check_common(distribution, growth, "global", sampling)
  rate = _schedules.check_rate(rate, "regrowth_rate")
  _arguments.check_initial_masks(initial_masks, start=s, structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=False, total_steps=total_steps,
                          note="" if end_note is None else f" {end_note}")
  start = _transform.Start(s, distribution, sampling, seed, initial_masks, selector,
                           _layers.check_layer_axes(layer_axes))
  regrowth = _mask_update.Regrowth(growth, rate, rate_schedule, 0.0, max(end_step, 1),
                                   start_step, end_step, update_every,
                                   warmup=_arguments.check_warmup(regrowth_warmup, update_every))
  return _transform.sparse_wrapper(inner, start, None, regrowth, track_union, packed_masks,
                                   structure)


def rigl(inner: optax.GradientTransformation, *, sparsity: float | None = None,
         total_steps: int,
         update_every: int = 100, end_step: int | None = None, start_step: int = 0,
         distribution: str | Mapping[str, float] = "erk", regrowth_rate: float = 0.3,
         growth: str = "gradient", seed: int = 0, sampling: str = "exact",
         initial_masks: PyTree | None = None, include: Regexes = None,
         exclude: Regexes = None, keep_first_dense: bool = False,
         keep_last_dense: bool = False, embeddings: bool = False,
         track_union: bool = False, packed_masks: bool = False,
         structure: StructureArg = None, layer_axes: LayerAxesArg = None,
    regrowth_warmup: int = 0) -> optax.GradientTransformationExtraArgs:
  """RigL: sparse from the start; per layer drop the smallest, grow by |gradient|.

  Defaults follow the RigL paper: ERK start at ``sparsity``, ΔT = 100, drop
  fraction 0.3 decayed by a cosine to 0 at ``end_step`` (default 75% of
  ``total_steps``), and no mask updates after ``end_step``.

  Example:
    >>> tx = sparse_jax.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
    ...                      total_steps=10_000)

  Args:
    inner: the optimizer to wrap.
    sparsity: the (constant) overall sparsity in [0, 1); with ``initial_masks``, 0
      (take the masks as they are) or the masks' sparsity (to within 1e-4).
    total_steps: total optimizer updates of the run.
    update_every: ΔT, updates between mask updates.
    end_step: last update at which the mask changes (default 75% of total_steps).
    start_step: first update at which the mask may change.
    distribution, seed, sampling: the random start mask, as in ``granet``.
    initial_masks: a bool (or packed) mask tree to start from instead.
    regrowth_rate: the drop fraction, decayed by a cosine to 0 at ``end_step``.
    growth: ``"gradient"`` (default), ``"momentum"`` or ``"random"``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable.
    track_union: keep the union of all masks so far in ``SparseState.union``.
    packed_masks: store the masks (and the union) 1 bit per weight, as
      ``PackedMask`` leaves, instead of a bool byte (see ``granet``).
    structure: N:M, blocks or channels, as in ``granet`` (default unstructured).
      ``NM(n, m)``: a random N:M start (``sparsity`` may be omitted); each event
      drops the layer's smallest weights and regrows, inside every group, as many
      as it lost (SRigL's constant fan-in), so every group keeps exactly ``n``.
    regrowth_warmup: the regrown weights' learning-rate warm-up, as in ``granet``.
    layer_axes: which prunable leaves hold stacked layers, as in ``granet``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  total_steps = _schedules.check_int(total_steps, "total_steps")
  end, note = end_step, None
  if end_step is None:
    end = int(0.75 * total_steps)
    note = f"end_step={end} is rigl's default, 75% of total_steps={total_steps}."
  return _dst(inner, sparsity=sparsity, total_steps=total_steps, update_every=update_every,
              start_step=start_step, end_step=end, end_note=note,
              distribution=distribution, rate=regrowth_rate,
              rate_schedule="cosine", growth=growth, seed=seed, sampling=sampling,
              initial_masks=initial_masks,
              selector=_arguments.selector(include, exclude, keep_first_dense,
                                           keep_last_dense, embeddings),
              track_union=track_union, packed_masks=packed_masks, structure=structure,
              layer_axes=layer_axes, regrowth_warmup=regrowth_warmup)


def sparse_evolutionary_training(
    inner: optax.GradientTransformation, *, sparsity: float | None = None,
    total_steps: int, update_every: int = 100, end_step: int | None = None, start_step: int = 0,
    distribution: str | Mapping[str, float] = "erk", regrowth_rate: float = 0.3,
    regrowth_schedule: str = "constant", seed: int = 0, sampling: str = "exact",
    initial_masks: PyTree | None = None, include: Regexes = None, exclude: Regexes = None,
    keep_first_dense: bool = False, keep_last_dense: bool = False, embeddings: bool = False,
    track_union: bool = False, packed_masks: bool = False, structure: StructureArg = None,
    layer_axes: LayerAxesArg = None,
    regrowth_warmup: int = 0) -> optax.GradientTransformationExtraArgs:
  """SET: sparse from the start; per layer drop the smallest, grow at random.

  Exported as ``sparse_jax.set``. Defaults follow the SET paper: a constant
  fraction zeta = 0.3 (``regrowth_schedule="cosine"`` decays it as RigL does),
  mask updates until ``end_step`` (default ``total_steps``).

  Example:
    >>> tx = sparse_jax.set(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
    ...                     total_steps=10_000)

  Args:
    inner: the optimizer to wrap.
    sparsity, total_steps, update_every, start_step: as in ``rigl``.
    end_step: last update at which the mask changes (default ``total_steps - 1``).
    distribution, seed, sampling, initial_masks: the start mask, as in ``rigl``.
    regrowth_rate: zeta, the fraction of each layer's active weights replaced.
    regrowth_schedule: ``"constant"`` (default) or ``"cosine"``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable.
    track_union: keep the union of all masks so far in ``SparseState.union``.
    packed_masks: store the masks (and the union) 1 bit per weight, as
      ``PackedMask`` leaves, instead of a bool byte (see ``granet``).
    structure: N:M, blocks or channels, as in ``rigl`` (growth at random inside
      each group for N:M, among inactive units for blocks and channels).
    regrowth_warmup: the regrown weights' learning-rate warm-up, as in ``granet``.
    layer_axes: which prunable leaves hold stacked layers, as in ``granet``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  if regrowth_schedule not in ("constant", "cosine"):
    raise ValueError(f"Unknown regrowth_schedule {regrowth_schedule!r}; use 'constant' "
                     "or 'cosine'.")
  total_steps = _schedules.check_int(total_steps, "total_steps")
  end, note = end_step, None
  if end_step is None:
    end = total_steps - 1
    note = f"end_step={end} is set's default, total_steps - 1."
  return _dst(inner, sparsity=sparsity, total_steps=total_steps, update_every=update_every,
              start_step=start_step, end_step=end, end_note=note,
              distribution=distribution, rate=regrowth_rate,
              rate_schedule=regrowth_schedule, growth="random", seed=seed,
              sampling=sampling, initial_masks=initial_masks,
              selector=_arguments.selector(include, exclude, keep_first_dense,
                                           keep_last_dense, embeddings),
              track_union=track_union, packed_masks=packed_masks, structure=structure,
              layer_axes=layer_axes, regrowth_warmup=regrowth_warmup)


def static(inner: optax.GradientTransformation, *, sparsity: float | None = None,
           distribution: str | Mapping[str, float] = "erk", seed: int = 0,
           sampling: str = "exact", initial_masks: PyTree | None = None,
           include: Regexes = None, exclude: Regexes = None,
           keep_first_dense: bool = False, keep_last_dense: bool = False,
           embeddings: bool = False, track_union: bool = False, packed_masks: bool = False,
           structure: StructureArg = None,
           layer_axes: LayerAxesArg = None) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: a fixed mask (random, or ``initial_masks`` e.g. SNIP).

  Example:
    >>> tx = sparse_jax.static(optax.adam(1e-3), sparsity=0.9, distribution="erk")
    >>> tx = sparse_jax.static(optax.adam(1e-3), initial_masks=snip_masks)

  Args:
    inner: the optimizer to wrap.
    sparsity, distribution, seed, sampling: the random mask, as in ``granet``
      (``sparsity=0.0``, the default: dense; ``1 - n/m`` with ``NM(n, m)``).
    initial_masks: the mask to train with instead (bool or packed); ``sparsity``
      is then 0 (the default) or the masks' sparsity, as in ``rigl``.
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves are prunable.
    track_union: keep ``SparseState.union`` (for a fixed mask, the mask itself).
    packed_masks: store the masks (and the union) 1 bit per weight, as
      ``PackedMask`` leaves, instead of a bool byte (see ``granet``).
    structure: a random N:M, block or channel mask (see ``granet``); given
      ``initial_masks`` must then fit it.
    layer_axes: which prunable leaves hold stacked layers, as in ``granet``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling, default=0.0)
  s = _arguments.check_sparsity(sparsity)
  seed = _schedules.check_int(seed, "seed")
  _arguments.check_common(distribution, "gradient", "global", sampling)
  _arguments.check_initial_masks(initial_masks, start=s, structure=structure)
  start = _transform.Start(s, distribution, sampling, seed, initial_masks,
                           _arguments.selector(include, exclude, keep_first_dense,
                                               keep_last_dense, embeddings),
                           _layers.check_layer_axes(layer_axes))
  return _transform.sparse_wrapper(inner, start, None, None, track_union, packed_masks,
                                   structure)


def one_shot(inner: optax.GradientTransformation, *, sparsity: float | None = None,
             prune_step: int, scope: str = "global", include: Regexes = None,
             exclude: Regexes = None, keep_first_dense: bool = False,
             keep_last_dense: bool = False, embeddings: bool = False,
             initial_masks: PyTree | None = None, track_union: bool = False,
             packed_masks: bool = False, structure: StructureArg = None,
             layer_axes: LayerAxesArg = None) -> optax.GradientTransformationExtraArgs:
  """Trains dense, prunes once by magnitude after update ``prune_step``, then fine-tunes.

  After the event the mask never changes (the pruned weights stay exactly 0 with
  zeroed optimizer state), as in the one-shot baseline of docs/algorithms.md §6
  and the pruning-plasticity experiment of §7.

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
    layer_axes: which prunable leaves hold stacked layers, as in ``granet``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity)
  s = _arguments.check_sparsity(sparsity)
  prune_step = _schedules.check_int(prune_step, "prune_step")
  if prune_step < 1:
    raise ValueError(f"prune_step={prune_step} must be >= 1: the prune happens after "
                     "that many updates (to prune before training use snip_masks, "
                     "synflow_masks, ... with sparse_jax.static).")
  _arguments.check_common("erk", "gradient", scope, "exact")
  _arguments.check_initial_masks(initial_masks, final=s, structure=structure)
  start = _transform.Start(0.0, "erk", "exact", 0, initial_masks,
                           _arguments.selector(include, exclude, keep_first_dense,
                                               keep_last_dense, embeddings),
                           _layers.check_layer_axes(layer_axes))
  # One event, at t = prune_step (k = 1 = kf), where the cubic schedule is already
  # at its final sparsity: the gradual prune of gmp with update_every = end_step.
  pruning = _mask_update.Pruning(0.0, s, 0, prune_step, prune_step, scope)
  return _transform.sparse_wrapper(inner, start, pruning, None, track_union,
                                   packed_masks, structure)
