"""Structured sparsity: N:M groups, blocks and whole channels (issue 14).

Every prunable kernel is read through its matrix view ``[*receptive, fan_in,
fan_out]`` (``_distributions.kernel_fans``): ``[in, out]`` for Dense, the kernel
itself for a Conv ``[h, w, in, out]``, ``[in, heads * head_dim]`` and ``[heads *
head_dim, out]`` for attention projections. The view is a free row-major reshape.

* ``NM(n, m)``: along the input axis (-2 of the view) every group of ``m``
  consecutive weights has exactly ``n`` active ones, for every output unit and
  spatial position. Ranked within each group by magnitude (pruning, drop) or by
  the growth score (regrowth); no global ranking is involved, since every group
  keeps the same count.
* ``Block(rows, cols)``: blocks of ``rows x cols`` of ``[fan_in, fan_out]`` (per
  spatial position for convs) are all active or all inactive.
* ``Channels()``: whole output units (the last axis: Dense columns, conv
  filters) are active or inactive.

Blocks and channels are *units*: a layer's units form a small array (one entry per
block or per output unit) and every stage of a mask update (global or
layer-wise prune, drop, grow, random start masks with their layer-wise
distribution) runs unchanged on these unit arrays, scored by the unit's RMS,
``||x_unit||_2 / sqrt(unit size)``: of the weights when pruning or dropping, of the
dense gradient (or its momentum) when growing. Counts, sparsities and densities are
then in units (a 90% ``Channels()`` run removes 90% of the prunable output units).
The RMS is the norm made independent of the unit's size: a global prune compares
units of different layers, and a raw L2 norm grows with the square root of the
fan-in, so it would rank every unit of a wide-input layer above those of a narrow
one; the RMS is the unit's typical weight magnitude, the scale unstructured global
magnitude pruning compares. Within a layer (all units of one size) it ranks
exactly as the norm. All blocks have ``rows * cols`` weights, so for ``Block`` the
RMS ranks as the block norm everywhere.

Ties are broken as ``_select`` breaks them: lower flat index first (of the unit
array for blocks and channels, within the group for N:M).

This module holds the structures, the views of the layers and the checks;
``_structured_masks`` the mask operations under a structure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from sparse_jax import _distributions
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _schedules

PyTree = Any


def _positive_int(value, name: str, owner: str) -> int:
  v = _schedules.check_int(value, f"{owner} {name}")
  if v < 1:
    raise ValueError(f"{owner} {name}={v} must be >= 1.")
  return v


@dataclasses.dataclass(frozen=True)
class NM:
  """N:M sparsity: ``n`` active weights in every group of ``m`` consecutive inputs.

  Every layer's density is then ``n / m``: a named ``distribution=`` and ``scope=``
  have no effect (every group keeps the same count), a density map or
  ``sampling="bernoulli"`` is a ``ValueError``.

  Example:
    >>> tx = sparse_jax.rigl(optax.adam(1e-3), structure=sparse_jax.NM(2, 4),
    ...                      total_steps=1000)   # sparsity 1 - 2/4 = 0.5
  """
  n: int
  m: int

  def __post_init__(self):
    n = _positive_int(self.n, "n", "NM")
    m = _positive_int(self.m, "m", "NM")
    if n >= m:
      raise ValueError(f"NM(n={n}, m={m}) needs n < m: n of every m weights stay "
                       "active (n = m is dense).")
    object.__setattr__(self, "n", n)
    object.__setattr__(self, "m", m)

  @property
  def sparsity(self) -> float:
    """``1 - n / m``, the sparsity of every prunable layer."""
    return 1.0 - self.n / self.m


@dataclasses.dataclass(frozen=True)
class Block:
  """Block sparsity: ``rows x cols`` blocks of ``[fan_in, fan_out]``, all or nothing.

  Example:
    >>> tx = sparse_jax.gmp(optax.adam(1e-3), sparsity=0.75, end_step=800,
    ...                     update_every=100, structure=sparse_jax.Block(4, 4))
  """
  rows: int
  cols: int

  def __post_init__(self):
    object.__setattr__(self, "rows", _positive_int(self.rows, "rows", "Block"))
    object.__setattr__(self, "cols", _positive_int(self.cols, "cols", "Block"))


@dataclasses.dataclass(frozen=True)
class Channels:
  """Channel sparsity: whole output units (Dense columns, conv filters), all or nothing.

  ``sparsity`` then counts units: 0.75 removes 75% of the prunable output units.
  Keep the classifier dense (``keep_last_dense=True``): its units are the classes.

  A dead unit is made exactly dead (docs/algorithms.md §6): with
  ``attach=True`` its layer's ``bias`` and the ``scale``/``bias`` of the
  normalisation after it are masked with its kernel column (held at their
  initial values while it is dead, a scale at 1 and biases at 0, where a
  regrown unit restarts), so it outputs ``activation(0)`` in training (in
  evaluation too once ``mask_batch_stats`` zeroed its running mean), and
  ``condense_channels`` / ``condense_train_state`` remove it exactly. The norm
  after a layer is found in the params' own order (the next module, named
  ``*Norm*``, whose leaves have one entry per unit) or named in ``norms``.

  Example:
    >>> tx = sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.5,
    ...                        total_steps=1000, end_step=700, update_every=100,
    ...                        structure=sparse_jax.Channels(), keep_last_dense=True)

  Attributes:
    attach: mask each unit's bias and normalisation with it (False: only the
      kernels are masked, as before 0.2).
    norms: ``{layer module: norm module}`` (e.g. ``{"Conv_0": "BatchNorm_0"}``)
      where the order of the params does not tell; ``None`` for a layer: no norm.
    units: ``{kernel leaf: units}`` of a model condensed during training
      (``condense_train_state`` returns them): the sparsity schedule counts units
      of these original widths, not of the smaller kernels.
  """
  attach: bool = True
  norms: Any = ()
  units: Any = ()

  def __post_init__(self):
    if not isinstance(self.attach, bool):
      raise TypeError(f"Channels(attach={self.attach!r}) must be True or False.")
    for field in ("norms", "units"):
      value = getattr(self, field)
      pairs = tuple(sorted(dict(value).items())) if isinstance(value, Mapping) else value
      if not isinstance(pairs, tuple) or any(
          not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)) for p in pairs):
        raise TypeError(f"Channels({field}=...) must be a dict keyed by name, got {value!r}.")
      object.__setattr__(self, field, pairs)
    for name, n in self.units:
      if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Channels(units={{{name!r}: {n!r}}}): a unit count is a "
                         "positive int (the layer's original width).")

  def unit_count(self, name: str, default: int) -> int:
    """The original units of the kernel leaf ``name`` (``default``: its own)."""
    return int(dict(self.units).get(name, default))

  def __repr__(self):
    fields = [f"{f}={getattr(self, f)!r}" for f, d in (("attach", True), ("norms", ()),
                                                        ("units", ())) if getattr(self, f) != d]
    return f"Channels({', '.join(fields)})"


STRUCTURES = (NM, Block, Channels)
Structure = NM | Block | Channels  # a factory's structure= (None: unstructured)


class KernelView(NamedTuple):
  """A prunable kernel and its matrix view ``(*receptive, fan_in, fan_out)``."""
  name: str
  shape: tuple[int, ...]
  view: tuple[int, ...]


def kernel_view(name: str, shape) -> KernelView:
  """The ``KernelView`` of a kernel, its fans read by ``kernel_fans``."""
  shape = tuple(int(n) for n in shape)
  fans = _distributions.kernel_fans(name, shape)
  return KernelView(name, shape, (*fans.receptive, fans.fan_in, fans.fan_out))


def check_layer(structure, v: KernelView) -> None:
  """Raises a ``ValueError`` naming the layer if its view does not fit ``structure``."""
  *_, fan_in, fan_out = v.view
  if isinstance(structure, NM) and fan_in % structure.m:
    raise ValueError(
        f"{structure} groups the {fan_in} inputs of layer {v.name!r} (shape {v.shape}) "
        f"by m={structure.m}, which does not divide {fan_in}. Keep that layer dense "
        "(exclude=its name, or keep_first_dense=True for a first conv on RGB inputs) "
        "or choose an m that divides it.")
  if isinstance(structure, Block) and (fan_in % structure.rows or fan_out % structure.cols):
    raise ValueError(
        f"{structure} does not tile layer {v.name!r} (shape {v.shape}, matrix "
        f"[{fan_in}, {fan_out}]): rows must divide {fan_in} and cols {fan_out}. Keep "
        "that layer dense (exclude=its name) or choose a block that tiles it.")


@dataclasses.dataclass(frozen=True)
class LeafStructure:
  """The structure and the views of a tree's prunable leaves (flattening order)."""
  structure: Any  # NM, Block, Channels or None (unstructured)
  views: tuple[KernelView, ...]

  @property
  def grouped(self) -> bool:
    """N:M: ranked within groups, on the weights themselves."""
    return isinstance(self.structure, NM)

  @property
  def units(self) -> bool:
    """Blocks or channels: ranked as units, on unit arrays."""
    return isinstance(self.structure, (Block, Channels))


def _is_masked(m) -> bool:
  return m is not None and m is not False


def leaf_structure(structure, tree: PyTree, masks: PyTree) -> LeafStructure:
  """The ``LeafStructure`` of the leaves of ``tree`` that have a mask in ``masks``.

  ``masks`` is a mask tree (None on dense leaves) or a tree of prunable flags.
  Every layer is checked (``check_layer``).
  """
  if structure is None:
    return LeafStructure(None, ())
  flat, treedef = jax.tree_util.tree_flatten_with_path(_masks.unwrap_variables(tree))
  flags = _paths.flatten_up_to(treedef, _masks.unwrap_variables(masks))
  chosen = [(_masks.path_to_name(p), np.shape(x))
            for (p, x), f in zip(flat, flags) if _is_masked(f)]
  return layer_structure(structure, [n for n, _ in chosen], [s for _, s in chosen])


def layer_structure(structure, names, shapes) -> LeafStructure:
  """The ``LeafStructure`` of layers given by name and shape, each checked
  (``check_layer``); the layers of stacked leaves are named ``name[i]``."""
  if structure is None:
    return LeafStructure(None, ())
  views = tuple(kernel_view(n, s) for n, s in zip(names, shapes))
  for v in views:
    check_layer(structure, v)
  return LeafStructure(structure, views)


def unit_split(structure, v: KernelView) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """A shape that splits the view into units, and the axes inside a unit."""
  *rec, fan_in, fan_out = v.view
  if isinstance(structure, Block):
    r, c = structure.rows, structure.cols
    n = len(rec)
    return (*rec, fan_in // r, r, fan_out // c, c), (n + 1, n + 3)
  return (math.prod(rec) * fan_in, fan_out), (0,)


def unit_shape(structure, v: KernelView) -> tuple[int, ...]:
  """Shape of a layer's unit array: ``(*receptive, fan_in/rows, fan_out/cols)`` or
  ``(fan_out,)``."""
  split, axes = unit_split(structure, v)
  return tuple(n for a, n in enumerate(split) if a not in axes)



# ---------------------------------------------------------------------------
# N:M counts, arguments, given masks
# ---------------------------------------------------------------------------


def group_count(sparsity: float, m: int) -> int:
  """Active weights per group of ``m`` at density ``1 - sparsity``: ``ceil((1 - s) m)``.

  Computed in float64 (1e-9 below an integer counts as it, so ``1 - n/m`` gives
  ``n``), kept in ``[1, m]``.
  """
  c = math.ceil((1.0 - float(np.float64(sparsity))) * m - 1e-9)
  return min(max(int(c), 1), m)


def group_count_table(structure: NM, *, initial_sparsity: float, final_sparsity: float,
                      start_step: int, end_step: int, update_every: int) -> np.ndarray:
  """Per-group active count of every pruning event ``k = 0 .. kf`` (int32).

  ``ceil(d_k m)`` with ``d_k = 1 - s_k`` of the cubic schedule, which ends at
  exactly ``n`` (``s_f = 1 - n/m``).

  Example:
    >>> group_count_table(NM(1, 4), initial_sparsity=0., final_sparsity=.75,
    ...                   start_step=0, end_step=300, update_every=100)
    array([4, 2, 1, 1], dtype=int32)
  """
  k0, kf = start_step // update_every, end_step // update_every
  return np.asarray([
      group_count(_schedules.cubic_sparsity(k, initial_sparsity=initial_sparsity,
                                            final_sparsity=final_sparsity, k0=k0, kf=kf),
                  structure.m)
      for k in range(kf + 1)], np.int32)


def check_arguments(structure, sparsity, *, distribution="erk", sampling="exact",
                    default=None):
  """Checks ``structure=`` of a factory; returns ``(structure, sparsity)``.

  ``NM(n, m)`` fixes the sparsity at ``1 - n/m``: ``sparsity`` may be ``None``
  and any other value is a ``ValueError``. Without N:M a ``None`` sparsity is
  ``default`` (static's 0) or a ``TypeError``, as a missing argument is.
  """
  if structure is not None and not isinstance(structure, STRUCTURES):
    raise TypeError(f"structure={structure!r} must be sparse_jax.NM(n, m), "
                    "sparse_jax.Block(rows, cols), sparse_jax.Channels() or None "
                    f"(unstructured), got {type(structure).__name__}.")
  if not isinstance(structure, NM):
    if sparsity is None:
      if default is None:
        raise TypeError("sparsity= is required (only structure=sparse_jax.NM(n, m) "
                        "sets it, to 1 - n/m).")
      return structure, default
    return structure, sparsity
  if sparsity is not None:
    s = _schedules.check_number(sparsity, "sparsity")
    if abs(s - structure.sparsity) > 1e-9:
      raise ValueError(f"sparsity={sparsity!r} disagrees with structure={structure}, "
                       f"whose sparsity is 1 - {structure.n}/{structure.m} = "
                       f"{structure.sparsity:g}; omit sparsity with N:M.")
  if isinstance(distribution, Mapping):
    raise ValueError(f"A density map does not apply with structure={structure}: every "
                     f"layer's density is {structure.n}/{structure.m}.")
  if sampling != "exact":
    raise ValueError(f"sampling={sampling!r} cannot keep exactly {structure.n} of every "
                     f"{structure.m} weights; structure={structure} needs 'exact'.")
  return structure, structure.sparsity


def check_initial_masks(structure, initial_masks: PyTree | None) -> None:
  """Raises a ``ValueError`` naming the layer if concrete masks do not fit ``structure``.

  N:M: every group of every layer must hold the same number of active weights;
  blocks and channels: every unit all active or all inactive. Traced masks are
  not checked (their values are unknown).
  """
  if structure is None or initial_masks is None:
    return
  masks = _masks.unpack_masks(_masks.unwrap_variables(initial_masks))
  flat = [(p, m) for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]]
  if any(isinstance(m, jax.core.Tracer) for _, m in flat):
    return
  counts = set()
  for path, m in flat:
    v = kernel_view(_masks.path_to_name(path), np.shape(m))
    check_layer(structure, v)
    m = np.asarray(m)
    if isinstance(structure, NM):
      *rec, fan_in, fan_out = v.view
      per_group = m.reshape(*rec, fan_in // structure.m, structure.m, fan_out).sum(-2)
      counts |= {int(c) for c in np.unique(per_group)}
      if len(counts) > 1:
        raise ValueError(
            f"initial_masks[{v.name!r}] breaks structure={structure}: its groups of "
            f"{structure.m} inputs hold {sorted(counts)} active weights across the "
            "masks; every group of every layer must hold the same number.")
    else:
      split, axes = unit_split(structure, v)
      units = m.reshape(split)
      if np.any(units.any(axis=axes) != units.all(axis=axes)):
        raise ValueError(
            f"initial_masks[{v.name!r}] breaks structure={structure}: some of its "
            "units are partly active; every unit must be all active or all inactive.")
