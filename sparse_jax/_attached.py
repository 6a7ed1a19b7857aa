"""A channel's bias and normalisation, masked with its kernel column (docs/algorithms.md §6).

Under ``Channels(attach=True)`` a unit whose kernel column is masked must output
exactly ``activation(0)``: its layer's ``bias`` and the ``scale``/``bias`` of the
normalisation right after the layer are *attached* to it. The wrapper masks their
gradients and updates with the unit (``extend`` gives them a mask of their own
shape, read from the kernel's), zeroes their optimizer state when the unit dies,
and holds a dead unit's leaves at their initial values (``restarts``: a scale at
1, biases at 0), where a regrown unit restarts. A dead unit's batch-normalised
output is then ``scale * 0 + 0`` in training, and its kernel column still gets
the gradient it would get as a regrown unit (a scale of 0 would block it, and
every dead unit would tie at growth). In evaluation the norm subtracts its
running mean, which the optimizer does not own: ``mask_batch_stats`` zeroes it
for dead units (the trainer does so at each event), after which it stays 0.

Which leaves are attached is read from the params' names, shapes and order when
the transformation is initialised (``find``); the masks (``get_masks``) stay the
kernels' only, so densities and counts do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sparse_jax import _layers
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _structure

PyTree = Any


class Attached(NamedTuple):
  """A leaf with one entry per unit of a prunable kernel."""
  leaf: str  # e.g. "BatchNorm_0/scale"
  kernel: str  # the kernel leaf whose units it follows, e.g. "Conv_0/kernel"
  restart: float  # its value when its unit regrows: 1 for a scale, else 0
  layer_axes: int  # leading layer axes of the kernel (stacked layers)


def _module(name: str) -> str:
  return name.rpartition("/")[0]


def _unit_shape(shape, n: int) -> tuple[int, ...]:
  return (*shape[:n], shape[-1])


def _norm_leaves(kernel: str, unit_shape, leaves: dict, ordered: list[str],
                 norms: dict) -> list[str]:
  """The leaves of the normalisation after ``kernel``'s module (named or next in order)."""
  module = _module(kernel)
  if module in norms:
    norm = norms[module]
    found = [n for n in ordered if _module(n) == norm] if norm else []
    if norm and not found:
      raise ValueError(f"Channels(norms={{{module!r}: {norm!r}}}): the params have no "
                       f"module {norm!r}. Name the norm's module path (e.g. 'BatchNorm_0').")
  else:
    mine = [i for i, n in enumerate(ordered) if _module(n) == module]
    after = ordered[mine[-1] + 1:] if mine else []
    nxt = _module(after[0]) if after else ""
    if "norm" not in nxt.rpartition("/")[2].lower():
      return []
    found = [n for n in after if _module(n) == nxt]
  wrong = [n for n in found if leaves[n] != unit_shape]
  if wrong:
    if module not in norms:  # not a per-channel norm of this layer (e.g. a LayerNorm of
      return []             # another width): nothing attached
    raise ValueError(f"Channels(norms=...): {wrong[0]!r} has shape {leaves[wrong[0]]}, "
                     f"not one entry per unit of {kernel!r} {unit_shape}.")
  return found


def find(structure, params: PyTree, masks: PyTree,
         layer_axes: _layers.LayerAxes) -> tuple[Attached, ...]:
  """The attached leaves of ``params`` under ``structure`` (none unless
  ``Channels(attach=True)``), read at ``tx.init``."""
  if not isinstance(structure, _structure.Channels) or not structure.attach:
    return ()
  params = _masks.unwrap_variables(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_paths.path_to_name(p) for p, _ in flat]
  leaves = {n: tuple(np.shape(x)) for n, (_, x) in zip(names, flat)}
  order = _paths.model_order(params)
  ordered = [names[i] for i in sorted(range(len(names)), key=order.__getitem__)]
  flags = _paths.flatten_up_to(treedef, _masks.unwrap_variables(masks))
  kernels = [n for n, f in zip(names, flags) if f is not None and f is not False]
  axes = _layers.leaf_axes(layer_axes, kernels, [leaves[n] for n in kernels])
  norms = dict(structure.norms)
  out, taken = [], set()
  for kernel, n in zip(kernels, axes):
    unit_shape = _unit_shape(leaves[kernel], n)
    bias = _module(kernel) + "/bias"
    found = [bias] if bias != kernel and leaves.get(bias) == unit_shape else []
    found += _norm_leaves(kernel, unit_shape, leaves, ordered, norms)
    for leaf in found:
      if leaf in taken or leaf in kernels:
        continue
      taken.add(leaf)
      out.append(Attached(leaf, kernel, 1.0 if leaf.endswith("scale") else 0.0, n))
  return tuple(out)


def _unit_mask(mask, n: int):
  """A channel kernel mask's units, ``(*layers, fan_out)``: its first row (all rows of
  a ``Channels()`` mask are equal)."""
  return mask[(slice(None),) * n + (0,) * (mask.ndim - n - 1)]


def extend(masks: PyTree, attached: Sequence[Attached], params: PyTree) -> PyTree:
  """``masks`` (bool, None on dense leaves) with the attached leaves' unit masks added."""
  if not attached or masks is None:
    return masks
  treedef = jax.tree.structure(params)
  values = _paths.flatten_up_to(treedef, masks)
  index = {n: i for i, n in enumerate(_paths.leaf_names(params))}
  for a in attached:
    values[index[a.leaf]] = _unit_mask(values[index[a.kernel]], a.layer_axes)
  return jax.tree.unflatten(treedef, values)


def restarts(params: PyTree, attached: Sequence[Attached]) -> PyTree:
  """A tree like ``params`` of the values a dead unit's leaves are held at (floats)."""
  value = {a.leaf: a.restart for a in attached}
  return jax.tree.unflatten(jax.tree.structure(params),
                            [value.get(n, 0.0) for n in _paths.leaf_names(params)])
