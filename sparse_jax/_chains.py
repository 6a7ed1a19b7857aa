"""The chain of layers a channel condensation walks (``_export``, ``_condense``).

A chain is a list of Dense/Conv module paths in forward order, each feeding the
next (through an activation, pooling, a flatten and an optional batch norm);
these helpers read its modules, its units' liveness and the constant a dead
unit outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import jax.numpy as jnp
import numpy as np


def get_module(tree, name: str, caller: str = "condense_channels"):
  """The module ``name`` (``"block/Conv_1"``) of a nested-dict tree."""
  for key in name.split("/"):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f"{caller}: no layer {name!r} in the params "
                       "(give module paths like 'Dense_0' or 'block/Conv_1').")
    tree = tree[key]
  return tree



def set_module(tree, name: str, value):
  """``tree`` with the module ``name`` replaced by ``value`` (copies along the path)."""
  keys = name.split("/")
  out = dict(tree)
  out[keys[0]] = (value if len(keys) == 1
                  else set_module(tree[keys[0]], "/".join(keys[1:]), value))
  return out



def kernel_mask(masks, name: str):
  """The kernel mask of the layer ``name``; None (dense) where the tree has none."""
  node = masks
  for key in (*name.split("/"), "kernel"):
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node



def alive_units(mask, kernel) -> np.ndarray:
  """Whether each output unit of ``kernel`` has an active weight (bool [fan_out])."""
  fan_out = kernel.shape[-1]
  if mask is None:
    return np.ones(fan_out, bool)
  # NumPy's stubs type any(axis=...) as possibly a scalar; of a 2-d array it is 1-d.
  return cast(np.ndarray, np.asarray(mask).reshape(-1, fan_out).any(axis=0))



def norm_constants(name: str, norm: str, norm_params, norm_stats, y, epsilon,
                   caller: str = "condense_channels"):
  """``BatchNorm(y)`` (eval mode) of a dead unit's constant pre-norm output ``y``."""
  if not isinstance(norm_stats, Mapping) or not {"mean", "var"} <= set(norm_stats):
    raise ValueError(f"{caller}: the batch norm {norm!r} after {name!r} has no "
                     "'mean' and 'var' in batch_stats (pass the 'batch_stats' collection).")
  mean, var = np.asarray(norm_stats["mean"]), np.asarray(norm_stats["var"])
  z = (y - mean) / np.sqrt(var + np.float32(epsilon))
  if "scale" in norm_params:
    z = z * np.asarray(norm_params["scale"])
  if "bias" in norm_params:
    z = z + np.asarray(norm_params["bias"])
  return z



def chain_positions(name: str, nxt: str, kernel, nkernel,
                    caller: str = "condense_channels") -> int:
  """How many inputs of ``nxt`` each output unit of ``name`` feeds (a flatten: > 1)."""
  channels, rows = kernel.shape[-1], nkernel.shape[-2]
  if rows == channels:
    return 1
  if nkernel.ndim == 2 and rows % channels == 0:
    return rows // channels  # a flatten of [*spatial, channels]
  raise ValueError(
      f"{caller}: layer {nxt!r} takes {rows} inputs, which do not follow "
      f"the {channels} outputs of {name!r} (nor a flatten of them): the layers must "
      "form a chain, each feeding the next (residual connections are not "
      "supported: a skip would need the same units alive on both of its ends).")



def dead_unit_outputs(name: str, out, params, batch_stats, norms, activation, epsilon,
                      caller: str = "condense_channels") -> np.ndarray:
  """Each unit's constant output if it is dead (float64): ``activation(y)`` of its
  bias ``y`` (0 without one), through the layer's batch norm if it has one."""
  kernel, bias = out["kernel"], out.get("bias")
  y = bias if bias is not None else np.zeros(kernel.shape[-1], kernel.dtype)
  if name in norms:
    y = norm_constants(name, norms[name], get_module(params, norms[name], caller),
                       get_module(batch_stats, norms[name], caller), y, epsilon, caller)
  return np.asarray(activation(jnp.asarray(y)), np.float64)


def check_arguments(layers, norms, batch_stats, caller: str = "condense_channels") -> None:
  """Raises a ``ValueError`` for an empty chain or norms it cannot use."""
  if len(layers) < 1:
    raise ValueError(f"{caller} needs at least one layer.")
  if set(norms) - set(layers):
    raise ValueError(f"{caller}: norms name layers {sorted(set(norms) - set(layers))} "
                     "that are not in the chain.")
  if norms and batch_stats is None:
    raise ValueError(f"{caller}: norms need batch_stats (their mean and var).")
