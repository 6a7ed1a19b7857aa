"""The grid runner every study's sweep uses: runs in sub-workdirs, resumable.

A sweep is a list of ``GridRun``: a name, the run's own workdir, its config (built
when the run starts) and the function that trains it. ``run_grid`` trains them in
order and skips the finished ones (by default those with a ``summary.json``), so
an interrupted sweep resumes where it stopped and a run killed halfway resumes
from its checkpoint. Reading the results back:
``read_summary``, ``with_flops`` (FLOPs post hoc for runs from before the trainer
wrote them) and ``read_run`` (a run's result from its workdir, else from its
committed record), grouped by row with ``collect``.

The argparse studies (lenet300, structured, transformers) share ``sweep_parser``
(``--workdir``, ``--seeds``, ``--out``, and ``--sparsities`` / ``--methods`` where
the study has them), ``setup`` (logging, the persistent compilation cache) and
``command`` (the command line quoted in a report).

  runs = [GridRun(d, d, functools.partial(make_config, d), train.train_and_evaluate)
          for d in run_dirs]
  run_grid(runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

from experiments.trainer import compilation_cache
from experiments.trainer import flops as run_flops_lib
from experiments.trainer import workdir as workdir_lib

RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "results")

# What ``GridRun.status`` says of a run: trained already (counted as skipped),
# waiting on other runs (counted as pending), listed only (a dry run), to train.
FINISHED, PENDING, LISTED, TO_RUN = "finished", "pending", "listed", "to run"


class RunFailed(Exception):
  """Raised by a ``GridRun.train`` for a failure that is a result, not a bug.

  The runner counts the run as failed, logs ``<tag> <message>`` and goes on.
  """


@dataclasses.dataclass(frozen=True)
class GridRun:
  """One run of a sweep.

  ``config()`` builds the run's config when the run starts (it may depend on the
  runs trained before it); ``train(config, workdir)`` trains it and returns its
  summary. ``status(tag)`` says whether to train it (``FINISHED``, ``PENDING``,
  ``LISTED`` or ``TO_RUN``); without one, a run is ``FINISHED`` once
  ``run_grid``'s ``is_finished``. ``metric`` names the accuracy in the log line of
  a trained run.
  """
  name: str
  workdir: str
  config: Callable[[], Any]
  train: Callable[[Any, str], Any]
  status: Callable[[str], str] | None = None
  metric: str = "test"


def has_summary(run_workdir: str) -> bool:
  """True when the run wrote its ``summary.json`` (a finished run)."""
  return os.path.exists(os.path.join(run_workdir, "summary.json"))


def run_grid(runs: Sequence[GridRun], *, is_finished: Callable[[str], bool] = has_summary,
             log: logging.Logger | None = None, keep_going: bool = False) -> dict[str, int]:
  """Trains every run of ``runs`` that is to run, in order; returns counts.

  Args:
    runs: the sweep's runs (``GridRun``).
    is_finished: ``is_finished(run_workdir)``: the default status, and the count
      of runs left in the progress line.
    log: with a logger, each run's outcome is logged through it (skipped, trained
      with its accuracy, time and ETA, failed); without, one line is printed as
      each run starts.
    keep_going: a run whose training raises is logged and counted as failed, and
      the sweep goes on (one broken grid point should not stop a sweep of
      hundreds); otherwise the exception stops the sweep. An exception while
      building a config always does.

  Returns:
    ``{"total", "skipped", "trained", "failed", "pending"}``.
  """
  log_error = (log or logging.getLogger(__name__)).error
  counts = {"total": len(runs), "skipped": 0, "trained": 0, "failed": 0, "pending": 0}
  durations, t0 = [], time.time()
  for k, run in enumerate(runs, 1):
    tag = f"[{k}/{len(runs)}] {run.name}"
    if run.status is not None:
      state = run.status(tag)
    else:
      state = FINISHED if is_finished(run.workdir) else TO_RUN
    if state == FINISHED:
      counts["skipped"] += 1
      if log:
        log.info("%s: finished, skipped.", tag)
    elif state == PENDING:
      counts["pending"] += 1
    if state != TO_RUN:
      continue
    if not log:
      print(f"{time.strftime('%H:%M:%S')} running {run.workdir}", flush=True)
    config = run.config()
    start = time.time()
    try:
      summary = run.train(config, run.workdir)
    except RunFailed as e:
      counts["failed"] += 1
      log_error("%s %s", tag, e)
      continue
    except Exception:  # pylint: disable=broad-except
      if not keep_going:
        raise
      counts["failed"] += 1
      log_error("%s failed:\n%s", tag, traceback.format_exc())
      continue
    counts["trained"] += 1
    durations.append(time.time() - start)
    if log:
      left = sum(1 for r in runs[k:] if not is_finished(r.workdir))
      eta = left * sum(durations) / len(durations)
      log.info("%s: %s accuracy %s in %.1f s; %d to go, ETA %.1f min (%.1f min so far).",
               tag, run.metric, summary.get("final_test_accuracy"), durations[-1], left,
               eta / 60, (time.time() - t0) / 60)
  return counts


def read_summary(run_workdir: str) -> dict | None:
  """The run's ``summary.json``, or None while it has none."""
  return workdir_lib.read_json_if_present(os.path.join(run_workdir, "summary.json"))


def with_flops(summary: dict, run_workdir: str) -> dict:
  """``summary`` with its FLOPs ratios (computed post hoc for older runs, cached)."""
  if "train_flops_vs_dense" in summary:
    return summary
  cache = os.path.join(run_workdir, "flops.json")
  if not os.path.exists(cache):
    with open(cache, "w") as f:
      json.dump(run_flops_lib.posthoc_run_flops(run_workdir), f)
  with open(cache) as f:
    return {**summary, **json.load(f)}


def write_record(path: str, record: dict):
  """Writes a run's record (keys sorted, as the committed records), never half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_json(path, dict(sorted(record.items())))


def read_run(path: str, record_path: str, result_of: Callable[[dict], dict] = dict, *,
             label: dict | None = None, rewrite: bool = False) -> dict | None:
  """A run's result from its workdir (recording it), else from its committed record.

  Workdirs are not in git; the record (under ``experiments/results/``) keeps a
  finished run's result once its workdir is gone.

  Args:
    path: the run's result file in its workdir (``summary.json``).
    record_path: its record.
    result_of: the result from the file's contents (e.g. the fields to keep).
    label: fields the record adds to the result (e.g. its row and seed).
    rewrite: write the record every time, not only when there is none.

  Returns:
    The result, or None when neither the file nor the record exists.
  """
  if os.path.exists(path):
    with open(path) as f:
      result = result_of(json.load(f))
    if rewrite or not os.path.exists(record_path):
      write_record(record_path, {**(label or {}), **result})
    return result
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  return None


def collect(rows: Iterable[tuple[Any, Iterable[dict | None]]]) -> dict[Any, list[dict]]:
  """``{key: results}`` of ``(key, results)`` pairs: missing results (None) and rows
  without any left out. ``results`` may be a generator: it is read before the next row."""
  out = {}
  for key, results in rows:
    results = [r for r in results if r is not None]
    if results:
      out[key] = results
  return out


def sweep_parser(doc: str, *, workdir: str, out: str, seeds: str = "0,1,2",
                 sparsities: str | None = None, methods: str | None = None,
                 ) -> argparse.ArgumentParser:
  """The flags every argparse study has; the study adds its own to the parser.

  ``--workdir`` (the sweep's root: one sub-workdir per run), ``--seeds``,
  ``--out``, and where given ``--methods`` and ``--sparsities`` (comma-separated;
  ``parse_lists`` turns them into lists).
  """
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--workdir", default=workdir)
  if methods is not None:
    parser.add_argument("--methods", default=methods)
  if sparsities is not None:
    parser.add_argument("--sparsities", default=sparsities)
  parser.add_argument("--seeds", default=seeds)
  parser.add_argument("--out", default=out)
  return parser


def parse_lists(args: argparse.Namespace) -> argparse.Namespace:
  """``args`` with ``--seeds`` as ints, ``--sparsities`` as floats, ``--methods`` split."""
  kinds = {"seeds": int, "sparsities": float, "methods": str}
  return argparse.Namespace(**{
      k: [kinds[k](v) for v in value.split(",")] if k in kinds else value
      for k, value in vars(args).items()})


def setup(level: int = logging.WARNING, **basic_config):
  """Logging to stdout, and the persistent compilation cache on.

  Runs of the same shapes then reuse compiled programs, across runs and sweeps.
  """
  logging.basicConfig(level=level, stream=sys.stdout, **basic_config)
  compilation_cache.enable()


def command(module: str) -> str:
  """The command line that ran ``python -m <module>``, for a report."""
  return " ".join([f"python -m {module}", *sys.argv[1:]]).strip()
