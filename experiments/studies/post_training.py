"""Post-training one-shot pruning of a trained dense model: magnitude and Wanda.

* ``magnitude_masks``: keep the largest ``|w|`` over all prunable kernels at once
  (global magnitude pruning).
* ``wanda_masks``: Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach
  for Large Language Models"): score ``|w_ij| * ||x_i||_2``, with ``||x_i||_2`` the
  norm of the layer's input feature ``i`` over the tokens of a calibration batch
  (``input_feature_norms``), and keep the top ``1 - sparsity`` of every output's
  weights (the paper's per-output comparison group), in every prunable kernel.

Neither retrains; ``experiments/studies/transformers.py`` evaluates the pruned model
as it is and after a short fine-tune with the mask fixed (``sparse_jax.static``
started from the pruned export, ``config.init_from``).

A kernel's input features are its contracted axes: ``[in]`` of a Dense
``[in, out]``, ``[in]`` of an attention q/k/v kernel ``[in, heads, head_dim]``,
``[heads, head_dim]`` of its output kernel ``[heads, head_dim, out]`` (linen's
``DenseGeneral.axis``).

Example:
  norms = input_feature_norms(model, variables, calibration_tokens, train=False)
  masks = wanda_masks(variables["params"], norms, 0.5)
  pruned = sparse_jax.apply_masks(variables["params"], masks)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax

PyTree = Any


def input_feature_norms(model, variables, inputs, **apply_kwargs) -> dict[str, jax.Array]:
  """``||x_i||_2`` of every Dense / DenseGeneral input feature over ``inputs``.

  The inputs each kernel sees are recorded while ``model.apply`` runs (linen's
  ``nn.intercept_methods``); a layer called several times sums all its calls.

  Args:
    model: a ``flax.linen.Module``.
    variables: its variables.
    inputs: the calibration batch (e.g. int32 tokens [B, L]).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    ``{kernel name: float32 norms}`` keyed like ``sparse_jax.leaf_names``
    ("block0/attn/query/kernel"), each shaped like the kernel's input axes.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  sums: dict[str, jax.Array] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral))
        and module.has_variable("params", "kernel")):
      if isinstance(module, nn.DenseGeneral) and module.batch_dims:
        raise ValueError(f"{'/'.join(module.path)}: DenseGeneral with batch_dims has no "
                         "input features shared by its kernel.")
      x = jnp.asarray(args[0], jnp.float32)
      axis = (-1,) if isinstance(module, nn.Dense) else module.axis
      axis = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
      reduce = tuple(a for a in range(x.ndim) if a not in axis)
      name = "/".join((*module.path, "kernel"))
      sq = jnp.sum(jnp.square(x), axis=reduce)
      sums[name] = sums[name] + sq if name in sums else sq
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, inputs, **apply_kwargs)
  return {k: jnp.sqrt(v) for k, v in sums.items()}


def wanda_scores(params: PyTree, norms: dict[str, jax.Array], prunable=None) -> PyTree:
  """``|w| * ||x||`` on the prunable kernels (``None`` elsewhere).

  Args:
    params: the model's params.
    norms: ``input_feature_norms`` of the model.
    prunable: flags like ``params`` (default ``sparse_jax.select_prunable(params)``).
  """
  prunable = sparse_jax.select_prunable(params) if prunable is None else prunable
  names = sparse_jax.leaf_names(params)
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for name, w, flag in zip(names, leaves, treedef.flatten_up_to(prunable)):
    if not flag:
      out.append(None)
      continue
    if name not in norms:
      raise ValueError(f"{name} is prunable but no Dense/DenseGeneral called it: Wanda "
                       "scores Dense and DenseGeneral kernels only.")
    n = norms[name]
    out.append(jnp.abs(w) * n.reshape(n.shape + (1,) * (w.ndim - n.ndim)))
  return jax.tree.unflatten(treedef, out)


def per_output_masks(scores: PyTree, norms: dict[str, jax.Array], sparsity: float) -> PyTree:
  """Keeps ``round((1 - sparsity) * fan_in)`` largest scores of every output of each kernel.

  Ties go to the lower input index. The layer's input axes are its leading
  ``norms[name].ndim`` axes.
  """
  names = sparse_jax.leaf_names(scores)
  leaves, treedef = jax.tree.flatten(scores)
  out = []
  for name, s in zip(names, leaves):
    n_in = norms[name].ndim
    fan_in = math.prod(s.shape[:n_in])
    keep = int(round((1.0 - sparsity) * fan_in))
    flat = s.reshape(fan_in, -1)
    # Rank of each weight within its output column (0 = largest score).
    order = jnp.argsort(-flat, axis=0, stable=True)
    ranks = jnp.argsort(order, axis=0, stable=True)
    out.append((ranks < keep).reshape(s.shape))
  return jax.tree.unflatten(treedef, out)


def wanda_masks(params: PyTree, norms: dict[str, jax.Array], sparsity: float,
                prunable=None) -> PyTree:
  """Wanda's masks: ``per_output_masks`` of ``wanda_scores`` (``None`` on dense leaves)."""
  return per_output_masks(wanda_scores(params, norms, prunable), norms, sparsity)


def magnitude_masks(params: PyTree, sparsity: float, prunable=None) -> PyTree:
  """Global magnitude pruning: the top ``1 - sparsity`` of ``|w|`` over all kernels."""
  prunable = sparse_jax.select_prunable(params) if prunable is None else prunable
  scores = jax.tree.map(lambda w, f: jnp.abs(w) if f else None, params, prunable)
  return sparse_jax.masks_from_scores(scores, sparsity)


def calibration_rows(num_examples: int, size: int, seed: int = 0) -> np.ndarray:
  """``size`` distinct training rows, drawn with ``seed`` (sorted)."""
  return np.sort(np.random.default_rng(seed).choice(num_examples, size, replace=False))
