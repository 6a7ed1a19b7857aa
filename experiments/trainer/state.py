"""The train state: its creation (or loading from an export), placement and read-back.

``create_train_state`` initialises a model's params and optimizer state;
``create_sharded_train_state`` does it as one compiled program, built in place on
a device mesh (``state_shardings``: replicated or fsdp). ``to_host`` and
``replicate`` move state between host and devices; ``abstract`` describes it
for ahead-of-time compiles.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import sparse_jax
from experiments.trainer import exports
from experiments import models
from experiments.trainer import sharding as sharding_lib

PyTree = Any
# Whether a state is sparse_jax.ste's (dense weights, masked forward); the trainer's
# other modules ask it here (experiments/trainer/steps.py).
is_straight_through = sparse_jax.is_straight_through


@flax.struct.dataclass
class TrainState:
  """Everything a training step updates (checkpointed as one pytree)."""
  step: jax.Array  # int32 [], optimizer steps completed
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2], dropout key (folded with the step)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config, num_classes: int):
  dtype = DTYPES[config.dtype]
  return models.get_model(config.model, num_classes, dtype=dtype, **config.model_kwargs)


def create_train_state(config, model, tx_fn, input_shape, rng,
                       input_dtype="float32") -> TrainState:
  """Initialises params (or loads ``config.init_from``) and the optimizer state.

  ``tx_fn(initial_masks)`` builds the optimizer; masks come from ``init_from``
  when it holds masks. The model is initialised on zeros of ``input_shape`` and
  ``input_dtype`` (the data set's: ``"int32"`` for token ids).
  """
  init_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "dropout": init_rng},
                         jnp.zeros((1, *input_shape), input_dtype), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  initial_masks = None
  if config.init_from:
    exported = exports.load_exported(config.init_from)
    params = exports.fill_from_export(params, exported, "params")
    if batch_stats:
      batch_stats = exports.fill_from_export(batch_stats, exported, "batch_stats")
    if any(k.startswith("masks/") for k in exported):
      names = sparse_jax.leaf_names(params)
      initial_masks = jax.tree.unflatten(
          jax.tree.structure(params),
          [jnp.asarray(exported[f"masks/{n}"]) if f"masks/{n}" in exported else None
           for n in names])
  tx = tx_fn(initial_masks)
  opt_state = tx.init(params)
  if config.sparsity.method != "dense" and not is_straight_through(opt_state):
    params = sparse_jax.sparsify_params(params, opt_state)  # ste keeps dense weights
    if config.get("init_scaling", "dense_fan_in") == "active_fan_in":
      params = scale_by_active_fan_in(params, sparse_jax.get_masks(opt_state))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=opt_state, rng=dropout_rng)




PARAM_SHARDINGS = ("replicated", "fsdp")


def state_shardings(state: TrainState, mesh, param_sharding: str = "replicated",
                    layer_axes=None):
  """The ``NamedSharding`` of every leaf of ``state`` (arrays or abstract) on ``mesh``.

  ``"replicated"``: a full copy on every device. ``"fsdp"``: params, batch stats and
  the optimizer state (sparse_jax masks, momentum, ...) split with
  ``experiments.trainer.sharding.fsdp_shardings`` over the mesh axis ``"data"``; the step
  and the dropout key stay replicated. On a ``("data", "model")`` mesh the attention
  and MLP kernels, and their masks and moments, are also split over ``"model"``
  (``sharding.mesh_shardings``; ``layer_axes``: the leading layer axes never split).
  """
  repl = NamedSharding(mesh, P())
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"Unknown param_sharding {param_sharding!r}; use one of "
                     f"{PARAM_SHARDINGS}.")
  if "model" in mesh.shape:
    shard = lambda tree: sharding_lib.mesh_shardings(
        tree, mesh, state.params, fsdp=param_sharding == "fsdp", layer_axes=layer_axes)
    return TrainState(step=repl, params=shard(state.params),
                      batch_stats=shard(state.batch_stats),
                      opt_state=shard(state.opt_state), rng=repl)
  if param_sharding == "replicated":
    return jax.tree.map(lambda _: repl, state)
  return TrainState(step=repl, params=sharding_lib.fsdp_shardings(state.params, mesh),
                    batch_stats=sharding_lib.fsdp_shardings(state.batch_stats, mesh),
                    opt_state=sharding_lib.fsdp_shardings(state.opt_state, mesh), rng=repl)


def create_sharded_train_state(config, model, tx_fn, input_shape, rng, mesh=None,
                               param_sharding: str = "replicated",
                               input_dtype="float32") -> TrainState:
  """``create_train_state`` as one compiled program, built in ``state_shardings``.

  Compiled, the init is one program instead of dozens of op-by-op ones, and on a
  mesh each device builds only its shards (no full copy per device; fsdp traces
  the init once more for its shapes). ``mesh=None`` builds on the default device.
  An init that needs host values (SynFlow scoring in float64) runs op by op and
  is then placed.
  """
  # The key is an argument, not a program constant (the sparse methods' own seeds
  # still are: sparse_jax builds them into the optimizer).
  def init(key):
    return create_train_state(config, model, tx_fn, input_shape, key, input_dtype)
  layer_axes = config.sparsity.get("layer_axes")
  place = lambda state: state if mesh is None else jax.device_put(
      state, state_shardings(state, mesh, param_sharding, layer_axes))
  if config.init_from and param_sharding == "replicated":
    return place(init(rng))  # compiled, the exported arrays would be program constants
  try:
    if mesh is None:
      out_shardings = None
    elif param_sharding == "replicated" and "model" not in mesh.shape:
      out_shardings = NamedSharding(mesh, P())
    else:
      out_shardings = state_shardings(jax.eval_shape(init, rng), mesh, param_sharding,
                                      layer_axes)
    return jax.jit(init, out_shardings=out_shardings)(rng)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
    return place(init(rng))


def to_host(tree):
  """numpy copies of ``tree``'s leaves, the same on every process.

  A leaf sharded over devices of several processes (``param_sharding="fsdp"`` on a
  multi-host mesh) is gathered with ``process_allgather``: every process must call
  this with the same tree. Other leaves are read with ``jax.device_get``.
  """
  def get(x):
    if (isinstance(x, jax.Array) and not x.is_fully_addressable
        and not x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(get, tree)


def replicate(tree, devices):
  """One copy of every leaf per device, stacked on a leading axis (for pmap)."""
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("replica",)), P("replica"))
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))),
                               sharding), tree)


def abstract(tree):
  """``ShapeDtypeStruct``s (with shardings) of ``tree``'s arrays.

  Lowering from these needs no live buffers, so a program compiles in the
  background while the buffers it was shaped on are donated to another.
  """
  def leaf(x):
    sharding = x.sharding if isinstance(x, jax.Array) else None
    weak = x.aval.weak_type if isinstance(x, jax.Array) else False
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding, weak_type=weak)
  return jax.tree.map(leaf, tree)


def scale_by_active_fan_in(params, masks):
  """Each unit's initial weights scaled from its dense to its active fan-in.

  A unit (the last axis of a kernel: an output feature or channel) with ``k`` of
  its ``n`` incoming weights active (``n`` = the product of the other axes) is
  multiplied by ``sqrt(n / k)``, so a ``U(+-1/sqrt(n))`` init becomes
  ``U(+-1/sqrt(k))``: the variance the unit would have as a dense unit of fan-in
  ``k``. Units without an active weight, leaves without a mask (``None``: biases,
  norms) and dense runs (``masks=None``) are unchanged.

  Example:
    >>> params = scale_by_active_fan_in(params, sparse_jax.get_masks(opt_state))

  Args:
    params: a pytree of arrays.
    masks: the same tree with bool masks, ``None`` leaves for unmasked ones; or None.

  Returns:
    The scaled params (same structure and dtypes).
  """
  if masks is None:
    return params

  def scale(mask, p):
    if mask is None or jnp.ndim(p) < 2:
      return p
    fan_in = math.prod(p.shape[:-1])
    active = jnp.sum(mask, axis=tuple(range(p.ndim - 1)), dtype=jnp.float32)  # [units]
    factor = jnp.where(active > 0, jnp.sqrt(fan_in / jnp.maximum(active, 1.0)), 1.0)
    return p * factor.astype(p.dtype)

  return jax.tree.map(scale, masks, params, is_leaf=lambda x: x is None)
