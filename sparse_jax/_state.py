"""The states of the sparse_jax transformations, and reading them.

``SparseState`` is the state of every method of ``_methods`` (the wrapper of
``_transform``), ``StraightThroughState`` that of ``ste``. The readers find either
inside any optimizer state (chains, ``MultiSteps``, ``apply_if_finite``, a Flax
``nnx.Optimizer``) and return bool masks whatever the storage.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_jax import _masks
from sparse_jax import _placement

PyTree = Any


class SparseState(NamedTuple):
  """State of a sparse-training wrapper."""
  # The field shadows tuple.count, as optax's states' do (a public name, kept).
  count: jax.Array  # type: ignore[assignment]  # int32 [], optimizer updates completed
  # bool arrays on prunable leaves (PackedMask with packed_masks=True), None on
  # dense leaves; get_masks / get_sparse_state always return bool masks.
  masks: PyTree
  rng: jax.Array  # uint32 [2], raw PRNG key (checkpointable as a plain array)
  inner_state: optax.OptState
  # Momentum of the dense gradient on prunable leaves, kept only for
  # growth="momentum" (None otherwise): the inner optimizer only sees masked
  # gradients, so its own momentum is zero wherever a weight could grow.
  grad_momentum: PyTree = None
  # Union of every mask so far (ITOP, docs/algorithms.md §9), kept only with
  # track_union=True (None otherwise); updated inside the event branch, so ordinary
  # steps only carry it.
  union: PyTree = None
  # Mask-update events skipped because the caller passed mask_update=False on an
  # event step (int32 []; should stay 0).
  skipped_events: jax.Array | None = None
  # The weights grown at the last event and that event's update count, kept only
  # with regrowth_warmup > 0 (None otherwise): their updates are scaled up from 0.
  regrown: "Regrown | None" = None


class Regrown(NamedTuple):
  """The weights whose learning rate is warming up after they regrew."""
  masks: PyTree  # stored like SparseState.masks (bool or PackedMask), None on dense leaves
  at: jax.Array  # int32 [], the update count of the event that grew them


class StraightThroughState(NamedTuple):
  """State of ``ste``: the masks of the forward pass and the inner optimizer's state."""
  # The field shadows tuple.count, as optax's states' do (a public name, kept).
  count: jax.Array  # type: ignore[assignment]  # int32 [], optimizer updates completed
  masks: PyTree  # bool on prunable leaves, None elsewhere
  inner_state: optax.OptState


def _find_sparse_states(opt_state) -> list[SparseState]:
  if hasattr(opt_state, "opt_state") and not isinstance(opt_state, SparseState):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
  return [x for x in leaves if isinstance(x, SparseState)]


def _find_straight_through_states(opt_state) -> list[StraightThroughState]:
  if hasattr(opt_state, "opt_state") and not isinstance(opt_state, tuple):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  is_state = lambda x: isinstance(x, StraightThroughState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def get_sparse_state(opt_state: optax.OptState) -> SparseState:
  """The ``SparseState`` inside any optimizer state (chains, MultiSteps, NNX).

  Flax NNX optimizer variables are unwrapped to plain arrays, and packed masks
  (``packed_masks=True``) and union are unpacked to bool arrays.
  """
  found = _find_sparse_states(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one sparse_jax wrapper state in the optimizer state, found "
        f"{len(found)}. Build the optimizer with a sparse_jax method (e.g. "
        "sparse_jax.granet(...)).")
  state = _masks.unwrap_variables(found[0])
  return state._replace(masks=_masks.unpack_masks(state.masks),
                        union=_masks.unpack_masks(state.union))


def is_straight_through(opt_state: optax.OptState) -> bool:
  """Whether ``opt_state`` holds a ``sparse_jax.ste`` state (dense weights, masked forward).

  Example:
    >>> if not sparse_jax.is_straight_through(opt_state):   # ste keeps dense weights
    ...   params = sparse_jax.sparsify_params(params, opt_state)
  """
  return bool(_find_straight_through_states(opt_state))


def get_straight_through_state(opt_state: optax.OptState) -> StraightThroughState:
  """The ``StraightThroughState`` inside any optimizer state (chains, NNX).

  Example:
    >>> masks = sparse_jax.get_straight_through_state(opt_state).masks
  """
  found = _find_straight_through_states(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one sparse_jax.ste state in the optimizer state, found "
        f"{len(found)}. Build the optimizer with sparse_jax.ste(...).")
  return _masks.unwrap_variables(found[0])


def get_masks(opt_state: optax.OptState) -> PyTree:
  """The current (bool) mask tree of an optimizer state built by any sparse_jax method.

  ``sparse_jax.ste``'s state included (its masks of the dense weights).

  Example:
    >>> masks = sparse_jax.get_masks(opt_state)   # also an nnx.Optimizer
    >>> sparse_jax.density(masks)
  """
  if is_straight_through(opt_state):
    return get_straight_through_state(opt_state).masks
  return get_sparse_state(opt_state).masks


def _flax_nnx():
  # Only via sys.modules: importing flax.nnx costs seconds, and a tree can hold NNX
  # objects only once the caller has imported it; linen-only users pay nothing.
  return sys.modules.get("flax.nnx")


def _named_leaves(tree: PyTree) -> dict[str, Any]:
  # None leaves too: the mask of a dense leaf is None.
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {_masks.path_to_name(path): x for path, x in leaves}


def _mismatch(values: PyTree, masks: PyTree) -> str | None:
  """How the leaves of ``values`` differ from those of ``masks``; None if they match."""
  is_none = lambda x: x is None
  # Any: jaxlib ships no type stub for PyTreeDef (see _paths.flatten_up_to).
  treedef: Any
  mask_treedef: Any
  value_leaves, treedef = jax.tree.flatten(values, is_leaf=is_none)
  mask_leaves, mask_treedef = jax.tree.flatten(masks, is_leaf=is_none)
  if treedef == mask_treedef and all(m is None or np.shape(v) == np.shape(m)
                                     for v, m in zip(value_leaves, mask_leaves)):
    return None
  # Only on the way to an error: the names of what differs.
  got, want = _named_leaves(values), _named_leaves(masks)
  if got.keys() != want.keys():
    extra = [n for n in got if n not in want][:3]
    missing = [n for n in want if n not in got][:3]
    return (f"{len(got)} leaves for {len(want)} masks; not in the masks: {extra}, "
            f"missing: {missing}")
  shapes = [f"{n} {np.shape(got[n])} for a mask {np.shape(m)}" for n, m in want.items()
            if m is not None and np.shape(got[n]) != np.shape(m)]
  return ", ".join(shapes[:3]) or "the same names in other containers (e.g. FrozenDict for dict)"


def _masked_like(params: PyTree, values: PyTree, masks: PyTree, caller: str) -> PyTree:
  """``apply_masks(values, masks)`` in the structure of ``params``.

  NNX ``Variable`` leaves (an ``nnx.State`` of ``nnx.Param``) are pytree nodes with
  one child while the masks hold plain arrays; the masks are applied to the raw
  values and the result is rebuilt with the params' own wrappers and metadata.

  Raises:
    ValueError: in one line, naming what was passed and what to pass, if the
      leaves of ``values`` are not those of ``masks``.
  """
  values = _masks.unwrap_variables(values)
  mismatch = _mismatch(values, masks)
  if mismatch is not None:
    raise ValueError(
        f"{caller} got a {type(params).__name__} whose leaves do not match the masks "
        f"({mismatch}); pass the params you gave tx.init (for NNX: nnx.state(model, "
        "nnx.Param), the wrt of nnx.Optimizer; sparsify_params also takes the model).")
  masked = _masks.apply_masks(values, masks)
  return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(masked))


def sparsify_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """Applies the optimizer state's masks to freshly initialised params, once.

  Takes the params given to ``tx.init`` (a linen dict, an ``nnx.State``, any
  pytree) or, with Flax NNX, the model itself: the model's ``wrt`` variables
  (those of the ``nnx.Optimizer``, else ``nnx.Param``) are masked in place with
  ``nnx.update`` and the model is returned. ``opt_state`` may be an
  ``nnx.Optimizer``.

  Example:
    >>> opt_state = tx.init(params)
    >>> params = sparse_jax.sparsify_params(params, opt_state)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # or with NNX
    >>> sparse_jax.sparsify_params(model, optimizer)

  Args:
    params: the params given to ``tx.init``, in any pytree (``nnx.State``
      included), or an ``nnx.Module``.
    opt_state: the optimizer state of a sparse_jax method (alone or inside a
      chain, ``MultiSteps``, ...), or an ``nnx.Optimizer``.

  Returns:
    ``params`` with zeros where the masks are False, in the same structure; an
    ``nnx.Module`` is updated in place and returned.

  Raises:
    ValueError: if the leaves of ``params`` are not those of the masks.
  """
  masks = get_masks(opt_state)
  nnx = _flax_nnx()
  if nnx is not None and isinstance(params, nnx.Module):
    state = nnx.state(params, getattr(opt_state, "wrt", nnx.Param))
    nnx.update(params, _masked_like(state, state, masks, "sparsify_params"))
    return params
  return _masked_like(params, params, masks, "sparsify_params")


def apply_updates(params: PyTree, updates: PyTree, opt_state: optax.OptState) -> PyTree:
  """``optax.apply_updates`` that stores every masked weight as exactly 0.

  ``where(mask, p + u, 0)`` on prunable leaves and ``p + u`` elsewhere, with the
  masks of ``opt_state``, the state ``tx.update`` returned with ``updates``. On
  finite values it gives the same bits as ``optax.apply_updates``; unlike it, it
  also zeroes masked weights that are NaN or infinite (see "Non-finite values" in
  the docstring of ``sparse_jax._transform``). Under jit the add and the ``where``
  fuse into one pass per leaf. An ``nnx.State`` of ``nnx.Param`` comes back as one.

  Example:
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = sparse_jax.apply_updates(params, updates, opt_state)

  Args:
    params: the params ``updates`` were computed for.
    updates: the updates of a sparse_jax transformation (alone or inside a chain,
      ``MultiSteps``, ``apply_if_finite``, ...).
    opt_state: the optimizer state returned with ``updates``.

  Returns:
    The new params, exactly masked, in the structure of ``params``.
  """
  new_values = optax.apply_updates(_masks.unwrap_variables(params),
                                   _masks.unwrap_variables(updates))
  return _masked_like(params, new_values, get_masks(opt_state), "apply_updates")


def mask_inner_state(inner: optax.GradientTransformation, inner_state: optax.OptState,
                     masks: PyTree) -> optax.OptState:
  """``inner_state`` with every per-parameter entry zeroed where ``masks`` is False.

  The moments and traces of ``inner`` (momentum, Adam's ``mu`` and ``nu``, ...)
  that have a parameter's shape become ``where(mask, s, 0)``, so a weight that is
  pruned, or regrown at 0, restarts with no optimizer history. Entries of dense
  leaves (mask ``None``), entries whose shape is not the parameter's (factored or
  scalar statistics) and non-parameter entries (step counts) are kept as they are.
  The wrapper does this at every mask-update event; use it after changing the
  masks of a ``SparseState`` by hand.

  Example:
    >>> sparse = sparse_jax.get_sparse_state(opt_state)
    >>> inner_state = sparse_jax.mask_inner_state(inner, sparse.inner_state, masks)
    >>> opt_state = sparse._replace(masks=masks, inner_state=inner_state)

  Args:
    inner: the inner optimizer ``inner_state`` belongs to (what the sparse_jax
      method wraps).
    inner_state: its state (``SparseState.inner_state``).
    masks: a mask tree like the params: bool arrays (or ``PackedMask``) on
      prunable leaves, ``None`` on dense ones.

  Returns:
    ``inner_state`` with the same structure.
  """
  return optax.tree_map_params(
      inner, lambda s, m: s if (m is None or getattr(s, "shape", None) != m.shape)
      else jnp.where(_placement.shard_like(m, s), s, jnp.zeros_like(s)),
      inner_state, _masks.unpack_masks(masks), transform_non_params=lambda x: x)
