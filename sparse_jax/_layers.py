"""Stacked layers: leaves whose leading axes index layers (docs/algorithms.md §2).

Transformers written with scan over layers (linen ``nn.scan``, NNX ``nnx.scan`` /
``nnx.vmap``; MaxText, big_vision, t5x) keep the kernels of their L blocks in one
leaf of shape ``[L, *kernel]`` (or ``[stages, layers, *kernel]``). For every
per-layer decision (ERK/ER densities, layer-wise prune and regrowth counts, the
global ranking's one weight kept per layer, N:M/block/channel structure, random
start masks) such a leaf is L layers: layer ``i`` is the slice ``leaf[i]``
(several layer axes count row-major). A stacked model then gets, slice by slice,
the masks of the same model with its layers unstacked in the same order.

Which leaves are stacked is said with ``layer_axes`` (leaf-name regex -> number
of leading layer axes) or read from the model's partitioning metadata, where a
leading axis is named like ``"layers"`` (``nn.scan(..., metadata_params=
{nn.PARTITION_NAME: "layers"})``, ``nnx.vmap``/``nnx.scan`` with
``transform_metadata={nnx.PARTITION_NAME: "layers"}``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _lazy
from sparse_jax import _masks
from sparse_jax import _paths

PyTree = Any
# Partition (mesh-axis) names that mark a leading axis as a layer axis.
LAYER_AXIS_NAMES = ("layers", "layer", "stages", "stage")
_LAYER_SUFFIX = re.compile(r"\[[\d,]+\]$")  # "name[2]", "name[0,3]"
# A factory's layer_axes=: a regex (one leading layer axis), or regex -> axes.
LayerAxesArg = str | Mapping[str, int] | None


@dataclasses.dataclass(frozen=True)
class LayerAxes:
  """Which prunable leaves are stacked layers: ``(regex, leading axes)`` pairs.

  A leaf name (``path_to_name``) that ``re.fullmatch``es a regex has that many
  leading layer axes (the first matching pair counts); other leaves have those
  read from their partitioning metadata at ``tx.init`` (``detected``), else none.
  """
  patterns: tuple[tuple[str, int], ...] = ()
  detected: tuple[tuple[str, int], ...] = ()  # exact leaf names, from metadata

  def with_detected(self, detected: Mapping[str, int] | None) -> "LayerAxes":
    return dataclasses.replace(self, detected=tuple(sorted((detected or {}).items())))


def check_layer_axes(layer_axes: LayerAxesArg) -> LayerAxes:
  """The ``LayerAxes`` of a factory's ``layer_axes`` argument.

  Args:
    layer_axes: None, a regex (one leading layer axis), or a mapping from regex
      to the number of leading layer axes (a positive int).

  Raises:
    TypeError, ValueError: naming the bad entry and the expected form.
  """
  if layer_axes is None:
    return LayerAxes()
  if isinstance(layer_axes, str):
    layer_axes = {layer_axes: 1}
  if not isinstance(layer_axes, Mapping):
    raise TypeError(
        f"layer_axes must be a regex or a mapping from leaf-name regex to the number of "
        f"leading layer axes, e.g. {{'blocks/.*': 1}}; got {type(layer_axes).__name__}.")
  pairs = []
  for regex, n in layer_axes.items():
    if not isinstance(regex, str):
      raise TypeError(f"layer_axes key {regex!r} is not a str: keys are leaf-name regexes.")
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"layer_axes key {regex!r} is not a valid regex: {e}.") from None
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(
          f"layer_axes[{regex!r}] = {n!r}: give the number of leading layer axes, a "
          "positive int (1 for nn.scan / nnx.scan over layers).")
    pairs.append((regex, int(n)))
  return LayerAxes(tuple(pairs))


def _names_of(x) -> tuple | None:
  """The partition names of a linen box or an NNX variable, if it has any."""
  names = getattr(x, "names", None)  # flax.core.meta.Partitioned, LogicallyPartitioned
  if names is None and hasattr(x, "get_metadata"):  # nnx.Variable
    meta = x.get_metadata()
    names = next((meta[k] for k in ("out_sharding", "sharding_names", "sharding")
                  if isinstance(meta.get(k), (tuple, list))), None)
  return tuple(names) if isinstance(names, (tuple, list)) else None


def _is_box(x) -> bool:
  return _names_of(x) is not None


def detect(params: PyTree) -> dict[str, int]:
  """Leaf name -> number of leading axes named like a layer axis (``LAYER_AXIS_NAMES``).

  Reads linen partitioning boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``)
  and NNX variables' sharding metadata; leaves without metadata are not listed.

  Example:
    >>> sparse_jax.layer_axes_of(nnx.state(model, nnx.Param))
    {'blocks/mlp_in/kernel': 1, ...}
  """
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
    names = _names_of(x)
    n = 0
    while names and n < len(names) and names[n] in LAYER_AXIS_NAMES:
      n += 1
    if n:
      out[_masks.path_to_name(path)] = n
  return out


def leaf_axes(spec: LayerAxes, names: Sequence[str],
              shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
  """The number of leading layer axes of each prunable leaf (0: one layer).

  Raises:
    ValueError: a regex that matches no prunable leaf, or a leaf without a kernel
      left once its layer axes are taken off.
  """
  detected = dict(spec.detected)
  out = []
  for name, shape in zip(names, shapes):
    n = next((k for r, k in spec.patterns if re.fullmatch(r, name)), detected.get(name, 0))
    if n and len(shape) - n < 1:
      raise ValueError(
          f"Leaf {name!r} of shape {tuple(shape)} has no axis left after {n} leading "
          f"layer axes: it has no layer axis {n - 1}. Give it fewer layer axes in "
          "layer_axes, or leave it out of the regex.")
    out.append(n)
  for regex, _ in spec.patterns:
    if not any(re.fullmatch(regex, name) for name in names):
      raise ValueError(
          f"layer_axes regex {regex!r} matches no prunable leaf; prunable leaves: "
          f"{list(names)}. Fix the regex (it must fullmatch the leaf name).")
  return tuple(out)


def layer_name(name: str, index: Sequence[int]) -> str:
  """The name of layer ``index`` of the stacked leaf ``name``: ``name[i]``, ``name[i,j]``."""
  return f"{name}[{','.join(str(int(i)) for i in index)}]"


def base_name(name: str) -> str:
  """The stacked leaf a layer name belongs to: ``name[i]`` -> ``name`` (others unchanged)."""
  return _LAYER_SUFFIX.sub("", name)


class Split(NamedTuple):
  """How a list of prunable leaves splits into layers (static)."""
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  axes: tuple[int, ...]

  @property
  def stacked(self) -> bool:
    return any(self.axes)

  def layer_names(self) -> list[str]:
    """``name`` for a plain leaf, ``name[i]`` (``name[i,j]``) for its layers."""
    out: list[str] = []
    for name, shape, n in zip(self.names, self.shapes, self.axes):
      if n:
        out.extend(layer_name(name, i) for i in np.ndindex(*shape[:n]))
      else:
        out.append(name)
    return out

  def layer_shapes(self) -> list[tuple[int, ...]]:
    return [s for shape, n in zip(self.shapes, self.axes)
            for s in [tuple(shape[n:])] * math.prod(shape[:n])]

  def layers(self) -> list[_masks.LayerInfo]:
    return [_masks.LayerInfo(name, shape, math.prod(shape))
            for name, shape in zip(self.layer_names(), self.layer_shapes())]

  def split(self, xs: Sequence, arrays: bool = False) -> list:
    """Leaves -> layers: a stacked leaf's layers are lazy ``_lazy.Slice``s of it.

    ``arrays``: the slices as arrays instead (for the structured stages' reshapes).
    """
    out = []
    for x, shape, n in zip(xs, self.shapes, self.axes):
      if not n:
        out.append(x)
        continue
      for i in np.ndindex(*shape[:n]):
        layer = _lazy.lazy(_lazy.Slice(x, tuple(int(a) for a in i)))
        out.append(layer.compute() if arrays else layer)
    return out

  def join(self, parts: Sequence) -> list:
    """Layers (arrays or ``Lazy``) -> leaves: a stacked leaf's layers stacked again."""
    out, it = [], iter(parts)
    for shape, n in zip(self.shapes, self.axes):
      if not n:
        out.append(next(it))
        continue
      layers = [_lazy.lazy(next(it)).compute() for _ in range(math.prod(shape[:n]))]
      out.append(jnp.stack(layers).reshape(shape))
    return out


def check_keep_dense(spec: LayerAxes, params: PyTree, selector: Mapping[str, Any]) -> None:
  """Refuses ``keep_first_dense``/``keep_last_dense`` that would pick a stacked leaf.

  They keep one *leaf* dense; on a stacked leaf that is all its layers, not the
  first or last layer of the model.
  """
  plain = {**selector, "keep_first_dense": False, "keep_last_dense": False}
  split = split_of(spec, params, _masks.select_prunable(params, **plain))
  kept = split_of(LayerAxes(), params, _masks.select_prunable(params, **selector))
  for name, shape, n in zip(split.names, split.shapes, split.axes):
    if n and name not in kept.names:
      flags = [f for f in ("keep_first_dense", "keep_last_dense") if selector.get(f)]
      raise ValueError(
          f"{'/'.join(flags)}=True would keep the stacked leaf {name!r} dense: all "
          f"{math.prod(shape[:n])} of its layers, not one. Leave it off and give the "
          f"layers you want dense density 1 in a density map "
          f"(distribution={{{name + '[0]'!r}: 1.0, ...}}), or exclude a leaf that is "
          "not stacked.")


def split_of(spec: LayerAxes, tree: PyTree, masks: PyTree) -> Split:
  """The ``Split`` of the leaves of ``tree`` that have a mask (or flag) in ``masks``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(_masks.unwrap_variables(tree))
  flags = _paths.flatten_up_to(treedef, _masks.unwrap_variables(masks))
  chosen = [(_masks.path_to_name(p), tuple(np.shape(x)))
            for (p, x), f in zip(flat, flags) if f is not None and f is not False]
  names = tuple(n for n, _ in chosen)
  shapes = tuple(s for _, s in chosen)
  return Split(names, shapes, leaf_axes(spec, names, shapes))


def layer_densities(masks: PyTree, layer_axes: LayerAxesArg = None) -> dict[str, jax.Array]:
  """Density of each prunable layer, keyed by name; a stacked leaf's layers by ``name[i]``.

  Example:
    >>> sparse_jax.layer_densities(sparse_jax.get_masks(state), {"blocks/.*": 1})
    {'blocks/mlp_in/kernel[0]': Array(0.1, dtype=float32), ...}

  Args:
    masks: a mask tree (bool or packed masks, None on dense leaves).
    layer_axes: which leaves hold stacked layers, as the factories take it (a
      regex or a mapping from regex to the number of leading layer axes); None:
      one density per leaf.
  """
  masks = _masks.unpack_masks(masks)
  flat = [(_masks.path_to_name(p), m) for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]]
  axes = leaf_axes(check_layer_axes(layer_axes), [n for n, _ in flat],
                   [np.shape(m) for _, m in flat])
  out = {}
  for (name, m), n in zip(flat, axes):
    d = jnp.mean(m.astype(jnp.float32), axis=tuple(range(n, m.ndim)))
    if not n:
      out[name] = d
      continue
    for i in np.ndindex(*m.shape[:n]):
      out[layer_name(name, i)] = d[i]
  return out
