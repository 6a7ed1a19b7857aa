r"""The gradient-flow sweep (docs/algorithms.md §8): sparse vs same-capacity dense over a grid.

Grid: ``config.study`` densities x optimizers x activations x regularisations x
inits x seeds; at every density below 1 a sparse run (``static`` masks of the config's
distribution at width ``study.width``) and its same-capacity dense run
(``experiments/studies/scsdc.py``); at density 1 the single dense run of full width. Each
run trains in its own workdir ``<workdir>/<run name>`` with the gradient-flow
measures logged to ``metrics.jsonl``; ``run.json`` records the grid point and the
SC-SDC widths and counts.

Resumable: a run whose ``summary.json`` exists is skipped, and an interrupted run
resumes from its checkpoint. The exception: a final run trained at a rate other
than its setting's tuned rate now (a widened grid chose another) is trained again,
its old directory moved to ``<workdir>/previous/<name>_<time>``. With
``study.rates_from`` (a finished sweep's ``tuning.json``) no tuning runs: each
final run trains at its setting's chosen rate there. Sliceable: ``--slice=i/n`` runs every n-th run
starting at the i-th (0-based), so n machines with i = 0..n-1 cover the grid once.

Learning-rate tuning (``study.learning_rates[optimizer]`` a tuple of 2 or more
values; a single value is used as it is): for every setting (optimizer,
activation, regularisation, density, sparse/dense, init) each rate of the grid is
trained once at ``study.tuning_seed`` on the training set less a held-out part
(``study.validation_fraction``, ``input_pipeline.split_for_validation``) and
evaluated on that part, in ``<workdir>/tune/<setting>_lr<rate>_seed<s>``. The
setting's seeds are then trained at the rate of the best validation accuracy
(ties: the smaller rate; a diverged rate ranks last) on the whole training set
and evaluated on the test set. ``<workdir>/tuning.json`` holds every grid and
chosen rate. A slice runs its share of the tuning runs first, then its share of
the final runs; a final run whose setting is not tuned yet (another slice's
tuning runs unfinished) is left pending: run the slice again once they are.

Initialisation (``study.inits``): ``dense_fan_in`` (as above) and/or
``active_fan_in`` (each sparse unit rescaled to its active fan-in,
``state.scale_by_active_fan_in``); the second adds sparse runs only (a dense net's
units have their whole fan-in), named ``..._sparse_active_fan_in_seed<s>``.

  python -m experiments.studies.gradient_flow.sweep \
      --config=experiments/configs/gradient_flow_mnist5k.py \
      --workdir=workdirs/gradient_flow --slice=0/1 [--dry_run]

Then ``python -m experiments.studies.gradient_flow.report --workdir=workdirs/gradient_flow``.
The runs are trained by ``experiments/studies/_grid.py``'s runner; the rates
chosen by ``tuning``; each run directory's files are ``records``'.
The converged study (tuned rates, the paper's grid, 30 epochs) and its commands:
``experiments/configs/gradient_flow_converged_mnist5k.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.trainer import config_checks
from experiments.data import input_pipeline
from experiments.studies import _grid
from experiments.studies import scsdc
from experiments.studies.gradient_flow import records
from experiments.studies.gradient_flow import tuning

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.")
flags.DEFINE_string("slice", "0/1", "i/n: run every n-th run from the i-th (0-based).")
flags.DEFINE_bool("dry_run", False, "Only list the runs of this slice and their state.")
config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=False)

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
REGULARISATIONS = ("none", "l2", "batch_norm", "dropout", "augment")
INITS = config_checks.INIT_SCALINGS
_LOG = logging.getLogger("sparse_jax.gradient_flow_sweep")


@dataclasses.dataclass(frozen=True)
class Run:
  """One grid point: a sparse run or its same-capacity dense run.

  ``learning_rate`` is set on tuning runs only (their grid value; they train on the
  training set less the validation part and are evaluated on that part).
  """
  optimizer: str
  activation: str
  regularisation: str
  density: float
  seed: int
  kind: str  # "sparse" | "dense" (same capacity; full width at density 1)
  init: str = "dense_fan_in"  # | "active_fan_in" (sparse runs only)
  learning_rate: float | None = None

  @property
  def setting(self) -> str:
    """Everything but the seed: the unit of learning-rate tuning."""
    init = "" if self.init == "dense_fan_in" else f"_{self.init}"
    return (f"{self.optimizer}_{self.activation}_{self.regularisation}_d{self.density:g}_"
            f"{self.kind}{init}")

  @property
  def is_tuning(self) -> bool:
    return self.learning_rate is not None

  @property
  def name(self) -> str:
    if self.is_tuning:
      return f"tune/{self.setting}_lr{self.learning_rate:g}_seed{self.seed}"
    return f"{self.setting}_seed{self.seed}"


def check_study(study):
  """Rejects a bad grid before any data is read or anything compiles."""
  for o in study.optimizers:
    if o not in OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {o!r} in study.optimizers; use {OPTIMIZERS}.")
    if o not in study.learning_rates:
      raise ValueError(f"study.learning_rates has no entry for {o!r}; add "
                       f"--config.study.learning_rates.{o}=<rate or tuple of rates>.")
    tuned = len(tuning.learning_rate_grid(study, o)) > 1
    if tuned and not 0.0 < study.get("validation_fraction", 0.0) < 1.0:
      raise ValueError(f"study.learning_rates.{o} is a grid (tuning) but "
                       f"study.validation_fraction={study.get('validation_fraction')} is "
                       "not in (0, 1): set e.g. --config.study.validation_fraction=0.1.")
  for r in study.regularisations:
    if r not in REGULARISATIONS:
      raise ValueError(f"Unknown regularisation {r!r} in study.regularisations; use "
                       f"{REGULARISATIONS}.")
  if "augment" in study.regularisations and not study.get("augment_shift", 0) >= 1:
    raise ValueError("The 'augment' regularisation needs study.augment_shift >= 1 "
                     f"(pixels; got {study.get('augment_shift')}).")
  for d in study.densities:
    if not 0.0 < d <= 1.0:
      raise ValueError(f"Density {d} in study.densities is outside (0, 1].")
  for i in study.get("inits", ("dense_fan_in",)):
    if i not in INITS:
      raise ValueError(f"Unknown init {i!r} in study.inits; use {INITS}.")


def grid_runs(study) -> list[Run]:
  """Every final run of the grid, seeds outermost (a partial sweep has whole seeds)."""
  check_study(study)
  runs = []
  for seed in study.seeds:
    for o in study.optimizers:
      for a in study.activations:
        for r in study.regularisations:
          for d in study.densities:
            for init in study.get("inits", ("dense_fan_in",)):
              if init == "dense_fan_in":
                kinds = ("dense",) if d == 1.0 else ("sparse", "dense")
              else:  # a dense unit's active fan-in is its fan-in: the same run
                kinds = () if d == 1.0 else ("sparse",)
              runs.extend(Run(o, a, r, float(d), int(seed), k, init) for k in kinds)
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


def run_config(config, run: Run, capacity: scsdc.SameCapacity,
               learning_rate: float | None = None):
  """The training config of ``run``: the study recipe with the grid point applied.

  The rate is the tuning run's own, else ``learning_rate`` (the tuned one), else
  the optimizer's single ``study.learning_rates`` value. Fields the trainer reads
  with a default (validation_fraction, augment_shift, init_scaling) are only set
  when on, so the runs of earlier grids keep their exact configs.
  """
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
  if run.is_tuning:
    c.learning_rate = run.learning_rate
    c.validation_fraction = float(study.validation_fraction)
  elif learning_rate is not None:
    c.learning_rate = float(learning_rate)
  else:
    grid = tuning.learning_rate_grid(study, run.optimizer)
    if len(grid) > 1:
      raise ValueError(f"{run.name}: study.learning_rates.{run.optimizer} is a grid; "
                       "pass the tuned learning_rate.")
    c.learning_rate = grid[0]
  c.weight_decay = float(study.l2) if run.regularisation == "l2" else 0.0
  if run.regularisation == "augment":
    c.augment_shift = int(study.augment_shift)
  if run.init != "dense_fan_in":
    c.init_scaling = run.init
  c.seed = run.seed
  if run.kind == "dense":
    c.sparsity.method = "dense"
  else:
    c.sparsity.final = 1.0 - run.density
  return c


class _Slice:
  """What the runs of a slice share: the study, its tuned rates (read once the
  slice's tuning runs are done) and the SC-SDC widths of each density.

  Its ``status``, ``prepare`` and ``train`` are the ``_grid.GridRun`` hooks of a run.
  """

  def __init__(self, config, workdir, finals, tunes, fixed, train_fn, dry_run):
    self.config, self.study, self.workdir = config, config.study, workdir
    self.finals, self.fixed, self.train_fn, self.dry_run = finals, fixed, train_fn, dry_run
    self.tuned_settings = {t.setting for t in tunes}
    self.info = input_pipeline.dataset_info(config.dataset, config.data_dir)
    self.tuning = None  # tuning.tuning_results, once a final run of a tuned setting asks
    self.capacities = {}  # density -> scsdc.SameCapacity

  def learning_rate(self, run: Run) -> float | None:
    """The rate ``run`` trains at when it is not its own or the single one.

    A final run of a tuned setting: the setting's chosen rate (None while its
    tuning runs are unfinished); with ``study.rates_from``: the rate there.
    """
    if not run.is_tuning and run.setting in self.tuned_settings:
      if self.tuning is None:  # once the slice's tuning runs are done
        self.tuning = tuning.tuning_results(self.study, self.workdir, self.finals)
        if not self.dry_run:
          records.write_tuning(self.workdir, self.tuning)
      return self.tuning["settings"][run.setting]["chosen"]
    return None if self.fixed is None else self.fixed[run.setting]

  def _rate_changed(self, run: Run, learning_rate) -> float | None:
    """The rate ``run`` was trained (or started) at, if its setting's rate is now another."""
    trained_at = records.recorded_rate(os.path.join(self.workdir, run.name))
    if (learning_rate is not None and trained_at is not None
        and not math.isclose(trained_at, learning_rate)):
      return trained_at
    return None

  def status(self, run: Run, tag: str) -> str:
    """Pending (its setting's tuning unfinished), to rerun, finished or to run."""
    run_dir = os.path.join(self.workdir, run.name)
    learning_rate = self.learning_rate(run)
    if not run.is_tuning and run.setting in self.tuned_settings and learning_rate is None:
      # Finished or not: its rate is known only when the tuning is done.
      _LOG.info("%s: pending (its setting's tuning runs %s are unfinished%s).", tag,
                self.tuning["settings"][run.setting]["pending"],
                "; a real run trains this slice's share of them first" if self.dry_run else "")
      return _grid.PENDING
    trained_at = self._rate_changed(run, learning_rate)
    if trained_at is not None:
      # The setting's tuned rate changed (a wider grid) since this run started,
      # finished or interrupted: train again at the new rate; the old run is kept.
      _LOG.info("%s: %s at rate %g, the setting's tuned rate is now %g: %s.", tag,
                "trained" if records.is_finished(run_dir) else "started", trained_at,
                learning_rate, "to rerun" if self.dry_run else "rerunning")
      return _grid.LISTED if self.dry_run else _grid.TO_RUN
    if records.is_finished(run_dir):
      return _grid.FINISHED
    if self.dry_run:
      _LOG.info("%s: to run.", tag)
      return _grid.LISTED
    return _grid.TO_RUN

  def prepare(self, run: Run):
    """The config of ``run``; its directory set up (``run.json``; an old run moved away)."""
    learning_rate = self.learning_rate(run)
    if self._rate_changed(run, learning_rate) is not None:
      records.keep_previous(self.workdir, run)
    study = self.study
    if run.density not in self.capacities:
      self.capacities[run.density] = scsdc.same_capacity(
          study.family, study.width, run.density, depth=study.depth,
          input_shape=self.info.input_shape, num_classes=self.info.num_classes)
    cap = self.capacities[run.density]
    c = run_config(self.config, run, cap, learning_rate)
    run_dir = os.path.join(self.workdir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    records.write_json(os.path.join(run_dir, "run.json"), {
        **dataclasses.asdict(run), "name": run.name, "setting": run.setting,
        "family": study.family, "learning_rate": c.learning_rate,
        "tuned": learning_rate is not None, "phase": "tune" if run.is_tuning else "final",
        "rates_from": study.get("rates_from", ""),
        "width": cap.sparse_width if run.kind == "sparse" else cap.dense_width,
        "sparse_width": cap.sparse_width, "dense_width": cap.dense_width,
        "total_weights": cap.total_weights, "active_weights": cap.active_weights,
        "dense_weights": cap.dense_weights, "leftover": cap.leftover,
        "dataset": c.dataset})
    return c

  def train(self, run: Run, config, run_dir: str) -> dict:
    """Trains ``run``; a rate that diverges is a result (``diverged.json``), not a bug."""
    try:
      return self.train_fn(config, run_dir)
    except FloatingPointError as e:
      records.write_json(os.path.join(run_dir, "diverged.json"), {"error": str(e)})
      if run.is_tuning:
        return {"final_test_accuracy": None}  # its rate ranks last
      # The setting's rate is unstable: the next pass tunes without it and trains
      # the setting's seeds at the next best rate (this run kept in previous/).
      raise _grid.RunFailed(f"diverged at rate {config.learning_rate:g} ({e}); the next "
                            "pass retrains its setting at the next best rate.") from e


def run_sweep(config, workdir: str, index: int = 0, count: int = 1, train_fn=None,
              dry_run: bool = False) -> dict:
  """Trains the unfinished runs of slice ``index``/``count``; returns counts.

  The slice's tuning runs first, then its final runs (each at its setting's tuned
  rate; left pending while the setting's tuning is unfinished).

  Args:
    config: the study config (with ``config.study``).
    workdir: the sweep's root directory.
    index, count: the slice (``slice_runs``, of the tuning and of the final runs).
    train_fn: ``train_fn(config, run_dir)``; the trainer by default (tests pass a
      stand-in).
    dry_run: only log the runs and whether they are finished.

  Returns:
    ``{"total", "skipped", "trained", "failed", "pending"}`` counts for the slice
    (``pending``: final runs waiting for their setting's tuning).
  """
  if train_fn is None:
    from experiments.trainer import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  study = config.study
  finals = grid_runs(study)  # checks the grid before any data is read
  fixed = tuning.rates_from(study, finals, workdir)
  tunes = tuning.tuning_runs(study, finals) if fixed is None else []
  state = _Slice(config, workdir, finals, tunes, fixed, train_fn, dry_run)
  runs = [_grid.GridRun(run.name, os.path.join(workdir, run.name),
                        functools.partial(state.prepare, run),
                        functools.partial(state.train, run),
                        status=functools.partial(state.status, run),
                        metric="validation" if run.is_tuning else "test")
          for run in slice_runs(tunes, index, count) + slice_runs(finals, index, count)]
  # One broken grid point should not stop a sweep of hundreds; it is reported.
  counts = _grid.run_grid(runs, is_finished=records.is_finished, log=_LOG, keep_going=True)
  if tunes and not dry_run:
    records.write_tuning(workdir, tuning.tuning_results(study, workdir, finals))
  _LOG.info("Slice %d/%d: %s", index, count, counts)
  return counts


def main(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  _grid.setup(logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow", "sparse_jax.train"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  index, count = parse_slice(FLAGS.slice)
  start = time.time()
  counts = run_sweep(FLAGS.config, FLAGS.workdir, index, count, dry_run=FLAGS.dry_run)
  if not FLAGS.dry_run:
    # The report quotes the command and the wall time from here.
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "sweep_log.jsonl"), "a") as f:
      f.write(json.dumps({"command": _grid.command("experiments.studies.gradient_flow.sweep"),
                          "slice": FLAGS.slice, "wall_time_s": time.time() - start,
                          **counts}) + "\n")
  if counts["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
