"""Mask pytrees: which leaves are prunable, and helpers to apply and measure masks.

A mask tree has the same structure as the params tree. A prunable leaf's mask is a
``bool`` array of the leaf's shape (``True`` = active weight). A non-prunable leaf
(bias, normalisation scale, anything the selector leaves out) has ``None`` as its
mask: ``None`` is an empty pytree node, so ``jax.tree.map(f, params, masks)`` still
visits every parameter and hands ``f`` a ``None`` mask for dense leaves, and the
mask tree costs nothing for them in checkpoints or in sharding.

A mask may also be stored bit-packed, as a ``PackedMask`` (1 bit per weight instead
of a ``bool``'s byte); ``unpack_masks`` turns such a tree back into bool masks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _paths
from sparse_jax import _placement

PyTree = Any


def _is_nnx_variable(x) -> bool:
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # flax is optional for the core library
    return False
  return isinstance(x, nnx.Variable)


def unwrap_variables(tree: PyTree) -> PyTree:
  """Replaces Flax NNX ``Variable`` leaves by their raw values.

  ``nnx.Optimizer`` hands ``tx.init`` a state of ``nnx.Param`` variables but hands
  ``tx.update`` plain arrays; unwrapping at init keeps the mask tree's structure
  equal to the structure seen at every update.
  """
  if not any(_is_nnx_variable(x) for x in jax.tree.leaves(tree, is_leaf=_is_nnx_variable)):
    return tree
  return jax.tree.map(
      lambda x: x.get_value() if _is_nnx_variable(x) else x, tree,
      is_leaf=_is_nnx_variable)


path_to_name = _paths.path_to_name
leaf_names = _paths.leaf_names
model_order = _paths.model_order


class LayerInfo(NamedTuple):
  """Static description of one prunable leaf."""
  name: str
  shape: tuple[int, ...]
  size: int


# A leaf's role is read from the last key of its name, which is how Flax linen and
# NNX name the parameters of every layer they ship (Dense, DenseGeneral, Conv,
# attention projections: kernel and bias; LayerNorm, BatchNorm, GroupNorm, RMSNorm:
# scale and bias; Embed: embedding).
ROLES = ("kernel", "bias", "scale", "embedding", "other")
_ROLE_OF_KEY = {"kernel": "kernel", "bias": "bias", "scale": "scale"}
# Embedding tables, position embeddings and class tokens: embedding (nn.Embed,
# nnx.Embed), pos_embedding (ViT), position_embeddings, token_emb, posemb, cls_token.
# "unembed" (an output projection) is not one.
_EMBEDDING_KEY = re.compile(
    r"(\w+_|pos|position|positional)?emb(ed(ding)?s?)?|cls|cls_token|class_token",
    re.IGNORECASE)


def leaf_role(name: str) -> str:
  """The role of a parameter leaf, from the last key of its name.

  ``"kernel"`` (``.../kernel``), ``"bias"`` (``.../bias``: layer biases and
  normalisation offsets, whatever their ndim), ``"scale"`` (normalisation scales),
  ``"embedding"`` (``emb``, ``embed(s)``, ``embedding(s)``, alone or after a prefix
  ending in ``_`` or ``pos``/``position``/``positional``, e.g. ``pos_embedding``,
  ``position_embeddings``, ``token_emb``, ``posemb``; class tokens ``cls``,
  ``cls_token``, ``class_token``; case is ignored), and ``"other"`` for any other
  name (custom modules, raw arrays in tuples and lists).

  Example:
    >>> leaf_role("MultiHeadDotProductAttention_0/query/bias")
    'bias'

  Args:
    name: a leaf name as ``path_to_name`` writes it ("Dense_0/kernel").

  Returns:
    One of ``ROLES``.
  """
  key = name.rsplit("/", 1)[-1]
  if key in _ROLE_OF_KEY:
    return _ROLE_OF_KEY[key]
  return "embedding" if _EMBEDDING_KEY.fullmatch(key) else "other"


def select_prunable(
    params: PyTree,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_ndim: int = 2,
    embeddings: bool = False,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
) -> PyTree:
  """Decides which leaves of ``params`` are prunable.

  By default a leaf is prunable by its role (``leaf_role``, docs/algorithms.md §1): kernels are,
  biases (whatever their ndim), normalisation scales and embeddings are not; a leaf
  of role ``"other"`` (an unknown name) is prunable when its ``ndim >= 2``. Every
  prunable leaf has ``ndim >= min_ndim``. ``include`` replaces the role rule: then
  exactly the leaves that match it (and have ``ndim >= min_ndim``) are prunable.

  Example:
    >>> flags = select_prunable(params, include=r".*/kernel$", keep_first_dense=True)

  Args:
    params: any pytree of arrays (linen dicts, ``nnx.State``, tuples, lists).
    include: regex or list of regexes over leaf names ("Dense_0/kernel"); when given
      a leaf must match one of them (``re.fullmatch``) and have ``ndim >= min_ndim``,
      whatever its role.
    exclude: regex or list of regexes; matching leaves are never prunable.
    min_ndim: smallest rank of a prunable leaf.
    embeddings: also prune the leaves of role ``"embedding"`` (without ``include``).
    keep_first_dense: keep the first prunable leaf dense: the first in the model's
      order (``model_order``: dicts in insertion order, the order layers are
      created in), which jax's sorted flattening order may not be.
    keep_last_dense: keep the last prunable leaf (in that order) dense.

  Returns:
    A pytree like ``params`` of Python bools.

  Raises:
    ValueError: if no leaf is selected, or if ``embeddings`` is given with
      ``include`` (which then decides alone).
  """
  params = unwrap_variables(params)
  as_list = lambda r: [] if r is None else ([r] if isinstance(r, str) else list(r))
  includes = [re.compile(r) for r in as_list(include)]
  excludes = [re.compile(r) for r in as_list(exclude)]
  if includes and embeddings:
    raise ValueError(
        f"embeddings=True has no effect with include={include!r}, which alone decides "
        "the prunable leaves: add the embeddings' names to include instead.")
  by_role = {"kernel": True, "other": True, "embedding": embeddings,
             "bias": False, "scale": False}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = []
  for path, leaf in flat:
    name = path_to_name(path)
    ok = np.ndim(leaf) >= min_ndim
    if includes:
      ok = ok and any(r.fullmatch(name) for r in includes)
    else:
      ok = ok and by_role[leaf_role(name)]
    if any(r.fullmatch(name) for r in excludes):
      ok = False
    flags.append(ok)
  # First and last in the model's order (dicts keep their insertion order, which is
  # the order linen and NNX create layers in), not jax's sorted-key flattening
  # order: on a ResNet that put "head/kernel" first.
  order = model_order(params)
  chosen = sorted((i for i, f in enumerate(flags) if f), key=order.__getitem__)
  if keep_first_dense and chosen:
    flags[chosen[0]] = False
  if keep_last_dense and chosen:
    flags[chosen[-1]] = False
  if not any(flags):
    raise ValueError(
        "No prunable leaf selected: leaves are "
        f"{[path_to_name(p) for p, _ in flat]}; prunable leaves need ndim >= "
        f"{min_ndim} and, without include, a kernel or unknown name (biases and "
        f"scales stay dense, embeddings unless embeddings=True); include={include!r}, "
        f"exclude={exclude!r}, keep_first_dense={keep_first_dense}, "
        f"keep_last_dense={keep_last_dense}. Loosen the selector.")
  return jax.tree_util.tree_unflatten(treedef, flags)


def prunable_layers(params: PyTree, prunable: PyTree) -> list[LayerInfo]:
  """Static ``LayerInfo`` of the prunable leaves, in flattening order."""
  params = unwrap_variables(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flags = jax.tree.leaves(prunable)
  return [LayerInfo(path_to_name(p), tuple(np.shape(x)), int(np.size(x)))
          for (p, x), f in zip(flat, flags) if f]


def check_mask_tree(params: PyTree, masks: PyTree) -> None:
  """Raises a clear error if ``masks`` does not fit ``params``.

  A fitting mask tree has the params' structure, and each of its leaves is either
  ``None`` (dense leaf), an array of the parameter's shape, or a ``PackedMask`` of
  that shape.
  """
  params = unwrap_variables(params)
  masks = unwrap_variables(masks)
  p_def = jax.tree.structure(params)
  try:
    pairs = _paths.flatten_up_to(p_def, masks)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "The mask tree does not match the params tree: masks must have the params' "
        "structure with a bool array (or None for a dense leaf) at every parameter. "
        f"params structure: {p_def}; masks structure: {jax.tree.structure(masks)}."
    ) from e
  names = leaf_names(params)
  for name, p, m in zip(names, jax.tree.leaves(params), pairs):
    if m is None:
      continue
    if isinstance(m, PackedMask):
      _check_packed(m, name)
    if not hasattr(m, "shape") or tuple(m.shape) != tuple(np.shape(p)):
      raise ValueError(
          f"Mask for {name!r} has shape {getattr(m, 'shape', type(m))} but the "
          f"parameter has shape {tuple(np.shape(p))}. Build masks from these params.")


def _pairs(params, masks):
  params = unwrap_variables(params)
  masks = unwrap_variables(masks)
  return jax.tree.leaves(params), _paths.flatten_up_to(jax.tree.structure(params), masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the inactive weights: ``p * m`` on prunable leaves, ``p`` elsewhere.

  Example:
    >>> params = sparse_jax.apply_masks(params, sparse_jax.get_masks(opt_state))
  """
  return jax.tree.map(
      lambda p, m: p if m is None else jnp.where(_placement.shard_like(m, p), p, jnp.zeros_like(p)),
      params, unpack_masks(masks))


# The measures below also take PackedMask leaves, whose pytree leaves are the packed
# bytes: summing those as masks would be silently wrong.
def count_active(masks: PyTree) -> jax.Array | int:
  """Number of active prunable weights (an int32 scalar; the int 0 without any)."""
  # Padding bits are 0, so a packed mask's count is the popcount of its bytes.
  return sum(jnp.sum(jax.lax.population_count(m.bits), dtype=jnp.int32) if _is_packed(m)
             else jnp.sum(m, dtype=jnp.int32)
             for m in jax.tree.leaves(masks, is_leaf=_is_packed))


def count_prunable(masks: PyTree) -> int:
  """Number of prunable weights (a Python int, from the shapes)."""
  return sum(math.prod(m.shape) if _is_packed(m) else int(np.size(m))
             for m in jax.tree.leaves(masks, is_leaf=_is_packed))


def density(masks: PyTree) -> jax.Array:
  """Overall density: active prunable weights / all prunable weights."""
  # An array: count_active is the int 0 only when count_prunable is 0 too, and then
  # the division raises.
  return cast(jax.Array, count_active(masks) / count_prunable(masks))


def sparsity(masks: PyTree) -> jax.Array:
  """Overall sparsity: ``1 - density(masks)``."""
  return 1.0 - density(masks)


def params_sparsity(params: PyTree, prunable: PyTree | None = None) -> jax.Array:
  """Fraction of exact zeros among the prunable params (measured, not the target)."""
  params = unwrap_variables(params)
  if prunable is None:
    prunable = select_prunable(params)
  leaves = [p for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if f]
  zeros = sum(jnp.sum(p == 0, dtype=jnp.int32) for p in leaves)
  # An array: zeros is the int 0 only without leaves, and then the division raises.
  return cast(jax.Array, zeros / sum(int(np.size(p)) for p in leaves))


def masks_from_params(params: PyTree, prunable: PyTree | None = None) -> PyTree:
  """Masks of the nonzero prunable weights (e.g. of a pretrained sparse model)."""
  params = unwrap_variables(params)
  if prunable is None:
    prunable = select_prunable(params)
  return jax.tree.map(lambda p, f: (p != 0) if f else None, params, prunable)


# ---------------------------------------------------------------------------
# Bit-packed masks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedMask:
  """A bool mask stored 1 bit per weight.

  The mask is viewed as a matrix of ``rows x cols`` (all axes but the last merged
  into rows, a free reshape; a 0-d or 1-d mask is one column of ``size`` rows), and
  each group of 8 consecutive rows is packed into one ``uint8`` row, row ``8 i + j``
  in bit ``j`` of byte row ``i`` (``np.packbits(..., axis=0, bitorder="little")``
  layout). Padding bits of the last byte row are 0. A ``(R, C)`` kernel packs to
  ``bits`` of shape ``(ceil(R / 8), C)``, a ``(3, 3, I, O)`` conv kernel to
  ``(ceil(9 I / 8), O)``; packing along axis 0 alone would use only 3 of 8 bits of
  each byte there.

  A pytree node whose only child is ``bits``: ``shape`` is static metadata, so
  ``jit``, ``lax.cond``, sharding and orbax see one ``uint8`` array per mask.
  """
  bits: jax.Array  # uint8 (ceil(rows / 8), *cols)
  shape: tuple[int, ...]  # the mask's own shape


jax.tree_util.register_dataclass(PackedMask, data_fields=["bits"], meta_fields=["shape"])


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
  """``(rows, cols)`` of the matrix view of a mask of ``shape``."""
  if len(shape) < 2:
    return math.prod(shape), ()
  return math.prod(shape[:-1]), shape[-1:]


def _packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of ``PackedMask.bits`` for a mask of ``shape``."""
  rows, cols = _matrix_shape(tuple(shape))
  return (-(-rows // 8),) + cols


def _check_packed(m: PackedMask, name: str = "mask") -> None:
  expected = _packed_shape(m.shape)
  if tuple(np.shape(m.bits)) != expected or np.dtype(m.bits.dtype) != np.uint8:
    raise ValueError(
        f"PackedMask {name!r} of shape {m.shape} needs uint8 bits of shape {expected}; "
        f"got {getattr(m.bits, 'dtype', type(m.bits))} of shape {np.shape(m.bits)}. "
        "Build it with sparse_jax.pack_masks.")


# Shifts written out rather than jnp.packbits/unpackbits: those move the packed axis
# last (two transposes around the reduce) while these only reshape leading axes
# (bitcasts), so both directions fuse into their consumer or producer with no
# relayout, also when the leaf is sharded.
def _pack_leaf(mask: jax.Array) -> PackedMask:
  shape = tuple(int(n) for n in np.shape(mask))
  rows, cols = _matrix_shape(shape)
  r8 = -(-rows // 8)
  mask = _placement.split_last_axis_only(mask)  # rows merge the leading axes
  m = jnp.reshape(mask, (rows,) + cols)
  m = jnp.pad(m, [(0, 8 * r8 - rows)] + [(0, 0)] * len(cols))
  m = m.reshape((r8, 8) + cols).astype(jnp.uint8)
  shifts = jnp.arange(8, dtype=jnp.uint8).reshape((1, 8) + (1,) * len(cols))
  # Distinct powers of two: the sum is their bitwise or and never overflows.
  return PackedMask(jnp.sum(m << shifts, axis=1, dtype=jnp.uint8), shape)


def _unpack_leaf(packed: PackedMask) -> jax.Array:
  rows, cols = _matrix_shape(packed.shape)
  shifts = jnp.arange(8, dtype=jnp.uint8).reshape((1, 8) + (1,) * len(cols))
  bits = (packed.bits[:, None] >> shifts) & 1
  return bits.reshape((-1,) + cols)[:rows].astype(bool).reshape(packed.shape)


def _is_packed(x) -> bool:
  return isinstance(x, PackedMask)


def pack_masks(masks: PyTree) -> PyTree:
  """Stores each bool mask of ``masks`` as a ``PackedMask`` (1 bit per weight).

  ``None`` (dense) leaves stay ``None`` and ``PackedMask`` leaves are kept as they
  are, so packing twice is packing once. Works under ``jit``.

  Example:
    >>> packed = sparse_jax.pack_masks(masks)
    >>> sparse_jax.unpack_masks(packed)   # the same bool masks again

  Args:
    masks: a mask tree (bool arrays, ``None`` on dense leaves), or one bool array.

  Returns:
    The tree with a ``PackedMask`` in place of every bool array.

  Raises:
    ValueError: if a leaf is not a bool array.
  """
  def pack(path, m):
    if _is_packed(m):
      return m
    dtype = m.dtype if hasattr(m, "dtype") else np.asarray(m).dtype
    if dtype != np.bool_:
      raise ValueError(
          f"pack_masks takes bool masks, but the leaf {path_to_name(path) or 'mask'!r} "
          f"has dtype {dtype}; compare it first (e.g. m != 0).")
    return _pack_leaf(m)

  return jax.tree_util.tree_map_with_path(pack, unwrap_variables(masks),
                                          is_leaf=_is_packed)


def unpack_masks(masks: PyTree) -> PyTree:
  """Bool masks of a tree that may hold ``PackedMask`` leaves (others are kept).

  The identity on a tree of bool masks, so code that reads masks can always unpack.
  Under ``jit`` the unpacking fuses into whatever consumes the mask.

  Example:
    >>> masks = sparse_jax.unpack_masks(sparse_state.masks)

  Args:
    masks: a mask tree with ``PackedMask``, bool-array and ``None`` leaves.

  Returns:
    The tree with a bool array of ``PackedMask.shape`` in place of every
    ``PackedMask``.

  Raises:
    ValueError: if a ``PackedMask``'s bits do not fit its shape.
  """
  def unpack(path, m):
    if not _is_packed(m):
      return m
    _check_packed(m, path_to_name(path) or "mask")
    return _unpack_leaf(m)

  return jax.tree_util.tree_map_with_path(unpack, unwrap_variables(masks),
                                          is_leaf=_is_packed)
