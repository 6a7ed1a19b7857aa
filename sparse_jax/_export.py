"""Export of structured-sparse models to smaller or compressed dense forms (issue 14).

* ``condense_channels``: a chain of Dense/Conv layers trained with
  ``structure=Channels()`` becomes the params of a smaller dense model of the same
  family: each dead output unit is removed from its layer (kernel column or conv
  filter, bias entry) together with the matching input rows of the next layer. A
  dead unit still outputs the constant ``activation(bias)``; its contribution to
  the next Dense layer is folded into that layer's bias, so the logits are the
  masked model's (up to float rounding). This runs faster on any hardware: the
  kernels are physically smaller.
* ``nm_compress`` / ``nm_decompress`` / ``nm_dense``: N:M storage, the ``n`` kept
  values of every group and their (uint8) positions in the group, and a reference
  Dense forward from it. Smaller in memory; the reference forward is a gather, not
  a fast kernel (XLA has no N:M sparse matmul on CPU).
* ``bcoo_compress`` / ``bcoo_dense`` / ``bcoo_kernels``: unstructured masked Dense
  kernels as ``jax.experimental.sparse.BCOO`` and the Dense forward from them.

Host-side, one-time functions on concrete arrays (NumPy inside), not for jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.typing import ArrayLike

from sparse_jax import _chains
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _structure

PyTree = Any


class Condensed(NamedTuple):
  """The params (and batch statistics) of the smaller dense model, its layers' widths."""
  params: PyTree
  features: tuple[int, ...]  # output units of each layer of the chain, in order
  batch_stats: PyTree = None  # the shrunk batch statistics; None when none were given


def _shrink_entries(tree, name: str, keep: np.ndarray):
  """``tree`` with the per-unit entries of the module ``name`` cut to ``keep``."""
  return _chains.set_module(tree, name, {k: jnp.asarray(np.asarray(v)[..., keep])
                                         for k, v in _chains.get_module(tree, name).items()})


def condense_channels(params: PyTree, masks: PyTree, layers: Sequence[str], *,
                      activation: Callable = jax.nn.relu,
                      batch_stats: PyTree | None = None,
                      norms: Mapping[str, str] | None = None,
                      epsilon: float = 1e-5,
                      keep_constant_channels: bool = False) -> Condensed:
  """Removes the dead output units of a chain of layers (a ``Channels()`` model).

  ``layers`` are the module paths of the chain in forward order (``"Dense_0"``,
  ``"Conv_1"``, ...), each holding a ``kernel`` (``[in, out]`` or ``[*spatial, in,
  out]``) and optionally a ``bias``. Between two of them the model may apply
  ``activation``, pooling (max or average), a global average pool, a row-major
  flatten (a conv followed by a Dense whose inputs are ``positions * channels``)
  and a batch norm named in ``norms``, nothing else: no residual connection (a
  skip would need the same units alive on both of its ends). The last layer's
  outputs are the model's outputs and are all kept.

  A unit is dead when its mask has no active weight. Its constant output
  ``activation(bias)`` -- ``activation(BatchNorm(bias))`` with a norm, where a
  bias-free layer's dead unit outputs 0 -- is folded into the next layer's bias
  when that layer is a Dense; before a conv it must be 0 (e.g. ReLU of a
  non-positive value), since a zero-padded conv turns a constant channel into a
  border pattern, not a bias.

  Example:
    >>> small = sparse_jax.condense_channels(params, sparse_jax.get_masks(opt_state),
    ...                                      ["Dense_0", "Dense_1", "Dense_2"])
    >>> MLP(features=small.features).apply({"params": small.params}, x)
    >>> # conv -> BatchNorm -> ReLU, as in VGG:
    >>> small = sparse_jax.condense_channels(
    ...     params, masks, ["Conv_0", "Conv_1", "Dense_0"], batch_stats=batch_stats,
    ...     norms={"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1"})
    >>> net.apply({"params": small.params, "batch_stats": small.batch_stats}, x,
    ...           train=False)

  Args:
    params: linen-style params (nested dicts), exactly masked.
    masks: their mask tree (``get_masks``); ``None`` marks a dense layer.
    layers: the chain's module paths, in forward order.
    activation: the elementwise function applied after each layer (and its norm)
      but the last.
    batch_stats: the ``'batch_stats'`` collection (nested like ``params``);
      needed with ``norms``.
    norms: ``{layer: batch norm module path}`` for the layers followed by an
      eval-mode batch norm (``params[norm]`` holds ``scale``/``bias``,
      ``batch_stats[norm]`` holds ``mean``/``var``). A norm after the last layer
      is left as it is.
    epsilon: the batch norms' epsilon (Flax's and PyTorch's default 1e-5).
    keep_constant_channels: keep the dead units whose constant output is not 0
      before a conv (their zero filters and the conv's input rows stay), instead
      of raising: exact, less condensed. In a ``Channels()``-trained VGG a dead
      channel's batch norm usually keeps a positive bias, so it outputs one.

  Returns:
    A ``Condensed``: the params (and ``batch_stats``) with the chain's layers and
    their norms shrunk (every other leaf as it was) and the output width of each
    layer.

  Raises:
    ValueError: for an unknown layer or norm, layers that do not chain, or a dead
      unit whose constant output cannot be folded.
  """
  params = _masks.unwrap_variables(params)
  masks = _masks.unpack_masks(_masks.unwrap_variables(masks))
  norms = dict(norms or {})
  _chains.check_arguments(layers, norms, batch_stats)
  layer = {n: {k: np.asarray(v) for k, v in _chains.get_module(params, n).items()}
           for n in layers}
  alive = []
  for i, name in enumerate(layers):
    kernel = layer[name]["kernel"]
    mask = _chains.kernel_mask(masks, name)
    alive.append(_chains.alive_units(mask, kernel) if i < len(layers) - 1
                 else np.ones(kernel.shape[-1], bool))
  for i, (name, nxt) in enumerate(zip(layers[:-1], layers[1:])):
    out = layer[name]
    positions = _chains.chain_positions(name, nxt, out["kernel"], layer[nxt]["kernel"])
    constant = _chains.dead_unit_outputs(name, out, params, batch_stats, norms,
                                         activation, epsilon)
    if keep_constant_channels and layer[nxt]["kernel"].ndim != 2:
      alive[i] = alive[i] | (constant != 0)  # their zero filters stay: exact
    keep = alive[i]
    what = "activation(BatchNorm(bias))" if name in norms else "activation(bias)"
    _cut_inputs(name, nxt, layer[nxt], keep, constant[~keep], positions, what)
    out["kernel"] = out["kernel"][..., keep]
    if out.get("bias") is not None:
      out["bias"] = out["bias"][keep]
  return _condensed(params, batch_stats, layers, layer, norms, alive)


def _cut_inputs(name: str, nxt: str, nlayer, keep: np.ndarray, const: np.ndarray,
                positions: int, what: str) -> None:
  """Removes from ``nlayer`` (the layer ``nxt``) the inputs of the dead units of
  ``name``, folding their constant outputs ``const`` into its bias (a Dense)."""
  nkernel = nlayer["kernel"]
  if nkernel.ndim == 2:
    w = nkernel.reshape(positions, len(keep), -1)
    if np.any(const != 0):
      shift = np.einsum("c,pco->o", const, w[:, ~keep].astype(np.float64))
      if "bias" not in nlayer:
        raise ValueError(f"condense_channels: dead units of {name!r} output "
                         f"{what} != 0, but {nxt!r} has no bias to fold it into.")
      nb = nlayer["bias"]
      nlayer["bias"] = (nb.astype(np.float64) + shift).astype(nb.dtype)
    nlayer["kernel"] = w[:, keep].reshape(positions * int(keep.sum()), -1)
    return
  if np.any(const != 0):
    raise ValueError(
        f"condense_channels: dead units of {name!r} output {what} != 0 "
        f"into the conv {nxt!r}; a zero-padded conv does not turn a constant "
        "channel into a bias. Zero those biases (or train with non-positive ones), "
        "or pass keep_constant_channels=True to keep these channels.")
  nlayer["kernel"] = nkernel[..., keep, :]


def _condensed(params, batch_stats, layers, layer, norms, alive) -> Condensed:
  """The ``Condensed`` of the shrunk ``layer`` arrays (and their norms' entries)."""
  new, new_stats = params, batch_stats
  for i, name in enumerate(layers):
    new = _chains.set_module(new, name, {
        **_chains.get_module(params, name),
        **{k: jnp.asarray(v) for k, v in layer[name].items()}})
    if name in norms and i < len(layers) - 1:
      new = _shrink_entries(new, norms[name], alive[i])
      new_stats = _shrink_entries(new_stats, norms[name], alive[i])
  return Condensed(new, tuple(int(a.sum()) for a in alive), new_stats)


# ---------------------------------------------------------------------------
# N:M storage
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NMKernel:
  """An N:M-sparse kernel stored as its kept values and their positions.

  ``values`` and ``indices`` have the shape ``[*receptive, fan_in * n / m,
  fan_out]`` of the matrix view: group ``g``'s ``n`` kept weights (in input order)
  at rows ``g n .. g n + n - 1``, and their positions ``0 .. m - 1`` in the group.
  """
  values: jax.Array
  indices: jax.Array  # uint8
  shape: tuple[int, ...]  # the dense kernel's shape
  n: int
  m: int

  @property
  def nbytes(self) -> int:
    """Bytes of ``values`` and ``indices``."""
    return int(self.values.nbytes + self.indices.nbytes)


jax.tree_util.register_dataclass(NMKernel, data_fields=["values", "indices"],
                                 meta_fields=["shape", "n", "m"])


def nm_compress(kernel: ArrayLike, mask: ArrayLike, structure: _structure.NM,
                name: str = "kernel") -> NMKernel:
  """The ``NMKernel`` of a masked kernel whose every group has exactly ``n`` active.

  Example:
    >>> k = sparse_jax.nm_compress(params["Dense_0"]["kernel"],
    ...                            masks["Dense_0"]["kernel"], sparse_jax.NM(2, 4))
    >>> k.nbytes   # 0.5 * 4 + 0.5 * 1 bytes per weight of a float32 kernel

  Raises:
    ValueError: if the kernel does not fit ``structure`` or a group's count is not n.
  """
  v = _structure.kernel_view(name, np.shape(kernel))
  _structure.check_layer(structure, v)
  n, m = structure.n, structure.m
  *rec, fan_in, fan_out = v.view
  groups = (*rec, fan_in // m, m, fan_out)
  w = np.asarray(kernel).reshape(groups)
  mk = np.asarray(mask, bool).reshape(groups)
  counts = mk.sum(axis=-2)
  if np.any(counts != n):
    raise ValueError(f"nm_compress: {name!r} has groups with {sorted(set(counts.ravel().tolist()))} "
                     f"active weights; {structure} needs exactly {n} in each.")
  idx = np.argsort(~mk, axis=-2, kind="stable")[..., :n, :]  # active positions, in order
  values = np.take_along_axis(w, idx, axis=-2)
  shape = (*rec, fan_in // m * n, fan_out)
  return NMKernel(jnp.asarray(values.reshape(shape)),
                  jnp.asarray(idx.astype(np.uint8).reshape(shape)), v.shape, n, m)


def nm_decompress(k: NMKernel) -> jax.Array:
  """The dense (masked) kernel of an ``NMKernel``."""
  *rec, rows, fan_out = k.values.shape
  g = rows // k.n
  values = k.values.reshape(*rec, g, k.n, fan_out)
  idx = k.indices.reshape(*rec, g, k.n, fan_out).astype(jnp.int32)
  onehot = idx[..., None, :] == jnp.arange(k.m).reshape(k.m, 1)  # [..., g, n, m, out]
  dense = jnp.sum(jnp.where(onehot, values[..., None, :], 0), axis=-3)
  return dense.astype(k.values.dtype).reshape(k.shape)


def nm_dense(x: jax.Array, k: NMKernel) -> jax.Array:
  """``x @ kernel`` for a 2-D ``[in, out]`` ``NMKernel``, reading only the kept weights.

  A reference (a gather of ``x`` per kept weight, then a contraction), equal to the
  dense masked product up to float rounding; not faster than it on CPU.
  """
  if len(k.shape) != 2:
    raise ValueError(f"nm_dense takes a 2-D [in, out] kernel, got shape {k.shape}.")
  fan_in, fan_out = k.shape
  g = fan_in // k.m
  idx = k.indices.reshape(g, k.n, fan_out).astype(jnp.int32)
  # One gather per (group, kept slot, output): x[..., g, idx[g, j, o]].
  flat_idx = (jnp.arange(g).reshape(g, 1, 1) * k.m + idx).reshape(-1)  # into x's inputs
  xs = jnp.take(x, flat_idx, axis=-1).reshape(*x.shape[:-1], g, k.n, fan_out)
  values = k.values.reshape(g, k.n, fan_out)
  return jnp.einsum("...gno,gno->...o", xs, values)


# ---------------------------------------------------------------------------
# BCOO storage (unstructured masks)
# ---------------------------------------------------------------------------


def bcoo_compress(kernel: ArrayLike, mask: ArrayLike, name: str = "kernel") -> jsparse.BCOO:
  """A masked 2-D ``[in, out]`` kernel as ``jax.experimental.sparse.BCOO``.

  Stored transposed, ``[out, in]``: ``bcoo_dense`` then multiplies the sparse
  matrix from the left, the product JAX's BCOO implements directly. Only the
  active weights are kept (``nse`` = the mask's count); indices are int32.

  Example:
    >>> k = sparse_jax.bcoo_compress(params["Dense_0"]["kernel"],
    ...                              masks["Dense_0"]["kernel"])
    >>> y = sparse_jax.bcoo_dense(x, k) + params["Dense_0"]["bias"]

  Raises:
    ValueError: for a kernel that is not 2-D or a mask of another shape.
  """
  kernel, mask = np.asarray(kernel), np.asarray(mask, bool)
  if kernel.ndim != 2 or mask.shape != kernel.shape:
    raise ValueError(f"bcoo_compress: {name!r} must be a 2-D [in, out] kernel with a "
                     f"mask of its shape, got {kernel.shape} and {mask.shape} (conv "
                     "kernels are not supported: JAX's BCOO convolution is 1-D only).")
  rows, cols = np.nonzero(mask.T)  # row-major order of [out, in]
  indices = np.stack([rows, cols], axis=1).astype(np.int32)
  data = kernel.T[rows, cols]
  return jsparse.BCOO((jnp.asarray(data), jnp.asarray(indices)),
                      shape=kernel.T.shape, indices_sorted=True, unique_indices=True)


def bcoo_nbytes(k: jsparse.BCOO) -> int:
  """Bytes of a ``BCOO``'s ``data`` and ``indices``."""
  return int(k.data.nbytes + k.indices.nbytes)


def bcoo_dense(x: jax.Array, k: jsparse.BCOO) -> jax.Array:
  """``x @ kernel`` for a ``bcoo_compress``-ed kernel, ``x`` of shape ``[..., in]``.

  A sparse-dense product of JAX's BCOO (a reference implementation, not tuned for
  speed: on CPU it beats the dense product only at high sparsity, see
  experiments/benchmarks/README.md). Equal to the dense masked product up to float
  rounding.
  """
  batch = x.shape[:-1]
  xt = x.reshape(-1, x.shape[-1]).T  # [in, batch]
  y = jsparse.bcoo_dot_general(k, xt, dimension_numbers=(([1], [0]), ([], [])))
  return y.T.reshape(*batch, k.shape[0])


def bcoo_kernels(params: PyTree, masks: PyTree) -> PyTree:
  """``params`` with every masked 2-D kernel replaced by its ``bcoo_compress``.

  Leaves without a mask (``None``) and masked leaves that are not 2-D (biases are
  never masked; conv kernels are left as they are) keep their dense values.
  """
  params = _masks.unwrap_variables(params)
  masks = _masks.unpack_masks(_masks.unwrap_variables(masks))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = _paths.flatten_up_to(treedef, masks)
  out = []
  for (path, p), m in zip(flat, flags):
    name = _masks.path_to_name(path)
    is_mask = m is not None and m is not False
    out.append(bcoo_compress(p, m, name) if is_mask and np.ndim(p) == 2 else p)
  return jax.tree.unflatten(treedef, out)
