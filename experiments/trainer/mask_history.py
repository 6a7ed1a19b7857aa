"""Mask history of a sparse run: the trainer's recorder and its file format.

The trainer (``config.record_mask_history = True``) keeps the initial mask and
the mask after every mask-update event, bit-packed (``np.packbits``, 1 bit per
weight), in ``<workdir>/mask_history.npz``; it also turns on the wrapper's
``track_union`` option so the union of all masks (ITOP) is kept on the device
inside the jitted update. Everything else is computed on the host after the
event, so ordinary steps pay nothing. Per event it adds to ``metrics.jsonl``:
``itop_rate``, ``itop_rate_since_final``, ``iou_prev``, ``iou_init`` and the
totals ``pruned``, ``dropped``, ``regrown``.

Counts (docs/algorithms.md §9), per layer and event ``k``, from the masks before
(``a``) and after (``b``) the event:

- ``regrown = |b & ~a|``: positions switched on;
- ``pruned = |a| - |b|``: the net decrease, exact because a layer's drop and
  grow counts are equal (docs/algorithms.md §5), so only the magnitude prune
  changes a layer's count;
- ``dropped = |a & ~b| - pruned``: positions switched off by the drop.

A weight dropped and regrown at the same event keeps its value and optimizer
state (docs/algorithms.md §5), so it is a no-op and is not counted; neither is a
weight removed by GraNet's prune and regrown at the same event (it restarts at 0).

A saved history is read with ``load_history``; the curves drawn from it (ITOP,
densities, distances, survival, regrowth by layer) are the mask dynamics study's
(studies/mask_dynamics.py, which imports this module; never the reverse).
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
# Bit packing, and the measures the recorder logs at each event.
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

  def final_index(self, flat=None) -> int | None:
    """The first record at the final sparsity (the final active count), if reached.

    ``flat``: ``flat_masks()``, if already computed.
    """
    flat = self.flat_masks() if flat is None else flat
    counts = [int(m.sum()) for m in flat]
    target = self.final_active if self.final_active is not None else counts[-1]
    for i, c in enumerate(counts):
      if c <= target:
        return i
    return None

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
      start = history.final_index(flat)
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
