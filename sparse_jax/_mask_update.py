"""The mask-update event: prune, then drop and regrow (docs/algorithms.md §3-§5).

``update_masks`` is a pure function of the arrays (params, this step's updates,
the dense gradient, the masks, an RNG key, the step ``t``) and of a static
``MaskUpdateConfig`` fixed when the transformation is built. The wrapper of
``_transform`` calls it inside its event branch; every stage still checks the
schedule at ``t``, so calling it at a step that is not an event leaves the masks
as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _counts
from sparse_jax import _distributions
from sparse_jax import _layers
from sparse_jax import _lazy
from sparse_jax import _placement
from sparse_jax import _prune
from sparse_jax import _regrow
from sparse_jax import _schedules
from sparse_jax import _select
from sparse_jax import _structure
from sparse_jax import _structured_masks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Pruning:
  """Gradual magnitude pruning on the cubic schedule (docs/algorithms.md §3-§4)."""
  initial_sparsity: float
  final_sparsity: float
  start_step: int
  end_step: int
  update_every: int
  scope: str


@dataclasses.dataclass(frozen=True)
class Regrowth:
  """Drop and regrow at the events of ``[start_step, end_step]`` (docs/algorithms.md §5)."""
  mode: str
  rate: float
  rate_schedule: str  # "cosine" or "constant"
  min_rate: float
  decay_steps: int
  start_step: int
  end_step: int  # last t at which an event may regrow (inclusive)
  update_every: int
  momentum: float = 0.9  # decay of the dense-gradient momentum (growth="momentum")
  # Updates after which a grown weight takes full steps: its update is scaled by
  # j / warmup at the j-th update after the event (0: full steps at once).
  warmup: int = 0


class MaskUpdateConfig(NamedTuple):
  """What a mask-update event does (static: fixed when the transformation is built)."""
  pruning: Pruning | None
  regrowth: Regrowth | None
  structure: Any  # NM, Block, Channels or None (unstructured)
  # Which leaves are stacked layers (their metadata's axes added at tx.init).
  layer_axes: _layers.LayerAxes = _layers.LayerAxes()


def is_event(config: MaskUpdateConfig, t) -> jax.Array:
  """Whether update ``t`` (traced int32) may change the masks (bool [])."""
  event = jnp.zeros((), bool)
  if config.pruning is not None:
    p = config.pruning
    event |= _schedules.is_event(t, p.update_every, p.start_step, p.end_step)
  if config.regrowth is not None:
    r = config.regrowth
    event |= _schedules.is_event(t, r.update_every, r.start_step, r.end_step)
  return event


def host_is_event(config: MaskUpdateConfig, t: int) -> bool:
  """Whether update ``t`` (1-based) may change the masks, decided on the host."""
  return any(bool(_schedules.is_event(t, s.update_every, s.start_step, s.end_step))
             for s in (config.pruning, config.regrowth) if s is not None)


def update_masks(config: MaskUpdateConfig, params: PyTree, updates: PyTree, grads: PyTree,
                 masks: PyTree, rng: jax.Array, t: jax.Array, grad_momentum: PyTree):
  """New masks and the ``keep`` masks after the update ``t`` (an event).

  Each stage (prune, drop, grow) computes its plan (a few scalars per layer)
  inside a ``lax.cond`` on whether it runs at ``t``; the pruned and dropped
  masks are materialised for the next stage, the two results computed in one
  elementwise pass.

  Args:
    config: the static description of the event.
    params: the params the update was computed for.
    updates: this step's updates of the inner optimizer.
    grads: the dense gradient (growth by gradient ranks it).
    masks: the bool mask tree before the event.
    rng: the event's PRNG key (random growth).
    t: the 1-based update count (traced int32).
    grad_momentum: the dense-gradient momentum (``growth="momentum"``) or None.

  Returns:
    ``(new_masks, keep)``: mask trees like ``masks``; ``keep`` is ``new_masks``
    minus the newly grown positions (those restart at 0).
  """
  ws, ms, rebuild = _prune.split_prunable(params, masks)
  us, _, _ = _prune.split_prunable(updates, masks)
  # The authors prune the weights after this step's update (docs/algorithms.md §5).
  # No masking here: every ranking below only considers positions active in
  # ``masks``. Every key is recomputed where it is needed (histogram passes, the
  # final masks), and exact counts need w + u bitwise equal everywhere; computed
  # inside different fusions it rounded differently (XLA may contract u's
  # arithmetic into an FMA in one and not another), so it is stored once behind a
  # barrier.
  ws = _prune.same_bits([w + u for w, u in zip(ws, us)])
  # Every stage below works on layers: a stacked leaf's layers are lazy slices of
  # it (docs/algorithms.md §2), joined again at the end.
  layers = _layers.split_of(config.layer_axes, params, masks)
  # Blocks and channels: every stage below ranks units (their RMS) on unit arrays;
  # N:M: the prune and the growth work within groups (_structured_masks).
  # Unstructured: the identity.
  st = _structure.layer_structure(config.structure, layers.layer_names(),
                                  layers.layer_shapes())
  ws, ms = layers.split(ws, arrays=st.structure is not None), layers.split(ms)
  ws, ms = _structured_masks.unit_scores(st, ws), _structured_masks.unit_masks(st, ms)
  # The pruned and the dropped masks are materialised (bool, or bit-packed in
  # large models: _packs): left lazy, every later pass and mask re-emitted their
  # selections' chains, and the event compiled ~15% slower (LeNet-300-100).
  m_pruned = ms
  if config.pruning is not None:
    m_pruned = _prune_stage(config.pruning, config.structure, st, ws, ms, t)
  m_new = m_pruned
  if config.regrowth is not None:
    # What growth ranks: the dense gradient or its momentum (random growth: neither).
    ranked = grads if config.regrowth.mode == "gradient" else grad_momentum
    m_new = _regrowth_stage(config.regrowth, st, ws, m_pruned, t, rng, ranked, masks,
                            layers)
  keep = [_lazy.lazy_map(lambda index, a, b: a & b, a, b) for a, b in zip(m_new, m_pruned)]
  new_masks = _structured_masks.from_units(st, [_lazy.lazy(m).compute() for m in m_new])
  return rebuild(layers.join(new_masks)), rebuild(layers.join(_structured_masks.from_units(
      st, [m.compute() for m in keep])))


def layerwise_count_table(counts, ms, sizes=None) -> np.ndarray:
  """Each event's overall count split over the layers ``ms`` by size (int32 [K, L]).

  Static, on the host (float64): each row is ``proportional_counts`` of one
  event's exact total. ``sizes``: the layers' sizes if not those of ``ms``.
  """
  sizes = [int(m.size) for m in ms] if sizes is None else sizes
  return np.asarray([_distributions.proportional_counts(sizes, int(c)) for c in counts],
                    np.int32)


# Layer-wise selections of models with at least this many prunable weights run in
# parts of about 1/_PARTS of the weights each, one selection (its own loops) after
# another. One selection over every layer at once histograms all of them in the same
# loop body, whose per-layer scatter indices, updates and histograms are then all
# live together: ~2.5x the parameter bytes at the event's peak on the scanned
# 32M language model (experiments/benchmarks/README.md, Memory). Each layer is its
# own group, so the parts select exactly what the whole selection does.
_SPLIT_FROM = 1 << 22
_PARTS = 8


def _layer_parts(ms) -> list[np.ndarray]:
  """Consecutive runs of layers of about 1/_PARTS of the weights each (one run for
  small models): a run is closed before a layer that would take it past that."""
  sizes = [int(m.size) for m in ms]
  total = sum(sizes)
  if total < _SPLIT_FROM:
    return [np.arange(len(sizes))]
  target, n = total / _PARTS, 0
  parts: list[np.ndarray] = []
  run: list[int] = []
  for i, size in enumerate(sizes):
    if run and n + size > target:
      parts.append(np.asarray(run))
      run, n = [], 0
    run.append(i)
    n += size
  return parts + [np.asarray(run)]


def _in_parts(parts, plan_fn, *per_layer) -> _select.Selection:
  """``plan_fn`` of each part of the layers (lists, or [L] arrays), joined in order."""
  if len(parts) == 1:
    return plan_fn(*per_layer)
  def pick(x, p):
    return [x[i] for i in p] if isinstance(x, list) else x[p]
  sels = [plan_fn(*[pick(x, p) for x in per_layer]) for p in parts]
  return _select.Selection(*[jnp.concatenate(f) for f in zip(*sels)])


# Models with at least this many prunable weights keep the event's pruned and dropped
# masks bit-packed (_packs): there three bool masks of the model are >= 96 MiB, at
# the event's peak next to the gradient and w + u (the scanned 126M LM: 1.232x ->
# 1.115x dense). Smaller models keep bool arrays: the packed reads cost compile time
# (ResNet-50's event: 29 -> 41 s) and saved nothing at the 32M LM's peak.
_PACK_FROM = 1 << 25


def _packs(ms) -> bool:
  """Whether the event keeps its pruned and dropped masks ``ms`` bit-packed
  (``_lazy.materialise``): models of at least ``_PACK_FROM`` weights, most of them
  in layers it can pack (``_lazy.packs``), where these masks are at the event's
  peak; not under explicit mesh axes (where JAX types each reshape's sharding)."""
  sizes = [int(m.size) for m in ms]
  aligned = sum(n for n, m in zip(sizes, ms) if _lazy.packs(m.shape))
  if sum(sizes) < _PACK_FROM or 2 * aligned < sum(sizes):
    return False
  arrays = jax.tree.leaves([_lazy.lazy(m).sources for m in ms])
  return all(_placement.explicit_sharding(a) is None for a in arrays)


def _pruned_sizes(structure, st, ms) -> list[int]:
  """The sizes the schedule counts: each layer's, or its original units for a model
  condensed during training (``Channels.units``: the targets stay those of the
  original widths, the dead units it lost being inactive)."""
  if not isinstance(structure, _structure.Channels) or not structure.units:
    return [int(m.size) for m in ms]
  return [structure.unit_count(_layers.base_name(v.name), int(m.size))
          for v, m in zip(st.views, ms)]


def _prune_stage(pruning: Pruning, structure, st, ws, ms, t) -> list:
  """The masks after the event's magnitude prune (``ms`` itself if none is due)."""
  num_layers = len(ms)
  sizes = _pruned_sizes(structure, st, ms)
  counts = _schedules.gradual_active_counts(
      sum(sizes), initial_sparsity=pruning.initial_sparsity,
      final_sparsity=pruning.final_sparsity, start_step=pruning.start_step,
      end_step=pruning.end_step, update_every=pruning.update_every)
  k0 = pruning.start_step // pruning.update_every
  kf = pruning.end_step // pruning.update_every
  k = t // pruning.update_every
  prune_now = (_schedules.is_event(t, pruning.update_every, pruning.start_step)
               & (k > k0) & (k <= kf))
  target = jnp.asarray(counts, jnp.int32)[jnp.clip(k, 0, kf)]
  if st.grouped:
    table = _structure.group_count_table(
        structure, initial_sparsity=pruning.initial_sparsity,
        final_sparsity=pruning.final_sparsity, start_step=pruning.start_step,
        end_step=pruning.end_step, update_every=pruning.update_every)
    per_group = jnp.where(prune_now, jnp.asarray(table)[jnp.clip(k, 0, kf)], structure.m)
    return _structured_masks.prune_in_groups(st, ws, ms, per_group)
  if pruning.scope == "global":
    plan = lax.cond(prune_now, lambda: _prune.global_prune_plan(ws, ms, target),
                    lambda: _prune.keep_all_global_plan(num_layers))
    return _lazy.materialise(_prune.apply_global_plan(ws, ms, plan), _packs(ms))
  # Layer-wise: each event's exact total, split over the layers in proportion to
  # their sizes by largest remainder.
  per_layer = jnp.asarray(layerwise_count_table(counts, ms, sizes))[jnp.clip(k, 0, kf)]
  sel = lax.cond(prune_now, lambda: _in_parts(_layer_parts(ms), _prune.layerwise_prune_plan,
                                              ws, ms, per_layer),
                 lambda: _select.Selection.all_positive(num_layers))
  return _lazy.materialise(_prune.apply_layerwise_plan(ws, ms, sel), _packs(ms))


def _growth_scores(regrowth: Regrowth, st, ranked, masks, layers: _layers.Split):
  """The growth scores of the prunable leaves of ``ranked`` (units' RMS for blocks
  and channels), or None for random growth."""
  if regrowth.mode == "random":
    return None
  scores, _, _ = _prune.split_prunable(ranked, masks)
  # The same barrier as on w + u: the growth plan (inside a cond) and the final
  # masks (outside it) must rank the same bits. Without it, with mask_update=True,
  # the bfloat16 momentum (or gradients computed in the same program) was kept in
  # float32 in one fusion and rounded in the other (XLA's excess precision), and a
  # grown position was lost (6 -> 5 active).
  scores = layers.split(_prune.same_bits(scores), arrays=st.structure is not None)
  return _structured_masks.unit_scores(st, scores)


def _growth(regrowth: Regrowth, st, rng, m_pruned, ranked, masks, layers):
  """``(plan, apply, nothing)`` of the growth stage (see ``group_growth``)."""
  num_layers = len(m_pruned)
  scores = _growth_scores(regrowth, st, ranked, masks, layers)
  # The two growths' plans differ in type (RandomPlan or Selection).
  grow_plan: Callable[..., Any]
  apply_grow: Callable[..., Any]
  no_growth: _regrow.RandomPlan | _select.Selection
  if regrowth.mode == "random":
    grow_plan = functools.partial(_regrow.random_grow_plan, rng)
    apply_grow = _regrow.apply_random_grow
    no_growth = _regrow.RandomPlan(jnp.zeros((num_layers, 2), jnp.uint32),
                                   _select.Selection.nothing(num_layers))
  else:
    grow_plan = lambda ms, num, active: _in_parts(
        _layer_parts(ms), _regrow.score_grow_plan, scores, ms, num, active)
    apply_grow = functools.partial(_regrow.apply_score_grow, scores)
    no_growth = _select.Selection.nothing(num_layers)
  if st.grouped:
    return _structured_masks.group_growth(st, regrowth.mode, rng, scores, m_pruned)
  return grow_plan, apply_grow, no_growth


def _regrowth_stage(regrowth: Regrowth, st, ws, m_pruned, t, rng, ranked, masks,
                    layers: _layers.Split) -> list:
  """The masks after the event's drop and regrowth (``m_pruned`` if none is due).

  ``ranked``: the tree growth ranks by (``masks`` picks its prunable leaves).
  """
  num_layers = len(m_pruned)
  regrow_now = _schedules.is_event(t, regrowth.update_every, regrowth.start_step,
                                   regrowth.end_step)
  if regrowth.rate_schedule == "cosine":
    rate = _schedules.cosine_regrowth_rate(
        t, initial_rate=regrowth.rate, total_steps=regrowth.decay_steps,
        min_rate=regrowth.min_rate)
  else:
    rate = _schedules.constant_rate(t, initial_rate=regrowth.rate)
  grow_plan, apply_grow, no_growth = _growth(regrowth, st, rng, m_pruned, ranked, masks,
                                             layers)

  packed = _packs(m_pruned)

  def plans():
    active = _counts.count_each(m_pruned)
    n = jnp.ceil(rate * active.astype(jnp.float32)).astype(jnp.int32)
    drop = _in_parts(_layer_parts(m_pruned), _prune.layerwise_prune_plan, ws, m_pruned,
                     active - n, active)
    dropped = _lazy.materialise(_prune.apply_layerwise_plan(ws, m_pruned, drop), packed)
    # The drop keeps exactly this many (clipped to keep >= 1), so no recount; grow
    # exactly as many as were dropped.
    kept = _prune.layerwise_keep_counts(active - n, active)
    return (dropped if packed else drop), grow_plan(dropped, active - kept, kept)

  def no_plans():
    if packed:  # the prune stage's Packed masks are returned as they are
      return _lazy.materialise(m_pruned, True), no_growth
    return _select.Selection.all_positive(num_layers), no_growth

  # Packed, the cond returns the dropped masks themselves (1 bit a weight): the final
  # masks then need no w + u (481 MiB at the scanned 126M LM), which dies after the
  # drop. Otherwise it returns the drop's plan, and the final masks recompute it.
  drop, grow = lax.cond(regrow_now, plans, no_plans)
  if packed:
    return apply_grow(drop, grow)
  return apply_grow(_prune.apply_layerwise_plan(ws, m_pruned, drop), grow)

