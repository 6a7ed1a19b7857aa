"""Learning-rate tuning of the gradient-flow sweep: grids, chosen rates, tuning.json.

With ``study.learning_rates[optimizer]`` a tuple of 2 or more rates, every setting
(all of a grid point but the seed) trains each rate once at ``study.tuning_seed``
on the training set less a validation part; the setting's seeds then train at the
rate chosen by ``TIE_RULE``. ``study.rates_from`` takes the chosen rates of a
finished sweep instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from experiments.studies.gradient_flow import records

TIE_RULE = ("the best validation accuracy; ties go to the smaller learning rate; a "
            "diverged rate (non-finite loss) ranks last; a rate at which a final run "
            "(another seed) diverged is not chosen again: the next best is")


def learning_rate_grid(study, optimizer: str) -> tuple[float, ...]:
  """``study.learning_rates[optimizer]`` as a tuple (one value: no tuning)."""
  value = study.learning_rates[optimizer]
  grid = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (
      float(value),)
  if not grid or any(not v > 0 for v in grid) or len(set(grid)) != len(grid):
    raise ValueError(f"study.learning_rates.{optimizer}={value!r}: give one rate or a "
                     "tuple of distinct positive rates (e.g. (0.3, 0.1, 0.03)).")
  return tuple(sorted(grid))


def tuning_runs(study, runs: list) -> list:
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


def tuning_results(study, workdir: str, runs: list) -> dict:
  """Every setting's grid, validation accuracies and chosen rate (``tuning.json``).

  ``{"settings": {setting: {"grid": {rate: accuracy | None}, "chosen": rate | None,
  "complete": bool}}, ...}``; accuracy None is a diverged run; ``chosen`` is None
  until every rate of the setting has finished (or diverged).
  """
  settings = {}
  for run in tuning_runs(study, runs):
    entry = settings.setdefault(run.setting, {"grid": {}, "pending": []})
    result = records.tuning_outcome(os.path.join(workdir, run.name))
    if result is None:
      entry["pending"].append(run.learning_rate)
    else:
      entry["grid"][run.learning_rate] = result["accuracy"]
  out, unstable = {}, records.unstable_rates(workdir)
  for setting, entry in settings.items():
    complete = not entry["pending"]
    bad = unstable.get(setting, [])
    out[setting] = {"grid": {f"{lr:g}": acc for lr, acc in sorted(entry["grid"].items())},
                    "pending": [f"{lr:g}" for lr in entry["pending"]],
                    "chosen": choose_learning_rate(entry["grid"], bad) if complete else None,
                    "complete": complete, "unstable": [f"{lr:g}" for lr in bad]}
  return {"validation_fraction": study.get("validation_fraction", 0.0),
          "tuning_seed": study.get("tuning_seed", 0), "rule": TIE_RULE, "settings": out}


def rates_from(study, runs: list, workdir: str) -> dict[str, float] | None:
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
