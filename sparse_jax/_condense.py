"""Condensed training: the dead units of a ``Channels()`` run removed from the whole
train state, so training goes on with a smaller dense model (docs/algorithms.md §6).

``condense_train_state`` cuts each dead unit out of its layer (kernel column or
conv filter, bias, the batch norm after it: params, statistics and every
per-parameter entry of the optimizer state, masks included) and the matching
inputs of the next layer. With ``Channels(attach=True)`` a dead unit outputs
exactly ``activation(0) = 0``, so the smaller model computes the same function;
the returned ``Channels`` structure carries the original widths, so a factory
built with it keeps counting the schedule's targets in units of the original
model. Host-side, on concrete arrays, at a mask-update event (few events, so few
new programs: the step compiles once per new set of widths).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _chains
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _state
from sparse_jax import _structure

PyTree = Any
_CALLER = "condense_train_state"


class CondensedState(NamedTuple):
  """The train state of the smaller model, and how it was cut."""
  params: PyTree
  opt_state: PyTree
  batch_stats: PyTree  # None when none were given
  features: tuple[int, ...]  # output units of each layer of the chain, in order
  kept: tuple[np.ndarray, ...]  # per layer but the last: the kept units' indices
  structure: _structure.Channels  # the structure to build the next factory with


def condense_train_state(params: PyTree, opt_state: PyTree, layers: Sequence[str], *,
                         structure: _structure.Channels | None = None,
                         batch_stats: PyTree | None = None,
                         norms: Mapping[str, str] | None = None,
                         activation: Callable = jax.nn.relu,
                         epsilon: float = 1e-5,
                         keep: Mapping[str, Any] | None = None) -> CondensedState:
  """Removes the dead units of a chain of layers from a ``Channels()`` train state.

  The chain is that of ``condense_channels`` (module paths in forward order;
  activation, pooling, flatten and a batch norm in ``norms`` between them; no
  residual connection); its last layer's outputs are all kept. Every dead unit
  must output exactly 0 (``activation(BatchNorm(bias))`` is 0), which
  ``Channels(attach=True)`` (the default) guarantees: the smaller model then
  computes the same logits. Each layer keeps at least one unit.

  Example:
    >>> c = sparse_jax.condense_train_state(params, opt_state, ["Dense_0", "Dense_1",
    ...                                     "Dense_2"], structure=structure)
    >>> model = MLP(features=c.features)          # the smaller model
    >>> tx = sparse_jax.granet(inner, ..., structure=c.structure)
    >>> tx.init(c.params)                           # reads the new shapes; then
    >>> params, opt_state = c.params, c.opt_state   # train on, recompiled

  Args:
    params: linen-style params (nested dicts), exactly masked.
    opt_state: the optax state of a sparse_jax method (alone or in a chain); the
      per-parameter entries of the inner optimizer must have the parameter's
      shape (SGD, momentum, Adam/AdamW, ...; not factored statistics).
    layers: the chain's module paths, in forward order.
    structure: the ``Channels`` the state was trained with (its ``units`` if it
      was condensed before); default ``Channels()``.
    batch_stats: the ``'batch_stats'`` collection; needed with ``norms``.
    norms: ``{layer: batch norm module path}`` of the layers followed by one.
    activation: the function after each layer (and its norm) but the last.
    epsilon: the batch norms' epsilon.
    keep: ``{layer: bool [units]}``, the units to keep where not all dead ones
      should go (e.g. those dead for fewer events than a patience); every alive
      unit must be kept. Default: the alive units.

  Returns:
    A ``CondensedState``; pass its ``structure`` to the factory of the next
    transformation, call its ``init`` on the new params (it reads their shapes)
    and train on with the returned params and optimizer state.

  Raises:
    ValueError: naming the layer, for a dead unit whose output is not 0, a layer
      with no unit alive, a chain that does not chain, or an optimizer state
      entry of a cut parameter that does not have its shape.
  """
  structure = _structure.Channels() if structure is None else structure
  if not isinstance(structure, _structure.Channels):
    raise TypeError(f"{_CALLER}: structure={structure!r} must be sparse_jax.Channels(...) "
                    "(condensing removes whole output units).")
  norms = dict(norms or {})
  _chains.check_arguments(layers, norms, batch_stats, _CALLER)
  params = _masks.unwrap_variables(params)
  masks = _state.get_masks(opt_state)
  cuts, kept = _plan(params, masks, layers, batch_stats, norms, activation, epsilon,
                     dict(keep or {}))
  shapes = {n: np.shape(x) for n, x in _named(params).items()}
  units = {**dict(structure.units), **{
      f"{n}/kernel": structure.unit_count(f"{n}/kernel", shapes[f"{n}/kernel"][-1])
      for n in layers}}
  new_params = _cut_tree(params, cuts, shapes, "params")
  new_stats = None if batch_stats is None else _cut_tree(
      batch_stats, cuts, {n: np.shape(x) for n, x in _named(batch_stats).items()},
      "batch_stats")
  new_state = _cut_state(opt_state, cuts, shapes)
  features = tuple(int(np.shape(_chains.get_module(new_params, n)["kernel"])[-1])
                   for n in layers)
  return CondensedState(new_params, new_state, new_stats, features, tuple(kept),
                        dataclasses.replace(structure, units=units))


def _named(tree) -> dict:
  return {_paths.path_to_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _plan(params, masks, layers, batch_stats, norms, activation, epsilon, chosen):
  """``({leaf: [(axis, indices)]}, kept indices per layer)`` of the dead units."""
  cuts: dict[str, list] = {}
  kept = []
  for name, nxt in zip(layers[:-1], layers[1:]):
    out = {k: np.asarray(v) for k, v in _chains.get_module(params, name, _CALLER).items()}
    nkernel = np.asarray(_chains.get_module(params, nxt, _CALLER)["kernel"])
    alive = _chains.alive_units(_chains.kernel_mask(masks, name), out["kernel"])
    kept_units = alive
    if name in chosen:
      kept_units = np.asarray(chosen[name], bool)
      if kept_units.shape != alive.shape or np.any(alive & ~kept_units):
        raise ValueError(f"{_CALLER}: keep[{name!r}] must be a bool [{alive.size}] that "
                         "keeps every alive unit (only dead units can be removed).")
    if not kept_units.any():
      raise ValueError(f"{_CALLER}: every unit of {name!r} is dead; a layer keeps at least "
                       "one unit (the methods' rankings keep one per layer: were these "
                       "masks set by hand?).")
    constant = _chains.dead_unit_outputs(name, out, params, batch_stats, norms, activation,
                                         epsilon, _CALLER)
    bad = np.flatnonzero((constant != 0) & ~kept_units)
    if bad.size:
      raise ValueError(
          f"{_CALLER}: dead units {bad[:5].tolist()} of {name!r} output "
          f"{constant[bad[0]]:g} != 0, so removing them would change the model: their "
          "bias or batch norm is not masked with them (train with structure="
          "sparse_jax.Channels(attach=True), the default) or their norm's running "
          "mean is not 0 (call sparse_jax.mask_batch_stats after each event).")
    keep = np.flatnonzero(kept_units)
    kept.append(keep)
    leaves = [f"{name}/{k}" for k in out]
    if name in norms:
      leaves += [f"{norms[name]}/{k}" for tree in (params, batch_stats)
                 for k in _chains.get_module(tree, norms[name], _CALLER)]
    for leaf in leaves:
      cuts.setdefault(leaf, []).append((-1, keep))
    positions = _chains.chain_positions(name, nxt, out["kernel"], nkernel, _CALLER)
    rows = (np.arange(positions)[:, None] * alive.size + keep[None, :]).ravel()
    cuts.setdefault(f"{nxt}/kernel", []).append((-2, rows))
  return cuts, kept


def _owner(name: str, params: Sequence[str]) -> str | None:
  """The parameter a state leaf belongs to: the longest parameter name it ends with."""
  found = [p for p in params if name == p or name.endswith("/" + p)]
  return max(found, key=len) if found else None


def _cut_tree(tree, cuts, shapes, what: str):
  """``tree`` with the leaves of cut parameters (found by name) sliced."""
  names = list(shapes)

  def cut(path, x):
    name = _paths.path_to_name(path)
    owner = _owner(name, names)
    if owner not in cuts:
      return x
    if np.shape(x) != shapes[owner]:
      raise ValueError(
          f"{_CALLER}: the {what} leaf {name!r} of shape {np.shape(x)} belongs to "
          f"{owner!r} {shapes[owner]} but does not have its shape (a factored "
          "statistic?); only per-parameter entries of the parameter's shape can be "
          "cut (SGD, momentum, Adam/AdamW, ...).")
    y = np.asarray(x)
    for axis, index in cuts[owner]:
      y = np.take(y, index, axis=axis)
    return jnp.asarray(y, dtype=x.dtype)

  return jax.tree_util.tree_map_with_path(cut, tree)


def _cut_state(opt_state, cuts, shapes):
  """``opt_state`` cut like the params; a sparse state's packed masks repacked."""
  is_sparse = lambda x: isinstance(x, _state.SparseState)

  def unpacked(x):
    if not is_sparse(x):
      return x
    regrown = x.regrown and x.regrown._replace(masks=_masks.unpack_masks(x.regrown.masks))
    return x._replace(masks=_masks.unpack_masks(x.masks),
                      union=_masks.unpack_masks(x.union), regrown=regrown)

  def repacked(old, new):
    if not is_sparse(old) or not _is_packed(old.masks):
      return new
    regrown = new.regrown and new.regrown._replace(masks=_masks.pack_masks(new.regrown.masks))
    return new._replace(masks=_masks.pack_masks(new.masks),
                        union=_masks.pack_masks(new.union), regrown=regrown)

  flat = jax.tree.map(unpacked, opt_state, is_leaf=is_sparse)
  new = _cut_tree(flat, cuts, shapes, "optimizer state")
  return jax.tree.map(repacked, opt_state, new, is_leaf=is_sparse)


def _is_packed(tree) -> bool:
  is_packed = lambda x: isinstance(x, _masks.PackedMask)
  return any(is_packed(x) for x in jax.tree.leaves(tree, is_leaf=is_packed))


def mask_batch_stats(batch_stats: PyTree, masks: PyTree, norms: Mapping[str, str]) -> PyTree:
  """``batch_stats`` with the running mean of every dead unit's batch norm set to 0.

  Under ``Channels(attach=True)`` a dead unit's pre-norm output is 0 and its norm's
  scale and bias are held at 1 and 0, so in training it outputs exactly 0; in
  evaluation the norm subtracts the running mean the unit had when it died, which
  only decays. Zeroed once at the event that kills the unit, it stays 0 (an
  average of zeros), and the unit outputs 0 in evaluation too. Call it after each
  mask-update event (the trainer does); host-side or under jit.

  Example:
    >>> batch_stats = sparse_jax.mask_batch_stats(
    ...     batch_stats, sparse_jax.get_masks(opt_state), {"Conv_0": "BatchNorm_0"})

  Args:
    batch_stats: the ``'batch_stats'`` collection (nested dicts).
    masks: the mask tree (``get_masks``).
    norms: ``{layer module: its batch norm module}``.

  Returns:
    ``batch_stats`` with the norms' ``mean`` zeroed at the dead units.
  """
  masks = _masks.unpack_masks(_masks.unwrap_variables(masks))
  for layer, norm in norms.items():
    mask = _chains.kernel_mask(masks, layer)
    if mask is None:
      continue
    alive = jnp.reshape(mask, (-1, mask.shape[-1])).any(axis=0)
    stats = _chains.get_module(batch_stats, norm, "mask_batch_stats")
    batch_stats = _chains.set_module(batch_stats, norm, {
        **stats, "mean": jnp.where(alive, stats["mean"], 0).astype(stats["mean"].dtype)})
  return batch_stats
