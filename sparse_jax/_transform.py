"""The Optax wrapper that enforces sparsity; every method of ``_methods`` builds one.

Every factory returns an ``optax.GradientTransformationExtraArgs`` wrapping any
inner optax transformation. At each update the wrapper

1. masks the gradients and runs the inner transformation on them;
2. at a mask-update event prunes and regrows from the updated weights and the
   dense gradient it was given (``_mask_update``; docs/algorithms.md §5 order:
   update -> mask -> prune -> mask -> drop -> grow -> mask);
3. emits ``where(keep, u, -p)`` so that ``optax.apply_updates`` leaves the params
   exactly masked (finite params; see "Non-finite values" below), and zeroes the
   inner state outside ``keep``.

``keep`` is the set of weights that stay active with their value: on ordinary
steps the mask itself; at events the new mask minus newly grown positions (those
restart at exactly 0 with zeroed optimizer state).

Whether a step is an event depends only on the step count, so a training loop can
decide it on the host and pass it as a static extra argument:
``tx.update(grads, state, params, mask_update=False)`` compiles the step without
the event (static sparse training's program), ``mask_update=True`` always runs the
mask update (which still follows the schedule, so it is correct at any step), and
``None`` (the default) decides in the graph. For inner optimizers that allow it
(``_inner_kind``: elementwise, a zero state at zero gradients, a state without the
params: SGD, momentum, Adam(W), RMSProp, Lion, ...) step 2 runs first (from this
step's updates recomputed from the old state) and zeroes the old state outside
``keep``, then step 1 masks the gradients by ``keep`` (``_early_event``): the same
bits, one parameter-sized buffer less at the event, in a ``while_loop`` of one
iteration at events and none otherwise (under ``None``, at about the cost of
``False`` on ordinary steps; ``True`` is then the same program). For the others
``None`` decides by a ``lax.cond`` after step 1 (1.3-1.5x a dense step at 30M
parameters), and ``True`` runs step 2 after step 1 without control flow. ``False`` at an event step
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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sparse_jax import _attached
from sparse_jax import _distributions
from sparse_jax import _inner_kind
from sparse_jax import _layers
from sparse_jax import _mask_update
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _placement
from sparse_jax import _state
from sparse_jax import _structure
from sparse_jax import _structured_masks

PyTree = Any
# ``mask_update`` for updates traced without one (``scheduled_jit`` sets it while it
# traces each of its two programs); None: decide in the graph.
MASK_UPDATE: contextvars.ContextVar = contextvars.ContextVar("mask_update", default=None)
# Each wrapper's host-side schedule: update_fn -> (1-based t -> is t an event).
_EVENT_SCHEDULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Start:
  """The start mask: random at ``sparsity`` (or dense), or ``initial_masks``."""
  sparsity: float  # 0.0 = dense start
  distribution: str | Mapping[str, float]
  sampling: str
  seed: int
  initial_masks: Any
  selector: Mapping[str, Any]  # the keyword arguments of select_prunable
  layer_axes: _layers.LayerAxes = _layers.LayerAxes()  # which leaves are stacked layers


class _Wrapper(NamedTuple):
  """What one wrapper is built from (static)."""
  inner: optax.GradientTransformationExtraArgs
  start: Start
  events: _mask_update.MaskUpdateConfig
  track_union: bool
  # How masks are stored in the state, pack_masks or unpack_masks. Both are no-ops
  # on masks already stored that way, so a state given the other kind (bool masks
  # put in with ``_replace``) is converted at the next update instead of failing.
  store: Callable[[PyTree], PyTree]
  # The layer axes read from the params' metadata at the last tx.init (leaf name
  # -> axes): updates get plain arrays, without metadata.
  detected: dict
  # The leaves attached to channels (``_attached.find``), read at the last tx.init
  # from the params' order, which jit's flattening loses.
  attached: list


def initial_masks(params: PyTree, start: Start, key: jax.Array, structure=None,
                  detected: Mapping[str, int] | None = None) -> PyTree:
  """The bool start masks of ``params`` (None on dense leaves) that ``start`` describes.

  ``detected``: the leaves' layer axes read from their metadata (``_layers.detect``).
  """
  layer_axes = start.layer_axes.with_detected(detected)
  params = _masks.unwrap_variables(params)
  if start.initial_masks is not None:
    given = _masks.unwrap_variables(start.initial_masks)
    _masks.check_mask_tree(params, given)
    given = _masks.unpack_masks(given)
    _layer_structure(structure, _layers.split_of(layer_axes, params, given))  # all fit it
    # Bool already (checked by the factory); asarray puts NumPy masks on the device.
    return jax.tree.map(lambda p, m: None if m is None else jnp.asarray(m).astype(bool),
                        params, given)
  _layers.check_keep_dense(layer_axes, params, start.selector)
  prunable = _masks.select_prunable(params, **start.selector)
  layers = _layers.split_of(layer_axes, params, prunable)
  st = _layer_structure(structure, layers)  # every layer fits it
  if start.sparsity == 0.0:
    return jax.tree.map(lambda p, f: jnp.ones(np.shape(p), bool) if f else None,
                        params, prunable)
  if structure is not None:
    chosen = _structured_masks.random_layer_masks(st, key, start.sparsity,
                                                  start.distribution, start.sampling)
  else:
    infos = layers.layers()
    densities = _distributions.layer_densities_for(infos, start.sparsity, start.distribution)
    total: int | None = _distributions.active_count(start.sparsity,
                                                    sum(l.size for l in infos))
    if isinstance(start.distribution, Mapping):
      total = None
    counts = _distributions.layer_counts(infos, densities, total)
    shapes = [jax.ShapeDtypeStruct(l.shape, bool) for l in infos]
    chosen = _distributions.random_masks(key, shapes, [True] * len(shapes), counts,
                                         sampling=start.sampling)
  treedef = jax.tree.structure(params)
  it = iter(layers.join(chosen))
  return jax.tree.unflatten(treedef, [next(it) if f else None
                                      for f in _paths.flatten_up_to(treedef, prunable)])


def _layer_structure(structure, layers: _layers.Split):
  return _structure.layer_structure(structure, layers.layer_names(), layers.layer_shapes())


def sparse_wrapper(inner: optax.GradientTransformation, start: Start,
                   pruning: _mask_update.Pruning | None,
                   regrowth: _mask_update.Regrowth | None, track_union: bool = False,
                   packed_masks: bool = False,
                   structure=None) -> optax.GradientTransformationExtraArgs:
  """``inner`` kept sparse: the transformation every factory of ``_methods`` returns.

  Args:
    inner: the optimizer to wrap.
    start: the start mask.
    pruning: the gradual prune of the events, or None.
    regrowth: the drop and regrowth of the events, or None (both None: static).
    track_union: keep the union of all masks so far in ``SparseState.union``.
    packed_masks: store the masks (and the union) as ``PackedMask`` leaves.
    structure: ``NM``, ``Block``, ``Channels`` or None (unstructured).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``SparseState``.
  """
  w = _Wrapper(optax.with_extra_args_support(inner), start,
               _mask_update.MaskUpdateConfig(pruning, regrowth, structure), track_union,
               _masks.pack_masks if packed_masks else _masks.unpack_masks, {}, [])

  def init_fn(params):
    return _init(w, params)

  def update_fn(updates, state, params=None, *, mask_update: bool | None = None,
                **extra_args):
    return _update(w, updates, state, params, mask_update, extra_args)

  _EVENT_SCHEDULES[update_fn] = functools.partial(_mask_update.host_is_event, w.events)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_dynamic(w: _Wrapper) -> bool:
  """Whether the masks ever change (not static sparse training)."""
  return w.events.pruning is not None or w.events.regrowth is not None


def _init(w: _Wrapper, params: PyTree) -> _state.SparseState:
  key = jax.random.PRNGKey(w.start.seed)
  mask_key, state_key = jax.random.split(key)
  w.detected.clear()
  w.detected.update(_layers.detect(params))
  masks = initial_masks(params, w.start, mask_key, w.events.structure, w.detected)
  w.attached[:] = _attached.find(w.events.structure, params, masks,
                                 w.start.layer_axes.with_detected(w.detected))
  # Built from shapes, the masks are replicated; a select of a replicated mask with
  # a sharded gradient is an error under explicit axes.
  masks = _placed_like(masks, _masks.unwrap_variables(params))
  stored = w.store(masks)
  grad_momentum = None
  regrowth = w.events.regrowth
  if regrowth is not None and regrowth.mode == "momentum":
    grad_momentum = jax.tree.map(lambda p, m: None if m is None else jnp.zeros_like(p),
                                 _masks.unwrap_variables(params), masks)
  return _state.SparseState(
      count=jnp.zeros((), jnp.int32), masks=stored, rng=state_key,
      inner_state=w.inner.init(params), grad_momentum=grad_momentum,
      # A copy: the same buffer twice in the state breaks buffer donation.
      union=jax.tree.map(jnp.copy, stored) if w.track_union else None,
      skipped_events=jnp.zeros((), jnp.int32) if _is_dynamic(w) else None,
      regrown=_state.Regrown(w.store(jax.tree.map(jnp.zeros_like, masks)),
                             jnp.zeros((), jnp.int32)) if _warmup(w) else None)


def _warmup(w: _Wrapper) -> int:
  """The wrapper's regrowth warm-up (0: none)."""
  return 0 if w.events.regrowth is None else w.events.regrowth.warmup


def _mask_update_flag(mask_update) -> bool | None:
  """The caller's ``mask_update`` (else ``MASK_UPDATE``'s): a Python bool or None."""
  if mask_update is not None and not isinstance(mask_update, (bool, np.bool_)):
    raise TypeError(
        f"mask_update must be a Python bool known when tracing (or None), got "
        f"{type(mask_update).__name__}. Compute it on the host, e.g. "
        "mask_update=(step + 1) % update_every == 0, and jit one step for each value "
        "(static_argnames); None decides inside the graph.")
  if mask_update is None:
    mask_update = MASK_UPDATE.get()
  if mask_update is not None:
    mask_update = bool(mask_update)
  return mask_update


def _placed_like(masks: PyTree, params: PyTree) -> PyTree:
  """Each mask (or packed mask's bits) placed like ``params``' leaf under explicit axes."""
  return jax.tree.map(lambda p, m: None if m is None else _placement.shard_like(m, p),
                      params, masks)


def _update(w: _Wrapper, updates, state: _state.SparseState, params, mask_update,
            extra_args):
  """``update_fn`` of ``sparse_wrapper``: the steps listed in the module docstring."""
  if params is None:
    raise ValueError("Sparse training wrappers need the params: call "
                     "tx.update(grads, opt_state, params).")
  mask_update = _mask_update_flag(mask_update)
  params = _masks.unwrap_variables(params)
  grads = updates
  stored, union = w.store(state.masks), w.store(state.union)
  # With packed storage every use unpacks its own copy, which XLA fuses into the
  # consumer; a cond must never take unpacked masks as an operand (a bool buffer of
  # the whole mask, materialised on every step). Packed masks unpack split along
  # their last axis only (under explicit axes): placed like the params again.
  masks = _placed_like(_masks.unpack_masks(stored), params)
  t = state.count + 1
  grad_momentum = _grad_momentum(w, state.grad_momentum, grads, masks)
  dynamic = _is_dynamic(w)
  is_event = _mask_update.is_event(w.events, t) if dynamic else jnp.asarray(False)
  inner_state, regrown, update_masks = state.inner_state, state.regrown, masks
  # The mask update comes first where the inner optimizer allows (_inner_kind); the
  # inner update then runs with the new keep mask.
  early = dynamic and mask_update is not False and _inner_kind.elementwise(
      w.inner, grads, inner_state, params, _attached.extend(masks, w.attached, params),
      extra_args)
  if early:
    new_stored, kept, rng, union, regrown, inner_state = _early_event(
        w, grads, state, params, stored, union, t, grad_momentum, is_event, extra_args)
    update_masks = _placed_like(_masks.unpack_masks(kept), params)
  inner_updates, inner_state = w.inner.update(
      _masked_grads(w, grads, update_masks, params), inner_state, params, **extra_args)
  if not dynamic or mask_update is False:
    # No mask update in this step (static, or the caller knows it is not an event):
    # the masks pass through. A wrong False is counted in skipped_events (a host
    # callback here, even in an untaken cond, cost ~40% of a LeNet step).
    new_stored, kept, rng = stored, stored, state.rng
  elif mask_update and not early:
    # The caller says this step may be an event: no control flow. Every stage still
    # checks the schedule, so a non-event leaves the masks (and rng) as they are.
    new_stored, kept, rng, union, grown = _event(
        w, params, inner_updates, grads, masks, stored, union, regrown, state.rng, t,
        grad_momentum)
    rng = jnp.where(is_event, rng, state.rng)
    if regrown is not None:
      regrown = jax.tree.map(lambda a, b: jnp.where(is_event, a, b), grown, regrown)
  elif not early:
    # A lax.cond after the update: its operands (the updates) are materialised and
    # its outputs copied on every step (1.3-1.5x a dense step at 30M parameters).
    new_stored, kept, rng, union, regrown = lax.cond(
        is_event, functools.partial(_event, w, params, inner_updates, grads, masks, stored,
                                    union, regrown, state.rng, t, grad_momentum),
        lambda: (stored, stored, state.rng, union, regrown))
  kept = _attached.extend(_placed_like(_masks.unpack_masks(kept), params), w.attached,
                          params)
  out = _kept_updates(w, inner_updates, params, kept, regrown, t)
  if dynamic and mask_update is not False and not early:
    # With masked gradients the inner state stays zero at inactive positions, so
    # only events (pruned and newly grown positions) need it zeroed.
    zero_off_keep = lambda: _state.mask_inner_state(w.inner, inner_state, kept)
    inner_state = zero_off_keep() if mask_update else lax.cond(
        is_event, zero_off_keep, lambda: inner_state)
  skipped = state.skipped_events
  if dynamic and mask_update is False and skipped is not None:
    skipped = skipped + is_event.astype(jnp.int32)
  return out, _state.SparseState(count=t, masks=new_stored, rng=rng,
                                 inner_state=inner_state, grad_momentum=grad_momentum,
                                 union=union, skipped_events=skipped, regrown=regrown)


def _masked_grads(w: _Wrapper, grads, masks, params):
  """The gradients zeroed outside the masks (and dead units' attached leaves)."""
  return jax.tree.map(
      lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros_like(g)), grads,
      _attached.extend(masks, w.attached, params))


def _event(w: _Wrapper, params, inner_updates, grads, masks, stored, union, regrown, rng,
           t, grad_momentum):
  """The mask update: (new stored masks, stored keep, rng, union, regrown)."""
  rng, event_rng = jax.random.split(rng)
  events = w.events._replace(layer_axes=w.start.layer_axes.with_detected(w.detected))
  new_masks, keep = _mask_update.update_masks(events, params, inner_updates, grads,
                                              masks, event_rng, t, grad_momentum)
  # Stored as the old masks are (packed bits are otherwise split on one axis).
  new_stored = _placed_like(w.store(new_masks), stored)
  # On packed masks the or of the bytes is the or of the bits.
  new_union = None if union is None else jax.tree.map(
      lambda u, m: u | m, union, new_stored)
  new_regrown = None if regrown is None else _state.Regrown(_placed_like(w.store(
      jax.tree.map(lambda n, k: n & ~k, new_masks, keep)), stored), t)
  return new_stored, _placed_like(w.store(keep), stored), rng, new_union, new_regrown


def _early_event(w: _Wrapper, grads, state, params, stored, union, t, grad_momentum,
                 is_event, extra_args):
  """The mask update before the inner update: (stored masks, keep, rng, union, regrown,
  inner state).

  The event recomputes this step's updates from the old state and zeroes that state
  outside ``keep``; the caller then runs the inner update on the gradients masked by
  ``keep``. For the optimizers ``_inner_kind.elementwise`` accepts (SGD, momentum,
  Adam(W), RMSProp, ...) that is bit for bit the late order's update, masks and state
  (update, mask update, state zeroed), which the others take. Its event holds one
  parameter-sized buffer less: the recomputed updates feed only ``w + u`` (the scanned
  32M LM's event: 1.33x -> 1.16x a dense step's XLA peak).

  A ``while_loop`` of one iteration at events and none otherwise, under ``None`` and
  ``True`` alike (one program: the same bits whoever decides; without the loop XLA
  fused the final update differently, one-ulp differences in the state). Nothing
  model-sized enters it that did not exist anyway, and a donated state is not copied
  into it (the masks are: ``keep`` starts as their copy); a ``lax.cond`` needed this
  step's updates materialised and copied the state on every ordinary step (1.3-1.5x).
  """

  def event(c):
    _, stored_, _, rng, union_, regrown_, inner_state = c
    masks = _placed_like(_masks.unpack_masks(stored_), params)
    inner_updates, _ = w.inner.update(_masked_grads(w, grads, masks, params),
                                      inner_state, params, **extra_args)
    new = _event(w, params, inner_updates, grads, masks, stored_, union_, regrown_, rng,
                 t, grad_momentum)
    keep = _attached.extend(_placed_like(_masks.unpack_masks(new[1]), params), w.attached,
                            params)
    return (jnp.zeros((), bool), *new, _state.mask_inner_state(w.inner, inner_state, keep))

  return lax.while_loop(lambda c: c[0], event, (is_event, stored, stored, state.rng, union,
                                                 state.regrown, state.inner_state))[1:]


def _kept_updates(w: _Wrapper, inner_updates, params, kept, regrown, t):
  """``where(keep, u, -p)``: outside ``keep`` the weights go to 0 (a dead channel's
  attached scale to 1), grown ones warm up."""
  out = jax.tree.map(
      lambda u, p, k, r: u if k is None else jnp.where(k, u, r - p if r else -p).astype(
          u.dtype), inner_updates, params, kept, _attached.restarts(params, w.attached))
  if regrown is not None:
    out = _warm_up(out, regrown, t, _warmup(w), params)
  return out


def _grad_momentum(w: _Wrapper, grad_momentum, grads, masks):
  """The dense-gradient momentum after this step (``growth="momentum"``), or None."""
  if grad_momentum is None:
    return None
  regrowth = w.events.regrowth
  if regrowth is None:  # unreachable: a momentum is only kept for growth="momentum"
    raise ValueError("A dense-gradient momentum needs a regrowth.")
  prunable_grads = jax.tree.map(lambda g, m: None if m is None else g, grads, masks)
  momentum = regrowth.momentum
  return jax.tree.map(lambda v, g: momentum * v + g.astype(v.dtype), grad_momentum,
                      prunable_grads)


def _warm_up(updates: PyTree, regrown: _state.Regrown, t, steps: int, params) -> PyTree:
  """``updates`` with those of the weights grown at the last event scaled by j / steps.

  ``j = t - regrown.at`` updates after the event (at the event itself they are 0:
  grown weights restart at 0). Adam's first steps on a weight with empty moments
  are ~(1 - b1) / sqrt(1 - b2) = 3.2 learning rates whatever the gradient's size;
  scaling them in over ``steps`` updates keeps an event from kicking the loss.
  """
  factor = jnp.clip((t - regrown.at).astype(jnp.float32) / steps, 0.0, 1.0)
  warm = _placed_like(_masks.unpack_masks(regrown.masks), params)
  return jax.tree.map(
      lambda u, m: u if m is None else jnp.where(m, u * factor.astype(u.dtype), u),
      updates, warm)


def event_schedule(tx: optax.GradientTransformation) -> Callable[[int], bool]:
  """``t -> bool``: whether update ``t`` (1-based) of ``tx`` is a mask-update event.

  ``tx`` is a transformation returned by a sparse_jax factory.

  Example:
    >>> tx = sparse_jax.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=1000)
    >>> sparse_jax.event_schedule(tx)(100), sparse_jax.event_schedule(tx)(101)
    (True, False)
  """
  schedule = _EVENT_SCHEDULES.get(getattr(tx, "update", None))
  if schedule is None:
    raise TypeError(f"{type(tx).__name__} is not a sparse_jax transformation: pass the "
                    "one a factory returned (sparse_jax.granet(...), rigl(...), ...), "
                    "not a chain or wrapper around it.")
  return schedule
