"""What a run reports: ``metrics.jsonl`` and TensorBoard, log lines, the summary.

A resumed run continues the records of the checkpoint it resumes from: records
after that step (written before a kill) are dropped from ``metrics.jsonl``, and
TensorBoard is told to purge them, so each step is reported exactly once.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

import sparse_jax
from experiments import steps as steps_lib

log = logging.getLogger("sparse_jax.train")


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard.

  ``start_step``: the step the run resumes from (0: a fresh start); records of
  later steps, and a line cut short by a kill, are dropped first.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      kept = self._keep_until(start_step)
      # tensorboardX writes TensorBoard event files without TensorFlow's summary ops
      # (which need the separate tensorboard package).
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      tb_dir = os.path.join(workdir, "tensorboard")
      # Its writer thread may not have written the last events of a killed run:
      # TensorBoard drops every earlier event (purge_step=0) and gets the kept
      # records again from metrics.jsonl.
      resumed = os.path.exists(tb_dir)
      self._tb = SummaryWriter(tb_dir, purge_step=0 if resumed else None)
      for record in kept if resumed else []:
        self._add_scalars(record)

  def _keep_until(self, start_step: int) -> list[dict]:
    """Drops the records after ``start_step``; returns those kept."""
    if not os.path.exists(self.path):
      return []
    kept, records = [], []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # cut short by a kill
        if start_step and record.get("step", 0) <= start_step:
          kept.append(line if line.endswith("\n") else line + "\n")
          records.append(record)
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    return records

  def write(self, record: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._add_scalars(record)
    self._tb.flush()

  def _add_scalars(self, record: dict):
    for k, v in record.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
        self._tb.add_scalar(k, v, global_step=record["step"])

  def close(self):
    """Writes out TensorBoard's queued events (its writer thread does not at exit)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
        f"last checkpoint (before step {bad}) is kept. Lower the learning rate, check "
        "the data, or resume from that checkpoint with other settings.")
  cat = lambda k: np.concatenate([m[k][:ran] for m, ran in fetched])
  return {"train_loss": float(np.mean(cat("train_loss"))),
          "train_accuracy": float(np.mean(cat("train_accuracy")))}


def log_line(record: dict, total_steps: int):
  """One progress line: step, epoch, loss, accuracy, sparsity, learning rate, speed."""
  test = (f" test_acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else "")
  if "test_bits_per_byte" in record:
    test += f" test_bpb {record['test_bits_per_byte']:.4f}"
  log.info("step %d/%d epoch %.1f loss %.4f train_acc %.4f%s sparsity %.4f lr %.4g "
           "%.1f steps/s", record["step"], total_steps, record["epoch"],
           record["train_loss"], record["train_accuracy"], test, record.get("sparsity", 0.0),
           record["learning_rate"], record["steps_per_s"])


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
    if skipped:
      log.warning("%d mask-update events were skipped (mask_update=False on an event "
                  "step): mask_update_steps() misses an event of this method.", skipped)
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
