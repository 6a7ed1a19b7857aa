"""What a run reports: ``metrics.jsonl`` and TensorBoard, log lines, the summary.

A resumed run continues the records of the checkpoint it resumes from: records
after that step (written before a kill) are dropped from ``metrics.jsonl``, and
TensorBoard is told to purge them, so each step is reported exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import time

import jax
import numpy as np

import sparse_jax
from experiments.trainer import checkpoints
from experiments.trainer import steps as steps_lib
from experiments.trainer import workdir as workdir_lib

log = logging.getLogger("sparse_jax.train")


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard.

  ``start_step``: the step the run resumes from (0: a fresh start); records of
  later steps, and a last line cut short by a kill, are dropped first. The
  records up to ``start_step`` must be intact: a line that is not a record, a
  cut line of a step up to ``start_step`` or a missing record of a mask-update
  step in ``event_steps`` (summary.json's FLOPs are computed from their layer
  densities) stops the resume with ``WorkdirDamaged`` naming the file, the line
  and the fix, before anything is trained.

  Each record is on disk when ``write`` returns, TensorBoard's too (written in
  this thread): a failed write raises ``WriteFailed``, and a failed append leaves
  ``metrics.jsonl`` as it was, without a partial line.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0, event_steps=()):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      kept = self._keep_until(start_step, event_steps)
      tb_dir = os.path.join(workdir, "tensorboard")
      # The last events of a killed run may be missing: TensorBoard drops every
      # earlier event (a purge from step 0) and gets the kept records again.
      resumed = os.path.exists(tb_dir)
      self._tb = _EventFile(tb_dir, purge=resumed)
      for record in kept if resumed else []:
        self._add_scalars(record)
      self._tb.flush()

  def _keep_until(self, start_step: int, event_steps) -> list[dict]:
    """Drops the records after ``start_step``; returns those kept (class docstring)."""
    if os.path.islink(self.path):
      raise workdir_lib.WorkdirDamaged(
          f"{self.path} is a symbolic link (to {os.readlink(self.path)}); a run appends "
          "to it and would write through it. Replace it with the file itself, then rerun.")
    data = b""
    if os.path.exists(self.path):
      with open(self.path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    cut = lines.pop()  # b"", unless the last append was cut short
    kept = [(line, r) for line, r in _records(self.path, lines, cut, start_step)
            if r["step"] <= start_step] if start_step else []
    recorded = {r["step"] for _, r in kept}
    missing = sorted(s for s in event_steps if s <= start_step and s not in recorded)
    if missing:
      raise workdir_lib.WorkdirDamaged(
          f"{self.path} has no record of the mask-update step"
          f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:10]))}"
          f"{', ...' if len(missing) > 10 else ''}, at or before the checkpoint at step "
          f"{start_step}: summary.json's FLOPs are computed from their layer densities. "
          "Restore metrics.jsonl from a copy, or train again in a new --workdir.")
    if len(kept) < len(lines) or cut:
      text = b"".join(line + b"\n" for line, _ in kept)
      workdir_lib.write_atomic(self.path, lambda f: f.write(text))
    return [r for _, r in kept]

  def write(self, record: dict):
    if not self.enabled:
      return
    workdir_lib.append_all(self.path, (json.dumps(record) + "\n").encode())
    self._add_scalars(record)
    self._tb.flush()

  def _add_scalars(self, record: dict):
    self._tb.add(record["step"], {k: v for k, v in record.items() if k != "step"
                                  and isinstance(v, (int, float)) and not isinstance(v, bool)})

  def close(self):
    """Closes TensorBoard's event file."""
    if self._tb is not None:
      tb, self._tb = self._tb, None
      tb.close()


def _records(path: str, lines: list[bytes], cut: bytes, start_step: int):
  """``(line, record)`` of each line of ``metrics.jsonl`` and of a cut last line if whole.

  A cut last line (no newline: a kill while appending) is dropped if it is of a
  step after ``start_step`` or of no known step: the record of a checkpoint's
  step is written before the checkpoint is saved.
  """
  for number, line in enumerate(lines, 1):
    record = _parse_record(line)
    if record is None:
      raise workdir_lib.WorkdirDamaged(
          f"{path} line {number} is not a step's record ({line[:80]!r}): each line holds "
          "one JSON object with its \"step\". Delete or repair that line, then rerun.")
    yield line, record
  if not cut:
    return
  record = _parse_record(cut)
  if record is not None:  # whole; only its newline is missing
    yield cut, record
    return
  m = re.match(rb'\{"step": (\d+)', cut)
  if m and int(m.group(1)) <= start_step:
    raise workdir_lib.WorkdirDamaged(
        f"{path} line {len(lines) + 1}, the record of step {int(m.group(1))}, is cut short "
        f"({cut[:60]!r}...), and the checkpoint the run resumes from is of step {start_step}. "
        "Restore metrics.jsonl from a copy, or train again in a new --workdir.")
  log.info("Dropped the last line of %s, cut short by a kill: %r.", path, cut[:60])


def _parse_record(line: bytes) -> dict | None:
  """The record on a line, or None if it is not a JSON object with an integer step."""
  try:
    record = json.loads(line)
  except ValueError:  # UnicodeDecodeError included
    return None
  ok = isinstance(record, dict) and type(record.get("step")) is int  # pylint: disable=unidiomatic-typecheck
  return record if ok else None


class _EventFile:
  """A TensorBoard event file, written in the caller's thread.

  tensorboardX's ``SummaryWriter`` writes from a thread of its own, where a failed
  write (a full disk) is a traceback on stderr and a dead thread, and then a
  trainer blocked forever once the thread's queue is full. Here it raises
  ``WriteFailed`` in the trainer. Same events: one per record, a purge
  (``SessionLog.START`` at step 0) first on a resume.
  """

  def __init__(self, logdir: str, purge: bool):
    # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer
    from tensorboardX import summary as tb_summary
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._scalar, self._crc = tb_summary.scalar, record_writer.masked_crc32c
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self.path, n = base, 0
    while True:  # a new file: one of the same second (a quick resume) is not overwritten
      try:
        with workdir_lib.writing(self.path):
          fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                       0o644)
        break
      except workdir_lib.WriteFailed as e:
        if not isinstance(e.cause, FileExistsError):
          raise
        n += 1
        self.path = f"{base}.{n}"
    self._file = os.fdopen(fd, "wb")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if purge:
      self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                  session_log=event_pb2.SessionLog(
                                      status=event_pb2.SessionLog.START)))

  def add(self, step: int, scalars: dict):
    values = [v for k, x in scalars.items() for v in self._scalar(k, x).value]
    if values:
      summary = self._summary_pb2.Summary(value=values)
      self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def _write(self, event):
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    with workdir_lib.writing(self.path):
      self._file.write(header + struct.pack("<I", self._crc(header)) + data
                       + struct.pack("<I", self._crc(data)))

  def flush(self):
    with workdir_lib.writing(self.path):
      self._file.flush()

  def close(self):
    # Every record was flushed when written: a failure here is one already raised
    # (closing after it, on the way out), not one to report over it.
    try:
      self._file.close()
    except OSError as e:
      log.warning("Closing %s: %s", self.path, workdir_lib.describe_error(e))


def measured_sparsity(params, prunable) -> float:
  """Exact zeros / all among the prunable params, counted on the host in int64."""
  leaves = [np.asarray(p) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable))
            if f]
  return sum(int(np.sum(p == 0)) for p in leaves) / sum(p.size for p in leaves)


def layer_table(params, masks) -> str:
  """The per-layer table printed at the start: shape, parameters, density."""
  lines = [f"{'layer':40s} {'shape':>20s} {'params':>10s} {'density':>8s}"]
  names = sparse_jax.leaf_names(params)
  mask_leaves = (jax.tree.structure(params).flatten_up_to(masks) if masks is not None
                 else [None] * len(names))
  for name, p, m in zip(names, jax.tree.leaves(params), mask_leaves):
    d = "dense" if m is None else f"{float(np.mean(np.asarray(m))):.4f}"
    lines.append(f"{name:40s} {str(tuple(p.shape)):>20s} {int(np.size(p)):>10d} {d:>8s}")
  return "\n".join(lines)


def host_layer_densities(masks) -> dict[str, np.float32]:
  """``sparse_jax.layer_densities`` of host (numpy) masks, without a device program.

  The active count is exact and divided in float32 as the device's float32 mean
  of the bools is (equal to it below 2**24 weights per layer).
  """
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  return {sparse_jax.path_to_name(p): np.float32(np.count_nonzero(m)) / np.float32(np.size(m))
          for p, m in flat}


def train_metrics(fetched, first_step: int) -> dict:
  """Mean loss and accuracy of the dispatches ``fetched`` (``[(metrics, steps run)]``).

  Raises ``FloatingPointError`` naming the first step (1-based) whose loss or
  gradient was not finite.
  """
  finite = np.concatenate([np.asarray(m["finite"][:ran]) for m, ran in fetched])
  if not finite.all():
    bad = first_step + int(np.argmin(finite)) + 1
    raise FloatingPointError(
        f"Step {bad}: the loss or a gradient is NaN or infinite. The run stops here; its "
        f"last checkpoint (before step {bad}) is kept. {checkpoints.DIVERGED_ADVICE}")
  cat = lambda k: np.concatenate([m[k][:ran] for m, ran in fetched])
  return {"train_loss": float(np.mean(cat("train_loss"))),
          "train_accuracy": float(np.mean(cat("train_accuracy")))}


def train_record(step: int, first_step: int, fetched, record: dict, *,
                 steps_per_epoch: int, seconds: float, t_start: float) -> dict:
  """The ``metrics.jsonl`` record at ``step`` of the dispatches ``fetched``.

  ``fetched`` ran steps ``first_step + 1 .. step`` in ``seconds``; ``record``
  holds the step's other entries (evaluation, mask update); ``t_start`` is the
  run's start on the wall clock (earlier segments included).
  """
  train = train_metrics(fetched, first_step)
  last = fetched[-1][0]  # the read-outs of the state now
  if "sparsity" not in record and "density" in last:
    record["sparsity"] = 1.0 - float(last["density"])
  return {"step": step, "epoch": step / steps_per_epoch, **train,
          "learning_rate": float(last["learning_rate"]),
          "wall_time_s": time.time() - t_start,
          "steps_per_s": (step - first_step) / max(seconds, 1e-9), **record}


# The per-step metrics a record averages, carried over a preemption in the
# checkpoint's meta (``since_last_record``, ``carried_metrics``).
CARRIED_KEYS = ("train_loss", "train_accuracy", "finite")


def since_last_record(fetched, first_step: int) -> dict:
  """The steps ``fetched`` since the last record, as a checkpoint's meta keeps them.

  Raises ``FloatingPointError`` (``train_metrics``) if a step was not finite.
  """
  train_metrics(fetched, first_step)
  since = {k: np.concatenate([np.asarray(m[k])[:ran] for m, ran in fetched])
           for k in CARRIED_KEYS}
  # JSON: a float32 (or bool) value round-trips exactly through a Python float.
  return {"first_step": first_step, "dtypes": {k: v.dtype.name for k, v in since.items()},
          **{k: v.tolist() for k, v in since.items()}}


def carried_metrics(meta: dict, step: int) -> tuple[list, int]:
  """``([(metrics, steps)], first step)`` of the steps run since the last record.

  A preempted run stops between two records: the next record (after the resume)
  averages the steps before the preemption too (``since_last_record`` in the
  checkpoint's ``meta``), as the uninterrupted run's does.
  """
  carried = meta.get("since_last_record")
  if not carried:
    return [], step
  metrics = {k: np.asarray(carried[k], dtype=carried["dtypes"][k]) for k in CARRIED_KEYS}
  return [(metrics, len(metrics["finite"]))], int(carried["first_step"])


def log_line(record: dict, total_steps: int, compile_wait_s: float = 0.0):
  """One progress line: step, epoch, loss, accuracy, sparsity, learning rate, speed.

  ``compile_wait_s``: the seconds of the interval spent waiting for a program to
  compile (the first interval, the first mask update), said on the line: its
  steps/s is of the wall clock, as ``metrics.jsonl`` records it.
  """
  test = (f" test_acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else "")
  if "test_bits_per_byte" in record:
    test += f" test_bpb {record['test_bits_per_byte']:.4f}"
  compiling = (f" (includes {compile_wait_s:.1f} s compiling)" if compile_wait_s >= 0.05
               else "")
  log.info("step %d/%d epoch %.1f loss %.4f train_acc %.4f%s sparsity %.4f lr %.4g "
           "%.1f steps/s%s", record["step"], total_steps, record["epoch"],
           record["train_loss"], record["train_accuracy"], test, record.get("sparsity", 0.0),
           record["learning_rate"], record["steps_per_s"], compiling)


def final_summary(config, final, masks, best_acc: float, last_eval: dict,
                  wall_time_s: float) -> dict:
  """``summary.json`` of a finished run (FLOPs and timings are added by the trainer)."""
  sparse = masks is not None
  prunable = (jax.tree.map(lambda p, m: m is not None, final.params, masks) if sparse
              else sparse_jax.select_prunable(final.params))
  skipped = None
  if sparse and not steps_lib.is_straight_through(final.opt_state):  # ste: no events
    skipped = sparse_jax.get_sparse_state(final.opt_state).skipped_events
    skipped = None if skipped is None else int(skipped)
  return {
      "final_test_accuracy": last_eval.get("test_accuracy"),
      "skipped_mask_updates": skipped,
      "best_test_accuracy": best_acc,
      "final_test_loss": last_eval.get("test_loss"),
      **({"final_test_bits_per_byte": last_eval["test_bits_per_byte"]}
         if "test_bits_per_byte" in last_eval else {}),
      "final_sparsity": measured_sparsity(final.params, prunable),
      # Counted on the host: the masks are numpy arrays by now.
      "mask_sparsity": None if masks is None else
                       1.0 - sum(int(np.count_nonzero(m)) for m in jax.tree.leaves(masks))
                       / sparse_jax.count_prunable(masks),
      "steps": int(final.step),
      "wall_time_s": wall_time_s,
      "method": config.sparsity.method,
      "config": config.to_dict(),
  }
