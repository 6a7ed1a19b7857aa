"""The Optax wrapper that enforces sparsity, and the factory of each method.

Every factory returns an ``optax.GradientTransformationExtraArgs`` wrapping any
inner optax transformation. At each update the wrapper

1. masks the gradients and runs the inner transformation on them;
2. at a mask-update event (a ``lax.cond`` on the step) prunes and regrows from
   the updated weights and the dense gradient it was given (SPEC §5 order:
   update -> mask -> prune -> mask -> drop -> grow -> mask);
3. emits ``where(keep, u, -p)`` so that ``optax.apply_updates`` leaves the params
   exactly masked (finite params; see "Non-finite values" below), and zeroes the
   inner state outside ``keep``.

Every factory checks its arguments when it is called, before any tracing:
``TypeError`` for a value of the wrong type (an integer argument must be a Python
or NumPy int, masks must be bool), ``ValueError`` for an impossible value: steps
with ``total_steps >= 1``, ``update_every >= 1``, ``0 <= start_step <= end_step
<= total_steps`` and at least one mask-update event in the window, rates in
[0, 1] with ``min_regrowth_rate <= regrowth_rate``, and sparsities that agree
with ``initial_masks`` (see ``initial_masks`` in each factory).

``keep`` is the set of weights that stay active with their value: on ordinary
steps the mask itself; at events the new mask minus newly grown positions (those
restart at exactly 0 with zeroed optimizer state).

Whether a step is an event depends only on the step count, so a training loop can
decide it on the host and pass it as a static extra argument:
``tx.update(grads, state, params, mask_update=False)`` compiles the step without
the event branch (as fast as static sparse training: the ``lax.cond`` costs
materialised updates and copied masks on every step), ``mask_update=True`` always
runs the mask update (which still follows the schedule, so it is correct at any
step), and ``None`` (the default) decides in the graph. ``False`` at an event step
would skip that event (counted in ``SparseState.skipped_events``): use it only on
steps known not to be events, e.g. ``mask_update=(step + 1) % update_every == 0``
for a 0-based loop ``step``.

Non-finite values. Step 3 makes ``optax.apply_updates`` give ``p + (-p)`` at every
position outside ``keep``: exactly ``+0.0`` where ``p`` is finite, but NaN where
``p`` is NaN or infinite, which no additive update can turn into 0. The
gradients are masked before the inner optimizer, so a NaN gradient never reaches
a masked position; a non-finite weight there comes from an active weight that was
already non-finite when an event pruned it (NaN and inf rank above every finite
magnitude, so that takes more non-finite weights than the event keeps), or from
params that were non-finite there to begin with. So:

* ``params = optax.apply_updates(params, updates)``: masked weights are exactly 0
  as long as the weights an event removes are finite.
* ``params = sparse_jax.apply_updates(params, updates, opt_state)`` (the new
  ``opt_state``): masked weights are exactly 0 whatever the values (the update,
  then a ``where`` on the masks, one fused elementwise pass per leaf; bit for bit
  ``optax.apply_updates`` on finite values). Since every masked weight is then 0
  when an event regrows it, a grown weight restarts at exactly 0; only a weight
  that is active and non-finite, pruned and regrown by the same event, restarts
  at NaN (the same rare case as above, in a run that has already diverged).
* ``optax.apply_if_finite(tx, max_consecutive_errors)`` skips a step whose
  gradients are not all finite (zero updates, the whole state kept, so
  ``SparseState.count`` does not advance and the event schedule moves by one step
  per skipped update; ``get_masks`` and ``get_sparse_state`` find the state inside
  it, and ``mask_update`` is forwarded).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sparse_jax import _distributions
from sparse_jax import _masks
from sparse_jax import _prune
from sparse_jax import _regrow
from sparse_jax import _schedules
from sparse_jax import _select
from sparse_jax import _structure

PyTree = Any
SCOPES = ("global", "layerwise")
# ``mask_update`` for updates traced without one (``scheduled_jit`` sets it while it
# traces each of its two programs); None: decide in the graph.
MASK_UPDATE: contextvars.ContextVar = contextvars.ContextVar("mask_update", default=None)
# Each wrapper's host-side schedule: update_fn -> (1-based t -> is t an event).
_EVENT_SCHEDULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SparseState(NamedTuple):
  """State of a sparse-training wrapper."""
  count: jax.Array  # int32 [], optimizer updates completed
  # bool arrays on prunable leaves (PackedMask with packed_masks=True), None on
  # dense leaves; get_masks / get_sparse_state always return bool masks.
  masks: PyTree
  rng: jax.Array  # uint32 [2], raw PRNG key (checkpointable as a plain array)
  inner_state: optax.OptState
  # Momentum of the dense gradient on prunable leaves, kept only for
  # growth="momentum" (None otherwise): the inner optimizer only sees masked
  # gradients, so its own momentum is zero wherever a weight could grow.
  grad_momentum: PyTree = None
  # Union of every mask so far (ITOP, SPEC §9), kept only with track_union=True
  # (None otherwise); updated inside the event branch, so ordinary steps only
  # carry it.
  union: PyTree = None
  # Mask-update events skipped because the caller passed mask_update=False on an
  # event step (int32 []; should stay 0).
  skipped_events: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Pruning:
  initial_sparsity: float
  final_sparsity: float
  start_step: int
  end_step: int
  update_every: int
  scope: str


@dataclasses.dataclass(frozen=True)
class _Regrowth:
  mode: str
  rate: float
  rate_schedule: str  # "cosine" or "constant"
  min_rate: float
  decay_steps: int
  start_step: int
  end_step: int  # last t at which an event may regrow (inclusive)
  update_every: int
  momentum: float = 0.9  # decay of the dense-gradient momentum (growth="momentum")


@dataclasses.dataclass(frozen=True)
class _Start:
  sparsity: float  # 0.0 = dense start
  distribution: str | Mapping[str, float]
  sampling: str
  seed: int
  initial_masks: Any
  selector: Mapping[str, Any]


def _build_initial_masks(params, start: _Start, key, structure=None):
  params = _masks.unwrap_variables(params)
  if start.initial_masks is not None:
    given = _masks.unwrap_variables(start.initial_masks)
    _masks.check_mask_tree(params, given)
    given = _masks.unpack_masks(given)
    _structure.leaf_structure(structure, params, given)  # every layer fits it
    # Bool already (checked by the factory); asarray puts NumPy masks on the device.
    return jax.tree.map(lambda p, m: None if m is None else jnp.asarray(m).astype(bool),
                        params, given)
  prunable = _masks.select_prunable(params, **start.selector)
  _structure.leaf_structure(structure, params, prunable)  # every layer fits it
  if start.sparsity == 0.0:
    return jax.tree.map(lambda p, f: jnp.ones(np.shape(p), bool) if f else None,
                        params, prunable)
  if structure is not None:
    return _structure.random_masks(structure, key, params, prunable, start.sparsity,
                                   start.distribution, start.sampling)
  layers = _masks.prunable_layers(params, prunable)
  densities = _distributions.layer_densities_for(layers, start.sparsity, start.distribution)
  total = _distributions.active_count(start.sparsity, sum(l.size for l in layers))
  if isinstance(start.distribution, Mapping):
    total = None
  counts = _distributions.layer_counts(layers, densities, total)
  return _distributions.random_masks(key, params, prunable, counts, sampling=start.sampling)


def _sparse_wrapper(inner: optax.GradientTransformation, start: _Start,
                    pruning: _Pruning | None, regrowth: _Regrowth | None,
                    track_union: bool = False, packed_masks: bool = False,
                    structure=None) -> optax.GradientTransformationExtraArgs:
  inner = optax.with_extra_args_support(inner)
  # How masks are stored in the state. Both are no-ops on masks already stored that
  # way, so a state given the other kind (bool masks put in with ``_replace``) is
  # converted at the next update instead of failing.
  store = _masks.pack_masks if packed_masks else _masks.unpack_masks

  def init_fn(params):
    key = jax.random.PRNGKey(start.seed)
    mask_key, state_key = jax.random.split(key)
    masks = _build_initial_masks(params, start, mask_key, structure)
    stored = store(masks)
    grad_momentum = None
    if regrowth is not None and regrowth.mode == "momentum":
      grad_momentum = jax.tree.map(lambda p, m: None if m is None else jnp.zeros_like(p),
                                   _masks.unwrap_variables(params), masks)
    return SparseState(
        count=jnp.zeros((), jnp.int32), masks=stored, rng=state_key,
        inner_state=inner.init(params), grad_momentum=grad_momentum,
        # A copy: the same buffer twice in the state breaks buffer donation.
        union=jax.tree.map(jnp.copy, stored) if track_union else None,
        skipped_events=(jnp.zeros((), jnp.int32)
                        if pruning is not None or regrowth is not None else None))

  def update_masks(params, updates, grads, masks, rng, t, grad_momentum):
    """New masks and the ``keep`` masks after the update ``t`` (an event).

    Each stage (prune, drop, grow) computes its plan (a few scalars per layer)
    inside a ``lax.cond`` on whether it runs at ``t``; the pruned and dropped
    masks are materialised for the next stage, the two results computed in one
    elementwise pass.
    """
    ws, ms, rebuild = _prune.split_prunable(params, masks)
    us, _, _ = _prune.split_prunable(updates, masks)
    # The authors prune the weights after this step's update (SPEC §5). No masking
    # here: every ranking below only considers positions active in ``masks``.
    # Every key is recomputed where it is needed (histogram passes, the final
    # masks), and exact counts need w + u bitwise equal everywhere; computed inside
    # different fusions it rounded differently (XLA may contract u's arithmetic into
    # an FMA in one and not another), so it is stored once behind a barrier.
    ws = _prune.same_bits([w + u for w, u in zip(ws, us)])
    # Blocks and channels: every stage below ranks units (their RMS) on unit arrays;
    # N:M: the prune and the growth work within groups (_structure). Unstructured:
    # the identity.
    st = _structure.leaf_structure(structure, params, masks)
    ws, ms = _structure.unit_scores(st, ws), _structure.unit_masks(st, ms)
    num_layers = len(ms)
    # The pruned and the dropped masks are materialised (bool): left lazy, every
    # later pass and mask re-emitted their selections' chains, and the event
    # compiled ~15% slower (LeNet-300-100); XLA's peak of the 30M MLP's event step
    # stayed 650 MB.
    m_pruned = ms
    if pruning is not None:
      counts = _schedules.gradual_active_counts(
          sum(int(m.size) for m in ms), initial_sparsity=pruning.initial_sparsity,
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
        m_pruned = _structure.prune_in_groups(st, ws, ms, per_group)
      elif pruning.scope == "global":
        plan = lax.cond(prune_now, lambda: _prune.global_prune_plan(ws, ms, target),
                        lambda: _prune.keep_all_global_plan(num_layers))
        m_pruned = [m.compute() for m in _prune.apply_global_plan(ws, ms, plan)]
      else:
        # Layer-wise: each event's exact total, split over the layers in proportion
        # to their sizes by largest remainder (static table, float64 on the host).
        layers = [_masks.LayerInfo("", tuple(m.shape), int(m.size)) for m in ms]
        n_total = sum(l.size for l in layers)
        table = np.asarray([
            _distributions.layer_counts(layers, [c / n_total] * len(layers), int(c))
            for c in counts], np.int32)
        per_layer = jnp.asarray(table)[jnp.clip(k, 0, kf)]
        sel = lax.cond(prune_now, lambda: _prune.layerwise_prune_plan(ws, ms, per_layer),
                       lambda: _select.Selection.all_positive(num_layers))
        m_pruned = [m.compute() for m in _prune.apply_layerwise_plan(ws, ms, sel)]
    m_new = m_pruned
    if regrowth is not None:
      regrow_now = _schedules.is_event(t, regrowth.update_every, regrowth.start_step,
                                       regrowth.end_step)
      if regrowth.rate_schedule == "cosine":
        rate = _schedules.cosine_regrowth_rate(
            t, initial_rate=regrowth.rate, total_steps=regrowth.decay_steps,
            min_rate=regrowth.min_rate)
      else:
        rate = _schedules.constant_rate(t, initial_rate=regrowth.rate)
      if regrowth.mode == "random":
        grow_plan = functools.partial(_regrow.random_grow_plan, rng)
        apply_grow = _regrow.apply_random_grow
        no_growth = _regrow.RandomPlan(jnp.zeros((num_layers, 2), jnp.uint32),
                                       _select.Selection.nothing(num_layers))
      else:
        scores, _, _ = _prune.split_prunable(
            grads if regrowth.mode == "gradient" else grad_momentum, masks)
        # The same barrier as on w + u: the growth plan (inside a cond) and the
        # final masks (outside it) must rank the same bits. Without it, with
        # mask_update=True, the bfloat16 momentum (or gradients computed in the same
        # program) was kept in float32 in one fusion and rounded in the other (XLA's
        # excess precision), and a grown position was lost (6 -> 5 active).
        scores = _prune.same_bits(scores)
        scores = _structure.unit_scores(st, scores)
        grow_plan = functools.partial(_regrow.score_grow_plan, scores)
        apply_grow = functools.partial(_regrow.apply_score_grow, scores)
        no_growth = _select.Selection.nothing(num_layers)
      if st.grouped:
        grow_plan, apply_grow, no_growth = _structure.group_growth(
            st, regrowth.mode, rng, None if regrowth.mode == "random" else scores, m_pruned)

      def plans():
        active = jnp.stack([_select.count_true(m) for m in m_pruned])
        n = jnp.ceil(rate * active.astype(jnp.float32)).astype(jnp.int32)
        drop = _prune.layerwise_prune_plan(ws, m_pruned, active - n, active)
        dropped = [m.compute() for m in _prune.apply_layerwise_plan(ws, m_pruned, drop)]
        # The drop keeps exactly this many (clipped to keep >= 1), so no recount;
        # grow exactly as many as were dropped.
        kept = _prune.layerwise_keep_counts(active - n, active)
        return drop, grow_plan(dropped, active - kept, kept)

      drop, grow = lax.cond(regrow_now, plans, lambda: (
          _select.Selection.all_positive(num_layers), no_growth))
      m_new = apply_grow(_prune.apply_layerwise_plan(ws, m_pruned, drop), grow)
    keep = [_select.lazy_map(lambda index, a, b: a & b, a, b) for a, b in zip(m_new, m_pruned)]
    return (rebuild(_structure.from_units(st, [_select.lazy(m).compute() for m in m_new])),
            rebuild(_structure.from_units(st, [m.compute() for m in keep])))

  def update_fn(updates, state, params=None, *, mask_update: bool | None = None,
                **extra_args):
    if params is None:
      raise ValueError("Sparse training wrappers need the params: call "
                       "tx.update(grads, opt_state, params).")
    if mask_update is not None and not isinstance(mask_update, (bool, np.bool_)):
      raise TypeError(
          f"mask_update must be a Python bool known when tracing (or None), got "
          f"{type(mask_update).__name__}. Compute it on the host, e.g. "
          "mask_update=(step + 1) % update_every == 0, and jit one step for each value "
          "(static_argnames); None decides inside the graph with a lax.cond.")
    if mask_update is None:
      mask_update = MASK_UPDATE.get()
    if mask_update is not None:
      mask_update = bool(mask_update)
    params = _masks.unwrap_variables(params)
    grads = updates
    stored, union = store(state.masks), store(state.union)
    # With packed storage every use unpacks its own copy, which XLA fuses into the
    # consumer; a cond must never take unpacked masks as an operand (a bool buffer of
    # the whole mask, materialised on every step).
    masks = _masks.unpack_masks(stored)

    def inner_update(inner_state, masks):
      masked_grads = jax.tree.map(
          lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros_like(g)), grads, masks)
      return inner.update(masked_grads, inner_state, params, **extra_args)

    inner_updates, inner_state = inner_update(state.inner_state, masks)
    t = state.count + 1
    grad_momentum = state.grad_momentum
    if grad_momentum is not None:
      prunable_grads = jax.tree.map(lambda g, m: None if m is None else g, grads, masks)
      grad_momentum = jax.tree.map(lambda v, g: regrowth.momentum * v + g.astype(v.dtype),
                                   grad_momentum, prunable_grads)

    dynamic = pruning is not None or regrowth is not None
    if dynamic:
      is_event = jnp.zeros((), bool)
      if pruning is not None:
        is_event |= _schedules.is_event(t, pruning.update_every, pruning.start_step,
                                        pruning.end_step)
      if regrowth is not None:
        is_event |= _schedules.is_event(t, regrowth.update_every, regrowth.start_step,
                                        regrowth.end_step)
    if not dynamic or mask_update is False:
      # No mask update in this step (static, or the caller knows it is not an event):
      # the masks pass through. A wrong False is counted in skipped_events (a host
      # callback here, even in an untaken cond, cost ~40% of a LeNet step).
      new_stored, kept, rng = stored, stored, state.rng
    else:

      def event():
        # Takes this step's updates as an operand. Recomputing them here from the
        # old state (an earlier design) kept the old state alive across the cond,
        # so XLA copied the momentum and the masked gradients on every step.
        rng, event_rng = jax.random.split(state.rng)
        new_masks, keep = update_masks(params, inner_updates, grads, masks, event_rng, t,
                                       grad_momentum)
        new_stored = store(new_masks)
        # On packed masks the or of the bytes is the or of the bits.
        new_union = None if union is None else jax.tree.map(
            lambda u, m: u | m, union, new_stored)
        return new_stored, store(keep), rng, new_union

      if mask_update:
        # The caller says this step may be an event: no cond. Every stage still
        # checks the schedule, so a non-event leaves the masks (and rng) as they are.
        new_stored, kept, rng, union = event()
        rng = jnp.where(is_event, rng, state.rng)
      else:
        # Ordinary steps hand the stored masks through a lax.cond. Its outputs are
        # copies, and its operands (the updates) must be materialised: 1.3-1.6x a
        # dense step at 30M parameters, against 1.06-1.13x with mask_update=False
        # (experiments/benchmarks/README.md).
        new_stored, kept, rng, union = lax.cond(
            is_event, event, lambda: (stored, stored, state.rng, union))

    out = jax.tree.map(
        lambda u, p, k: u if k is None else jnp.where(k, u, -p).astype(u.dtype),
        inner_updates, params, _masks.unpack_masks(kept))
    if dynamic and mask_update is not False:
      # With masked gradients the inner state stays zero at inactive positions, so
      # only events (pruned and newly grown positions) need it zeroed.
      def zero_off_keep():
        return optax.tree_map_params(
            inner, lambda s, k: s if (k is None or getattr(s, "shape", None) != k.shape)
            else jnp.where(k, s, jnp.zeros_like(s)),
            inner_state, _masks.unpack_masks(kept), transform_non_params=lambda x: x)
      inner_state = zero_off_keep() if mask_update else lax.cond(
          is_event, zero_off_keep, lambda: inner_state)
    skipped = state.skipped_events
    if dynamic and mask_update is False and skipped is not None:
      skipped = skipped + is_event.astype(jnp.int32)
    return out, SparseState(count=t, masks=new_stored, rng=rng, inner_state=inner_state,
                            grad_momentum=grad_momentum, union=union,
                            skipped_events=skipped)

  def host_is_event(t: int) -> bool:
    """Whether update ``t`` (1-based) may change the masks, decided on the host."""
    return any(bool(_schedules.is_event(t, s.update_every, s.start_step, s.end_step))
               for s in (pruning, regrowth) if s is not None)

  _EVENT_SCHEDULES[update_fn] = host_is_event
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def event_schedule(tx):
  """``t -> bool``: whether update ``t`` (1-based) of ``tx`` is a mask-update event.

  ``tx`` is a transformation returned by a sparse_jax factory.
  """
  schedule = _EVENT_SCHEDULES.get(getattr(tx, "update", None))
  if schedule is None:
    raise TypeError(f"{type(tx).__name__} is not a sparse_jax transformation: pass the "
                    "one a factory returned (sparse_jax.granet(...), rigl(...), ...), "
                    "not a chain or wrapper around it.")
  return schedule


def _selector(include, exclude, keep_first_dense, keep_last_dense, embeddings=False):
  return dict(include=include, exclude=exclude, keep_first_dense=keep_first_dense,
              keep_last_dense=keep_last_dense, embeddings=embeddings)


def _check_common(distribution, growth, scope, sampling):
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


def _check_sparsity(sparsity, name: str = "sparsity") -> float:
  return _distributions.check_sparsity(_schedules.check_number(sparsity, name), name)


def _check_steps(**steps) -> tuple[int, ...]:
  """``_schedules.check_steps(**steps)``, all required; the steps as ints, in order."""
  steps = {name: _schedules.check_int(v, name) for name, v in steps.items()}
  _schedules.check_steps(**steps)
  return tuple(steps.values())


def _check_final_and_initial(sparsity, initial_sparsity) -> tuple[float, float]:
  s_f = _check_sparsity(sparsity)
  s_i = _check_sparsity(initial_sparsity, "initial_sparsity")
  if s_i > s_f:
    raise ValueError(f"initial_sparsity={s_i} is above the final sparsity={s_f}.")
  return s_f, s_i


def _check_rates(rate, min_rate) -> tuple[float, float]:
  r = _schedules.check_rate(rate, "regrowth_rate")
  r_min = _schedules.check_rate(min_rate, "min_regrowth_rate")
  if r_min > r:
    raise ValueError(f"min_regrowth_rate={min_rate!r} is above regrowth_rate={rate!r}: "
                     "the rate decays from regrowth_rate down to min_regrowth_rate.")
  return r, r_min


# How far a sparsity given with initial_masks may be from theirs: a value computed
# from the masks in float32 (sparse_jax.sparsity) is off by ~1e-7.
_MASK_SPARSITY_TOLERANCE = 1e-4


def _check_initial_masks(initial_masks, *, start: float | None = None,
                         start_name: str = "sparsity", final: float | None = None,
                         structure=None) -> None:
  """Checks ``initial_masks`` and the sparsities given with them, at the factory.

  The masks must be bool arrays or ``PackedMask`` leaves (None on dense leaves),
  never cast: a float tree would be all True. ``start`` describes the start mask
  (``sparsity`` of rigl, set and static, ``initial_sparsity`` of granet and gmp):
  0 takes the masks as they are, any other value must be their sparsity (to within
  ``_MASK_SPARSITY_TOLERANCE``). ``final``, the end of a pruning schedule, must not
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
  if start and abs(start - have) > _MASK_SPARSITY_TOLERANCE:
    raise ValueError(
        f"{start_name}={start} disagrees with initial_masks, whose sparsity is "
        f"{have:.4f} {of}: with initial_masks the start mask is initial_masks. Pass "
        f"{start_name}=0 to take the masks as they are, or masks at that sparsity.")
  if final is not None and final < have - _MASK_SPARSITY_TOLERANCE:
    raise ValueError(
        f"sparsity={final} is below the sparsity {have:.4f} of initial_masks {of}: "
        f"pruning only removes weights, so the run would end at {have:.4f}. Give a "
        "final sparsity at least that of the masks.")
  _structure.check_initial_masks(structure, initial_masks)


def granet(inner: optax.GradientTransformation, *, sparsity: float | None = None,
           total_steps: int, end_step: int, update_every: int,
           initial_sparsity: float = 0.0,
           start_step: int = 0, distribution: str | Mapping[str, float] = "erk",
           regrowth_rate: float = 0.5, min_regrowth_rate: float = 0.005,
           growth: str = "gradient", scope: str = "global", seed: int = 0,
           sampling: str = "exact", initial_masks: PyTree | None = None,
           include=None, exclude=None, keep_first_dense: bool = False,
           keep_last_dense: bool = False,
           embeddings: bool = False, track_union: bool = False,
           packed_masks: bool = False, structure=None
           ) -> optax.GradientTransformationExtraArgs:
  """GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

  Prunes globally by magnitude on Zhu & Gupta's cubic schedule from
  ``initial_sparsity`` to ``sparsity``, and at every event (also after
  ``end_step``, until the end of training) drops ``ceil(r(t) * active_l)`` of the
  smallest weights of each layer and regrows as many by dense |gradient|, with
  the cosine-decayed rate ``r(t)`` (SPEC §3-§5). ``initial_sparsity > 0`` gives
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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling)
  s_f, s_i = _check_final_and_initial(sparsity, initial_sparsity)
  update_every, start_step, end_step, total_steps = _check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step,
      total_steps=total_steps)
  seed = _schedules.check_int(seed, "seed")
  rate, min_rate = _check_rates(regrowth_rate, min_regrowth_rate)
  _check_common(distribution, growth, scope, sampling)
  _check_initial_masks(initial_masks, start=s_i, start_name="initial_sparsity", final=s_f,
                       structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=True, total_steps=total_steps)
  start = _Start(s_i, distribution, sampling, seed, initial_masks,
                 _selector(include, exclude, keep_first_dense, keep_last_dense,
                           embeddings))
  pruning = _Pruning(s_i, s_f, start_step, end_step, update_every, scope)
  regrowth = _Regrowth(growth, rate, "cosine", min_rate, total_steps,
                       start_step, total_steps - 1, update_every)
  return _sparse_wrapper(inner, start, pruning, regrowth, track_union, packed_masks,
                         structure)


def gmp(inner: optax.GradientTransformation, *, sparsity: float | None = None,
        end_step: int, update_every: int, initial_sparsity: float = 0.0,
        start_step: int = 0,
        scope: str = "global", include=None, exclude=None,
        keep_first_dense: bool = False, keep_last_dense: bool = False,
        embeddings: bool = False,
        initial_masks: PyTree | None = None, track_union: bool = False,
        packed_masks: bool = False, structure=None
        ) -> optax.GradientTransformationExtraArgs:
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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity)
  s_f, s_i = _check_final_and_initial(sparsity, initial_sparsity)
  update_every, start_step, end_step = _check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step)
  _check_common("erk", "gradient", scope, "exact")
  if s_i > 0 and initial_masks is None:
    raise ValueError("gmp starts dense: initial_sparsity > 0 needs initial_masks "
                     "(or use granet(..., initial_sparsity=...)).")
  _check_initial_masks(initial_masks, start=s_i, start_name="initial_sparsity", final=s_f,
                       structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=True)
  start = _Start(0.0, "erk", "exact", 0, initial_masks,
                 _selector(include, exclude, keep_first_dense, keep_last_dense,
                           embeddings))
  return _sparse_wrapper(inner, start,
                         _Pruning(s_i, s_f, start_step, end_step, update_every, scope), None,
                         track_union, packed_masks, structure)


def _dst(inner, *, sparsity, total_steps, update_every, start_step, end_step, end_note,
         distribution, rate, rate_schedule, growth, seed, sampling, initial_masks,
         selector, track_union=False, packed_masks=False, structure=None):
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling)
  s = _check_sparsity(sparsity)
  update_every, start_step, end_step, total_steps = _check_steps(
      update_every=update_every, start_step=start_step, end_step=end_step,
      total_steps=total_steps)
  seed = _schedules.check_int(seed, "seed")
  _check_common(distribution, growth, "global", sampling)
  rate = _schedules.check_rate(rate, "regrowth_rate")
  _check_initial_masks(initial_masks, start=s, structure=structure)
  _schedules.check_events(update_every=update_every, start_step=start_step,
                          end_step=end_step, pruning=False, total_steps=total_steps,
                          note="" if end_note is None else f" {end_note}")
  start = _Start(s, distribution, sampling, seed, initial_masks, selector)
  regrowth = _Regrowth(growth, rate, rate_schedule, 0.0, max(end_step, 1), start_step,
                       end_step, update_every)
  return _sparse_wrapper(inner, start, None, regrowth, track_union, packed_masks,
                         structure)


def rigl(inner: optax.GradientTransformation, *, sparsity: float | None = None,
         total_steps: int,
         update_every: int = 100, end_step: int | None = None, start_step: int = 0,
         distribution: str | Mapping[str, float] = "erk", regrowth_rate: float = 0.3,
         growth: str = "gradient", seed: int = 0, sampling: str = "exact",
         initial_masks: PyTree | None = None, include=None, exclude=None,
         keep_first_dense: bool = False, keep_last_dense: bool = False,
         embeddings: bool = False,
         track_union: bool = False, packed_masks: bool = False, structure=None
         ) -> optax.GradientTransformationExtraArgs:
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
              selector=_selector(include, exclude, keep_first_dense, keep_last_dense,
                                 embeddings),
              track_union=track_union, packed_masks=packed_masks, structure=structure)


def sparse_evolutionary_training(
    inner: optax.GradientTransformation, *, sparsity: float | None = None,
    total_steps: int, update_every: int = 100, end_step: int | None = None, start_step: int = 0,
    distribution: str | Mapping[str, float] = "erk", regrowth_rate: float = 0.3,
    regrowth_schedule: str = "constant", seed: int = 0, sampling: str = "exact",
    initial_masks: PyTree | None = None, include=None, exclude=None,
    keep_first_dense: bool = False, keep_last_dense: bool = False, embeddings: bool = False,
    track_union: bool = False, packed_masks: bool = False, structure=None
    ) -> optax.GradientTransformationExtraArgs:
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
              selector=_selector(include, exclude, keep_first_dense, keep_last_dense,
                                 embeddings),
              track_union=track_union, packed_masks=packed_masks, structure=structure)


def static(inner: optax.GradientTransformation, *, sparsity: float | None = None,
           distribution: str | Mapping[str, float] = "erk", seed: int = 0,
           sampling: str = "exact", initial_masks: PyTree | None = None, include=None,
           exclude=None, keep_first_dense: bool = False, keep_last_dense: bool = False,
           embeddings: bool = False,
           track_union: bool = False, packed_masks: bool = False, structure=None
           ) -> optax.GradientTransformationExtraArgs:
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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity,
                                                   distribution=distribution,
                                                   sampling=sampling, default=0.0)
  s = _check_sparsity(sparsity)
  seed = _schedules.check_int(seed, "seed")
  _check_common(distribution, "gradient", "global", sampling)
  _check_initial_masks(initial_masks, start=s, structure=structure)
  start = _Start(s, distribution, sampling, seed, initial_masks,
                 _selector(include, exclude, keep_first_dense, keep_last_dense,
                           embeddings))
  return _sparse_wrapper(inner, start, None, None, track_union, packed_masks, structure)


def _find_states(opt_state) -> list[SparseState]:
  if hasattr(opt_state, "opt_state") and not isinstance(opt_state, SparseState):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
  return [x for x in leaves if isinstance(x, SparseState)]


def get_sparse_state(opt_state) -> SparseState:
  """The ``SparseState`` inside any optimizer state (chains, MultiSteps, NNX).

  Flax NNX optimizer variables are unwrapped to plain arrays, and packed masks
  (``packed_masks=True``) and union are unpacked to bool arrays.
  """
  found = _find_states(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one sparse_jax wrapper state in the optimizer state, found "
        f"{len(found)}. Build the optimizer with a sparse_jax method (e.g. "
        "sparse_jax.granet(...)).")
  state = _masks.unwrap_variables(found[0])
  return state._replace(masks=_masks.unpack_masks(state.masks),
                        union=_masks.unpack_masks(state.union))


def get_masks(opt_state) -> PyTree:
  """The current (bool) mask tree of an optimizer state built by any sparse_jax method.

  ``sparse_jax.ste``'s state included (its masks of the dense weights).

  Example:
    >>> masks = sparse_jax.get_masks(opt_state)   # also an nnx.Optimizer
    >>> sparse_jax.density(masks)
  """
  from sparse_jax import _straight_through  # it imports this module
  if _straight_through.is_straight_through(opt_state):
    return _straight_through.get_straight_through_state(opt_state).masks
  return get_sparse_state(opt_state).masks


def sparsify_params(params: PyTree, opt_state) -> PyTree:
  """Applies the optimizer state's masks to freshly initialised params, once.

  Example:
    >>> opt_state = tx.init(params)
    >>> params = sparse_jax.sparsify_params(params, opt_state)
  """
  return _masks.apply_masks(params, get_masks(opt_state))



def apply_updates(params: PyTree, updates: PyTree, opt_state) -> PyTree:
  """``optax.apply_updates`` that stores every masked weight as exactly 0.

  ``where(mask, p + u, 0)`` on prunable leaves and ``p + u`` elsewhere, with the
  masks of ``opt_state``, the state ``tx.update`` returned with ``updates``. On
  finite values it gives the same bits as ``optax.apply_updates``; unlike it, it
  also zeroes masked weights that are NaN or infinite (see the module docstring).
  Under jit the add and the ``where`` fuse into one pass per leaf.

  Example:
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = sparse_jax.apply_updates(params, updates, opt_state)

  Args:
    params: the params ``updates`` were computed for.
    updates: the updates of a sparse_jax transformation (alone or inside a chain,
      ``MultiSteps``, ``apply_if_finite``, ...).
    opt_state: the optimizer state returned with ``updates``.

  Returns:
    The new params, exactly masked.
  """
  return _masks.apply_masks(optax.apply_updates(params, updates), get_masks(opt_state))
