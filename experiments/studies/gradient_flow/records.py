"""The gradient-flow sweep's records: what each run directory holds, read and written.

A run's directory (``<workdir>/<run name>``) holds ``run.json`` (the grid point, the
rate, the SC-SDC widths; written by the sweep before training), the trainer's
``summary.json`` and ``metrics.jsonl``, and ``diverged.json`` when its loss went
non-finite. The sweep's root holds ``tuning.json`` (every setting's grid and chosen
rate) and ``previous/`` (runs retrained at another rate, kept whole). ``load_run``
flattens a finished run into the record the report's statistics work on.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import time

import numpy as np

from experiments.trainer import workdir as workdir_lib

MEASURES = ("egf_p1", "egf_p2", "gradient_norm", "gradient_norm_active", "ghg")


def load_run(run_dir: str) -> dict | None:
  """One finished run as a flat record, or None if it has not finished.

  The record holds the grid point (``run.json``), ``accuracy`` (final test
  accuracy), and for every measure ``<m>`` its mean over the logged steps
  (``measures[m]``) and its value at step 0 (``init[m]``).
  """
  paths = {k: os.path.join(run_dir, f) for k, f in (
      ("run", "run.json"), ("summary", "summary.json"), ("metrics", "metrics.jsonl"))}
  if not all(os.path.exists(p) for p in paths.values()):
    return None
  with open(paths["run"]) as f:
    record = json.load(f)
  with open(paths["summary"]) as f:
    summary = json.load(f)
  if summary.get("final_test_accuracy") is None:
    return None
  series = collections.defaultdict(dict)  # measure -> step -> value
  with open(paths["metrics"]) as f:
    for line in f:
      row = json.loads(line)
      for m in (*MEASURES, "train_loss"):
        if m in row:
          series[m][row["step"]] = row[m]  # a resumed run may log a step twice
  losses = sorted(series.pop("train_loss", {}).items())
  record["loss_drop_last_fifth"] = loss_drop(losses)
  # run.json's "init" is the init scheme (study.inits); "init" below is step 0.
  scheme = record.pop("init", None)
  record["init_scheme"] = scheme if isinstance(scheme, str) else "dense_fan_in"
  record["accuracy"] = summary["final_test_accuracy"]
  record["wall_time_s"] = summary.get("wall_time_s")
  record["num_epochs"] = summary.get("config", {}).get("num_epochs")
  record["measures"] = {m: float(np.mean(list(s.values()))) for m, s in series.items()}
  record["init"] = {m: s[0] for m, s in series.items() if 0 in s}
  record["series"] = {m: sorted(s.items()) for m, s in series.items()}
  return record


PLATEAU_DROP = 0.05  # a run whose training loss fell more over its last fifth is not flat


def loss_drop(losses, fraction: float = 0.8) -> float | None:
  """Relative fall of the logged training loss from ``fraction`` of the run to its end.

  ``(L(t0) - L(T)) / L(t0)`` with ``t0`` the last logged step at or before
  ``fraction * T``; None with fewer than two logged points.

  Example:
    >>> loss_drop([(10, 2.0), (80, 1.0), (100, 0.9)])   # (1.0 - 0.9) / 1.0
    0.1
  """
  if len(losses) < 2:
    return None
  last_step, last = losses[-1]
  before = [v for step, v in losses[:-1] if step <= fraction * last_step]
  if not before or not before[-1]:
    return None
  return (before[-1] - last) / before[-1]


def load_tuning(workdir: str) -> dict | None:
  """The sweep's ``tuning.json`` (grids, validation accuracies, chosen rates), if any."""
  return workdir_lib.read_json_if_present(os.path.join(workdir, "tuning.json"))


def load_runs(workdir: str) -> list[dict]:
  """Every finished run under ``workdir`` (one subdirectory per run), by name."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; point it at the "
                     "sweep's root (the --workdir of gradient_flow_sweep).")
  records = [load_run(os.path.join(workdir, d)) for d in sorted(os.listdir(workdir))]
  return [r for r in records if r is not None]


def setting_key(record) -> tuple[str, str, str]:
  """``(optimizer, activation, regularisation)``: the setting but density, kind, init."""
  return (record["optimizer"], record["activation"], record["regularisation"])


def is_sparse_run(r) -> bool:
  return r["kind"] == "sparse"


def is_finished(run_dir: str) -> bool:
  """True when the run wrote its final summary (a halted run has none).

  A tuning run that diverged (``diverged.json``) is finished too: its rate ranks last.
  """
  if os.path.exists(os.path.join(run_dir, "diverged.json")):
    return True
  summary = workdir_lib.read_json_if_present(os.path.join(run_dir, "summary.json"))
  return summary is not None and summary.get("final_test_accuracy") is not None


def tuning_outcome(run_dir: str) -> dict | None:
  """``{"accuracy": validation accuracy or None if diverged}``; None if not finished."""
  if os.path.exists(os.path.join(run_dir, "diverged.json")):
    return {"accuracy": None}
  summary = workdir_lib.read_json_if_present(os.path.join(run_dir, "summary.json"))
  acc = None if summary is None else summary.get("final_test_accuracy")
  return None if acc is None else {"accuracy": acc}


def recorded_rate(run_dir: str) -> float | None:
  """The learning rate in a run's ``run.json`` (None without one)."""
  run = workdir_lib.read_json_if_present(os.path.join(run_dir, "run.json"))
  return None if run is None else run.get("learning_rate")


def unstable_rates(workdir: str) -> dict[str, list[float]]:
  """``{setting: rates}`` at which a final run diverged (``diverged.json``).

  Read from the final runs' directories and from ``previous/``, where such a run
  is moved once its setting is retrained at another rate, so the rate stays out.
  """
  out = collections.defaultdict(set)
  for marker in (glob.glob(os.path.join(workdir, "*", "diverged.json"))
                 + glob.glob(os.path.join(workdir, "previous", "*", "diverged.json"))):
    run = workdir_lib.read_json_if_present(os.path.join(os.path.dirname(marker), "run.json"))
    if run is None:
      continue
    if run.get("phase") == "final" and run.get("learning_rate") is not None:
      out[run["setting"]].add(float(run["learning_rate"]))
  return {k: sorted(v) for k, v in out.items()}


def keep_previous(workdir: str, run):
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
  settings = (workdir_lib.read_json_if_present(path) or {}).get("settings", {})
  write_json(path, {**tuning, "settings": {**settings, **tuning["settings"]}})


def write_json(path: str, value):
  """Writes ``value`` to ``path`` (its directory made): a complete file or the old one."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_json(path, value)
