"""Chase: unstructured DST whose sparsest channels are removed gradually (issue 32).

Chase (Yin et al., NeurIPS 2023, "Dynamic Sparsity Is Channel-Level Sparsity
Learner"; the authors' code luuyin/chase) observes that unstructured dynamic sparse
training leaves many channels far sparser than the rest, and removes them while it
trains. Here it runs as a condensed run (``sparsity.condense=True``) of RigL or SET
on weights with ``sparsity.channel_sparsity = S_c > 0`` (docs/algorithms.md §6):

* **score**: a unit's UMM (unmasked mean magnitude), ``sum |w[..., c]|`` over its
  active weights divided by its fan-in in the original model (an inactive weight
  counts 0, so a unit that is sparse *and* small scores low);
* **schedule**: at each event up to ``t_f`` (``sparsity.end_epoch``) the masked
  hidden layers keep ``ceil(N0 (1 - s_t))`` of their ``N0`` original units, ``s_t =
  S_c (1 - (1 - t / t_f)^3)``, the lowest UMM across those layers removed first
  (ties: layer order, then unit index); the last event at or before ``t_f`` (or the
  run's last event, if the method's events stop earlier) goes to ``S_c``; a layer
  keeps at least ``max(1, int(C_l (1 - S_c) beta))`` units (``beta`` =
  ``sparsity.channel_floor``, the authors' 0.2);
* **budget**: the run keeps ``(1 - sparsity)`` of the original model's masked
  weights (a dense classifier does not count): a removed unit's active weights (its column and its row in the next
  kernel) are regrown at once in the smaller model, the inactive positions of largest
  |gradient| on one fixed training batch across all prunable leaves, at value 0 (as
  RigL's regrowth), so the surviving units grow denser.

A removed unit's output becomes 0 before it goes (its kernel column, bias and next
norm's bias zeroed, its running mean too): the removal itself is a prune, exact
afterwards (the smaller model computes the masked model's logits).

Differences from the authors' code, for this trainer's events: units go at the
weight-update events (theirs halfway between two); the budget is refilled at the
removal from one batch's gradient (theirs at the next update); the DST between
removals is this library's RigL/SET (layer-wise drop and regrowth with an ERK start:
their ImageNet script's defaults; their CIFAR scripts rank globally and add MEST's
soft memory bound, not reproduced); every masked hidden layer of the chain is a
candidate, dense layers and the last conv included (theirs: convs only, not VGG's
last); ties go by layer and index (theirs: a random proportional subsample).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np

import sparse_jax
from experiments.trainer import steps as steps_lib

log = logging.getLogger("sparse_jax.train")
CHASE_METHODS = ("rigl", "set")


@dataclasses.dataclass(frozen=True)
class Chase:
  """A run's Chase settings (host side)."""
  channel_sparsity: float  # S_c: the fraction of the hidden units removed by end_step
  floor: float  # beta: a layer keeps max(1, int(C_l (1 - S_c) beta)) units
  end_step: int  # t_f: the schedule reaches S_c here
  budget: int  # active weights of the prunable leaves to keep

  def alive_target(self, total: int, t: int) -> int:
    """Hidden units to keep after the event ``t`` of ``total`` original ones."""
    frac = min(1.0, t / self.end_step)
    s_t = self.channel_sparsity * (1.0 - (1.0 - frac) ** 3)
    return math.ceil(total * (1.0 - s_t) - 1e-9)

  def layer_floor(self, width: int) -> int:
    return max(1, int(width * (1.0 - self.channel_sparsity) * self.floor))


def check_config(config) -> str | None:
  """Why ``sparsity.channel_sparsity`` cannot run with ``config`` (None if it can)."""
  sp = config.sparsity
  sc, beta = sp.get("channel_sparsity", 0.0), sp.get("channel_floor", 0.2)
  if not 0.0 <= sc < 1.0:
    return f"sparsity.channel_sparsity must be in [0, 1) (got {sc!r})"
  if not 0.0 <= beta <= 1.0:
    return f"sparsity.channel_floor must be in [0, 1] (got {beta!r})"
  if sp.method not in CHASE_METHODS:
    return (f"sparsity.channel_sparsity (Chase) needs an unstructured constant-budget "
            f"DST, one of {CHASE_METHODS} (got {sp.method!r})")
  if sp.get("regrowth_warmup", 0):
    return ("sparsity.channel_sparsity (Chase) regrows the removed units' weights at "
            "a cut without a learning-rate warm-up: set sparsity.regrowth_warmup=0")
  if sp.get("structure", "unstructured") != "unstructured":
    return ("sparsity.channel_sparsity (Chase) prunes weights unstructured and removes "
            f"units by UMM: set sparsity.structure='unstructured' (got {sp.structure!r})")
  return None


def umm(kernel, mask, fan_in: int) -> np.ndarray:
  """Each output unit's unmasked mean magnitude: ``sum |w| over its active weights /
  fan_in`` (float64 [units])."""
  w = np.abs(np.asarray(kernel, np.float64))
  if mask is not None:
    w = w * np.asarray(mask, bool)
  return w.reshape(-1, w.shape[-1]).sum(0) / fan_in


def choose(scores: dict[str, np.ndarray], floors: dict[str, int],
           n_remove: int) -> dict[str, np.ndarray]:
  """The ``n_remove`` units of lowest score across layers, no layer below its floor.

  Ties go by layer order, then unit index. Returns ``{layer: bool [units] removed}``.
  """
  remove = {n: np.zeros(len(s), bool) for n, s in scores.items()}
  left = {n: len(s) - floors[n] for n, s in scores.items()}
  order = sorted((float(s[i]), li, i) for li, (n, s) in enumerate(scores.items())
                 for i in range(len(s)))
  names = list(scores)
  for _, li, i in order:
    if n_remove <= 0:
      break
    if left[names[li]] > 0:
      remove[names[li]][i] = True
      left[names[li]] -= 1
      n_remove -= 1
  return remove


def zero_units(state, norms: dict, remove: dict[str, np.ndarray]):
  """``state`` with the ``remove``d units' outputs exactly 0: their kernel columns
  (weights and masks), biases, next norm's bias and running mean zeroed (host)."""
  params = jax.tree.map(np.array, state.params)
  stats = jax.tree.map(np.array, state.batch_stats) if state.batch_stats else state.batch_stats
  masks = {n: dict(v) if isinstance(v, dict) else v
           for n, v in sparse_jax.get_masks(state.opt_state).items()}
  for name, gone in remove.items():
    if not gone.any():
      continue
    for leaf in ("kernel", "bias"):
      if leaf in params[name]:
        params[name][leaf][..., gone] = 0
    m = (masks.get(name) or {}).get("kernel")
    if m is not None:
      m = np.array(m)
      m[..., gone] = False
      masks[name]["kernel"] = m
    if name in norms:
      norm = norms[name]
      if "bias" in params[norm]:
        params[norm]["bias"][..., gone] = 0
      if stats and "mean" in stats.get(norm, {}):
        stats[norm]["mean"][..., gone] = 0
  return state.replace(params=params, batch_stats=stats,
                       opt_state=with_masks(state.opt_state, masks))


def with_masks(opt_state, masks):
  """``opt_state`` whose sparse wrapper holds ``masks`` (bool; packed where it packs)."""
  def swap(s):
    if not isinstance(s, sparse_jax.SparseState):
      return s
    packed = any(isinstance(x, sparse_jax.PackedMask) for x in jax.tree.leaves(
        s.masks, is_leaf=lambda x: isinstance(x, sparse_jax.PackedMask)))
    return s._replace(masks=sparse_jax.pack_masks(masks) if packed else masks)
  return jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, sparse_jax.SparseState))


def refill(state, grads, budget: int):
  """``state`` with its masks regrown to ``budget`` active weights: the inactive
  positions of largest |grads| across every prunable leaf (ties: leaf order, then
  position), at weight 0. Returns ``(state, grown)``."""
  masks = sparse_jax.get_masks(state.opt_state)
  names = [n for n, m in _flat(masks).items() if m is not None]
  flat_m = {n: np.asarray(_flat(masks)[n], bool) for n in names}
  deficit = budget - sum(int(m.sum()) for m in flat_m.values())
  if deficit <= 0:
    return state, 0
  flat_g = _flat(grads)
  scores = np.concatenate([np.where(flat_m[n], -1.0, np.abs(np.asarray(flat_g[n],
                                                                       np.float64))).ravel()
                           for n in names])
  picked = np.argsort(-scores, kind="stable")[:deficit]
  picked = picked[scores[picked] >= 0]
  if picked.size < deficit:
    log.warning("Chase: the smaller model holds %d weights, fewer than its budget %d: "
                "every weight is active and the run is less sparse than "
                "sparsity.final (raise sparsity.final or lower channel_sparsity).",
                sum(m.size for m in flat_m.values()), budget)
  grown = np.zeros(scores.size, bool)
  grown[picked] = True
  offsets = np.cumsum([0] + [flat_m[n].size for n in names])
  params = jax.tree.map(np.array, state.params)
  new = {}
  for n, a, b in zip(names, offsets[:-1], offsets[1:]):
    g = grown[a:b].reshape(flat_m[n].shape)
    new[n] = flat_m[n] | g
    module, leaf = n.rsplit("/", 1)
    params[module][leaf][g] = 0
  new_masks = jax.tree.map(lambda m: m, masks)
  for n, m in new.items():
    module, leaf = n.rsplit("/", 1)
    new_masks[module][leaf] = m
  return state.replace(params=params, opt_state=with_masks(state.opt_state, new_masks)), int(
      grown.sum())


def batch_grads(model, state, batch, num_classes: int, label_smoothing: float = 0.0):
  """The dense gradient of the training loss on ``batch`` (train mode, a fixed key)."""
  def loss_fn(params):
    logits, _ = steps_lib.apply_train_mode(model, params, state.batch_stats,
                                           batch["image"], jax.random.PRNGKey(0))
    return steps_lib.cross_entropy(logits, batch["label"], num_classes,
                                   label_smoothing).mean()
  return jax.device_get(jax.jit(jax.grad(loss_fn))(state.params))


def _flat(tree) -> dict:
  """``{"module/leaf": value}`` of a two-level linen tree (None kept)."""
  return {f"{m}/{k}": v for m, sub in tree.items() if isinstance(sub, dict)
          for k, v in sub.items()}
