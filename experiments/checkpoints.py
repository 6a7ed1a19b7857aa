"""Orbax checkpoints of the train state, with what a resumed run must report.

Each checkpoint ``<workdir>/checkpoints/<step>`` holds the state (``state``) and
a JSON ``meta``: the step, the best and last evaluation so far and the wall time
spent, so a resumed run reports what the uninterrupted one would.

Restoring tries the newest checkpoint first; one that cannot be read (truncated
or corrupted files, bad metadata) is named in a warning, moved out of orbax's
reach to ``<workdir>/checkpoints_unreadable/<step>`` (never deleted, and never
garbage-collected or overwritten by a later save) and the one before is tried.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

UNREADABLE = "checkpoints_unreadable"


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state, step: int, meta: dict | None = None):
  """Saves ``state`` at ``step`` (asynchronously) with ``meta`` (JSON-able) beside it."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**(meta or {}),
                                                                  "step": step})))


def restore(mngr: ocp.CheckpointManager, target):
  """The newest readable checkpoint: ``(state, meta)``, or ``(target, None)`` if none.

  Restored into the structure and shardings of ``target``. Unreadable newer
  checkpoints are moved aside with a warning (module docstring); if every one is
  unreadable, raises instead of starting over.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return target, None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  failures = []
  for step in steps:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      meta = dict(restored["meta"])
      if int(meta["step"]) != step:
        raise ValueError(f"its meta says step {meta['step']}")
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, f"{type(e).__name__}: {str(e)[:300]}"))
      continue
    if failures:
      _move_aside(mngr, failures)
    return restored["state"], meta
  raise RuntimeError(
      f"No checkpoint in {mngr.directory} can be read: "
      + "; ".join(f"step {s}: {why}" for s, why in failures)
      + ". Nothing was changed; move the checkpoints directory away to start over.")


def restore_checkpoint(mngr: ocp.CheckpointManager, target):
  """``restore`` as ``(state, step)`` (0 if there is no checkpoint)."""
  state, meta = restore(mngr, target)
  return state, 0 if meta is None else int(meta["step"])


def _move_aside(mngr: ocp.CheckpointManager, failures):
  log = logging.getLogger("sparse_jax.train")
  directory = os.fspath(mngr.directory)
  aside = os.path.join(os.path.dirname(directory), UNREADABLE)
  for step, why in failures:
    src = os.path.join(directory, str(step))
    dst = os.path.join(aside, str(step))
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(aside, exist_ok=True)
      n = 1
      while os.path.exists(dst):  # an earlier unreadable checkpoint of that step
        dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.rename(src, dst)
    log.warning("Checkpoint %s cannot be read (%s): moved to %s; resuming from an "
                "earlier checkpoint.", src, why, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("unreadable checkpoints moved")
  mngr.reload()
