r"""The gradient-flow sweep (SPEC §8): sparse vs same-capacity dense over a grid.

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
The converged study (tuned rates, the paper's grid, 30 epochs) and its commands:
``experiments/configs/gradient_flow_converged_mnist5k.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import math
import os
import sys
import time
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.trainer import compilation_cache
from experiments.trainer import config_checks
from experiments.data import input_pipeline
from experiments.studies import scsdc
from experiments.trainer import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.")
flags.DEFINE_string("slice", "0/1", "i/n: run every n-th run from the i-th (0-based).")
flags.DEFINE_bool("dry_run", False, "Only list the runs of this slice and their state.")
config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=False)

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
REGULARISATIONS = ("none", "l2", "batch_norm", "dropout", "augment")
INITS = config_checks.INIT_SCALINGS
TIE_RULE = ("the best validation accuracy; ties go to the smaller learning rate; a "
            "diverged rate (non-finite loss) ranks last; a rate at which a final run "
            "(another seed) diverged is not chosen again: the next best is")


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


def learning_rate_grid(study, optimizer: str) -> tuple[float, ...]:
  """``study.learning_rates[optimizer]`` as a tuple (one value: no tuning)."""
  value = study.learning_rates[optimizer]
  grid = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (
      float(value),)
  if not grid or any(not v > 0 for v in grid) or len(set(grid)) != len(grid):
    raise ValueError(f"study.learning_rates.{optimizer}={value!r}: give one rate or a "
                     "tuple of distinct positive rates (e.g. (0.3, 0.1, 0.03)).")
  return tuple(sorted(grid))


def check_study(study):
  """Rejects a bad grid before any data is read or anything compiles."""
  for o in study.optimizers:
    if o not in OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {o!r} in study.optimizers; use {OPTIMIZERS}.")
    if o not in study.learning_rates:
      raise ValueError(f"study.learning_rates has no entry for {o!r}; add "
                       f"--config.study.learning_rates.{o}=<rate or tuple of rates>.")
    tuned = len(learning_rate_grid(study, o)) > 1
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


def tuning_runs(study, runs: list[Run]) -> list[Run]:
  """The tuning runs of the settings of ``runs`` whose optimizer has a rate grid."""
  out, seen = [], set()
  for run in runs:
    grid = learning_rate_grid(study, run.optimizer)
    if len(grid) < 2 or run.setting in seen:
      continue
    seen.add(run.setting)
    out.extend(dataclasses.replace(run, seed=int(study.tuning_seed), learning_rate=lr)
               for lr in grid)
  return out


def choose_learning_rate(grid: dict, unstable=()) -> float:
  """The rate of ``{rate: validation accuracy or None (diverged)}`` by ``TIE_RULE``.

  ``unstable``: rates at which a final run diverged; left out while another is left.
  """
  if not grid:
    raise ValueError("choose_learning_rate needs at least one tuning result.")
  candidates = [lr for lr in grid if not any(math.isclose(lr, u) for u in unstable)]
  return min(candidates or [min(grid)],
             key=lambda lr: (-(grid[lr] if grid[lr] is not None else -math.inf), lr))


def unstable_rates(workdir: str) -> dict[str, list[float]]:
  """``{setting: rates}`` at which a final run diverged (``diverged.json``).

  Read from the final runs' directories and from ``previous/``, where such a run
  is moved once its setting is retrained at another rate, so the rate stays out.
  """
  out = collections.defaultdict(set)
  for marker in (glob.glob(os.path.join(workdir, "*", "diverged.json"))
                 + glob.glob(os.path.join(workdir, "previous", "*", "diverged.json"))):
    path = os.path.join(os.path.dirname(marker), "run.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      run = json.load(f)
    if run.get("phase") == "final" and run.get("learning_rate") is not None:
      out[run["setting"]].add(float(run["learning_rate"]))
  return {k: sorted(v) for k, v in out.items()}


def tuning_results(study, workdir: str, runs: list[Run]) -> dict:
  """Every setting's grid, validation accuracies and chosen rate (``tuning.json``).

  ``{"settings": {setting: {"grid": {rate: accuracy | None}, "chosen": rate | None,
  "complete": bool}}, ...}``; accuracy None is a diverged run; ``chosen`` is None
  until every rate of the setting has finished (or diverged).
  """
  settings = {}
  for run in tuning_runs(study, runs):
    entry = settings.setdefault(run.setting, {"grid": {}, "pending": []})
    result = tuning_outcome(os.path.join(workdir, run.name))
    if result is None:
      entry["pending"].append(run.learning_rate)
    else:
      entry["grid"][run.learning_rate] = result["accuracy"]
  out, unstable = {}, unstable_rates(workdir)
  for setting, entry in settings.items():
    complete = not entry["pending"]
    bad = unstable.get(setting, [])
    out[setting] = {"grid": {f"{lr:g}": acc for lr, acc in sorted(entry["grid"].items())},
                    "pending": [f"{lr:g}" for lr in entry["pending"]],
                    "chosen": choose_learning_rate(entry["grid"], bad) if complete else None,
                    "complete": complete, "unstable": [f"{lr:g}" for lr in bad]}
  return {"validation_fraction": study.get("validation_fraction", 0.0),
          "tuning_seed": study.get("tuning_seed", 0), "rule": TIE_RULE, "settings": out}


def tuning_outcome(run_dir: str) -> dict | None:
  """``{"accuracy": validation accuracy or None if diverged}``; None if not finished."""
  if os.path.exists(os.path.join(run_dir, "diverged.json")):
    return {"accuracy": None}
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    acc = json.load(f).get("final_test_accuracy")
  return None if acc is None else {"accuracy": acc}


def rates_from(study, runs: list[Run], workdir: str) -> dict[str, float] | None:
  """``{setting: rate}`` from ``study.rates_from`` (a ``tuning.json``), or None.

  Each setting of ``runs`` takes its chosen rate there, tuned on the grid this
  study gives its optimizer (an optimizer with one rate takes that rate). Checked
  before any data is read, so a wrong path, another sweep's grid or an untuned
  setting fails at once.
  """
  path = study.get("rates_from", "")
  if not path:
    return None
  if not os.path.isfile(path):
    raise ValueError(f"study.rates_from={path!r} is not a file: give the tuning.json of "
                     "a finished sweep (e.g. workdirs/gradient_flow_converged/tuning.json).")
  if os.path.abspath(path) == os.path.abspath(os.path.join(workdir, "tuning.json")):
    raise ValueError(f"study.rates_from={path!r} is this sweep's own tuning.json: train "
                     "the longer (or other) runs in a new --workdir.")
  with open(path) as f:
    settings = json.load(f).get("settings", {})
  rates, bad = {}, []
  for run in runs:
    grid = learning_rate_grid(study, run.optimizer)
    entry = settings.get(run.setting, {})
    tuned_on = {*entry.get("grid", {}), *entry.get("pending", [])}
    if len(grid) < 2:
      rates[run.setting] = grid[0]
    elif entry.get("complete") and tuned_on == {f"{lr:g}" for lr in grid}:
      rates[run.setting] = entry["chosen"]
    else:
      bad.append(run.setting)
  if bad:
    bad = sorted(set(bad))
    raise ValueError(f"study.rates_from={path!r} has no finished tuning on this study's "
                     f"learning-rate grids for {len(bad)} settings (e.g. {bad[0]}): finish "
                     "that sweep's tuning on the same study.learning_rates, or narrow the "
                     "grid to its tuned settings.")
  return rates


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
  """True when the run wrote its final summary (a halted run has none).

  A tuning run that diverged (``diverged.json``) is finished too: its rate ranks last.
  """
  if os.path.exists(os.path.join(run_dir, "diverged.json")):
    return True
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("final_test_accuracy") is not None


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
    grid = learning_rate_grid(study, run.optimizer)
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
  log = logging.getLogger("sparse_jax.gradient_flow_sweep")
  study = config.study
  finals = grid_runs(study)  # checks the grid before any data is read
  fixed = rates_from(study, finals, workdir)
  tunes = tuning_runs(study, finals) if fixed is None else []
  tuned_settings = {t.setting for t in tunes}
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  runs = slice_runs(tunes, index, count) + slice_runs(finals, index, count)
  counts = {"total": len(runs), "skipped": 0, "trained": 0, "failed": 0, "pending": 0}
  capacities, durations, t0 = {}, [], time.time()
  tuning = None
  for k, run in enumerate(runs, 1):
    run_dir = os.path.join(workdir, run.name)
    tag = f"[{k}/{len(runs)}] {run.name}"
    learning_rate = None
    if not run.is_tuning and run.setting in tuned_settings:
      if tuning is None:  # once the slice's tuning runs are done
        tuning = tuning_results(study, workdir, finals)
        if not dry_run:
          write_tuning(workdir, tuning)
      learning_rate = tuning["settings"][run.setting]["chosen"]
    elif fixed is not None:
      learning_rate = fixed[run.setting]
    waiting = not run.is_tuning and run.setting in tuned_settings and learning_rate is None
    if waiting:  # finished or not: its rate is known only when the tuning is done
      counts["pending"] += 1
      log.info("%s: pending (its setting's tuning runs %s are unfinished%s).", tag,
               tuning["settings"][run.setting]["pending"],
               "; a real run trains this slice's share of them first" if dry_run else "")
      continue
    trained_at = recorded_rate(run_dir)
    if (learning_rate is not None and trained_at is not None
        and not math.isclose(trained_at, learning_rate)):
      # The setting's tuned rate changed (a wider grid) since this run started,
      # finished or interrupted: train again at the new rate; the old run is kept.
      log.info("%s: %s at rate %g, the setting's tuned rate is now %g: %s.", tag,
               "trained" if is_finished(run_dir) else "started", trained_at,
               learning_rate, "to rerun" if dry_run else "rerunning")
      if dry_run:
        continue
      keep_previous(workdir, run)
    elif is_finished(run_dir):
      counts["skipped"] += 1
      log.info("%s: finished, skipped.", tag)
      continue
    if dry_run:
      log.info("%s: to run.", tag)
      continue
    if run.density not in capacities:
      capacities[run.density] = scsdc.same_capacity(
          study.family, study.width, run.density, depth=study.depth,
          input_shape=info.input_shape, num_classes=info.num_classes)
    cap = capacities[run.density]
    c = run_config(config, run, cap, learning_rate)
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "run.json"), {
        **dataclasses.asdict(run), "name": run.name, "setting": run.setting,
        "family": study.family, "learning_rate": c.learning_rate,
        "tuned": learning_rate is not None, "phase": "tune" if run.is_tuning else "final",
        "rates_from": study.get("rates_from", ""),
        "width": cap.sparse_width if run.kind == "sparse" else cap.dense_width,
        "sparse_width": cap.sparse_width, "dense_width": cap.dense_width,
        "total_weights": cap.total_weights, "active_weights": cap.active_weights,
        "dense_weights": cap.dense_weights, "leftover": cap.leftover,
        "dataset": c.dataset})
    start = time.time()
    try:
      summary = train_fn(c, run_dir)
    except FloatingPointError as e:
      # A rate of the grid that diverges is a result (it ranks last), not a failure.
      _write_json(os.path.join(run_dir, "diverged.json"), {"error": str(e)})
      if not run.is_tuning:
        # The setting's rate is unstable: the next pass tunes without it and trains
        # the setting's seeds at the next best rate (this run kept in previous/).
        counts["failed"] += 1
        log.error("%s diverged at rate %g (%s); the next pass retrains its setting at "
                  "the next best rate.", tag, c.learning_rate, e)
        continue
      summary = {"final_test_accuracy": None}
    except Exception:  # pylint: disable=broad-except
      # One broken grid point should not stop a sweep of hundreds; it is reported.
      counts["failed"] += 1
      log.error("%s failed:\n%s", tag, traceback.format_exc())
      continue
    counts["trained"] += 1
    durations.append(time.time() - start)
    left = sum(1 for r in runs[k:] if not is_finished(os.path.join(workdir, r.name)))
    eta = left * sum(durations) / len(durations)
    log.info("%s: %s accuracy %s in %.1f s; %d to go, ETA %.1f min (%.1f min so far).",
             tag, "validation" if run.is_tuning else "test",
             summary.get("final_test_accuracy"), durations[-1], left, eta / 60,
             (time.time() - t0) / 60)
  if tunes and not dry_run:
    write_tuning(workdir, tuning_results(study, workdir, finals))
  log.info("Slice %d/%d: %s", index, count, counts)
  return counts


def recorded_rate(run_dir: str) -> float | None:
  """The learning rate in a run's ``run.json`` (None without one)."""
  path = os.path.join(run_dir, "run.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("learning_rate")


def keep_previous(workdir: str, run: Run):
  """Moves a run's directory to ``<workdir>/previous/<name>_<time>`` (kept whole)."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest = os.path.join(workdir, "previous", f"{run.name}_{stamp}")
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  os.rename(os.path.join(workdir, run.name), dest)


def write_tuning(workdir: str, tuning: dict):
  """Writes ``<workdir>/tuning.json``, keeping the settings of earlier sweeps' grids.

  A workdir can hold several grids (the converged study's init factor is a second
  sweep on a sub-grid); each sweep recomputes its own settings from the run
  directories and leaves the others' entries as they are.
  """
  path = os.path.join(workdir, "tuning.json")
  settings = {}
  if os.path.exists(path):
    with open(path) as f:
      settings = json.load(f).get("settings", {})
  _write_json(path, {**tuning, "settings": {**settings, **tuning["settings"]}})


def _write_json(path: str, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_json(path, value)  # a complete file or the old one, never half


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
      f.write(json.dumps({"command": " ".join(["python -m experiments.studies.gradient_flow.sweep",
                                               *sys.argv[1:]]),
                          "slice": FLAGS.slice, "wall_time_s": time.time() - start,
                          **counts}) + "\n")
  if counts["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
