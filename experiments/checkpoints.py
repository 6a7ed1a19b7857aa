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

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from experiments import state as state_lib

UNREADABLE = "checkpoints_unreadable"


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


@jax.jit
def fingerprint(tree) -> jax.Array:
  """uint32 [leaves]: a hash of each leaf's bits, the same whatever the sharding.

  A wrapping integer sum of every element's bits, mixed with its position, so a
  changed element always changes its leaf's hash. One fused pass over the state.
  """
  return jnp.stack([_leaf_hash(x) for x in jax.tree.leaves(tree)])


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
  return [int(v) for v in np.asarray(state_lib.to_host(fingerprint(state)))]


def save_checkpoint(mngr: ocp.CheckpointManager, state, step: int, meta: dict | None = None):
  """Saves ``state`` at ``step`` (asynchronously) with ``meta`` (JSON-able) beside it."""
  meta = {**(meta or {}), "step": step, "fingerprint": _fingerprint_list(state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


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
