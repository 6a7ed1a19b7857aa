"""Mask dynamics analysis: what a recorded mask history says (docs/algorithms.md §9).

Reads the ``<workdir>/mask_history.npz`` a run with
``config.record_mask_history = True`` writes (experiments/trainer/mask_history.py,
its format and the per-event counts logged in ``metrics.jsonl``). Host numpy,
not jitted:

  >>> from experiments.trainer import mask_history
  >>> from experiments.studies import mask_dynamics as md
  >>> h = mask_history.load_history("workdirs/granet")
  >>> steps, itop = md.itop_curve(h)                 # ITOP rate
  >>> steps, itop = md.itop_curve(h, since="final")  # from final sparsity
  >>> md.layer_density_curves(h)                     # {layer: [E]}
  >>> md.mask_distance_curves(h)                     # IoU / Hamming
  >>> md.regrowth_survival(h)                        # [E, E]
  >>> md.regrowth_by_layer(h)                        # {layer: [E]}

The notebook experiments/notebooks/mask_dynamics.ipynb draws them for GraNet
and RigL.
"""

from __future__ import annotations

import numpy as np

from experiments.trainer import mask_history
from experiments.trainer.mask_history import MaskHistory


# ----------------------------------------------------------------------------
# Measures on masks (flat bool arrays or lists of them). ``iou`` and
# ``event_counts``, which the recorder logs at each event, are in mask_history.
# ----------------------------------------------------------------------------


def hamming(a: np.ndarray, b: np.ndarray) -> float:
  """Fraction of positions where two masks differ."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return int(np.sum(a != b)) / a.size


def itop_rates(masks: list[np.ndarray]) -> np.ndarray:
  """ITOP rate after each mask: the fraction of positions active in any mask so far."""
  union = np.zeros_like(np.asarray(masks[0], bool))
  out = []
  for m in masks:
    union |= np.asarray(m, bool)
    out.append(union.sum() / union.size)
  return np.asarray(out, np.float64)


def survival_matrix(masks: list[np.ndarray]) -> np.ndarray:
  """``S[k, j]``: of the positions switched on at mask k, the fraction active at j.

  NaN where j < k or nothing was switched on at k (and for k = 0).
  """
  e = len(masks)
  out = np.full((e, e), np.nan)
  for k in range(1, e):
    grown = np.asarray(masks[k], bool) & ~np.asarray(masks[k - 1], bool)
    n = int(grown.sum())
    if n == 0:
      continue
    for j in range(k, e):
      out[k, j] = int(np.sum(grown & np.asarray(masks[j], bool))) / n
  return out


# ----------------------------------------------------------------------------
# Curves of a loaded history.
# ----------------------------------------------------------------------------


def itop_curve(history: MaskHistory, since: str = "start"):
  """ITOP rate over time: ``(steps, rate)``.

  Args:
    history: a loaded ``MaskHistory``.
    since: ``"start"`` (union of every mask, init included) or ``"final"``
      (union from the first record at the final sparsity; for dense-start
      methods the union from the start is trivially 1).

  Returns:
    Recorded steps (int array) and the ITOP rate after each (float array).
  """
  if since not in ("start", "final"):
    raise ValueError(f"since={since!r}: use 'start' or 'final'.")
  flat = history.flat_masks()
  start = 0
  if since == "final":
    start = history.final_index(flat)
    if start is None:
      return np.zeros(0, np.int64), np.zeros(0)
  return np.asarray(history.steps[start:]), itop_rates(flat[start:])


def layer_density_curves(history: MaskHistory) -> dict[str, np.ndarray]:
  """{layer: density at each recorded step}."""
  return {n: history.layer_masks(n).mean(axis=1) for n in history.names}


def mask_distance_curves(history: MaskHistory) -> dict[str, np.ndarray]:
  """IoU and Hamming distance to the previous and to the initial mask, per record.

  Returns:
    ``{"steps", "iou_prev", "iou_init", "hamming_prev", "hamming_init"}``; the
    ``*_prev`` entries are NaN at the first record.
  """
  flat = history.flat_masks()
  nan = [np.nan]
  iou = mask_history.iou
  return {
      "steps": np.asarray(history.steps),
      "iou_prev": np.asarray(nan + [iou(a, b) for a, b in zip(flat, flat[1:])]),
      "iou_init": np.asarray([iou(flat[0], b) for b in flat]),
      "hamming_prev": np.asarray(nan + [hamming(a, b) for a, b in zip(flat, flat[1:])]),
      "hamming_init": np.asarray([hamming(flat[0], b) for b in flat]),
  }


def regrowth_survival(history: MaskHistory) -> np.ndarray:
  """``S[k, j]``: of the weights regrown at record k, the fraction active at j >= k."""
  return survival_matrix(history.flat_masks())


def event_count_table(history: MaskHistory) -> dict[str, dict[str, np.ndarray]]:
  """{layer: {"pruned", "dropped", "regrown": int [E]}} (0 at the first record)."""
  out = {}
  for n in history.names:
    ms = history.layer_masks(n)
    rows = [{"pruned": 0, "dropped": 0, "regrown": 0}] + [
        mask_history.event_counts(a, b) for a, b in zip(ms, ms[1:])]
    out[n] = {k: np.asarray([r[k] for r in rows]) for k in ("pruned", "dropped", "regrown")}
  return out


def regrowth_by_layer(history: MaskHistory, normalize: bool = False) -> dict[str, np.ndarray]:
  """Which layers absorb the regrowth: weights regrown per layer at each record.

  Args:
    history: a loaded ``MaskHistory``.
    normalize: divide by each record's total regrowth (shares that sum to 1).

  Returns:
    {layer: [E]} counts (or shares; NaN where nothing regrew).
  """
  table = event_count_table(history)
  counts = {n: t["regrown"].astype(np.float64) for n, t in table.items()}
  if not normalize:
    return counts
  total = sum(counts.values())
  with np.errstate(invalid="ignore", divide="ignore"):
    return {n: np.where(total > 0, c / np.where(total > 0, total, 1), np.nan)
            for n, c in counts.items()}
