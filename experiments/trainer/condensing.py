"""Condensed training (``config.sparsity.condense``, issue 32; docs/algorithms.md §6).

A ``structure="channels"`` run of a chain model (MLP, LeNet-300-100, LeNet-5,
VGG) removes its dead units at mask-update events and trains on the smaller
dense model: ``sparse_jax.condense_train_state`` cuts params, batch statistics,
optimizer moments and masks consistently, the model is rebuilt at the new widths
(``condense.model_at``) and the step recompiled. A unit is removed once it has
been dead after ``condense_patience`` consecutive events (default 1: at the event
that kills it); a removed unit never comes back, so a regrowing method regrows
among the units still in the model (those dead for fewer events). Everything the
run reports (densities, sparsity, FLOPs) stays in units of the original widths.

``Condenser`` holds the chain, the original shapes, which original units each
layer still has and how long each has been dead; ``meta`` / ``for_run(meta)``
carry that through checkpoints, so a resume after a shrink builds the smaller
model before restoring into it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any


import jax
import numpy as np

import sparse_jax
from experiments.trainer import chase as chase_lib
from experiments.trainer import condense

log = logging.getLogger("sparse_jax.train")
META_KEY = "condensed"


CONDENSED_METHODS = ("granet", "gmp", "rigl", "set")


def check_config(config) -> None:
  """Raises a ``ValueError`` naming the field and the fix if ``sparsity.condense`` cannot
  run with this config (before any data is read or model built)."""
  sp = config.sparsity
  if not sp.get("condense", False):
    if sp.get("channel_sparsity", 0.0):
      raise ValueError(f"sparsity.channel_sparsity={sp.channel_sparsity} (Chase) needs "
                       "sparsity.condense=True (the removed units leave the model); or "
                       "set sparsity.channel_sparsity=0.")
    return
  why = _method_problem(config) or _run_problem(config)
  if why:
    raise ValueError(f"sparsity.condense=True {why}; or set sparsity.condense=False.")


def _method_problem(config) -> str | None:
  """Why the method and structure cannot condense (Chase's own rules if it is one)."""
  sp = config.sparsity
  if sp.get("channel_sparsity", 0.0):
    return chase_lib.check_config(config)
  if sp.get("structure", "unstructured") != "channels":
    return (f"needs sparsity.structure='channels' (got {sp.get('structure')!r}): only "
            "whole units can be removed (or sparsity.channel_sparsity > 0 with rigl/set "
            "on weights: Chase)")
  if sp.method not in CONDENSED_METHODS:
    return (f"needs a method with mask-update events, one of {CONDENSED_METHODS} (got "
            f"{sp.method!r})")
  return None


def _run_problem(config) -> str | None:
  """Why the model, parallelism, recordings or condense fields cannot condense."""
  sp = config.sparsity
  if config.model in condense.RESIDUAL_MODELS or config.model not in condense.FAMILIES:
    return (f"cannot condense model {config.model!r}: chain models only "
            f"({', '.join(sorted(condense.FAMILIES))}); a residual block's skip needs the "
            "same units on both of its ends")
  try:  # the activation between the chain's layers must be stateless
    condense.activation_of(config.model, config.get("model_kwargs", {}))
  except ValueError as e:
    return f"cannot condense model {config.model!r}: {e}"
  if config.get("param_sharding", "replicated") != "replicated" or config.get("mesh_shape"):
    return "runs with replicated params only (unset param_sharding/mesh_shape)"
  if config.get("record_mask_history") or config.get("gradient_flow_every_steps"):
    return "does not record mask history or gradient flow (their arrays change shape)"
  for field, low in (("condense_patience", 1), ("condense_wait_steps", 0)):
    value = sp.get(field, low)
    if not (isinstance(value, int) and value >= low):
      return f"needs sparsity.{field} >= {low} (got {value!r})"
  if not 0.0 <= sp.get("condense_min_fraction", 0.0) < 1.0:
    return ("needs sparsity.condense_min_fraction in [0, 1) (got "
            f"{sp.get('condense_min_fraction')!r})")
  return None


@dataclasses.dataclass
class Condenser:
  """The condensation of one run (host side)."""
  model_name: str
  model_kwargs: dict
  num_classes: int
  chain: list[str]
  norms: dict
  original: dict[str, tuple[int, ...]]  # kernel leaf -> its shape in the full model
  prunable: tuple[str, ...]  # the kernel leaves with masks
  # Chain layer (but the last) -> the original indices of the units it still has,
  # and how many events in a row each has been dead.
  index: dict[str, np.ndarray]
  dead_for: dict[str, np.ndarray]
  patience: int = 1
  min_fraction: float = 0.0  # shrink once this fraction of the current units can go
  # During the pruning schedule (to step prune_end), a shrink waits for its last
  # event when that is fewer than wait_steps away (its recompiles would repeat soon).
  wait_steps: int = 0
  prune_end: int | None = None
  chase: chase_lib.Chase | None = None  # Chase's schedule (sparsity.channel_sparsity > 0)

  @classmethod
  def for_run(cls, config, num_classes: int, params, masks,
              steps_per_epoch: int) -> "Condenser":
    """The condenser of a run from its full-width ``params`` (shapes) and masks."""
    kwargs = dict(config.model_kwargs)
    chain, norms = condense.chain_of(config.model, params, kwargs)
    original = {f"{n}/kernel": tuple(np.shape(params[n]["kernel"])) for n in chain}
    index = {n: np.arange(original[f"{n}/kernel"][-1]) for n in chain[:-1]}
    prunable = tuple(k for k in original
                     if (masks.get(k.split("/")[0]) or {}).get("kernel") is not None)
    sp = config.sparsity
    chase = None
    if sp.get("channel_sparsity", 0.0):
      active = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks))
      chase = chase_lib.Chase(float(sp.channel_sparsity), float(sp.get("channel_floor", 0.2)),
                              max(1, int(round(sp.end_epoch * steps_per_epoch))), active)
    return cls(config.model, kwargs, num_classes, chain, norms, original, prunable, index,
               {n: np.zeros(len(i), np.int64) for n, i in index.items()},
               int(sp.get("condense_patience", 1)),
               float(sp.get("condense_min_fraction", 0.0)),
               int(sp.get("condense_wait_steps", 0)),
               (int(round(sp.end_epoch * steps_per_epoch)) if sp.method in ("granet", "gmp")
                else None), chase)

  def resumed(self, meta) -> "Condenser":
    """This condenser as a checkpoint's ``meta`` left it (itself if not condensed)."""
    saved = (meta or {}).get(META_KEY)
    if not saved:
      return self
    return dataclasses.replace(
        self, index={n: np.asarray(v, np.int64) for n, v in saved["index"].items()},
        dead_for={n: np.asarray(v, np.int64) for n, v in saved["dead_for"].items()})

  @property
  def features(self) -> tuple[int, ...]:
    """The chain's current output widths (the last: the logits)."""
    return (*(len(self.index[n]) for n in self.chain[:-1]),
            self.original[f"{self.chain[-1]}/kernel"][-1])

  @property
  def condensed(self) -> bool:
    return any(len(i) < self.original[f"{n}/kernel"][-1] for n, i in self.index.items())

  def units(self) -> dict[str, int]:
    """``Channels(units=...)``: each kernel's original number of units (none for
    Chase, whose optimizer prunes weights unstructured)."""
    if self.chase is not None:
      return {}
    return {k: s[-1] for k, s in self.original.items()}

  def structure(self) -> sparse_jax.Channels:
    """The structure the run's optimizer is built with (methods.create_tx_fn)."""
    return sparse_jax.Channels(units=self.units())

  def model(self, **extra):
    """The model at the current widths (``extra``: e.g. its dtype)."""
    return condense.model_at(self.model_name, self.num_classes, self.features,
                             self.model_kwargs, **extra)

  def meta(self) -> dict:
    """What a checkpoint keeps to rebuild the current model (JSON)."""
    return {META_KEY: {"features": list(self.features), "shrunk": self.condensed,
                       "index": {n: i.tolist() for n, i in self.index.items()},
                       "dead_for": {n: d.tolist() for n, d in self.dead_for.items()}}}

  def at_event(self, state, last: bool = False, step: int = 0,
               until_next: int | None = None) -> tuple[Any, bool]:
    """The host ``state`` after the event ``step`` (``until_next``: steps to the next
    event, None at the ``last``). Returns ``(state, shrunk)``; each shrink recompiles.

    Dead units: their running means are zeroed; those dead for ``patience`` events
    are removed once they are ``min_fraction`` of the current units, unless the
    pruning schedule's last event comes within ``wait_steps`` and the next event
    still prunes (that one would shrink again); at the last event every dead unit.
    Chase: the units its schedule removes now (``_chase_event``).
    """
    if self.chase is not None:
      return self._chase_event(state, step, until_next)
    masks = sparse_jax.get_masks(state.opt_state)
    stats = state.batch_stats
    if self.norms:
      stats = sparse_jax.mask_batch_stats(stats, masks, self.norms)
    remove = {}
    for n in self.chain[:-1]:
      m = (masks.get(n) or {}).get("kernel")
      m = None if m is None else np.asarray(m)
      alive = np.ones(len(self.index[n]), bool) if m is None else (
          m.reshape(-1, m.shape[-1]).any(0))
      self.dead_for[n] = np.where(alive, 0, self.dead_for[n] + 1)
      # After the last event no unit can regrow: every dead one goes.
      remove[n] = (self.dead_for[n] >= self.patience) | (last & ~alive)
    removable = sum(int(r.sum()) for r in remove.values())
    current = sum(len(i) for i in self.index.values())
    soon = (self.prune_end is not None and until_next is not None
            and step + until_next <= self.prune_end < step + self.wait_steps)
    if not removable or (not last and (removable < self.min_fraction * current or soon)):
      return state.replace(batch_stats=stats), False
    return self._shrink(state.replace(batch_stats=stats), remove), True

  def _chase_event(self, state, step: int, until_next: int | None):
    """Chase at the event ``step``: the units of lowest UMM its schedule removes
    (their outputs zeroed, then cut); the budget is refilled by ``refill``. The last
    event at or before t_f (the next is later, or none) removes down to S_c."""
    masks = sparse_jax.get_masks(state.opt_state)
    hidden = [n for n in self.chain[:-1] if f"{n}/kernel" in self.prunable]
    if until_next is None or step + until_next > self.chase.end_step:
      step = max(step, self.chase.end_step)
    scores = {n: chase_lib.umm(state.params[n]["kernel"], (masks.get(n) or {}).get("kernel"),
                               math.prod(self.original[f"{n}/kernel"][:-1]))
              for n in hidden}
    total = sum(self.original[f"{n}/kernel"][-1] for n in hidden)
    n_remove = sum(map(len, scores.values())) - self.chase.alive_target(total, step)
    floors = {n: self.chase.layer_floor(self.original[f"{n}/kernel"][-1]) for n in hidden}
    remove = chase_lib.choose(scores, floors, n_remove)
    if not any(r.any() for r in remove.values()):
      return state, False
    state = chase_lib.zero_units(state, self.norms, remove)
    return self._shrink(state, remove), True

  def refill(self, state, grads):
    """Chase: ``state`` regrown to its weight budget (``grads``: the smaller model's)."""
    state, grown = chase_lib.refill(state, grads, self.chase.budget)
    log.info("Chase: %d weights regrown in the remaining units (budget %d).", grown,
             self.chase.budget)
    return state

  def _shrink(self, state, remove):
    """``state`` without the units of ``remove`` (those dead long enough)."""
    c = sparse_jax.condense_train_state(
        state.params, state.opt_state, self.chain, structure=self.structure(),
        batch_stats=state.batch_stats or None, norms=self.norms,
        activation=condense.activation_of(self.model_name, self.model_kwargs),
        keep={n: ~r for n, r in remove.items()})
    before = self.features
    for n, keep in zip(self.chain[:-1], c.kept):
      self.index[n], self.dead_for[n] = self.index[n][keep], self.dead_for[n][keep]
    total = sum(self.original[f"{n}/kernel"][-1] for n in self.chain[:-1])
    log.info("Condensed: widths %s -> %s (%.1f%% of the original units); recompiling.",
             before, self.features, 100 * sum(self.features[:-1]) / total)
    return state.replace(params=c.params, batch_stats=c.batch_stats or state.batch_stats,
                         opt_state=c.opt_state)

  def original_densities(self, layer_density: dict, params) -> dict:
    """``layer_density`` (of the current kernels) in terms of the original ones."""
    out = {}
    for k, d in layer_density.items():
      shape = self.original.get(k)
      current = _leaf_shape(params, k)
      out[k] = d if shape is None or current is None else (
          d * math.prod(current) / math.prod(shape))
    return out


  def reported(self, record: dict, params) -> dict:
    """``record`` (a log record or the summary) with its densities and sparsities in
    units of the original widths: the active (and nonzero) weights over the full
    model's (``params``: those the record's numbers were computed on)."""
    if "layer_density" in record:
      record["layer_density"] = self.original_densities(record["layer_density"], params)
    current = sum(math.prod(_leaf_shape(params, k)) for k in self.prunable)
    fraction = current / max(1, sum(math.prod(self.original[k]) for k in self.prunable))
    for key in ("sparsity", "final_sparsity", "mask_sparsity"):
      if record.get(key) is not None:
        record[key] = 1.0 - (1.0 - float(record[key])) * fraction
    return record


def shrunk(meta) -> bool:
  """Whether a checkpoint's ``meta`` is of a condensed run that has shrunk."""
  return bool(((meta or {}).get(META_KEY) or {}).get("shrunk"))


def _leaf_shape(params, name: str):
  node = params
  for key in name.split("/"):
    if not hasattr(node, "get") or key not in node:
      return None
    node = node[key]
  return tuple(np.shape(node))
