"""The optimizer and the sparse method of a run, built from its config.

``create_optimizer`` (the inner, dense optax optimizer and its learning-rate
schedule), ``create_sparse_tx`` (that optimizer wrapped in the sparse_jax method
named by ``config.sparsity.method``), ``create_tx_fn`` (the same with the
pruning-at-init baselines' scoring at ``init``) and ``mask_update_steps`` (the
steps at which the method may change its masks, as its transformation reports
them to the host).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import baselines

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


STRUCTURE_FORMS = ("unstructured", "N:M (e.g. 2:4)", "block:RxC (e.g. block:4x4)",
                   "channels")


def parse_structure(text: str):
  """``config.sparsity.structure`` as ``sparse_jax.NM/Block/Channels`` (or None).

  ``"unstructured"`` is None; ``"2:4"`` is ``NM(2, 4)``; ``"block:4x4"`` is
  ``Block(4, 4)``; ``"channels"`` is ``Channels()``.
  """
  text = str(text).strip().lower()
  try:
    if text == "unstructured":
      return None
    if text == "channels":
      return sparse_jax.Channels()
    if text.startswith("block:"):
      rows, cols = text[len("block:"):].split("x")
      return sparse_jax.Block(int(rows), int(cols))
    if text.count(":") == 1:
      n, m = text.split(":")
      return sparse_jax.NM(int(n), int(m))
  except ValueError as e:
    raise ValueError(f"config.sparsity.structure={text!r}: {e} (use one of "
                     f"{', '.join(STRUCTURE_FORMS)}).") from None
  raise ValueError(f"config.sparsity.structure={text!r} is not one of "
                   f"{', '.join(STRUCTURE_FORMS)}.")


def create_sparse_tx(config, inner: optax.GradientTransformation, steps_per_epoch: int,
                     initial_masks=None, units=None) -> optax.GradientTransformation:
  """Wraps ``inner`` in the sparse method named by ``config.sparsity.method``.

  The method checks its arguments here; a mistake is reported in the config's
  terms (epochs become steps at ``steps_per_epoch``). ``units``: a condensed run's
  original widths (``sparse_jax.Channels(units=...)``).
  """
  try:
    return _sparse_tx(config, inner, steps_per_epoch, initial_masks, units)
  except (ValueError, TypeError) as e:
    sp = config.sparsity
    raise type(e)(
        f"config.sparsity ({sp.method}; {num_train_steps(config, steps_per_epoch)} steps "
        f"at {steps_per_epoch}/epoch, so start_epoch={sp.start_epoch} is step "
        f"{int(round(sp.start_epoch * steps_per_epoch))} and end_epoch={sp.end_epoch} "
        f"step {int(round(sp.end_epoch * steps_per_epoch))}): {e}") from None


# Straight-through methods (sparse_jax.ste): the optimizer keeps dense weights and
# the forward pass sees the masked ones (experiments/trainer/steps.py forward_params).
# Two names rather than one method and a decay switch: "srste" (Zhou et al. 2021,
# lambda_w = config.sparsity.srste_decay, their 2e-4) and "ste" (no decay) are
# the names of the literature, and each run's summary then says which one it was.
STRAIGHT_THROUGH = ("ste", "srste")
SRSTE_DECAY = 2e-4  # Zhou et al. 2021's lambda_w


def check_straight_through(config):
  """Raises on a config ``ste``/``srste`` cannot run (no data read, nothing built)."""
  _straight_through_tx(config, optax.identity())


def _straight_through_tx(config, inner):
  """``sparse_jax.ste`` from the config: masks recomputed every step, as in SR-STE.

  ``sparsity.update_every`` (the dynamic methods' interval) is not used.
  """
  sp = config.sparsity
  structure = parse_structure(sp.get("structure", "unstructured"))
  if structure is None and not sp.final > 0.0:
    raise ValueError(f"{sp.method} needs sparsity.final > 0 or an N:M / block / "
                     f"channels structure (got final={sp.final}, unstructured).")
  for field in ("packed_masks", "layer_axes"):
    if sp.get(field, False):
      raise ValueError(f"sparsity.{field}={sp.get(field)!r} is not supported by {sp.method}.")
  if config.get("record_mask_history", False):
    raise ValueError(f"record_mask_history=True is not supported by {sp.method}.")
  decay = float(sp.get("srste_decay", SRSTE_DECAY)) if sp.method == "srste" else 0.0
  return sparse_jax.ste(
      inner, sparsity=sp.final, structure=structure, update_every=1, decay=decay,
      scope=sp.scope, include=sp.include, exclude=sp.exclude,
      keep_first_dense=sp.keep_first_dense, keep_last_dense=sp.keep_last_dense)


def _sparse_tx(config, inner, steps_per_epoch: int, initial_masks, units=None):
  sp = config.sparsity
  method = sp.method
  # Regrown weights' learning-rate warm-up (docs/algorithms.md §5): regrowing methods.
  warmup = dict(regrowth_warmup=sp.get("regrowth_warmup", 0))
  if warmup["regrowth_warmup"] and method not in ("granet", "rigl", "set"):
    raise ValueError(f"sparsity.regrowth_warmup={sp.regrowth_warmup} warms up regrown "
                     f"weights, and {method} regrows none: use granet, rigl or set, or "
                     "leave it at 0.")
  if method == "dense":
    return inner
  if method in STRAIGHT_THROUGH:
    return _straight_through_tx(config, inner)
  if method in baselines.PRUNING_AT_INIT:
    method = "static"  # on the scored masks (baselines.pruning_at_init_tx_fn)
  if method not in sparse_jax.METHODS:
    raise ValueError(f"Unknown sparse method {method!r}; use dense or one of "
                     f"{sorted([*sparse_jax.METHODS, *STRAIGHT_THROUGH, *baselines.PRUNING_AT_INIT])} (imp "
                     "runs through experiments.main or experiments.trainer.imp.run_imp).")
  total = num_train_steps(config, steps_per_epoch)
  epoch = lambda e: int(round(e * steps_per_epoch))
  selector = dict(include=sp.include, exclude=sp.exclude,
                  keep_first_dense=sp.keep_first_dense, keep_last_dense=sp.keep_last_dense,
                  initial_masks=initial_masks,
                  # The union of all masks (ITOP) for the mask history, kept on the device.
                  track_union=bool(config.get("record_mask_history", False)),
                  packed_masks=bool(sp.get("packed_masks", False)),
                  structure=parse_structure(sp.get("structure", "unstructured")))
  if units:  # a condensed run counts the schedule in its original widths
    selector["structure"] = dataclasses.replace(selector["structure"], units=units)
  if sp.get("layer_axes"):  # stacked (scanned) layers; absent: the factory's default
    selector["layer_axes"] = dict(sp.layer_axes)
  if method == "granet":
    return sparse_jax.granet(
        inner, sparsity=sp.final, total_steps=total, end_step=epoch(sp.end_epoch),
        update_every=sp.update_every, initial_sparsity=sp.initial,
        start_step=epoch(sp.start_epoch), distribution=sp.distribution,
        regrowth_rate=sp.regrowth_rate, min_regrowth_rate=sp.min_regrowth_rate,
        growth=sp.growth, scope=sp.scope, seed=config.seed, sampling=sp.sampling,
        **warmup, **selector)
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
        seed=config.seed, sampling=sp.sampling, **warmup, **selector)
  if method == "set":
    return sparse_jax.set(
        inner, sparsity=sp.final, total_steps=total, update_every=sp.update_every,
        end_step=mask_end, start_step=epoch(sp.start_epoch),
        distribution=sp.distribution, regrowth_rate=sp.regrowth_rate, seed=config.seed,
        sampling=sp.sampling, **warmup, **selector)
  return sparse_jax.static(inner, sparsity=sp.final, distribution=sp.distribution,
                           seed=config.seed, sampling=sp.sampling, **selector)


def mask_update_steps(config, steps_per_epoch: int, tx=None) -> set[int]:
  """The 1-based steps after which the method may update its masks (host side).

  Asked of the transformation (``sparse_jax.event_schedule``), which alone knows
  its defaults (RigL's end at 75% of the run, SET's at the last step, ...).

  Args:
    config: the run's config.
    steps_per_epoch: updates per epoch.
    tx: the run's transformation (``create_sparse_tx`` or ``create_tx_fn``'s);
      None builds one from ``config``.

  Returns:
    The event steps; none for ``dense`` and the straight-through methods, whose
    masks follow the weights at every step.
  """
  if config.sparsity.method in ("dense", *STRAIGHT_THROUGH):
    return set()
  if tx is None:
    tx = create_sparse_tx(config, optax.identity(), steps_per_epoch)
  is_event = sparse_jax.event_schedule(tx)
  return {t for t in range(1, num_train_steps(config, steps_per_epoch) + 1) if is_event(t)}


def create_tx_fn(config, model, info, steps_per_epoch: int, units=None):
  """``tx_fn(initial_masks)``: the run's optimizer, as ``create_train_state`` takes it.

  SNIP, GraSP and SynFlow score the params at ``init`` (experiments/trainer/baselines.py).
  """
  inner = create_optimizer(config, steps_per_epoch)
  tx_fn = lambda masks: create_sparse_tx(config, inner, steps_per_epoch, masks, units)
  if config.sparsity.method in baselines.PRUNING_AT_INIT:
    tx_fn = baselines.pruning_at_init_tx_fn(config, model, info.num_classes,
                                            info.input_shape, tx_fn)
  return tx_fn
