"""The trainer: data-parallel sparse training of a Flax model from a config.

Small top-level functions in the style of the Flax examples:
``create_optimizer``, ``create_sparse_tx``, ``create_train_state``,
``train_step``, ``eval_step`` and ``train_and_evaluate``. JAX transforms are
applied where the functions are used: ``jax.jit`` over a device mesh (default)
or ``jax.pmap`` (``config.parallelism = "pmap"``).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import functools
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import sparse_jax
from experiments import baselines
from experiments import compilation_cache
from experiments import flops as run_flops_lib
from experiments import input_pipeline
from experiments import mask_history
from experiments import models
from experiments import sharding as sharding_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a training step updates (checkpointed as one pytree)."""
  step: jax.Array  # int32 [], optimizer steps completed
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2], dropout key (folded with the step)


# ----------------------------------------------------------------------------
# Optimizer and sparse method.
# ----------------------------------------------------------------------------


def num_train_steps(config, steps_per_epoch: int) -> int:
  """``config.num_train_steps`` if set, else ``num_epochs * steps_per_epoch``."""
  if config.get("num_train_steps") is not None:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


LR_SCHEDULES = ("multistep", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Multi-step, cosine or constant learning rate, with optional linear warm-up."""
  total = num_train_steps(config, steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  base = config.learning_rate
  if config.lr_schedule == "multistep":
    boundaries = {int(round(m * total)): config.lr_decay_factor for m in config.lr_milestones}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(base, max(total - warmup, 1))
  elif config.lr_schedule == "constant":
    main = optax.constant_schedule(base)
  else:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; use one of "
                     f"{LR_SCHEDULES}.")
  if warmup == 0:
    return main
  if config.lr_schedule == "multistep":
    # Milestones count from the start of training, warm-up included.
    return lambda step: jnp.where(step < warmup, base * step / warmup, main(step))
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def _decay_mask(params):
  """True on the leaves that get weight decay: every leaf with ndim >= 2."""
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The inner (dense) optimizer from the config."""
  lr = learning_rate_schedule(config, steps_per_epoch)
  wd = config.weight_decay
  mask = None if config.weight_decay_on_norm_and_bias else _decay_mask
  name = config.optimizer
  if name == "sgd":
    # Coupled L2 as in PyTorch's SGD(weight_decay=...), which the GraNet code uses.
    return optax.chain(optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
                       optax.sgd(lr, momentum=config.momentum or None,
                                 nesterov=config.nesterov))
  if name == "adamw":
    return optax.adamw(lr, weight_decay=wd, mask=mask)
  if name in ("adam", "rmsprop", "adagrad"):
    opt = {"adam": optax.adam, "rmsprop": optax.rmsprop, "adagrad": optax.adagrad}[name](lr)
    return optax.chain(optax.add_decayed_weights(wd, mask) if wd else optax.identity(), opt)
  raise ValueError(f"Unknown optimizer {name!r}; use one of {OPTIMIZERS}.")


def create_sparse_tx(config, inner: optax.GradientTransformation, steps_per_epoch: int,
                     initial_masks=None) -> optax.GradientTransformation:
  """Wraps ``inner`` in the sparse method named by ``config.sparsity.method``."""
  sp = config.sparsity
  method = sp.method
  if method == "dense":
    return inner
  if method in baselines.PRUNING_AT_INIT:
    method = "static"  # on the scored masks (baselines.pruning_at_init_tx_fn)
  if method not in sparse_jax.METHODS:
    raise ValueError(f"Unknown sparse method {method!r}; use dense or one of "
                     f"{sorted([*sparse_jax.METHODS, *baselines.PRUNING_AT_INIT])} (imp "
                     "runs through experiments.main or experiments.imp.run_imp).")
  total = num_train_steps(config, steps_per_epoch)
  epoch = lambda e: int(round(e * steps_per_epoch))
  selector = dict(include=sp.include, exclude=sp.exclude,
                  keep_first_dense=sp.keep_first_dense, keep_last_dense=sp.keep_last_dense,
                  initial_masks=initial_masks,
                  # The union of all masks (ITOP) for the mask history, kept on the device.
                  track_union=bool(config.get("record_mask_history", False)),
                  packed_masks=bool(sp.get("packed_masks", False)))
  if method == "granet":
    return sparse_jax.granet(
        inner, sparsity=sp.final, total_steps=total, end_step=epoch(sp.end_epoch),
        update_every=sp.update_every, initial_sparsity=sp.initial,
        start_step=epoch(sp.start_epoch), distribution=sp.distribution,
        regrowth_rate=sp.regrowth_rate, min_regrowth_rate=sp.min_regrowth_rate,
        growth=sp.growth, scope=sp.scope, seed=config.seed, sampling=sp.sampling,
        **selector)
  if method == "gmp":
    return sparse_jax.gmp(
        inner, sparsity=sp.final, end_step=epoch(sp.end_epoch),
        update_every=sp.update_every, start_step=epoch(sp.start_epoch), scope=sp.scope,
        **selector)
  if method == "one_shot":
    return sparse_jax.one_shot(inner, sparsity=sp.final, prune_step=epoch(sp.end_epoch),
                               scope=sp.scope, **selector)
  mask_end = None if sp.mask_end_epoch is None else epoch(sp.mask_end_epoch)
  if method == "rigl":
    return sparse_jax.rigl(
        inner, sparsity=sp.final, total_steps=total, update_every=sp.update_every,
        end_step=mask_end, start_step=epoch(sp.start_epoch),
        distribution=sp.distribution, regrowth_rate=sp.regrowth_rate, growth=sp.growth,
        seed=config.seed, sampling=sp.sampling, **selector)
  if method == "set":
    return sparse_jax.set(
        inner, sparsity=sp.final, total_steps=total, update_every=sp.update_every,
        end_step=mask_end, start_step=epoch(sp.start_epoch),
        distribution=sp.distribution, regrowth_rate=sp.regrowth_rate, seed=config.seed,
        sampling=sp.sampling, **selector)
  return sparse_jax.static(inner, sparsity=sp.final, distribution=sp.distribution,
                           seed=config.seed, sampling=sp.sampling, **selector)


def mask_update_steps(config, steps_per_epoch: int) -> set[int]:
  """The 1-based steps after which the method may update its masks (host side)."""
  sp = config.sparsity
  total = num_train_steps(config, steps_per_epoch)
  if sp.method in ("dense", "static", *baselines.PRUNING_AT_INIT):
    return set()
  if sp.method == "one_shot":
    return {int(round(sp.end_epoch * steps_per_epoch))}
  start = int(round(sp.start_epoch * steps_per_epoch))
  if sp.method == "gmp":
    end = int(round(sp.end_epoch * steps_per_epoch))
  elif sp.method == "granet":
    end = total - 1
  elif sp.mask_end_epoch is not None:
    end = int(round(sp.mask_end_epoch * steps_per_epoch))
  else:
    end = int(0.75 * total) if sp.method == "rigl" else total - 1
  return {t for t in range(sp.update_every, end + 1, sp.update_every) if t >= start}


# ----------------------------------------------------------------------------
# State, steps.
# ----------------------------------------------------------------------------


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config, num_classes: int):
  dtype = DTYPES[config.dtype]
  return models.get_model(config.model, num_classes, dtype=dtype, **config.model_kwargs)


def load_exported(path: str) -> dict[str, np.ndarray]:
  """Reads an ``export.npz`` written by ``export_model`` (or its directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "export.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from={path!r} does not exist; point it at the "
                            "export.npz (or its directory) of an earlier run.")
  with np.load(path) as f:
    return dict(f)


def _fill_from_export(tree, exported: dict[str, np.ndarray], prefix: str):
  names = sparse_jax.leaf_names(tree)
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for name, leaf in zip(names, leaves):
    key = f"{prefix}/{name}"
    if key not in exported:
      raise ValueError(f"init_from has no {key!r}; the checkpoint does not match the model "
                       f"{tuple(n for n in exported if n.startswith(prefix))[:5]}...")
    value = exported[key]
    if value.shape != np.shape(leaf):
      raise ValueError(f"init_from: {key!r} has shape {value.shape}, the model "
                       f"{np.shape(leaf)}.")
    out.append(jnp.asarray(value, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def create_train_state(config, model, tx_fn, input_shape, rng) -> TrainState:
  """Initialises params (or loads ``config.init_from``) and the optimizer state.

  ``tx_fn(initial_masks)`` builds the optimizer; masks come from ``init_from``
  when it holds masks.
  """
  init_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "dropout": init_rng},
                         jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  initial_masks = None
  if config.init_from:
    exported = load_exported(config.init_from)
    params = _fill_from_export(params, exported, "params")
    if batch_stats:
      batch_stats = _fill_from_export(batch_stats, exported, "batch_stats")
    if any(k.startswith("masks/") for k in exported):
      names = sparse_jax.leaf_names(params)
      initial_masks = jax.tree.unflatten(
          jax.tree.structure(params),
          [jnp.asarray(exported[f"masks/{n}"]) if f"masks/{n}" in exported else None
           for n in names])
  tx = tx_fn(initial_masks)
  opt_state = tx.init(params)
  if config.sparsity.method != "dense":
    params = sparse_jax.sparsify_params(params, opt_state)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=opt_state, rng=dropout_rng)


PARAM_SHARDINGS = ("replicated", "fsdp")


def state_shardings(state: TrainState, mesh, param_sharding: str = "replicated"):
  """The ``NamedSharding`` of every leaf of ``state`` (arrays or abstract) on ``mesh``.

  ``"replicated"``: a full copy on every device. ``"fsdp"``: params, batch stats and
  the optimizer state (sparse_jax masks, momentum, ...) split with
  ``experiments.sharding.fsdp_shardings`` over the mesh axis ``"data"``; the step
  and the dropout key stay replicated.
  """
  repl = NamedSharding(mesh, P())
  if param_sharding == "replicated":
    return jax.tree.map(lambda _: repl, state)
  if param_sharding != "fsdp":
    raise ValueError(f"Unknown param_sharding {param_sharding!r}; use one of "
                     f"{PARAM_SHARDINGS}.")
  return TrainState(step=repl, params=sharding_lib.fsdp_shardings(state.params, mesh),
                    batch_stats=sharding_lib.fsdp_shardings(state.batch_stats, mesh),
                    opt_state=sharding_lib.fsdp_shardings(state.opt_state, mesh), rng=repl)


def create_sharded_train_state(config, model, tx_fn, input_shape, rng, mesh=None,
                               param_sharding: str = "replicated") -> TrainState:
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
    return create_train_state(config, model, tx_fn, input_shape, key)
  place = lambda state: state if mesh is None else jax.device_put(
      state, state_shardings(state, mesh, param_sharding))
  if config.init_from and param_sharding == "replicated":
    return place(init(rng))  # compiled, the exported arrays would be program constants
  try:
    if mesh is None:
      out_shardings = None
    elif param_sharding == "replicated":
      out_shardings = NamedSharding(mesh, P())
    else:
      out_shardings = state_shardings(jax.eval_shape(init, rng), mesh, param_sharding)
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


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float):
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def apply_train_mode(model, params, batch_stats, images, dropout_rng):
  """Logits in training mode and the updated batch statistics (if the model has any)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return model.apply(variables, images, train=True,
                     mutable=["batch_stats"] if batch_stats else [],
                     rngs={"dropout": dropout_rng})


def train_step(state: TrainState, batch, *, model, tx, config, num_classes: int,
               axis_name: str | None = None, mask_update: bool | None = None):
  """One optimizer step. ``axis_name`` is the pmap axis to average gradients over.

  ``mask_update`` (static) is passed to a sparse_jax optimizer: False compiles the
  step without the mask-update branch, True with it unconditionally, None lets the
  optimizer decide in the graph (see sparse_jax/_transform.py).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, new_vars = apply_train_mode(model, params, state.batch_stats, batch["image"],
                                        dropout_rng)
    loss = cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (new_vars.get("batch_stats", state.batch_stats), acc)

  (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss, acc = jax.lax.pmean((loss, acc), axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  extra = {} if mask_update is None else {"mask_update": mask_update}
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, {"train_loss": loss, "train_accuracy": acc}


def train_steps(state: TrainState, batches, num_steps=None, *, max_steps=None, **kwargs):
  """Train steps in one dispatch: the first ``num_steps`` of ``max_steps``.

  One compiled program serves every dispatch length: a ``lax.while_loop`` runs
  exactly ``num_steps`` (traced) steps, so a short dispatch costs only its steps
  and leaves nothing past them to undo (state, optimizer count, rng).

  Args:
    state: the train state.
    batches: stacked batches [max_steps, ...], or ``fn(i)`` returning the batch of
      the dispatch's ``i``-th step (traced ``i``; e.g. gathered from device data).
    num_steps: int32 [], the steps to run (at most ``max_steps``); None: all.
    max_steps: the length of the metric buffers; defaults to the batches' length.
    **kwargs: passed to ``train_step``.

  Returns:
    The new state and ``train_loss``/``train_accuracy`` [max_steps], zeros past
    ``num_steps``.
  """
  if not callable(batches):
    max_steps = max_steps or jax.tree.leaves(batches)[0].shape[0]
    stacked, batches = batches, lambda i: jax.tree.map(lambda x: x[i], stacked)
  step = lambda s, i: train_step(s, batches(i), **kwargs)
  shapes = jax.eval_shape(step, state, 0)[1]
  buffers = jax.tree.map(lambda x: jnp.zeros((max_steps, *x.shape), x.dtype), shapes)

  def body(carry):
    i, state, buffers = carry
    state, metrics = step(state, i)
    return i + 1, state, jax.tree.map(lambda b, m: b.at[i].set(m), buffers, metrics)

  num_steps = max_steps if num_steps is None else num_steps
  _, state, buffers = jax.lax.while_loop(lambda carry: carry[0] < num_steps, body,
                                         (jnp.int32(0), state, buffers))
  return state, buffers


def dispatch_steps(state: TrainState, data, num_steps, *, max_steps: int, lr_fn,
                   sparse: bool, batch_sharding=None, **kwargs):
  """The trainer's dispatch: ``train_steps`` on ``data``, then ``state_readouts``.

  ``data`` is ``(images, labels, idx)`` (a training set on the device and the
  example indices [max_steps, batch] of each step, gathered step by step) or
  stacked batches [max_steps, ...]. ``batch_sharding`` constrains each step's
  batch on a mesh.
  """
  if isinstance(data, tuple):
    images, labels, idx = data
    batches = lambda i: {"image": images[idx[i]], "label": labels[idx[i]]}
  else:
    batches = lambda i: jax.tree.map(lambda x: x[i], data)
  if batch_sharding is not None:
    unconstrained = batches
    batches = lambda i: jax.lax.with_sharding_constraint(unconstrained(i), batch_sharding)
  state, metrics = train_steps(state, batches, num_steps, max_steps=max_steps, **kwargs)
  return state, {**metrics, **state_readouts(state, lr_fn, sparse)}


def state_readouts(state: TrainState, lr_fn, sparse: bool) -> dict:
  """What the host logs of the state after a dispatch, computed inside it.

  The learning rate of the last step and, for sparse runs, the masks' density
  and layer densities: no separate program, no op-by-op dispatch per log line.
  """
  out = {"learning_rate": lr_fn(state.step - 1)}
  if sparse:
    masks = sparse_jax.get_masks(state.opt_state)
    out.update(density=sparse_jax.density(masks),
               layer_density=sparse_jax.layer_densities(masks))
  return out


def eval_step(state: TrainState, batch, *, model, num_classes: int,
              axis_name: str | None = None):
  """Summed loss, correct count and example count of a (padded) batch."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
  out = {"loss": jnp.sum(loss * mask),
         "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
         "count": jnp.sum(mask)}
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def gradient_flow_step(state: TrainState, batch, *, model, config, num_classes: int):
  """The gradient-flow measures (SPEC §8) of the training loss on one fixed batch.

  The loss is the training-mode loss (batch statistics, a fixed dropout key);
  running statistics are not updated. Dense runs measure every kernel as a layer.
  """
  masks = (sparse_jax.get_masks(state.opt_state) if config.sparsity.method != "dense"
           else None)

  def loss_fn(params):
    logits, _ = apply_train_mode(model, params, state.batch_stats, batch["image"], state.rng)
    return cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()

  return sparse_jax.gradient_flow_measures(loss_fn, state.params, masks)


def gradient_flow_record(measures) -> dict:
  """The measures as a metrics.jsonl record (host floats; ``loss`` -> ``gf_loss``)."""
  measures = jax.device_get(measures)
  out = {("gf_loss" if k == "loss" else k): float(v) for k, v in measures.items()
         if k != "egf_p2_layers"}
  out["egf_p2_layers"] = {k: float(v) for k, v in measures["egf_p2_layers"].items()}
  return out


def replicate(tree, devices):
  """One copy of every leaf per device, stacked on a leading axis (for pmap)."""
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("replica",)), P("replica"))
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))),
                               sharding), tree)


# ----------------------------------------------------------------------------
# Data feeding.
# ----------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training examples in ``epoch`` (the same on every host)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


class DeviceData:
  """A small training set kept on the devices; batches are gathered there.

  Only indices cross from host to device each dispatch, so the trainer does not
  wait on host-side input work (measured on LeNet-300-100, where a step is ~2 ms).
  """

  def __init__(self, arrays, sharding, seed: int, batch_size: int):
    self.images = jax.device_put(arrays["image"], sharding)
    self.labels = jax.device_put(arrays["label"].astype(np.int32), sharding)
    self.n = len(arrays["label"])
    self.seed, self.batch_size = seed, batch_size
    self.steps_per_epoch = self.n // batch_size
    self._perm_epoch, self._perm = -1, None

  def indices(self, first_step: int, num_steps: int) -> np.ndarray:
    """Example indices [num_steps, batch] for steps ``first_step ..`` (0-based)."""
    out = []
    for s in range(first_step, first_step + num_steps):
      epoch, pos = divmod(s, self.steps_per_epoch)
      if epoch != self._perm_epoch:
        self._perm_epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.n)
      out.append(self._perm[pos * self.batch_size:(pos + 1) * self.batch_size])
    return np.stack(out).astype(np.int32)


# ----------------------------------------------------------------------------
# Checkpoints, metrics, export.
# ----------------------------------------------------------------------------


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, step: int):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})))


def restore_checkpoint(mngr: ocp.CheckpointManager, target: TrainState):
  """Restores the latest checkpoint into the structure (and shardings) of ``target``."""
  step = mngr.latest_step()
  if step is None:
    return target, 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored["state"], int(restored["meta"]["step"])


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      # tensorboardX writes TensorBoard event files without TensorFlow's summary ops
      # (which need the separate tensorboard package).
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
        self._tb.add_scalar(k, v, global_step=record["step"])
    self._tb.flush()


def export_model(path: str, params, batch_stats, masks):
  """Writes ``export.npz``: ``params/<name>``, ``batch_stats/<name>``, ``masks/<name>``."""
  arrays = {}
  for prefix, tree in (("params", params), ("batch_stats", batch_stats), ("masks", masks)):
    if tree is None:
      continue
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for p, x in flat:
      arrays[f"{prefix}/{sparse_jax.path_to_name(p)}"] = np.asarray(x)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def measured_sparsity(params, prunable) -> float:
  """Exact zeros / all among the prunable params, counted on the host in int64."""
  leaves = [np.asarray(p) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable))
            if f]
  return sum(int(np.sum(p == 0)) for p in leaves) / sum(p.size for p in leaves)


def layer_table(params, masks) -> str:
  """The per-layer table printed at the start: shape, parameters, density."""
  lines = [f"{'layer':40s} {'shape':>20s} {'params':>10s} {'density':>8s}"]
  names = sparse_jax.leaf_names(params)
  mask_leaves = (jax.tree.structure(params).flatten_up_to(masks) if masks is not None
                 else [None] * len(names))
  for name, p, m in zip(names, jax.tree.leaves(params), mask_leaves):
    d = "dense" if m is None else f"{float(np.mean(np.asarray(m))):.4f}"
    lines.append(f"{name:40s} {str(tuple(p.shape)):>20s} {int(np.size(p)):>10d} {d:>8s}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------


def _validate(config):
  """Rejects a bad config before any data is read or any model built."""
  if config.steps_per_dispatch < 1:
    raise ValueError(f"steps_per_dispatch={config.steps_per_dispatch} must be >= 1.")
  for name in ("log_every_steps", "checkpoint_every_steps"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name}={getattr(config, name)} must be >= 1.")
  if config.parallelism not in ("mesh", "pmap"):
    raise ValueError(f"Unknown parallelism {config.parallelism!r}; use mesh or pmap.")
  param_sharding = config.get("param_sharding", "replicated")
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"Unknown param_sharding {param_sharding!r}; use one of "
                     f"{PARAM_SHARDINGS}.")
  if param_sharding == "fsdp" and config.parallelism != "mesh":
    raise ValueError(f"param_sharding='fsdp' needs parallelism='mesh' (got "
                     f"{config.parallelism!r}): pmap keeps a full copy of the state on "
                     "every device.")
  gf_every = config.get("gradient_flow_every_steps")
  if gf_every is not None and gf_every < 1:
    raise ValueError(f"gradient_flow_every_steps={gf_every} must be >= 1 (or None: off).")
  input_pipeline.augmentation(config.dataset)  # raises on an unknown data set
  if config.model not in models.MODELS:
    raise ValueError(f"Unknown model {config.model!r}; known models: "
                     f"{', '.join(sorted(models.MODELS))}.")
  method = config.sparsity.method
  if method != "dense" and method not in (*sparse_jax.METHODS, *baselines.PRUNING_AT_INIT):
    raise ValueError(f"Unknown sparse method {method!r}; use dense or one of "
                     f"{sorted([*sparse_jax.METHODS, *baselines.PRUNING_AT_INIT])} (imp "
                     "runs through experiments.main or experiments.imp.run_imp).")
  if method != "dense" and not 0.0 <= config.sparsity.final < 1.0:
    raise ValueError(f"sparsity.final={config.sparsity.final} must be in [0, 1).")
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; use one of {OPTIMIZERS}.")
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; use one of "
                     f"{LR_SCHEDULES}.")
  if config.dtype not in DTYPES:
    raise ValueError(f"Unknown dtype {config.dtype!r}; use one of {tuple(DTYPES)}.")


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


def compile_logged(fn, args, what: str, verbose: bool = True, seconds=None):
  """``fn`` (a jit or pmap) compiled for ``args``, with a log line before and after.

  A persistent-cache hit (experiments/compilation_cache.py) takes well under a
  second; the line says so. ``seconds`` (a dict) receives the time under ``what``.
  """
  log = logging.getLogger("sparse_jax.train")
  if verbose:
    log.info("Compiling %s...", what)
  t = time.time()
  compiled = fn.lower(*args).compile()
  if seconds is not None:
    seconds[what] = time.time() - t
  if verbose:
    log.info("Compiled %s in %.1f s.", what, time.time() - t)
  return compiled


def pad_steps(x: np.ndarray, length: int) -> np.ndarray:
  """``x`` [n, ...] padded with zeros to [length, ...]: the steps a dispatch skips."""
  if len(x) == length:
    return x
  return np.concatenate([x, np.zeros((length - len(x), *x.shape[1:]), x.dtype)])


def host_layer_densities(masks) -> dict[str, np.float32]:
  """``sparse_jax.layer_densities`` of host (numpy) masks, without a device program.

  The active count is exact and divided in float32 as the device's float32 mean
  of the bools is (equal to it below 2**24 weights per layer).
  """
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  return {sparse_jax.path_to_name(p): np.float32(np.count_nonzero(m)) / np.float32(np.size(m))
          for p, m in flat}


def next_stop(step: int, total_steps: int, *, periods, events=(), halt=None) -> int:
  """The first step after ``step`` at which the host must look at the state.

  ``periods`` are step intervals (logging, checkpoints, evaluation, gradient
  flow), ``events`` the sorted mask-update steps, ``halt`` an optional last step.

  Example:
    >>> next_stop(25, 100, periods=(31, 50))
    31
  """
  stops = [total_steps] + [(step // p + 1) * p for p in periods]
  stops += events[bisect.bisect_right(events, step):][:1]
  if halt is not None and halt > step:
    stops.append(halt)
  return min(stops)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates; resumes from ``workdir`` if it holds a checkpoint.

  Returns the summary written to ``workdir/summary.json``.
  """
  _validate(config)
  # Before anything compiles: a second run of the config compiles nothing.
  compilation_cache.enable(config.get("compilation_cache_dir"))
  if config.distributed and not jax.distributed.is_initialized():
    # Unset fields are auto-detected (TPU pods, SLURM, ...). Initialised once per
    # process: a second run in the same process reuses the connection.
    jax.distributed.initialize(
        **{k: config.get(k) for k in ("coordinator_address", "num_processes", "process_id")
           if config.get(k) is not None})
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  log = logging.getLogger("sparse_jax.train")
  t_start = time.time()

  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  steps_per_epoch = info.num_train_examples // config.batch_size
  total_steps = num_train_steps(config, steps_per_epoch)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the training set.")
  n_dev = jax.device_count()
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"{n_dev} devices.")

  model = create_model(config, info.num_classes)
  inner = create_optimizer(config, steps_per_epoch)
  tx_fn = lambda masks: create_sparse_tx(config, inner, steps_per_epoch, masks)
  if config.sparsity.method in baselines.PRUNING_AT_INIT:
    tx_fn = baselines.pruning_at_init_tx_fn(config, model, info.num_classes,
                                            info.input_shape, tx_fn)
  param_sharding = config.get("param_sharding", "replicated")
  mesh = None
  if config.parallelism == "mesh":
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = jax.random.PRNGKey(config.seed)
  if is_main:
    log.info("Building %s and its %s train state...", config.model,
             config.sparsity.method)
  # Built in place on the mesh, each device holding its shards (see state_shardings).
  state = create_sharded_train_state(config, model, tx_fn, info.input_shape, rng, mesh,
                                     param_sharding)
  # Initial masks only matter at init; the state built above already holds them.
  tx = tx_fn(None)
  lr_fn = learning_rate_schedule(config, steps_per_epoch)
  sparse = config.sparsity.method != "dense"
  # On the host now (every process; gathered if sharded): the state's buffers are
  # donated to the first step.
  masks0 = to_host(sparse_jax.get_masks(state.opt_state)) if sparse else None
  densities0 = None if masks0 is None else host_layer_densities(masks0)
  if is_main:
    log.info("Model %s on %s: %d steps (%d/epoch), %d devices, method %s, %s state.\n%s",
             config.model, config.dataset, total_steps, steps_per_epoch, n_dev,
             config.sparsity.method, param_sharding, layer_table(state.params, masks0))

  mngr = checkpoint_manager(workdir, config)
  # Restored into the structure and shardings of ``state`` (sharded if fsdp).
  state, start_step = restore_checkpoint(mngr, state)
  if start_step and is_main:
    log.info("Resumed from the checkpoint at step %d.", start_step)

  s_per = config.steps_per_dispatch
  step_kwargs = dict(model=model, tx=tx, config=config, num_classes=info.num_classes,
                     lr_fn=lr_fn, sparse=sparse, max_steps=s_per)
  use_device_data = config.data_on_device and input_pipeline.augmentation(config.dataset) == "none"
  if mesh is not None:
    repl = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P(None, "data"))
    # One sharding for the whole state (replicated), or one per leaf (fsdp).
    state_sh = repl if param_sharding == "replicated" else state_shardings(
        state, mesh, param_sharding)
    state = jax.device_put(state, state_sh)

    def make_run(mask_update):
      return jax.jit(
          functools.partial(dispatch_steps, mask_update=mask_update,
                            batch_sharding=NamedSharding(mesh, P("data")), **step_kwargs),
          in_shardings=(state_sh, (repl,) * 3 if use_device_data else data_sharding, repl),
          out_shardings=(state_sh, repl), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, model=model, num_classes=info.num_classes),
                       in_shardings=(state_sh, NamedSharding(mesh, P("data"))),
                       out_shardings=repl)
  else:
    devices = jax.local_devices()
    n_local = len(devices)
    state = replicate(state, devices)

    def make_run(mask_update):
      return jax.pmap(functools.partial(dispatch_steps, mask_update=mask_update,
                                        axis_name="batch", **step_kwargs),
                      axis_name="batch", donate_argnums=0)
    evaluate = jax.pmap(functools.partial(eval_step, model=model, num_classes=info.num_classes,
                                          axis_name="batch"), axis_name="batch")

  # Where a run's time goes (summary.json "timings"; experiments/benchmarks/
  # time_to_result.py): phases measured at host sync points, compiles by program.
  timings = collections.defaultdict(float, compile_s={})
  t_data = time.time()
  if use_device_data:
    arrays = input_pipeline.load_arrays(config.dataset, "train", config.data_dir)
    if mesh is not None:
      data = DeviceData(arrays, repl, config.seed, config.batch_size)
    else:
      data = DeviceData(arrays, None, config.seed, config.batch_size)
      data.images = replicate(arrays["image"], devices)
      data.labels = replicate(arrays["label"].astype(np.int32), devices)
  else:
    train_iter = input_pipeline.train_batches(
        config.dataset, batch_size=config.batch_size, data_dir=config.data_dir,
        seed=config.seed, start_step=start_step)
  timings["data_s"] += time.time() - t_data

  def dispatch_inputs(step, n):
    """The data and step count of a dispatch of ``n`` steps from ``step``, padded to s_per."""
    if use_device_data:
      idx = pad_steps(data.indices(step, n), s_per)
      if mesh is None:
        idx = np.stack([idx.reshape(s_per, n_local, -1)[:, d] for d in range(n_local)])
      return (data.images, data.labels, idx), per_device(np.int32(n))
    local = [next(train_iter) for _ in range(n)]
    batches = jax.tree.map(lambda *xs: pad_steps(np.stack(xs), s_per), *local)
    if mesh is None:
      batches = jax.tree.map(
          lambda x: np.moveaxis(x.reshape(s_per, n_local, -1, *x.shape[2:]), 1, 0), batches)
    elif jax.process_count() > 1:
      batches = jax.make_array_from_process_local_data(data_sharding, batches)
    return batches, per_device(np.int32(n))

  def per_device(x):
    """``x`` as pmap takes it (one copy per local device); unchanged on a mesh."""
    return x if mesh is not None else np.full(n_local, x)

  eval_cache = []

  def eval_batches():
    if eval_cache:
      return eval_cache
    # Rounded up to a multiple of the devices; the padding is masked out.
    batch_size = -(-config.eval_batch_size // n_dev) * n_dev
    batches = []
    for b in input_pipeline.eval_batches(config.dataset, batch_size=batch_size,
                                         data_dir=config.data_dir):
      if mesh is None:
        b = jax.tree.map(lambda x: x.reshape(n_local, -1, *x.shape[1:]), b)
      elif jax.process_count() > 1:
        b = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), b)
      batches.append(b)
    if use_device_data:
      eval_cache.extend(batches)
    return batches

  def host_state(tree):
    """``tree`` as one global array per leaf (pmap keeps a copy per device).

    On a mesh the leaves may be sharded (fsdp): read them on the host with
    ``to_host``, on every process.
    """
    return tree if mesh is not None else jax.tree.map(lambda a: a[0], tree)

  # Each program compiles once, from the first dispatch's argument shapes (every
  # dispatch has the same): the one needed first in the foreground, the others
  # (the mask-update step, the evaluation) meanwhile in the background.
  compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
  programs = {}
  program_names = {None: f"the train dispatch ({s_per} steps)",
                   False: f"the ordinary dispatch ({s_per} steps)",
                   True: "the mask-update step", "eval": "the evaluation"}

  def compile_soon(key, fn, args):
    if key not in programs:
      programs[key] = compiler.submit(compile_logged, fn, abstract(args), program_names[key],
                                      is_main, timings["compile_s"])

  def program(key):
    if programs[key].done():
      return programs[key].result()
    if is_main:
      log.info("Waiting for %s to compile...", program_names[key])
    t = time.time()
    compiled = programs[key].result()
    timings["compile_wait_s"] += time.time() - t
    return compiled

  def run_eval(state):
    t = time.time()
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for b in eval_batches():
      compile_soon("eval", evaluate, (state, b))
      out = jax.device_get(host_state(program("eval")(state, b)))
      for k in totals:
        totals[k] += float(out[k])
    timings["eval_s"] += time.time() - t
    return {"test_loss": totals["loss"] / totals["count"],
            "test_accuracy": totals["correct"] / totals["count"]}

  writer = MetricWriter(workdir, is_main)
  # Gradient-flow measures on a fixed batch, off the hot path (one extra dispatch and
  # host sync every gradient_flow_every_steps, plus step 0).
  gf_every, gradient_flow = config.get("gradient_flow_every_steps"), None
  if gf_every is not None:  # validated in _validate
    gf_batch = input_pipeline.load_arrays(config.dataset, f"train[:{config.batch_size}]",
                                          config.data_dir)
    gf_fn = jax.jit(functools.partial(gradient_flow_step, model=model, config=config,
                                      num_classes=info.num_classes))
    gradient_flow = lambda state: gradient_flow_record(gf_fn(host_state(state), gf_batch))
    if start_step == 0:
      writer.write({"step": 0, "epoch": 0.0, **gradient_flow(state)})
  events = mask_update_steps(config, steps_per_epoch)
  # Masks after every event, bit-packed on the host (experiments/mask_history.py).
  keep_history = sparse and config.get("record_mask_history", False)
  recorder = None
  if keep_history and is_main:
    recorder = mask_history.Recorder.for_run(workdir, masks0, start_step=start_step,
                                             final_sparsity=config.sparsity.final)
  pending = []
  best_acc, last_eval = 0.0, {}
  step = start_step
  t_log, steps_at_log = time.time(), step
  # Dispatches end exactly where the host needs the state (evaluation, logging,
  # checkpoints, mask-update records): up to s_per steps in one program whatever
  # their number (train_steps).
  periods = [config.log_every_steps, config.checkpoint_every_steps,
             steps_per_epoch * config.eval_every_epochs] + ([gf_every] if gf_every else [])
  sorted_events = sorted(events) if sparse else []
  # With the mask-update steps known here, ordinary dispatches run a step compiled
  # without the optimizer's mask-update branch and each event step runs alone with
  # it (sparse_jax's mask_update=False/True); otherwise the optimizer decides in the
  # graph (None) on every step.
  host_events = bool(sorted_events) and config.get("host_mask_updates", True)
  t_loop = time.time()
  timings["before_loop_s"] = t_loop - t_start
  while step < total_steps:
    stop = next_stop(step, total_steps, periods=periods, events=sorted_events,
                     halt=config.halt_after_step)
    mask_update = None
    if host_events:
      mask_update = stop in events and stop - step == 1
      if stop in events and not mask_update:
        stop -= 1  # run up to the step before the event, then the event alone
    n = min(s_per, stop - step)
    inputs = dispatch_inputs(step, n)
    if not programs:
      for key in [mask_update] + ([not mask_update] if host_events else []):
        compile_soon(key, make_run(key), (state, *inputs))
      compile_soon("eval", evaluate, (state, eval_batches()[0]))
    state, metrics = program(mask_update)(state, *inputs)
    pending.append((metrics, n))
    step += n
    record = {}
    # Every mask update ends a dispatch (next_stop), so an event is this step.
    if sparse and step in events:
      dens, layers = jax.device_get(host_state((metrics["density"], metrics["layer_density"])))
      record.update(mask_update=True, sparsity=1.0 - float(dens),
                    layer_density={k: float(v) for k, v in layers.items()})
      if keep_history:
        # Gathered on every process (sharded masks), recorded by process 0.
        sparse_state = sparse_jax.get_sparse_state(host_state(state).opt_state)
        event_masks, union = to_host((sparse_state.masks, sparse_state.union))
        if recorder is not None:
          record.update(recorder.record(step, event_masks, union))
    epoch_done = step % steps_per_epoch == 0
    epoch = step // steps_per_epoch
    if (epoch_done and epoch % config.eval_every_epochs == 0) or step == total_steps:
      last_eval = run_eval(state)
      best_acc = max(best_acc, last_eval["test_accuracy"])
      record.update(last_eval)
    if gradient_flow is not None and (step % gf_every == 0 or step == total_steps):
      record.update(gradient_flow(state))
    if step % config.log_every_steps == 0 or record or step == total_steps:
      # The metrics of each dispatch's steps (its buffers hold s_per), in order.
      fetched = [(jax.device_get(host_state(m)), ran) for m, ran in pending]
      pending = []
      loss = float(np.mean(np.concatenate([m["train_loss"][:ran] for m, ran in fetched])))
      acc = float(np.mean(np.concatenate([m["train_accuracy"][:ran] for m, ran in fetched])))
      last = fetched[-1][0]  # the read-outs of the state now
      if "sparsity" not in record and sparse:
        record["sparsity"] = 1.0 - float(last["density"])
      now = time.time()
      record = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss,
                "train_accuracy": acc, "learning_rate": float(last["learning_rate"]),
                "wall_time_s": now - t_start,
                "steps_per_s": (step - steps_at_log) / max(now - t_log, 1e-9), **record}
      t_log, steps_at_log = now, step
      writer.write(record)
      if is_main:
        log.info("step %d/%d epoch %.1f loss %.4f train_acc %.4f%s sparsity %.4f "
                 "lr %.4g %.1f steps/s", step, total_steps, record["epoch"], loss, acc,
                 f" test_acc {record['test_accuracy']:.4f}" if "test_accuracy" in record
                 else "", record.get("sparsity", 0.0), record["learning_rate"],
                 record["steps_per_s"])
    if step % config.checkpoint_every_steps == 0 or step == total_steps or (
        config.halt_after_step is not None and step >= config.halt_after_step):
      t = time.time()
      save_checkpoint(mngr, host_state(state), step)
      timings["checkpoint_s"] += time.time() - t
      if recorder is not None:
        recorder.save()
    if config.halt_after_step is not None and step >= config.halt_after_step:
      mngr.wait_until_finished()
      compiler.shutdown(wait=False, cancel_futures=True)
      log.info("Halting after step %d (halt_after_step).", step)
      return {"halted_at_step": step}

  compiler.shutdown(wait=False, cancel_futures=True)
  t = time.time()
  mngr.wait_until_finished()
  timings["checkpoint_s"] += time.time() - t
  timings["loop_s"] = time.time() - t_loop
  final = to_host(host_state(state))
  masks = sparse_jax.get_masks(final.opt_state) if sparse else None
  prunable = (jax.tree.map(lambda p, m: m is not None, final.params, masks) if sparse
              else sparse_jax.select_prunable(final.params))
  skipped = None
  if sparse:
    skipped = sparse_jax.get_sparse_state(final.opt_state).skipped_events
    skipped = None if skipped is None else int(skipped)
    if skipped:
      log.warning("%d mask-update events were skipped (mask_update=False on an event "
                  "step): mask_update_steps() misses an event of this method.", skipped)
  summary = {
      "final_test_accuracy": last_eval.get("test_accuracy"),
      "skipped_mask_updates": skipped,
      "best_test_accuracy": best_acc,
      "final_test_loss": last_eval.get("test_loss"),
      "final_sparsity": measured_sparsity(final.params, prunable),
      # Counted on the host: the masks are numpy arrays by now.
      "mask_sparsity": None if masks is None else
                       1.0 - sum(int(np.count_nonzero(m)) for m in jax.tree.leaves(masks))
                       / sparse_jax.count_prunable(masks),
      "steps": int(final.step),
      "wall_time_s": time.time() - t_start,
      "method": config.sparsity.method,
      "config": config.to_dict(),
  }
  variables = {"params": final.params, **({"batch_stats": final.batch_stats}
                                          if final.batch_stats else {})}
  summary.update(run_flops_lib.run_flops(
      config, model, variables, info.input_shape, steps_per_epoch, total_steps, densities0,
      run_flops_lib.event_densities(workdir), masks, events))
  timings["after_loop_s"] = time.time() - t_loop - timings["loop_s"]
  summary["timings"] = dict(timings)
  if is_main:
    export_model(os.path.join(workdir, "export.npz"), final.params, final.batch_stats, masks)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1, default=str)
    log.info("Done: final test accuracy %.4f, sparsity %.4f, %.1f s.",
             summary["final_test_accuracy"], summary["final_sparsity"],
             summary["wall_time_s"])
  return summary
