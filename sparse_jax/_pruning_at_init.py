"""Pruning at initialisation: SNIP, GraSP, SynFlow and random masks (docs/algorithms.md §6).

Each ``*_masks`` function maps params (and a loss and data, or for SynFlow only
the model's forward) to a mask tree for ``sparse_jax.static(...,
initial_masks=masks)``, which then trains with the mask fixed. Scores are
computed once, before training; the masks keep exactly the requested number of
weights, globally (one ranking over the model, the papers' default) or per
layer under a density distribution (``"uniform"``, ``"er"``, ``"erk"``), with
ties to the lower flat index as every selection in the library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_jax import _distributions
from sparse_jax import _masks
from sparse_jax import _paths
from sparse_jax import _prune
from sparse_jax import _select

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


def _as_batches(batches) -> list:
  """The batches to score on: a list or an iterator is several, anything else one.

  One batch is any pytree (a dict, an ``(x, y)`` tuple, an array), passed to
  ``loss_fn`` as it is. A Python ``list`` or an iterator (a generator, ``iter(...)``)
  holds several batches. A tuple is always one batch, never several, so that the
  common ``(x, y)`` batch reaches the loss whole; a batch that is itself a list is
  given as ``[batch]``.
  """
  if isinstance(batches, list) or hasattr(batches, "__next__"):
    out = list(batches)
  else:
    out = [batches]
  if not out:
    raise ValueError("No batch given: pass a batch, a list of batches or an iterator "
                     "that yields at least one.")
  return out


def _prunable(params, selector: Mapping[str, Any] | None):
  return _masks.select_prunable(params, **(selector or {}))


def signed_score_keys(scores: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
  """Order-preserving ``uint32`` keys of signed float scores (largest = kept).

  The float order maps to the unsigned order of ``bitcast`` with the sign bit
  flipped (all bits for negatives); the lowest bit is dropped to stay below the
  selector's forced key, so scores one float32 ulp apart may tie (ties go to the
  lower index).
  """
  s = scores.astype(jnp.float32)
  u = lax.bitcast_convert_type(s, jnp.uint32)
  ordered = jnp.where(s < 0, ~u, u | jnp.uint32(0x80000000))
  keys = (ordered >> 1) + jnp.uint32(1)
  if candidates is not None:
    keys = jnp.where(candidates, keys, jnp.uint32(_select.NOT_CANDIDATE))
  return keys


# Jitted: the selector's many small ops would each dispatch on their own eagerly.
_top_k_jit = jax.jit(_select.top_k_masks, static_argnums=2)


def masks_from_scores(scores: PyTree, sparsity: float, *,
                      distribution: str | Mapping[str, float] = "global",
                      candidates: PyTree | None = None) -> PyTree:
  """Keeps the weights with the largest scores, globally or per layer.

  Example:
    >>> masks = masks_from_scores(snip_scores(params, loss_fn, batch), 0.9)

  Args:
    scores: float arrays on prunable leaves, ``None`` elsewhere (signed scores
      are ranked by value, not magnitude).
    sparsity: target overall sparsity in [0, 1); exactly
      ``round((1 - s) * N)`` weights are kept.
    distribution: ``"global"`` (one ranking over all prunable weights) or a layer
      density distribution (``"uniform"``, ``"er"``, ``"erk"``, a name -> density
      map) with a ranking inside each layer.
    candidates: optional mask tree; only its active positions may be kept
      (counts are still fractions of all prunable weights).

  Returns:
    A mask tree (bool on prunable leaves, ``None`` elsewhere).
  """
  s = _distributions.check_sparsity(sparsity)
  leaves, treedef = jax.tree.flatten(scores)
  names = [_masks.path_to_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(scores)[0]]
  if not leaves:
    raise ValueError("The score tree has no array; score at least one prunable leaf.")
  cands = ([None] * len(leaves) if candidates is None
           else _paths.flatten_up_to(treedef, candidates))
  # Behind a barrier: under a caller's jit every selection pass must read the same
  # keys (see _prune.same_bits).
  keys = _prune.same_bits([signed_score_keys(x, c) for x, c in zip(leaves, cands)])
  layers = [_masks.LayerInfo(n, tuple(x.shape), int(np.size(x))) for n, x in zip(names, leaves)]
  n_total = sum(l.size for l in layers)
  total = _distributions.active_count(s, n_total)
  if distribution == "global":
    chosen = _top_k_jit(keys, jnp.asarray([total], jnp.int32), (0,) * len(keys))
  else:
    dens = _distributions.layer_densities_for(layers, s, distribution)
    counts = _distributions.layer_counts(
        layers, dens, None if isinstance(distribution, Mapping) else total)
    chosen = _top_k_jit(keys, jnp.asarray(counts, jnp.int32), tuple(range(len(keys))))
  if candidates is not None:
    chosen = [m if c is None else m & c for m, c in zip(chosen, cands)]
  return jax.tree.unflatten(treedef, chosen)


def _mean_grad(loss_fn, params, batches):
  grads = [jax.grad(loss_fn)(params, b) for b in batches]
  return jax.tree.map(lambda *g: sum(g) / len(g), *grads)


def snip_scores(params: PyTree, loss_fn: LossFn, batches: Any, *,
                prunable: PyTree | None = None) -> PyTree:
  """SNIP connection sensitivity ``|w * dL/dw|`` (Lee et al., 2019).

  Example:
    >>> scores = snip_scores(params, lambda p, b: loss(model.apply(p, b["x"]), b["y"]), batch)

  Args:
    params: the params at initialisation.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    batches: one batch (any pytree, e.g. a dict or an ``(x, y)`` tuple, passed to
      ``loss_fn`` as it is) or several: a list or an iterator of batches (the
      gradient is their mean). A tuple is always one batch.
    prunable: bool pytree of the prunable leaves (default ``select_prunable``).

  Returns:
    Scores on prunable leaves, ``None`` elsewhere.
  """
  params = _masks.unwrap_variables(params)
  prunable = _prunable(params, None) if prunable is None else prunable
  g = _mean_grad(loss_fn, params, _as_batches(batches))
  return jax.tree.map(lambda w, gw, f: jnp.abs(w * gw) if f else None, params, g, prunable)


def grasp_scores(params: PyTree, loss_fn: LossFn, batches: Any, *,
                 prunable: PyTree | None = None) -> PyTree:
  """GraSP scores ``w * (H g)``; the LARGEST are kept (Wang et al., 2020).

  GraSP removes the weights whose removal least reduces the gradient norm, i.e.
  those with the largest ``-w * Hg``; we return the negation so every score in
  the module ranks the same way (keep the largest). ``g`` is the gradient on the
  prunable leaves only (as the authors' code uses weight gradients only) and
  ``H g`` is a Hessian-vector product (forward-over-reverse), never a dense
  Hessian. With several batches, ``g`` is the mean gradient and ``H g`` the mean
  of the batches' ``H_b g``. The authors' softmax temperature (T = 200) belongs
  in ``loss_fn``.

  Args:
    params: the params at initialisation.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    batches: one batch (any pytree, a dict or an ``(x, y)`` tuple, passed to
      ``loss_fn`` as it is), or a list or an iterator of batches.
    prunable: bool pytree of the prunable leaves (default ``select_prunable``).

  Returns:
    Signed scores on prunable leaves, ``None`` elsewhere.
  """
  params = _masks.unwrap_variables(params)
  prunable = _prunable(params, None) if prunable is None else prunable
  batches = _as_batches(batches)
  g = _mean_grad(loss_fn, params, batches)
  g = jax.tree.map(lambda x, f: x if f else jnp.zeros_like(x), g, prunable)
  hvps = [jax.jvp(lambda p, b=b: jax.grad(loss_fn)(p, b), (params,), (g,))[1]
          for b in batches]
  hg = jax.tree.map(lambda *h: sum(h) / len(h), *hvps)
  return jax.tree.map(lambda w, h, f: w * h if f else None, params, hg, prunable)


def synflow_scores(params: PyTree, apply_fn: Callable[[PyTree, jax.Array], jax.Array],
                   input_shape: Sequence[int], masks: PyTree | None = None, *,
                   prunable: PyTree | None = None) -> PyTree:
  """SynFlow scores ``|w| * dR/d|w|`` of the all-ones input (Tanaka et al., 2020).

  ``R = sum(apply_fn(|params| * masks, ones(input_shape)))``: data-free, so the
  score depends only on the params, the masks and the input's shape. It is
  computed in the dtype of the params (see ``synflow_masks`` for float64).

  Args:
    params: the params (every leaf is replaced by its absolute value; pruned
      positions by 0).
    apply_fn: ``apply_fn(params, x) -> outputs``, the model in eval mode (batch
      norm with its running statistics, no dropout).
    input_shape: shape of the input, e.g. ``(1, 28, 28, 1)``.
    masks: the current mask tree (all active if None).
    prunable: bool pytree of the prunable leaves (default from ``masks`` or
      ``select_prunable``).

  Returns:
    Non-negative scores on prunable leaves, ``None`` elsewhere.
  """
  params = _masks.unwrap_variables(params)
  if prunable is None:
    prunable = (_prunable(params, None) if masks is None else
                jax.tree.map(lambda p, m: m is not None, params, masks))
  if masks is None:
    masks = jax.tree.map(lambda p, f: jnp.ones(np.shape(p), bool) if f else None,
                         params, prunable)
  dtype = jax.tree.leaves(params)[0].dtype
  abs_params = _masks.apply_masks(jax.tree.map(jnp.abs, params), masks)
  x = jnp.ones(tuple(input_shape), dtype)
  r_grad = jax.grad(lambda p: jnp.sum(apply_fn(p, x)))(abs_params)
  return jax.tree.map(lambda w, g, f: w * g if f else None, abs_params, r_grad, prunable)


def snip_masks(params: PyTree, loss_fn: LossFn, batches: Any, sparsity: float, *,
               distribution: str | Mapping[str, float] = "global",
               **selector: Any) -> PyTree:
  """SNIP masks: keep the largest ``|w * dL/dw|`` on a batch (global by default).

  Example:
    >>> masks = snip_masks(params, loss_fn, (x, y), 0.9)  # loss_fn(params, (x, y))
    >>> masks = snip_masks(params, loss_fn, [batch1, batch2], 0.9)  # their mean
    >>> tx = sparse_jax.static(optax.sgd(0.1, momentum=0.9), initial_masks=masks)

  Args:
    params: the params at initialisation.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    batches: one batch, passed to ``loss_fn`` as it is (any pytree: a dict, an
      ``(x, y)`` tuple, an array), or several batches as a list or an iterator
      (the gradient is their mean). A tuple is always one batch; give one batch
      that is itself a list as ``[batch]``.
    sparsity: target overall sparsity in [0, 1).
    distribution: ``"global"`` or a per-layer density distribution.
    **selector: ``include``, ``exclude``, ``keep_first_dense``,
      ``keep_last_dense`` of ``select_prunable``.

  Returns:
    A mask tree.
  """
  params = _masks.unwrap_variables(params)
  scores = snip_scores(params, loss_fn, batches, prunable=_prunable(params, selector))
  return masks_from_scores(scores, sparsity, distribution=distribution)


def grasp_masks(params: PyTree, loss_fn: LossFn, batches: Any, sparsity: float, *,
                distribution: str | Mapping[str, float] = "global",
                **selector: Any) -> PyTree:
  """GraSP masks: prune the largest ``-w * Hg`` (keep the largest ``w * Hg``).

  Example:
    >>> masks = grasp_masks(params, loss_fn, batches, 0.9)

  Args: as ``snip_masks``.

  Returns:
    A mask tree.
  """
  params = _masks.unwrap_variables(params)
  scores = grasp_scores(params, loss_fn, batches, prunable=_prunable(params, selector))
  return masks_from_scores(scores, sparsity, distribution=distribution)


def synflow_masks(params: PyTree, apply_fn: Callable[[PyTree, jax.Array], jax.Array],
                  input_shape: Sequence[int], sparsity: float, *,
                  num_iterations: int = 100, precision: str = "float64",
                  distribution: str | Mapping[str, float] = "global",
                  **selector: Any) -> PyTree:
  """Iterative SynFlow masks (data-free).

  Round ``k = 1..n`` rescores the masked net and keeps the top
  ``density ** (k / n)`` fraction (exponentially increasing sparsity), so the
  last round reaches ``sparsity`` exactly.

  The score is a product over all layers of |w| sums, which overflows float32 on
  deep nets (VGG-19's R is ~1e30 at init and grows with width). ``precision``:

  - ``"float64"`` (default): params, input and scores in float64 (JAX's x64 mode
    is switched on for this computation only). The scores are divided by their
    maximum before ranking, which needs float32 keys.
  - ``"rescaled"``: float32, each prunable leaf's ``|w|`` divided by its
    active sum per output unit (``sum |w| / n_out``), so each layer passes an
    all-ones input at a gain near 1. With positive inputs and weights the net is linear
    in each layer's kernel, so if the biases are 0 (Flax's init; batch norm at
    init is a positive scaling) every score is scaled by the same factor and the
    ranking is exactly the float64 one; nonzero biases make it approximate.

  Example:
    >>> masks = synflow_masks(params, lambda p, x: model.apply({"params": p}, x),
    ...                       (1, 28, 28, 1), 0.98)

  Args:
    params: the params at initialisation.
    apply_fn: ``apply_fn(params, x) -> outputs`` in eval mode.
    input_shape: input shape (a batch of 1 is enough: the score is linear in it).
    sparsity: target overall sparsity in [0, 1).
    num_iterations: rounds of pruning (100 in the paper).
    precision: ``"float64"`` or ``"rescaled"``.
    distribution: ``"global"`` (the paper) or a per-layer density distribution.
    **selector: which leaves are prunable (``select_prunable``).

  Returns:
    A mask tree.
  """
  s = _distributions.check_sparsity(sparsity)
  if int(num_iterations) < 1:
    raise ValueError(f"num_iterations={num_iterations} must be >= 1 (100 in the paper).")
  if precision not in ("float64", "rescaled"):
    raise ValueError(f"Unknown precision {precision!r}; use 'float64' or 'rescaled'.")
  params = _masks.unwrap_variables(params)
  prunable = _prunable(params, selector)
  masks = jax.tree.map(lambda p, f: jnp.ones(np.shape(p), bool) if f else None,
                       params, prunable)

  def scores_fn(p, m):
    if precision == "rescaled":
      p = jax.tree.map(
          lambda w, mm: w if mm is None else
          jnp.abs(w) / jnp.maximum(jnp.sum(jnp.where(mm, jnp.abs(w), 0)) / w.shape[-1],
                                   1e-30), p, m)
    sc = synflow_scores(p, apply_fn, input_shape, m, prunable=prunable)
    top = jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(sc)]))
    return jax.tree.map(lambda x: (x / jnp.where(top > 0, top, 1)).astype(jnp.float32), sc)

  def run():
    p = params
    if precision == "float64":
      p = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
    score = jax.jit(scores_fn)
    m = masks
    for k in range(1, int(num_iterations) + 1):
      s_k = 1.0 - (1.0 - s) ** (k / int(num_iterations))
      m = masks_from_scores(score(p, m), s_k, distribution=distribution, candidates=m)
    return m

  if precision == "float64":
    with jax.enable_x64(True):
      return jax.tree.map(lambda m: jnp.asarray(np.asarray(m)), run())
  return run()


def random_pruning_masks(key: jax.Array, params: PyTree, sparsity: float, *,
                         distribution: str | Mapping[str, float] = "erk",
                         **selector: Any) -> PyTree:
  """Random masks with exact per-layer counts (the PaI reference baseline).

  The same masks ``sparse_jax.static(..., sparsity, distribution, seed)`` starts
  from when given the same key.

  Example:
    >>> masks = random_pruning_masks(jax.random.PRNGKey(0), params, 0.9)

  Args:
    key: a PRNG key.
    params: the params (shapes only).
    sparsity: target overall sparsity in [0, 1).
    distribution: ``"uniform"``, ``"er"``, ``"erk"`` or a name -> density map.
    **selector: which leaves are prunable (``select_prunable``).

  Returns:
    A mask tree.
  """
  s = _distributions.check_sparsity(sparsity)
  params = _masks.unwrap_variables(params)
  prunable = _prunable(params, selector)
  layers = _masks.prunable_layers(params, prunable)
  dens = _distributions.layer_densities_for(layers, s, distribution)
  total = None if isinstance(distribution, Mapping) else _distributions.active_count(
      s, sum(l.size for l in layers))
  counts = _distributions.layer_counts(layers, dens, total)
  return _distributions.random_masks(key, params, prunable, counts)
