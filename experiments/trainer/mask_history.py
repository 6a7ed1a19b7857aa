"""Mask history of a sparse run: a recorder for the trainer and the analysis API.

The trainer (``config.record_mask_history = True``) keeps the initial mask and
the mask after every mask-update event, bit-packed (``np.packbits``, 1 bit per
weight), in ``<workdir>/mask_history.npz``; it also turns on the wrapper's
``track_union`` option so the union of all masks (ITOP) is kept on the device
inside the jitted update. Everything else is computed on the host after the
event, so ordinary steps pay nothing. Per event it adds to ``metrics.jsonl``:
``itop_rate``, ``itop_rate_since_final``, ``iou_prev``, ``iou_init`` and the
totals ``pruned``, ``dropped``, ``regrown``.

Counts (SPEC §9), per layer and event ``k``, from the masks before (``a``) and
after (``b``) the event:

- ``regrown = |b & ~a|``: positions switched on;
- ``pruned = |a| - |b|``: the net decrease, exact because a layer's drop and
  grow counts are equal (SPEC §5), so only the magnitude prune changes a
  layer's count;
- ``dropped = |a & ~b| - pruned``: positions switched off by the drop.

A weight dropped and regrown at the same event keeps its value and optimizer
state (SPEC §5), so it is a no-op and is not counted; neither is a weight
removed by GraNet's prune and regrown at the same event (it restarts at 0).

Analysis (host numpy; see README "Mask dynamics"):

  >>> h = mask_history.load_history("workdirs/granet")
  >>> steps, itop = mask_history.itop_curve(h)                 # ITOP rate
  >>> steps, itop = mask_history.itop_curve(h, since="final")  # from final sparsity
  >>> mask_history.layer_density_curves(h)                     # {layer: [E]}
  >>> mask_history.mask_distance_curves(h)                     # IoU / Hamming
  >>> mask_history.regrowth_survival(h)                        # [E, E]
  >>> mask_history.regrowth_by_layer(h)                        # {layer: [E]}
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

import sparse_jax
from experiments.trainer import workdir as workdir_lib

FILENAME = "mask_history.npz"


# ----------------------------------------------------------------------------
# Measures on masks (flat bool arrays or lists of them).
# ----------------------------------------------------------------------------


def pack(mask: np.ndarray) -> np.ndarray:
  """A bool array as uint8 bytes, 8 weights per byte (``np.packbits`` of the flat mask)."""
  return np.packbits(np.asarray(mask, bool).ravel())


def unpack(packed: np.ndarray, shape) -> np.ndarray:
  """Inverse of ``pack``: the bool array of ``shape``."""
  n = int(np.prod(shape))
  return np.unpackbits(np.asarray(packed, np.uint8), count=n).astype(bool).reshape(shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two masks (1.0 when both are empty)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  union = int(np.sum(a | b))
  return 1.0 if union == 0 else int(np.sum(a & b)) / union


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


def event_counts(before: np.ndarray, after: np.ndarray) -> dict[str, int]:
  """``pruned``, ``dropped``, ``regrown`` between two masks of one layer (module doc)."""
  before, after = np.asarray(before, bool), np.asarray(after, bool)
  removed = int(np.sum(before & ~after))
  regrown = int(np.sum(after & ~before))
  pruned = max(int(before.sum()) - int(after.sum()), 0)
  return {"pruned": pruned, "dropped": removed - pruned, "regrown": regrown}


# ----------------------------------------------------------------------------
# The stored history.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class MaskHistory:
  """Bit-packed masks of the prunable layers at steps 0 (init) and each event."""
  names: list[str]
  shapes: list[tuple[int, ...]]
  steps: list[int] = dataclasses.field(default_factory=list)
  packed: list[list[np.ndarray]] = dataclasses.field(default_factory=list)  # [E][L] uint8
  final_active: int | None = None  # active weights at the final sparsity, if known
  union_packed: list[np.ndarray] | None = None  # last device union (track_union), [L]

  @property
  def sizes(self) -> list[int]:
    return [int(np.prod(s)) for s in self.shapes]

  def __len__(self) -> int:
    return len(self.steps)

  def layer_masks(self, name: str) -> np.ndarray:
    """bool [E, n_l]: the flat masks of one layer at every recorded step."""
    i = self.names.index(name)
    return np.stack([unpack(p[i], (self.sizes[i],)) for p in self.packed])

  def flat_masks(self) -> list[np.ndarray]:
    """The whole model's flat mask (layers concatenated) at every recorded step."""
    return [np.concatenate([unpack(p, (n,)) for p, n in zip(ps, self.sizes)])
            for ps in self.packed]

  def masks_at(self, index: int) -> dict[str, np.ndarray]:
    """{layer: bool mask of its shape} at recorded step number ``index``."""
    return {n: unpack(p, s) for n, p, s in zip(self.names, self.packed[index], self.shapes)}

  def append(self, step: int, masks: list[np.ndarray]):
    if self.steps and step <= self.steps[-1]:
      raise ValueError(f"Mask history steps must increase: got {step} after {self.steps[-1]}.")
    if [tuple(np.shape(m)) for m in masks] != [tuple(s) for s in self.shapes]:
      raise ValueError(f"Mask shapes {[np.shape(m) for m in masks]} do not match the "
                       f"history's layers {self.shapes}.")
    self.steps.append(int(step))
    self.packed.append([pack(m) for m in masks])

  def truncate(self, last_step: int):
    """Drops the records after ``last_step`` (on resume from an earlier checkpoint)."""
    keep = [i for i, s in enumerate(self.steps) if s <= last_step]
    self.steps = [self.steps[i] for i in keep]
    self.packed = [self.packed[i] for i in keep]

  def save(self, path: str):
    """Writes one ``.npz``: ``steps``, ``meta`` (JSON) and ``packed/<i>`` [E, bytes]."""
    arrays = {"steps": np.asarray(self.steps, np.int64),
              "meta": np.asarray(json.dumps({"names": self.names,
                                             "shapes": [list(s) for s in self.shapes],
                                             "final_active": self.final_active}))}
    for i in range(len(self.names)):
      arrays[f"packed/{i}"] = (np.stack([p[i] for p in self.packed]) if self.packed else
                               np.zeros((0, -(-self.sizes[i] // 8)), np.uint8))
      if self.union_packed is not None:
        arrays[f"union/{i}"] = self.union_packed[i]
    # All or nothing (workdir_lib.WriteFailed on a full disk, the old file kept).
    workdir_lib.write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def load_history(path: str) -> MaskHistory:
  """Loads ``mask_history.npz`` (or the workdir holding it)."""
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No mask history at {path!r}; run the trainer with "
                            "config.record_mask_history=True.")
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
    n_layers = len(meta["names"])
    per_layer = [f[f"packed/{i}"] for i in range(n_layers)]
    union = ([f[f"union/{i}"] for i in range(n_layers)] if "union/0" in f.files else None)
    steps = [int(s) for s in f["steps"]]
  return MaskHistory(names=meta["names"], shapes=[tuple(s) for s in meta["shapes"]],
                     steps=steps, packed=[[p[e] for p in per_layer] for e in range(len(steps))],
                     final_active=meta["final_active"], union_packed=union)


# ----------------------------------------------------------------------------
# The recorder the trainer calls at events.
# ----------------------------------------------------------------------------


class Recorder:
  """Appends the masks after each event; returns the event's scalars for the log."""

  def __init__(self, path: str, history: MaskHistory):
    self.path = path
    self.history = history
    masks = [unpack(p, s) for p, s in zip(history.packed[-1], history.shapes)] \
        if history.packed else None
    self._prev = masks
    self._init = ([unpack(p, s) for p, s in zip(history.packed[0], history.shapes)]
                  if history.packed else None)
    self._union = None
    self._union_final = None
    if history.packed:
      flat = history.flat_masks()
      self._union = np.logical_or.reduce(flat)
      start = _final_index(history, flat)
      if start is not None:
        self._union_final = np.logical_or.reduce(flat[start:])

  @classmethod
  def for_run(cls, workdir: str, masks0, *, start_step: int, final_sparsity: float):
    """Starts a history at step 0 with ``masks0``, or resumes the saved one."""
    path = os.path.join(workdir, FILENAME)
    if start_step:
      history = _resumed_history(path, start_step)
    else:
      names = sparse_jax.leaf_names(masks0)  # None (dense) leaves have no name
      leaves = [np.asarray(m) for m in jax.tree.leaves(masks0)]
      n_total = sum(m.size for m in leaves)
      history = MaskHistory(names=names, shapes=[m.shape for m in leaves],
                            final_active=sparse_jax.active_count(final_sparsity, n_total))
    recorder = cls(path, history)
    if not history.packed:
      recorder.record(0, masks0)
    return recorder

  def record_state(self, step: int, opt_state) -> dict:
    """``record`` with the masks (and union, if tracked) of an optimizer state."""
    state = sparse_jax.get_sparse_state(opt_state)
    return self.record(step, state.masks, state.union)

  def record(self, step: int, masks, union=None) -> dict:
    """Stores ``masks`` after the event at ``step``; returns its scalars for the log.

    ``union`` is the device-side union (``SparseState.union``) when tracked.
    """
    masks, union_dev = jax.device_get((masks, union))
    leaves = [np.asarray(m, bool) for m in jax.tree.leaves(masks)]
    self.history.append(step, leaves)
    flat = np.concatenate([m.ravel() for m in leaves])
    self._union = flat.copy() if self._union is None else self._union | flat
    fa = self.history.final_active
    if self._union_final is not None:
      self._union_final |= flat
    elif fa is not None and int(flat.sum()) <= fa:
      self._union_final = flat.copy()
    out = {}
    if union_dev is not None:
      union_leaves = [np.asarray(u, bool) for u in jax.tree.leaves(union_dev)]
      self.history.union_packed = [pack(u) for u in union_leaves]
      out["itop_rate"] = float(sum(u.sum() for u in union_leaves) / flat.size)
    else:
      out["itop_rate"] = float(self._union.mean())
    if self._union_final is not None:
      out["itop_rate_since_final"] = float(self._union_final.mean())
    if self._prev is not None:
      prev = np.concatenate([m.ravel() for m in self._prev])
      init = np.concatenate([m.ravel() for m in self._init])
      out.update(iou_prev=iou(prev, flat), iou_init=iou(init, flat))
      counts = [event_counts(a, b) for a, b in zip(self._prev, leaves)]
      for key in ("pruned", "dropped", "regrown"):
        out[key] = sum(c[key] for c in counts)
    else:
      self._init = leaves
    self._prev = leaves
    return out

  def save(self):
    self.history.save(self.path)


def _resumed_history(path: str, start_step: int) -> MaskHistory:
  """The saved history up to ``start_step``; ``WorkdirDamaged`` if it is lost or unreadable.

  It is saved with every checkpoint: without it a resumed run would record a
  history missing every event before ``start_step``.
  """
  fix = ("Restore it from a copy, or train again in a new --workdir: resuming without "
         f"it would lose the masks of the events up to step {start_step}.")
  if not os.path.exists(path):
    raise workdir_lib.WorkdirDamaged(f"{path} is missing: the run resumes from its checkpoint "
                                 f"at step {start_step} with record_mask_history on. {fix}")
  try:
    history = load_history(path)
  except Exception as e:  # pylint: disable=broad-except
    # np.load and zipfile raise many kinds (BadZipFile, EOFError, KeyError, ValueError).
    raise workdir_lib.WorkdirDamaged(
        f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}). {fix}") from None
  history.truncate(start_step)
  return history


# ----------------------------------------------------------------------------
# Analysis of a loaded history.
# ----------------------------------------------------------------------------


def _final_index(history: MaskHistory, flat=None) -> int | None:
  """First record at the final sparsity (the final active count), if reached."""
  flat = history.flat_masks() if flat is None else flat
  counts = [int(m.sum()) for m in flat]
  target = history.final_active if history.final_active is not None else counts[-1]
  for i, c in enumerate(counts):
    if c <= target:
      return i
  return None


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
    start = _final_index(history, flat)
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
        event_counts(a, b) for a, b in zip(ms, ms[1:])]
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
