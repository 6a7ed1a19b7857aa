"""The jitted steps: a training step, a dispatch of many, evaluation, gradient flow.

Pure functions of the train state and a batch; the trainer wraps them in
``jax.jit`` over a mesh or ``jax.pmap`` (experiments/trainer/programs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import sparse_jax
from experiments.trainer import state as state_lib
from experiments.trainer.state import TrainState


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float):
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


is_straight_through = state_lib.is_straight_through


def forward_params(params, opt_state):
  """The params the model computes with: masked for ``ste`` (straight-through
  gradient), ``params`` itself for every other method (masked already)."""
  if is_straight_through(opt_state):
    return sparse_jax.masked_params(params, opt_state)
  return params


def with_forward_params(state: TrainState) -> TrainState:
  """A host ``state`` holding the params the model computes with (``forward_params``).

  Straight-through runs (ste, srste) checkpoint dense weights; their model is the
  masked one, exact zeros off the mask: summarised, counted and exported as such.
  """
  if not is_straight_through(state.opt_state):
    return state
  return state.replace(params=state_lib.to_host(forward_params(state.params, state.opt_state)))


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
  images = batch["image"]
  if config.get("augment_shift", 0):  # off: the step is the same program as before
    images = random_shift(images, jax.random.fold_in(dropout_rng, 1), config.augment_shift)

  def loss_fn(params):
    params = forward_params(params, state.opt_state)
    logits, new_vars = apply_train_mode(model, params, state.batch_stats, images,
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
  return new_state, {"train_loss": loss, "train_accuracy": acc,
                     "finite": all_finite((loss, grads))}


def random_shift(images, key, max_shift: int):
  """Each image [B, H, W, C] shifted by its own random (dy, dx) in [-max_shift, max_shift].

  ``out[b, i, j] = images[b, i - dy_b, j - dx_b]``; pixels shifted in from outside
  repeat the nearest edge pixel (MNIST's background, whatever the normalisation).
  ``(dy, dx) = jax.random.randint(key, (B, 2), -max_shift, max_shift + 1)``.

  Example:
    >>> x = random_shift(batch["image"], jax.random.key(0), 2)
  """
  b, h, w, c = images.shape
  offsets = jax.random.randint(key, (b, 2), -max_shift, max_shift + 1)
  s = max_shift
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
  crop = lambda img, off: jax.lax.dynamic_slice(img, (s - off[0], s - off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def all_finite(tree) -> jax.Array:
  """bool []: no NaN or infinity in any leaf of ``tree`` (one fused reduction per leaf).

  The trainer stops at the first step whose loss or (dense) gradient is not finite
  (experiments/trainer/train.py), before that step's state can be checkpointed.
  """
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
  layer_axes = kwargs["config"].sparsity.get("layer_axes") if "config" in kwargs else None
  return state, {**metrics, **state_readouts(state, lr_fn, sparse, layer_axes)}


def state_readouts(state: TrainState, lr_fn, sparse: bool, layer_axes=None) -> dict:
  """What the host logs of the state after a dispatch, computed inside it.

  The learning rate of the last step and, for sparse runs, the masks' density
  and layer densities (each layer of a stacked leaf as ``name[i]``, with
  ``sparsity.layer_axes``): no separate program, no op-by-op dispatch per log line.
  """
  out = {"learning_rate": lr_fn(state.step - 1)}
  if sparse:
    masks = sparse_jax.get_masks(state.opt_state)
    out.update(density=sparse_jax.density(masks), layer_density=sparse_jax.layer_densities(
        masks, dict(layer_axes) if layer_axes else None))
  return out


def eval_step(state: TrainState, batch, *, model, num_classes: int,
              axis_name: str | None = None):
  """Summed loss, correct count and prediction count of a (padded) batch.

  The mask is per example [B]; a sequence model's loss is per token [B, L], so
  the mask is broadcast over the positions and the counts are of tokens.
  """
  variables = {"params": forward_params(state.params, state.opt_state)}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, batch["image"], train=False)
  loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
  mask = batch["mask"]
  mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (loss.ndim - 1)), loss.shape)
  out = {"loss": jnp.sum(loss * mask),
         "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
         "count": jnp.sum(mask)}
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def gradient_flow_step(state: TrainState, batch, *, model, config, num_classes: int):
  """The gradient-flow measures (docs/algorithms.md §8) of the training loss on one fixed batch.

  The loss is the training-mode loss (batch statistics, a fixed dropout key);
  running statistics are not updated. Dense runs measure every kernel as a layer.
  """
  masks = sparse_jax.get_masks(state.opt_state) if config.sparsity.method != "dense" else None

  def loss_fn(params):
    logits, _ = apply_train_mode(model, params, state.batch_stats, batch["image"], state.rng)
    return cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()

  params = forward_params(state.params, state.opt_state)
  return sparse_jax.gradient_flow_measures(loss_fn, params, masks)


def gradient_flow_record(measures) -> dict:
  """The measures as a metrics.jsonl record (host floats; ``loss`` -> ``gf_loss``)."""
  measures = jax.device_get(measures)
  out = {("gf_loss" if k == "loss" else k): float(v) for k, v in measures.items()
         if k != "egf_p2_layers"}
  out["egf_p2_layers"] = {k: float(v) for k, v in measures["egf_p2_layers"].items()}
  return out
