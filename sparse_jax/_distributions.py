"""Layer-wise density distributions and exact-count random masks (docs/algorithms.md §2).

Densities and counts are static: they are computed in Python float64 from the
layer shapes when a transformation is built, never inside jit (float32 is off by
one at 30M weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _layers
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _select

PyTree = Any

DISTRIBUTIONS = ("uniform", "er", "erk")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
  """Returns ``float(sparsity)`` or raises if it is outside [0, 1)."""
  s = float(sparsity)
  if not 0.0 <= s < 1.0 or math.isnan(s):
    raise ValueError(
        f"{name}={sparsity!r} is outside [0, 1): it is the fraction of prunable "
        "weights set to zero, e.g. 0.9 keeps 10% of them.")
  return s


def round_half_up(x: float) -> int:
  """``round`` as taught in school (Python's ``round`` rounds half to even)."""
  return int(math.floor(x + 0.5))


def active_count(sparsity: float, n: int) -> int:
  """Exact number of active weights ``round((1 - s) * n)``, in float64."""
  return round_half_up((1.0 - float(np.float64(sparsity))) * n)


class KernelFans(NamedTuple):
  """How a kernel connects its layer's inputs to its outputs (for ER/ERK and FLOPs)."""
  fan_in: int  # product of the axes contracted with the input (in channels for a conv)
  fan_out: int  # product of the output-feature axes
  receptive: tuple[int, ...]  # a conv kernel's spatial axes; () for dense-like kernels


def dense_kernel_fans(shape: Sequence[int], in_ndim: int) -> KernelFans:
  """Fans of a dense-like kernel whose first ``in_ndim`` axes meet the input."""
  shape = tuple(int(n) for n in shape)
  return KernelFans(math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:]), ())


def conv_kernel_fans(shape: Sequence[int]) -> KernelFans:
  """Fans of a conv kernel ``[*spatial, in, out]`` (Flax's layout, 1-D to 3-D)."""
  shape = tuple(int(n) for n in shape)
  return KernelFans(shape[-2], shape[-1], shape[:-2])


# Flax's attention projections (linen MultiHeadDotProductAttention, nnx
# MultiHeadAttention) are DenseGeneral/LinearGeneral submodules with these names.
_ATTENTION_INPUTS = ("query", "key", "value")
_ATTENTION_OUTPUT = "out"


def kernel_fans(name: str, shape: Sequence[int]) -> KernelFans:
  """Fan-in, fan-out and receptive field of a kernel, from its name and shape.

  - 2-d ``[in, out]`` (Dense, Linear): fan-in ``in``, fan-out ``out``.
  - 3-d ``.../query|key|value/kernel`` ``[in, heads, head_dim]`` (attention input
    projections): fan-in ``in``, fan-out ``heads * head_dim``.
  - 3-d ``.../out/kernel`` ``[heads, head_dim, out]`` (attention output
    projection): fan-in ``heads * head_dim``, fan-out ``out``.
  - any other kernel of 3 or more dims is a conv ``[*spatial, in, out]``: fan-in
    ``in``, fan-out ``out``, receptive field ``spatial``. Other DenseGeneral kernels
    are read this way too, since their name does not say which axes meet the input.

  Example:
    >>> kernel_fans("MultiHeadDotProductAttention_0/out/kernel", (4, 16, 64))
    KernelFans(fan_in=64, fan_out=64, receptive=())

  Args:
    name: the leaf's name ("Block_0/attn/query/kernel", ``path_to_name``).
    shape: the kernel's shape.

  Returns:
    A ``KernelFans``.

  Raises:
    ValueError: if ``shape`` has fewer than 2 dims (no fan-in/fan-out to read).
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) < 2:
    raise ValueError(
        f"Leaf {name!r} of shape {shape} has no fan-in/fan-out: ER/ERK read kernels "
        "of 2 or more dims; use distribution='uniform' or a density map for it.")
  parts = _layers.base_name(name).split("/")  # a stacked leaf's layer: "…/kernel[2]"
  if len(shape) == 3 and len(parts) >= 2 and parts[-1] == "kernel":
    if parts[-2] in _ATTENTION_INPUTS:
      return dense_kernel_fans(shape, 1)
    if parts[-2] == _ATTENTION_OUTPUT:
      return dense_kernel_fans(shape, 2)
  if len(shape) == 2:
    return dense_kernel_fans(shape, 1)
  return conv_kernel_fans(shape)


def _raw_scores(shapes: Sequence[tuple[int, ...]], names: Sequence[str],
                kind: str) -> np.ndarray:
  scores = []
  for name, shape in zip(names, shapes):
    fans = kernel_fans(name, shape)
    if kind == "er":
      # Erdős–Rényi: (n_in + n_out) / (n_in * n_out); conv kernels count their
      # input/output channels only.
      scores.append((fans.fan_in + fans.fan_out) / (fans.fan_in * fans.fan_out))
    else:
      # ERK: sum / product of all kernel dims, a conv's spatial dims included.
      dims = (*fans.receptive, fans.fan_in, fans.fan_out)
      scores.append(sum(dims) / np.float64(math.prod(dims)))
  return np.asarray(scores, np.float64)


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float, *,
                  kind: str = "erk", names: Sequence[str] | None = None) -> list[float]:
  """Erdős–Rényi(-Kernel) layer densities with overall density ``density``.

  Solves ``sum_l eps * raw_l * n_l = density * sum_l n_l``; any layer whose
  ``eps * raw_l`` exceeds 1 is made dense and the solve is repeated over the rest
  (docs/algorithms.md §2). Each layer's fan-in and fan-out are read by ``kernel_fans``.

  Example:
    >>> erk_densities([(784, 300), (300, 100), (100, 10)], 0.1)

  Args:
    shapes: shapes of the prunable layers.
    density: overall target density in (0, 1].
    kind: ``"erk"`` (all kernel dims) or ``"er"`` (input/output dims only).
    names: the layers' names, which tell attention projections from convs
      (``kernel_fans``); without them every kernel of 3 or more dims is a conv.

  Returns:
    One density in (0, 1] per layer.

  Raises:
    ValueError: if ``names`` does not give one name per shape, or a layer has
      fewer than 2 dims.
  """
  if names is None:
    names = [""] * len(shapes)
  elif len(names) != len(shapes):
    raise ValueError(f"erk_densities got {len(names)} names for {len(shapes)} shapes; "
                     "give one name per layer.")
  sizes = np.asarray([np.prod(s, dtype=np.float64) for s in shapes])
  raw = _raw_scores(shapes, names, kind)
  dense = np.zeros(len(shapes), bool)
  total = density * sizes.sum()
  while True:
    budget = total - sizes[dense].sum()
    denom = (raw * sizes)[~dense].sum()
    eps = budget / denom if denom > 0 else 0.0
    over = (~dense) & (eps * raw > 1.0)
    if not over.any():
      break
    dense |= over
  return [1.0 if d else float(eps * r) for d, r in zip(dense, raw)]


def layer_densities_for(
    layers: Sequence[_masks.LayerInfo], sparsity: float,
    distribution: str | Mapping[str, float] = "erk") -> list[float]:
  """Per-layer densities for an overall ``sparsity`` under ``distribution``.

  Args:
    layers: the prunable layers (``_masks.prunable_layers``).
    sparsity: overall target sparsity in [0, 1).
    distribution: ``"uniform"``, ``"er"``, ``"erk"``, or a mapping from a layer
      name or regex (``re.fullmatch``) to that layer's density (a custom map must
      cover every prunable layer).
  """
  s = check_sparsity(sparsity)
  shapes = [l.shape for l in layers]
  if isinstance(distribution, Mapping):
    out = []
    for l in layers:
      # A stacked leaf's layer "name[i]" takes the entry of "name" too.
      base = _layers.base_name(l.name)
      hits = [v for k, v in distribution.items()
              if k in (l.name, base) or re.fullmatch(k, l.name) or re.fullmatch(k, base)]
      if not hits:
        raise ValueError(
            f"The custom density map has no entry for layer {l.name!r}; give every "
            f"prunable layer a density (keys: {sorted(distribution)}).")
      d = float(hits[0])
      if not 0.0 < d <= 1.0:
        raise ValueError(f"Density {d} for layer {l.name!r} is outside (0, 1].")
      out.append(d)
    return out
  if distribution == "uniform":
    return [1.0 - s] * len(layers)
  if distribution in ("er", "erk"):
    return erk_densities(shapes, 1.0 - s, kind=distribution,
                         names=[l.name for l in layers])
  raise ValueError(
      f"Unknown distribution {distribution!r}; use one of {DISTRIBUTIONS} or a "
      "mapping from layer name to density.")


def layer_counts(layers: Sequence[_masks.LayerInfo], densities: Sequence[float],
                 total: int | None = None) -> list[int]:
  """Exact per-layer active counts that add up to ``total``.

  Floors ``density_l * n_l`` and hands the remaining units to the largest
  remainders (ties to the earlier layer), keeping every layer in [1, n_l].

  Args:
    layers: the prunable layers.
    densities: one density per layer.
    total: the exact overall count; defaults to ``round(sum density_l * n_l)``.
  """
  sizes = [l.size for l in layers]
  ideal = [float(np.float64(d) * n) for d, n in zip(densities, sizes)]
  if total is None:
    total = round_half_up(sum(ideal))
  total = min(max(total, len(sizes)), sum(sizes))
  counts = [min(max(int(math.floor(x)), 1), n) for x, n in zip(ideal, sizes)]
  # Hand out (or take back) single units by remainder until the sum is exact.
  order = sorted(range(len(sizes)), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
  diff = total - sum(counts)
  while diff != 0:
    moved = False
    for i in (order if diff > 0 else reversed(order)):
      if diff > 0 and counts[i] < sizes[i]:
        counts[i] += 1
        diff -= 1
        moved = True
      elif diff < 0 and counts[i] > 1:
        counts[i] -= 1
        diff += 1
        moved = True
      if diff == 0:
        break
    if not moved:
      break
  return counts


def proportional_counts(sizes: Sequence[int], total: int) -> list[int]:
  """Exact per-layer counts that add up to ``total``, in proportion to the sizes.

  The layer-wise split of one overall count: every layer keeps the fraction
  ``total / sum(sizes)`` of its weights, rounded by largest remainder
  (``layer_counts``) and kept in [1, n_l].

  Example:
    >>> sparse_jax.proportional_counts([300, 100, 10], 41)   # 10% of each layer
    [30, 10, 1]

  Args:
    sizes: the number of weights of each layer.
    total: the overall count.

  Returns:
    One count per layer.
  """
  sizes = [int(n) for n in sizes]
  total = int(total)
  layers = [_masks.LayerInfo("", (n,), n) for n in sizes]
  return layer_counts(layers, [total / sum(sizes)] * len(sizes), total)


_select_jit = jax.jit(_select.top_k_masks, static_argnums=2)


def random_masks(
    key: jax.Array, params: PyTree, prunable: PyTree, counts: Sequence[int], *,
    sampling: str = "exact") -> PyTree:
  """Random masks with ``counts[l]`` active weights in prunable layer ``l``.

  Args:
    key: a PRNG key.
    params: the params pytree (shapes only).
    prunable: a pytree of bools like ``params`` (``select_prunable``).
    counts: exact active count per prunable layer, in flattening order.
    sampling: ``"exact"`` (exactly ``counts[l]`` ones, the default) or
      ``"bernoulli"`` (each weight active with probability ``counts[l] / n_l``,
      as the authors' code samples; the count then varies around the target).

  Returns:
    A mask tree: bool arrays on prunable leaves, ``None`` elsewhere.
  """
  params = _masks.unwrap_variables(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = _paths.flatten_up_to(treedef, prunable)
  keys = jax.random.split(key, max(1, sum(flags)))
  out, li = [], 0
  scores: list[jax.Array | None] = []
  for p, f in zip(leaves, flags):
    if not f:
      scores.append(None)
      continue
    shape = np.shape(p)
    if sampling == "exact":
      # Random non-negative keys; the exact selector keeps the largest counts[l].
      bits = jax.random.bits(keys[li], shape, jnp.uint32) >> 1
      scores.append(bits + 1)
    elif sampling == "bernoulli":
      scores.append(jax.random.uniform(keys[li], shape) < counts[li] / int(np.prod(shape)))
    else:
      raise ValueError(f"Unknown sampling {sampling!r}; use 'exact' or 'bernoulli'.")
    li += 1
  if sampling == "exact":
    sel_keys = [s for s in scores if s is not None]
    # Jitted: init usually runs eagerly, where the selector's many small ops
    # would each dispatch on their own.
    chosen = _select_jit(sel_keys, jnp.asarray(counts, jnp.int32),
                         tuple(range(len(sel_keys))))
    it = iter(chosen)
    out = [None if s is None else next(it) for s in scores]
  else:
    out = scores
  return jax.tree.unflatten(treedef, out)
