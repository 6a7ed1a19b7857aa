r"""The gradient-flow sweep (SPEC §8): sparse vs same-capacity dense over a grid.

Grid: ``config.study`` densities x optimizers x activations x regularisations x
seeds; at every density below 1 a sparse run (``static`` masks of the config's
distribution at width ``study.width``) and its same-capacity dense run
(``experiments/scsdc.py``); at density 1 the single dense run of full width. Each
run trains in its own workdir ``<workdir>/<run name>`` with the gradient-flow
measures logged to ``metrics.jsonl``; ``run.json`` records the grid point and the
SC-SDC widths and counts.

Resumable: a run whose ``summary.json`` exists is skipped, and an interrupted run
resumes from its checkpoint. Sliceable: ``--slice=i/n`` runs every n-th run
starting at the i-th (0-based), so n machines with i = 0..n-1 cover the grid once.

  python -m experiments.gradient_flow_sweep \
      --config=experiments/configs/gradient_flow_mnist5k.py \
      --workdir=workdirs/gradient_flow --slice=0/1 [--dry_run]

Then ``python -m experiments.gradient_flow_report --workdir=workdirs/gradient_flow``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import compilation_cache
from experiments import input_pipeline
from experiments import scsdc

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.")
flags.DEFINE_string("slice", "0/1", "i/n: run every n-th run from the i-th (0-based).")
flags.DEFINE_bool("dry_run", False, "Only list the runs of this slice and their state.")
config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=False)

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
REGULARISATIONS = ("none", "l2", "batch_norm", "dropout")


@dataclasses.dataclass(frozen=True)
class Run:
  """One grid point: a sparse run or its same-capacity dense run."""
  optimizer: str
  activation: str
  regularisation: str
  density: float
  seed: int
  kind: str  # "sparse" | "dense" (same capacity; full width at density 1)

  @property
  def name(self) -> str:
    return (f"{self.optimizer}_{self.activation}_{self.regularisation}_d{self.density:g}_"
            f"{self.kind}_seed{self.seed}")


def grid_runs(study) -> list[Run]:
  """Every run of the grid, seeds outermost (a partial sweep has whole seeds)."""
  for o in study.optimizers:
    if o not in OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {o!r} in study.optimizers; use {OPTIMIZERS}.")
  for r in study.regularisations:
    if r not in REGULARISATIONS:
      raise ValueError(f"Unknown regularisation {r!r} in study.regularisations; use "
                       f"{REGULARISATIONS}.")
  for d in study.densities:
    if not 0.0 < d <= 1.0:
      raise ValueError(f"Density {d} in study.densities is outside (0, 1].")
  runs = []
  for seed in study.seeds:
    for o in study.optimizers:
      for a in study.activations:
        for r in study.regularisations:
          for d in study.densities:
            kinds = ("dense",) if d == 1.0 else ("sparse", "dense")
            runs.extend(Run(o, a, r, float(d), int(seed), k) for k in kinds)
  return runs


def parse_slice(text: str) -> tuple[int, int]:
  """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--slice={text!r} is not i/n (e.g. 0/4 for the first of four "
                     "machines).") from None
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"--slice={text!r}: need n >= 1 and 0 <= i < n (0-based).")
  return i, n


def slice_runs(runs: list[Run], index: int, count: int) -> list[Run]:
  """The runs of slice ``index`` of ``count`` (round robin, so slices stay balanced)."""
  return runs[index::count]


def is_finished(run_dir: str) -> bool:
  """True when the run wrote its final summary (a halted run has none)."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("final_test_accuracy") is not None


def run_config(config, run: Run, capacity: scsdc.SameCapacity):
  """The training config of ``run``: the study recipe with the grid point applied."""
  study = config.study
  c = config.copy_and_resolve_references()
  c.unlock()
  del c["study"]
  width = capacity.sparse_width if run.kind == "sparse" else capacity.dense_width
  model_kwargs = {"activation": run.activation}
  if run.regularisation == "batch_norm":
    model_kwargs["batch_norm"] = True
  if run.regularisation == "dropout":
    model_kwargs["dropout_rate"] = float(study.dropout_rate)
  c.model, kwargs = scsdc.family_model(study.family, width, study.depth, **model_kwargs)
  c.model_kwargs = kwargs
  c.optimizer = "sgd" if run.optimizer == "momentum" else run.optimizer
  c.momentum = 0.9 if run.optimizer == "momentum" else 0.0
  c.learning_rate = float(study.learning_rates[run.optimizer])
  c.weight_decay = float(study.l2) if run.regularisation == "l2" else 0.0
  c.seed = run.seed
  if run.kind == "dense":
    c.sparsity.method = "dense"
  else:
    c.sparsity.final = 1.0 - run.density
  return c


def run_sweep(config, workdir: str, index: int = 0, count: int = 1, train_fn=None,
              dry_run: bool = False) -> dict:
  """Trains the unfinished runs of slice ``index``/``count``; returns counts.

  Args:
    config: the study config (with ``config.study``).
    workdir: the sweep's root directory.
    index, count: the slice (``slice_runs``).
    train_fn: ``train_fn(config, run_dir)``; the trainer by default (tests pass a
      stand-in).
    dry_run: only log the runs and whether they are finished.

  Returns:
    ``{"total", "skipped", "trained", "failed"}`` counts for the slice.
  """
  if train_fn is None:
    from experiments import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  log = logging.getLogger("sparse_jax.gradient_flow_sweep")
  study = config.study
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  runs = slice_runs(grid_runs(study), index, count)
  capacities = {}
  counts = {"total": len(runs), "skipped": 0, "trained": 0, "failed": 0}
  t0, durations = time.time(), []
  for k, run in enumerate(runs, 1):
    run_dir = os.path.join(workdir, run.name)
    if is_finished(run_dir):
      counts["skipped"] += 1
      log.info("[%d/%d] %s: finished, skipped.", k, len(runs), run.name)
      continue
    if dry_run:
      log.info("[%d/%d] %s: to run.", k, len(runs), run.name)
      continue
    if run.density not in capacities:
      capacities[run.density] = scsdc.same_capacity(
          study.family, study.width, run.density, depth=study.depth,
          input_shape=info.input_shape, num_classes=info.num_classes)
    cap = capacities[run.density]
    c = run_config(config, run, cap)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
      json.dump({**dataclasses.asdict(run), "name": run.name, "family": study.family,
                 "width": cap.sparse_width if run.kind == "sparse" else cap.dense_width,
                 "sparse_width": cap.sparse_width, "dense_width": cap.dense_width,
                 "total_weights": cap.total_weights, "active_weights": cap.active_weights,
                 "dense_weights": cap.dense_weights, "leftover": cap.leftover,
                 "dataset": c.dataset}, f, indent=1)
    start = time.time()
    try:
      summary = train_fn(c, run_dir)
    except Exception:  # pylint: disable=broad-except
      # One broken grid point should not stop a sweep of hundreds; it is reported.
      counts["failed"] += 1
      log.error("[%d/%d] %s failed:\n%s", k, len(runs), run.name, traceback.format_exc())
      continue
    counts["trained"] += 1
    durations.append(time.time() - start)
    left = sum(1 for r in runs[k:] if not is_finished(os.path.join(workdir, r.name)))
    eta = left * sum(durations) / len(durations)
    log.info("[%d/%d] %s: test accuracy %.4f in %.1f s; %d to go, ETA %.1f min "
             "(%.1f min so far).", k, len(runs), run.name,
             summary.get("final_test_accuracy") or float("nan"), durations[-1], left,
             eta / 60, (time.time() - t0) / 60)
  log.info("Slice %d/%d: %s", index, count, counts)
  return counts


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow", "sparse_jax.train"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  index, count = parse_slice(FLAGS.slice)
  start = time.time()
  counts = run_sweep(FLAGS.config, FLAGS.workdir, index, count, dry_run=FLAGS.dry_run)
  if not FLAGS.dry_run:
    # The report quotes the command and the wall time from here.
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "sweep_log.jsonl"), "a") as f:
      f.write(json.dumps({"command": " ".join(["python -m experiments.gradient_flow_sweep",
                                               *sys.argv[1:]]),
                          "slice": FLAGS.slice, "wall_time_s": time.time() - start,
                          **counts}) + "\n")
  if counts["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
