"""Straight-through sparse training (STE, and SR-STE's decay of pruned weights).

Unlike every other method, the optimizer keeps *dense* weights: the forward pass
uses the masked ones, ``masked_params(params, opt_state)`` inside the loss, whose
gradient passes straight through the mask to every dense weight; the masks are
recomputed by magnitude from the dense weights every ``update_every`` updates, so
a pruned weight that grows large enough comes back. SR-STE (Zhou et al. 2021,
"Learning N:M fine-grained structured sparse neural networks from scratch") adds
``decay * w`` to the gradient of every pruned weight (their lambda_w), pulling
pruned weights towards 0 so the mask settles.

Per update: ``g += decay * where(mask, 0, w)`` -> inner update -> at an event,
masks = magnitude masks of ``w + u`` (the weights the next forward pass sees).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparse_jax import _arguments
from sparse_jax import _distributions
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _prune
from sparse_jax import _schedules
from sparse_jax import _state
from sparse_jax import _structure
from sparse_jax import _structured_masks

PyTree = Any


def magnitude_masks(params: PyTree, prunable: PyTree, sparsity: float, *,
                    structure: _arguments.StructureArg = None,
                    scope: str = "global") -> PyTree:
  """Masks of the largest-magnitude weights at ``sparsity``, from scratch (jittable).

  ``NM(n, m)``: the ``n`` largest of every group. Otherwise the exact
  ``active_count(sparsity, N)`` largest weights (blocks, channels: units by RMS)
  over the whole model (``scope="global"``, every layer keeping at least one) or
  the same fraction of every layer (``"layerwise"``).

  Example:
    >>> masks = magnitude_masks(params, sparse_jax.select_prunable(params), 0.5,
    ...                         structure=sparse_jax.NM(2, 4))
  """
  params = _masks.unwrap_variables(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = _paths.flatten_up_to(treedef, prunable)
  ws = _prune.same_bits([w for w, f in zip(leaves, flags) if f])
  st = _structure.leaf_structure(structure, params, prunable)
  if st.grouped:
    ones = [jnp.ones(w.shape, bool) for w in ws]
    chosen = _structured_masks.prune_in_groups(st, ws, ones, st.structure.n)
  else:
    us = _structured_masks.unit_scores(st, ws)
    ones = [jnp.ones(u.shape, bool) for u in us]
    layers = [_masks.LayerInfo("", tuple(u.shape), int(u.size)) for u in us]
    total = _distributions.active_count(sparsity, sum(l.size for l in layers))
    if scope == "global":
      plan = _prune.global_prune_plan(us, ones, total)
      kept = _prune.apply_global_plan(us, ones, plan)
    else:
      counts = _distributions.layer_counts(layers, [1.0 - sparsity] * len(layers), total)
      sel = _prune.layerwise_prune_plan(us, ones, jnp.asarray(counts, jnp.int32))
      kept = _prune.apply_layerwise_plan(us, ones, sel)
    chosen = _structured_masks.from_units(st, [m.compute() for m in kept])
  it = iter(chosen)
  return jax.tree.unflatten(treedef, [next(it) if f else None for f in flags])


def ste(inner: optax.GradientTransformation, *, sparsity: float | None = None,
        structure: _arguments.StructureArg = None, update_every: int = 1,
        decay: float = 0.0, scope: str = "global", include: _arguments.Regexes = None,
        exclude: _arguments.Regexes = None,
        keep_first_dense: bool = False, keep_last_dense: bool = False,
        embeddings: bool = False) -> optax.GradientTransformationExtraArgs:
  """Straight-through sparse training: dense weights, masked forward (SR-STE with decay).

  The loss must see ``sparse_jax.masked_params(params, opt_state)``; updates are
  dense (apply them with ``optax.apply_updates``), and the trained sparse model is
  ``masked_params(params, opt_state)`` (exact zeros off the mask).

  Example:
    >>> tx = sparse_jax.ste(optax.adam(1e-3), structure=sparse_jax.NM(2, 4),
    ...                     decay=2e-4)   # SR-STE
    >>> loss = lambda p: loss_fn(sparse_jax.masked_params(p, opt_state), batch)
    >>> updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    inner: the optimizer to wrap.
    sparsity: the sparsity of the masks (``1 - n/m`` with ``NM(n, m)``, which may
      omit it).
    structure: ``None`` (unstructured), ``NM``, ``Block`` or ``Channels``.
    update_every: updates between mask recomputations (1: every step, as SR-STE).
    decay: SR-STE's lambda_w, added times the weight to the gradient of every
      pruned weight (0: plain STE).
    scope: ``"global"`` or ``"layerwise"`` magnitude ranking (no effect with N:M).
    include, exclude, keep_first_dense, keep_last_dense, embeddings: which leaves
      are prunable (see ``select_prunable``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    ``StraightThroughState`` (``_state``).
  """
  structure, sparsity = _structure.check_arguments(structure, sparsity)
  s = _arguments.check_sparsity(sparsity)
  update_every = _schedules.check_int(update_every, "update_every")
  _schedules.check_steps(update_every=update_every)
  lam = _schedules.check_number(decay, "decay")
  if not lam >= 0.0:
    raise ValueError(f"decay={decay!r} must be >= 0 (SR-STE's lambda_w, e.g. 2e-4).")
  _arguments.check_common("erk", "gradient", scope, "exact")
  selector = _arguments.selector(include, exclude, keep_first_dense, keep_last_dense,
                                 embeddings)
  inner = optax.with_extra_args_support(inner)

  def masks_of(params):
    params = _masks.unwrap_variables(params)
    prunable = _masks.select_prunable(params, **selector)
    return magnitude_masks(params, prunable, s, structure=structure, scope=scope)

  def init_fn(params):
    return _state.StraightThroughState(jnp.zeros((), jnp.int32), masks_of(params),
                                       inner.init(params))

  # The first argument is named as in optax's update protocol (``updates``).
  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("ste needs the params: call tx.update(grads, opt_state, params).")
    params = _masks.unwrap_variables(params)
    if lam:
      updates = jax.tree.map(
          lambda g, p, m: g if m is None else g + (lam * jnp.where(m, 0, p)).astype(g.dtype),
          updates, params, state.masks)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    t = state.count + 1
    recompute = lambda: masks_of(optax.apply_updates(params, updates))
    if update_every == 1:
      masks = recompute()
    else:
      masks = lax.cond(t % update_every == 0, recompute, lambda: state.masks)
    return updates, _state.StraightThroughState(t, masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """The params the forward pass of a straight-through model sees.

  ``where(mask, p, 0)`` in value (exactly, for finite weights), with the identity
  as gradient: ``p + stop_gradient(where(mask, p, 0) - p)``. With the state of any
  other sparse_jax method (whose params are masked already) its masks are applied
  the same way.

  Example:
    >>> logits = model.apply({"params": sparse_jax.masked_params(p, opt_state)}, x)
  """
  masks = (_state.get_straight_through_state(opt_state).masks
           if _state.is_straight_through(opt_state) else _state.get_masks(opt_state))
  params = _masks.unwrap_variables(params)
  return jax.tree.map(
      lambda p, m: p if m is None else p + lax.stop_gradient(jnp.where(m, p, 0) - p),
      params, masks)
