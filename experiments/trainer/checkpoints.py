"""Orbax checkpoints of the train state, with what a resumed run must report.

Each checkpoint ``<workdir>/checkpoints/<step>`` holds the state (``state``) and
a JSON ``meta``: the step, the best and last evaluation so far and the wall time
spent, so a resumed run reports what the uninterrupted one would.

``meta`` also holds a ``fingerprint`` of the state's bits (``fingerprint``), so a
checkpoint whose files were corrupted without orbax noticing (flipped bytes
inside a compressed chunk can decompress to other numbers) is not taken as good.

Restoring tries the newest checkpoint first; one that cannot be read (truncated
or corrupted files, bad metadata, a fingerprint that does not match) is named in a warning, moved out of orbax's
reach to ``<workdir>/checkpoints_unreadable/<step>`` (never deleted, and never
garbage-collected or overwritten by a later save) and the one before is tried.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from experiments.trainer import state as state_lib
from experiments.trainer import workdir as workdir_lib

UNREADABLE = "checkpoints_unreadable"
# What to do about a run that diverged (here and experiments/trainer/reporting.py).
DIVERGED_ADVICE = (
    "To resume from that checkpoint with a lower learning rate, rerun with "
    "--config.learning_rate=<lower> --config.allow_changed=learning_rate (name every "
    "changed field in allow_changed, e.g. learning_rate,weight_decay); or check the data.")


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save that failed or was killed left its files in
  # "<step>.orbax-checkpoint-tmp", never taken as a checkpoint; removed here.
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         cleanup_tmp_directories=True)
  return _Manager(os.path.join(os.path.realpath(workdir), "checkpoints"), options=options)


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, whose failed save raises ``workdir.WriteFailed``.

  A save runs in the background: a failure (a full disk) surfaces at the next
  ``save`` or at ``wait_until_finished``, as whatever tensorstore raised. It is
  raised as the checkpoint that could not be written, and its temporary
  directory is removed (a single process; else at the next start).
  """

  _step = None  # of the newest save started

  def save(self, step, *args, **kwargs):
    started, self._step = self._step, step
    try:
      return super().save(step, *args, **kwargs)  # first waits for the one before
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(e, started if started is not None else step) from e

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(e, self._step) from e

  def _write_failed(self, e: Exception, step) -> Exception:
    """``WriteFailed`` for a failed write (an errno in it), else ``e`` itself."""
    if isinstance(e, workdir_lib.WriteFailed) or not (
        isinstance(e, OSError) or "os_error_code" in str(e)):
      return e
    m = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
    step = m.group(1) if m else step
    directory = os.fspath(self.directory)
    if jax.process_count() == 1:
      for name in os.listdir(directory):
        if name.endswith(".orbax-checkpoint-tmp"):
          shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return workdir_lib.WriteFailed(os.path.join(directory, str(step)), e)


@jax.jit
def fingerprint(tree) -> tuple[jax.Array, jax.Array]:
  """``(hashes, finite)``: uint32 [leaves] and bool [leaves] of ``tree``.

  ``hashes``: a hash of each leaf's bits, the same whatever the sharding: a
  wrapping integer sum of every element's bits, mixed with its position, so a
  changed element always changes its leaf's hash. ``finite``: no NaN or infinity
  in the leaf (True for integer and bool leaves). One fused pass over the state
  reads each element once for both.
  """
  leaves = jax.tree.leaves(tree)
  finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True) for x in leaves]
  return jnp.stack([_leaf_hash(x) for x in leaves]), jnp.stack(finite)


def _leaf_hash(x) -> jax.Array:
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    bits = lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  idx = lax.iota(jnp.uint32, bits.size)
  mixed = (bits * jnp.uint32(0x85EBCA77)) ^ (idx * jnp.uint32(0x9E3779B1))
  return jnp.sum(mixed, dtype=jnp.uint32)


def _fingerprint_list(state) -> list[int]:
  return _fingerprint_and_finite(state)[0]


# The state layouts (tree structure, shapes, dtypes, shardings) whose fingerprint
# program this process has compiled: the first compiles at the first checkpoint
# (1-2 s for VGG-19's 155 arrays on a 2-core CPU), silent but for this log line.
_FINGERPRINTED = set()


def _fingerprint_and_finite(state) -> tuple[list[int], list[bool]]:
  leaves = jax.tree.leaves(state)
  layout = (jax.tree.structure(state), tuple(
      (x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
  if layout not in _FINGERPRINTED:
    logging.getLogger("sparse_jax.train").info(
        "Compiling the checkpoint fingerprint (a hash of the state's %d arrays, to detect "
        "a corrupted checkpoint)...", len(leaves))
    _FINGERPRINTED.add(layout)
  hashes, finite = state_lib.to_host(fingerprint(state))
  return [int(v) for v in np.asarray(hashes)], [bool(v) for v in np.asarray(finite)]


def save_checkpoint(mngr: ocp.CheckpointManager, state, step: int, meta: dict | None = None):
  """Saves ``state`` at ``step`` (asynchronously) with ``meta`` (JSON-able) beside it.

  Raises ``FloatingPointError`` instead if a leaf of ``state`` holds NaN or
  infinity (a diverged run: e.g. a learning rate so large that the weights
  overflow while the loss and gradient were still finite): the newest checkpoint
  stays the last good one.
  """
  hashes, finite = _fingerprint_and_finite(state)
  if not all(finite):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    bad = [p for p, ok in zip(paths, finite) if ok is False]
    latest = mngr.latest_step()
    raise FloatingPointError(
        f"Step {step}: the state holds NaN or infinite values ({len(bad)} arrays: "
        f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); it is not checkpointed "
        f"and the run stops here. Its last checkpoint "
        f"({'none' if latest is None else f'step {latest}'}) is kept. {DIVERGED_ADVICE}")
  meta = {**(meta or {}), "step": step, "fingerprint": hashes}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, target):
  """The newest readable checkpoint: ``(state, meta)``, or ``(target, None)`` if none.

  Restored into the structure and shardings of ``target``: a state, or ``meta ->
  state`` (``None`` when there is no checkpoint) where the state's shapes depend on
  the checkpoint (a condensed run's smaller model). Unreadable newer
  checkpoints are moved aside with a warning (module docstring); if every one is
  unreadable, raises instead of starting over.
  """
  target_for = target if callable(target) else (lambda meta: target)
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return target_for(None), None
  failures = []
  for step in steps:
    try:
      if callable(target):  # its shapes depend on the checkpoint's meta
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target(dict(meta["meta"])))
      else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      meta = dict(restored["meta"])
      if int(meta["step"]) != step:
        raise ValueError(f"its meta says step {meta['step']}")
      if "fingerprint" in meta and _fingerprint_list(restored["state"]) != meta["fingerprint"]:
        raise ValueError("its arrays do not match the fingerprint saved with them")
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
