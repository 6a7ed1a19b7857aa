"""FLOPs accounting of dense and sparse models and training runs (docs/algorithms.md §10).

Counts follow RigL: a multiply-add is 2 FLOPs; a prunable layer at density d
costs d times its dense FLOPs; the parts that are never pruned (biases,
normalisation, activations, pooling) are paid densely. Training a step costs
the forward pass, the input-gradient pass and the weight-gradient pass, each as
much as the forward; a masked net pays all three at its density except that
methods growing by the dense gradient (RigL, GraNet) pay a dense weight gradient
at their mask-update steps.

Everything here is host-side arithmetic on static shapes and densities (Python
ints and floats), computed once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _distributions
from sparse_jax import _layers
from sparse_jax import _masks

if TYPE_CHECKING:  # flax is optional: model_flops imports it when called
  import flax.linen

PyTree = Any


class ModelFlops(NamedTuple):
  """Dense forward FLOPs of a model for one input batch."""
  layers: dict[str, int]  # kernel name ("Dense_0/kernel") -> dense FLOPs of its product
  other: int  # everything that is never pruned (from XLA's count, see ``model_flops``)


def _conv_padding(padding, in_spatial, kernel, strides, dilation):
  """Per spatial dim ``(lo, hi)`` padding of a Flax ``nn.Conv`` (as XLA pads)."""
  if isinstance(padding, str):
    if padding.upper() in ("VALID", "CIRCULAR"):
      # CIRCULAR pads with real values, which XLA sees as a VALID conv.
      return [(0, 0)] * len(in_spatial)
    if padding.upper() == "SAME":
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
      return jax.lax.padtype_to_pads(in_spatial, dilated, strides, "SAME")
    raise ValueError(f"Unsupported conv padding {padding!r} for FLOPs counting; use "
                     "SAME, VALID, CIRCULAR, an int or (lo, hi) pairs.")
  if isinstance(padding, int):
    return [(padding, padding)] * len(in_spatial)
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _valid_taps(n_in: int, n_out: int, k: int, stride: int, dil: int, lo: int) -> int:
  """Kernel taps that land inside the (unpadded) input, summed over outputs."""
  out = np.arange(n_out)[:, None] * stride - lo + np.arange(k)[None, :] * dil
  return int(np.sum((out >= 0) & (out < n_in)))


def _product_flops(module, x_shape, y_shape, kernel_shape) -> int:
  """Dense FLOPs (2 per multiply-add) of a Dense, DenseGeneral or Conv kernel product."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if isinstance(module, nn.Conv) and len(kernel_shape) > 2:
    fans = _distributions.conv_kernel_fans(kernel_shape)
    nd = len(fans.receptive)
    in_spatial, out_spatial = x_shape[-nd - 1:-1], y_shape[-nd - 1:-1]
    strides = module.strides or 1
    strides = (strides,) * nd if isinstance(strides, int) else tuple(strides)
    dil = module.kernel_dilation or 1
    dil = (dil,) * nd if isinstance(dil, int) else tuple(dil)
    pads = _conv_padding(module.padding, in_spatial, fans.receptive, strides, dil)
    # Padded positions multiply zeros; XLA (and RigL's counter, for VALID convs)
    # leaves them out, so only the taps inside the input are counted.
    taps = 1
    for n_i, n_o, k, s, d, (lo, _) in zip(in_spatial, out_spatial, fans.receptive,
                                         strides, dil, pads):
      taps *= _valid_taps(n_i, n_o, k, s, d, lo)
    batch = int(np.prod(y_shape[:-nd - 1]))
    return 2 * batch * taps * fans.fan_in * fans.fan_out
  # Dense and DenseGeneral (anything of the form x @ W): one multiply-add per kernel
  # entry per input row. The module says which kernel axes meet the input, so the
  # name rule of ``kernel_fans`` is not needed here.
  in_ndim = len(_axes(module.axis)) if isinstance(module, nn.DenseGeneral) else 1
  fans = _distributions.dense_kernel_fans(kernel_shape, in_ndim)
  rows = int(np.prod(y_shape)) // fans.fan_out
  return 2 * rows * int(np.prod(kernel_shape))


def _axes(axis) -> tuple[int, ...]:
  return (axis,) if isinstance(axis, int) else tuple(axis)


def xla_flops(fn: Callable[..., Any], *args: Any) -> float | None:
  """FLOPs of ``jax.jit(fn)(*args)`` from XLA's cost analysis (None if unavailable).

  Example:
    >>> xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  """
  try:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backends without cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def model_flops(model: flax.linen.Module, variables: PyTree, input_shape: Sequence[int],
                *, count_other: bool = True, input_dtype: Any = jnp.float32,
                **apply_kwargs: Any) -> ModelFlops:
  """Dense forward FLOPs of each Dense, DenseGeneral and Conv kernel of a linen model.

  The kernels' FLOPs come from the shapes seen by each layer (traced with
  ``jax.eval_shape``, nothing is computed); the rest of the model (biases,
  normalisation, activations, pooling, never pruned) is XLA's FLOPs count of the
  dense forward minus the kernels'.

  Example:
    >>> f = model_flops(model, variables, (1, 28, 28, 1), train=False)
    >>> sum(f.layers.values())  # 2 * (784*300 + 300*100 + 100*10) for LeNet-300-100

  Args:
    model: a ``flax.linen.Module``.
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    input_shape: the input batch shape, batch included (``(1, 28, 28, 1)`` for
      per-example FLOPs).
    count_other: also count the non-kernel FLOPs with XLA (a compile of the
      forward); False sets ``other`` to 0.
    input_dtype: dtype of the input batch (``jnp.int32`` for token ids).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    A ``ModelFlops`` whose ``layers`` are keyed like ``sparse_jax.leaf_names``
    of the params ("Dense_0/kernel").
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  layers: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    # A DenseGeneral with batch_dims has a kernel per batch entry: not counted.
    if (context.method_name == "__call__"
        and isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))
        and not _axes(getattr(module, "batch_dims", ()))
        and module.has_variable("params", "kernel")):
      kernel: jax.Array = module.get_variable("params", "kernel")
      name = "/".join((*module.path, "kernel"))
      f = _product_flops(module, tuple(args[0].shape), tuple(y.shape), tuple(kernel.shape))
      scanned = _scanned_layers(name, (*module.path, "kernel"), np.ndim(kernel))
      if scanned is None:
        layers[name] = layers.get(name, 0) + f
      # Linen traces a scan body more than once: its calls count once per layer.
      layers.update(dict.fromkeys(scanned or (), f))
    return y

  def _scanned_layers(name, path, ndim):
    """``name[i]`` for each layer when ``nn.scan`` stacks the kernel, else None.

    Inside a scan the module sees one layer's kernel: the stored leaf has the
    layer axes in front, and each layer does the same work.
    """
    full = variables.get("params", {})
    for key in path:
      full = full.get(key, {}) if isinstance(full, Mapping) else {}
    full = getattr(full, "value", full)  # a partitioning box
    n = np.ndim(full) - ndim if hasattr(full, "shape") else 0
    if n <= 0:
      return None
    return [_layers.layer_name(name, i) for i in np.ndindex(*np.shape(full)[:n])]

  x = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, x)
  if not layers:
    raise ValueError(f"{type(model).__name__} has no nn.Dense, nn.DenseGeneral or nn.Conv "
                     "layer with a kernel; FLOPs are counted from those layers.")
  other = 0
  if count_other:
    total = xla_flops(lambda v, x: model.apply(v, x, **apply_kwargs), variables,
                      jnp.zeros(tuple(input_shape), input_dtype))
    if total is not None:
      other = max(int(round(total)) - sum(layers.values()), 0)
  return ModelFlops(layers, other)


def _density_of(name, densities: Mapping[str, float]) -> float:
  """A layer's density; a stacked leaf's layer ``name[i]`` may take its leaf's."""
  return float(densities.get(name, densities.get(_layers.base_name(name), 1.0)))


def inference_flops(flops: ModelFlops, densities: Mapping[str, float] | PyTree) -> float:
  """Forward FLOPs of the masked model: ``sum_l d_l F_l + other``.

  Example:
    >>> inference_flops(f, sparse_jax.get_masks(opt_state)) / inference_flops(f, {})

  Args:
    flops: ``model_flops`` of the model.
    densities: layer name -> density (``sparse_jax.layer_densities``), or a mask
      tree; layers not in it are dense.

  Returns:
    FLOPs as a float.
  """
  densities = as_layer_densities(densities)
  unknown = set(densities) - set(flops.layers) - {_layers.base_name(n) for n in flops.layers}
  if unknown:
    raise ValueError(f"Densities given for {sorted(unknown)}, which are not Dense, "
                     f"DenseGeneral or Conv kernels of the model ({sorted(flops.layers)}).")
  return sum(_density_of(n, densities) * f for n, f in flops.layers.items()) + flops.other


def as_layer_densities(densities: Mapping[str, float] | PyTree) -> dict[str, float]:
  """A ``{name: density}`` dict from such a dict or a mask tree."""
  if isinstance(densities, Mapping) and all(
      isinstance(v, (int, float, np.floating, np.integer)) for v in densities.values()):
    return {k: float(v) for k, v in densities.items()}
  masks = _masks.unwrap_variables(densities)
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  return {_masks.path_to_name(p): float(np.mean(np.asarray(m))) for p, m in flat}


def training_step_flops(flops: ModelFlops, densities: Mapping[str, float],
                        dense_weight_gradient: bool = False) -> float:
  """FLOPs of one training step (forward + input gradient + weight gradient).

  Args:
    flops: ``model_flops`` of the model (its batch is the step's batch).
    densities: layer name -> density during the step.
    dense_weight_gradient: the step computes the weight gradient densely (a RigL
      or GraNet mask update, or momentum growth).

  Returns:
    ``2 * inference + (dense or sparse) weight-gradient FLOPs``.
  """
  forward = inference_flops(flops, densities)
  weight_grad = (sum(flops.layers.values()) + flops.other if dense_weight_gradient
                 else forward)
  return 2.0 * forward + weight_grad


def training_flops(flops: ModelFlops, density_changes: Iterable[tuple[int, Mapping[str, float]]],
                   total_steps: int, dense_gradient_steps: Iterable[int] = ()) -> float:
  """FLOPs of a training run whose per-layer densities change at given steps.

  Example:
    >>> # GMP: dense until the event after step 100, then 10% dense.
    >>> training_flops(f, [(0, {}), (100, {"Dense_0/kernel": 0.1})], total_steps=300)

  Args:
    flops: ``model_flops`` for one training batch.
    density_changes: ``(t, densities)`` pairs: the masks in force for the
      updates after update ``t`` (``t = 0`` for the start masks). Sorted by ``t``;
      the first must have ``t = 0``.
    total_steps: updates of the run.
    dense_gradient_steps: the 1-based updates that compute a dense weight
      gradient (mask-update steps of RigL and GraNet).

  Returns:
    Total FLOPs of the run.
  """
  changes = sorted(((int(t), as_layer_densities(d)) for t, d in density_changes),
                   key=lambda x: x[0])
  if not changes or changes[0][0] != 0:
    raise ValueError("density_changes must start with the start masks at t=0, e.g. "
                     "[(0, initial_densities), (event_step, densities), ...].")
  dense_steps = sorted({int(t) for t in dense_gradient_steps if 1 <= int(t) <= total_steps})
  total = 0.0
  bounds = [t for t, _ in changes[1:]] + [total_steps]
  for (start, dens), end in zip(changes, bounds):
    end = min(end, total_steps)
    if end <= start:
      continue
    # Updates start+1 .. end use these masks.
    n_dense = sum(1 for t in dense_steps if start < t <= end)
    sparse_step = training_step_flops(flops, dens)
    dense_step = training_step_flops(flops, dens, dense_weight_gradient=True)
    total += (end - start - n_dense) * sparse_step + n_dense * dense_step
  return total


def dense_training_flops(flops: ModelFlops, total_steps: int) -> float:
  """FLOPs of training the dense model for ``total_steps``: ``3 * F * steps``."""
  return 3.0 * (sum(flops.layers.values()) + flops.other) * total_steps
