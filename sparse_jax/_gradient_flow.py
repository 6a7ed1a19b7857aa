"""Gradient-flow measures (docs/algorithms.md §8): effective gradient flow, gradient norm, g^T H g.

Effective gradient flow (EGF, Tessera et al., "Keep the Gradients Flowing") is the
gradient restricted to the active weights, measured per layer, normalised by the
layer's number of active weights and averaged evenly over layers:

  EGF_p = (1 / L) * sum_l ||g_l * m_l||_p / ||m_l||_0,   p in {1, 2}.

The layers are the prunable leaves, i.e. the leaves whose mask is an array (a
``None`` mask marks a dense leaf such as a bias; it is not a layer here). A layer
with no active weight has no gradient flow to measure: it is left out of the
average (L counts only layers with at least one active weight), so the measure is
never NaN; with no active weight anywhere it is 0.

All functions are pure and jittable; masks may be ``None`` for a dense network, in
which case every leaf with ``ndim >= 2`` is a fully active layer (the same default
as ``select_prunable``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparse_jax import _masks
from sparse_jax import _paths

PyTree = Any


def _layer_pairs(grads: PyTree, masks: PyTree | None):
  """(name, grad, mask) of every layer; mask is None for a fully active layer."""
  grads = _masks.unwrap_variables(grads)
  flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
  if masks is None:
    flags = jax.tree.leaves(_masks.select_prunable(grads))
    return [(_masks.path_to_name(p), g, None) for (p, g), f in zip(flat, flags) if f]
  mask_leaves = _paths.flatten_up_to(treedef, _masks.unwrap_variables(masks))
  return [(_masks.path_to_name(p), g, m) for (p, g), m in zip(flat, mask_leaves)
          if m is not None]


def _check_p(p):
  if p not in (1, 2):
    raise ValueError(f"p={p!r} is not supported; effective gradient flow uses p=1 or "
                     "p=2 (the default).")


def _layer_flow(g, m, p):
  """(||g * m||_p / ||m||_0, has_active) of one layer, NaN-free when m is all False."""
  g = jnp.asarray(g, jnp.float32)
  if m is None:
    active = jnp.asarray(g.size, jnp.float32)
    masked = g
  else:
    active = jnp.sum(m, dtype=jnp.float32)
    masked = jnp.where(m, g, 0.0)
  if p == 1:
    norm = jnp.sum(jnp.abs(masked))
  else:
    norm = jnp.sqrt(jnp.sum(jnp.square(masked)))
  has_active = active > 0
  return jnp.where(has_active, norm / jnp.maximum(active, 1.0), 0.0), has_active


def layer_gradient_flow(grads: PyTree, masks: PyTree | None = None, p: int = 2
                        ) -> dict[str, jax.Array]:
  """Per-layer effective gradient flow ``||g_l * m_l||_p / ||m_l||_0``.

  Example:
    >>> flows = sparse_jax.layer_gradient_flow(grads, sparse_jax.get_masks(opt_state))
    >>> flows["Dense_0/kernel"]

  Args:
    grads: the gradient pytree (the params' structure).
    masks: a mask tree (bool arrays on prunable leaves, ``None`` on dense leaves),
      or ``None`` for a dense network (every leaf with ``ndim >= 2`` fully active).
    p: the norm, 1 or 2.

  Returns:
    A dict from layer name ("Dense_0/kernel") to a float32 scalar; a layer with no
    active weight has flow 0.
  """
  _check_p(p)
  return {name: _layer_flow(g, m, p)[0] for name, g, m in _layer_pairs(grads, masks)}


def effective_gradient_flow(grads: PyTree, masks: PyTree | None = None, p: int = 2
                            ) -> jax.Array:
  """Effective gradient flow: per-layer masked gradient norms averaged over layers.

  ``EGF_p = (1/L) sum_l ||g_l * m_l||_p / ||m_l||_0`` over the L layers with at
  least one active weight (layers with none are left out, never NaN).

  Example:
    >>> grads = jax.grad(loss_fn)(params)
    >>> egf = sparse_jax.effective_gradient_flow(grads, sparse_jax.get_masks(opt_state))

  Args:
    grads: the gradient pytree (the params' structure).
    masks: a mask tree, or ``None`` for a dense network.
    p: the norm, 1 or 2 (the default).

  Returns:
    A float32 scalar; 0 when no layer has an active weight.
  """
  _check_p(p)
  pairs = [_layer_flow(g, m, p) for _, g, m in _layer_pairs(grads, masks)]
  if not pairs:
    raise ValueError("effective_gradient_flow found no layer: the masks have no array "
                     "leaf (or, with masks=None, no gradient leaf has ndim >= 2).")
  total = sum(f for f, _ in pairs)
  num_layers = sum(a.astype(jnp.float32) for _, a in pairs)
  return jnp.where(num_layers > 0, total / jnp.maximum(num_layers, 1.0), 0.0)


def _restrict(tree: PyTree, masks: PyTree | None) -> PyTree:
  """``tree`` with inactive weights zeroed (dense leaves kept)."""
  if masks is None:
    return tree
  return _masks.apply_masks(tree, masks)


def gradient_norm(grads: PyTree, masks: PyTree | None = None) -> jax.Array:
  """The plain (global) L2 norm of the gradient, ``||g||_2``.

  Example:
    >>> sparse_jax.gradient_norm(grads)          # every entry, as in the EGF paper
    >>> sparse_jax.gradient_norm(grads, masks)   # active weights and dense leaves

  Args:
    grads: the gradient pytree.
    masks: ``None`` for the norm over every entry (inactive weights included);
      a mask tree to leave inactive weights out.

  Returns:
    A float32 scalar.
  """
  leaves = jax.tree.leaves(_restrict(_masks.unwrap_variables(grads), masks))
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in leaves))


def _vdot(a: PyTree, b: PyTree) -> jax.Array | int:  # 0 for trees without leaves
  return sum(jnp.vdot(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gradient_hessian_gradient(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                              masks: PyTree | None = None) -> jax.Array:
  """GraSP's ``g^T H g`` by one Hessian-vector product (forward over reverse).

  Never forms H: ``H v`` is the JVP of ``jax.grad(loss_fn)`` along ``v = g``.

  Example:
    >>> ghg = sparse_jax.gradient_hessian_gradient(lambda p: loss(p, batch), params)

  Args:
    loss_fn: a scalar function of the params.
    params: where to evaluate it.
    masks: ``None`` for the full gradient and Hessian; a mask tree to restrict
      both to the active weights (and dense leaves): ``(g*m)^T H (g*m)``.

  Returns:
    A float32 scalar.
  """
  g = _restrict(jax.grad(loss_fn)(params), masks)
  return _gradient_hessian_gradient(loss_fn, params, g)


def _gradient_hessian_gradient(loss_fn, params, v):
  _, hv = jax.jvp(jax.grad(loss_fn), (params,), (v,))
  return _vdot(v, hv)


def gradient_flow_measures(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                           masks: PyTree | None = None) -> dict[str, Any]:
  """Every gradient-flow measure of docs/algorithms.md §8 at ``params``, from one gradient.

  Example:
    >>> m = jax.jit(lambda p: sparse_jax.gradient_flow_measures(
    ...     lambda q: loss(q, batch), p, masks))(params)
    >>> m["egf_p2"], m["gradient_norm"], m["ghg"]

  Args:
    loss_fn: a scalar function of the params.
    params: where to measure.
    masks: a mask tree, or ``None`` for a dense network.

  Returns:
    A dict of float32 scalars: ``loss``; ``egf_p1`` and ``egf_p2`` (effective
    gradient flow); ``gradient_norm`` (every entry); ``gradient_norm_active``
    (inactive weights left out); ``ghg`` (``g^T H g`` over the active weights,
    since inactive ones cannot move); and ``egf_p2_layers``, a dict from layer name
    to that layer's p=2 flow.
  """
  loss, grads = jax.value_and_grad(loss_fn)(params)
  active = _restrict(grads, masks)
  return {
      "loss": loss,
      "egf_p1": effective_gradient_flow(grads, masks, p=1),
      "egf_p2": effective_gradient_flow(grads, masks, p=2),
      "gradient_norm": gradient_norm(grads),
      "gradient_norm_active": gradient_norm(active),
      "ghg": _gradient_hessian_gradient(loss_fn, params, active),
      "egf_p2_layers": layer_gradient_flow(grads, masks, p=2),
  }
