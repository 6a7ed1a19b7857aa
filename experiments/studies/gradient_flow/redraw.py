r"""Draws a gradient-flow report's plots again from its records; its README stays as it is.

  python -m experiments.studies.gradient_flow.redraw \
      --records=experiments/results/gradient_flow/records.tar.gz \
      --out=experiments/results/gradient_flow

``--records``: a sweep's workdir, or a ``.tar.gz`` of its run directories (``--pack``
writes one from a workdir: each finished run's ``run.json``, ``summary.json`` and
``metrics.jsonl``, what ``records.load_run`` reads). The report is computed again
(``report.write_report``, into a temporary directory) and only the plots that
``--out`` already holds are replaced. Records that do not reproduce the report are
refused: every row of the README's tables with a "±" (the sparse vs dense
accuracies) must come out of them unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile

from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import report
from experiments.studies.gradient_flow import stats

RUN_FILES = ("run.json", "summary.json", "metrics.jsonl")


def pack(workdir: str, path: str) -> int:
  """Writes the finished runs of ``workdir`` (``RUN_FILES`` each) to ``path``; their count."""
  names = [d for d in sorted(os.listdir(workdir))
           if records_lib.load_run(os.path.join(workdir, d)) is not None]
  with tarfile.open(path, "w:gz") as tar:
    for name in names:
      for f in RUN_FILES:
        tar.add(os.path.join(workdir, name, f), arcname=os.path.join(name, f))
  return len(names)


def load(records_path: str, scratch: str) -> list[dict]:
  """The records of a workdir, or of a ``pack``ed tarball (unpacked into ``scratch``)."""
  if os.path.isdir(records_path):
    return records_lib.load_runs(records_path)
  with tarfile.open(records_path) as tar:
    tar.extractall(scratch, filter="data")
  return records_lib.load_runs(scratch)


def table_rows(markdown: str) -> list[str]:
  """The rows of ``markdown``'s tables that hold a mean ± std."""
  return [l for l in markdown.splitlines() if l.startswith("| ") and " ± " in l]


def redraw(records: list[dict], out_dir: str, n_boot: int = stats.N_BOOTSTRAP) -> list[str]:
  """Replaces the plots in ``out_dir`` with those drawn from ``records``; their names."""
  with open(os.path.join(out_dir, "README.md")) as f:
    committed = table_rows(f.read())
  with tempfile.TemporaryDirectory() as tmp:
    again = set(table_rows(report.write_report(records, tmp, n_boot=n_boot)))
    differ = [row for row in committed if row not in again]
    if not committed or differ:
      raise ValueError(f"The records do not reproduce {out_dir}/README.md: "
                       f"{len(differ)} of its {len(committed)} mean ± std rows differ, "
                       f"e.g. {differ[:1]}. Nothing was redrawn.")
    names = sorted(n for n in os.listdir(tmp)
                   if n.endswith(".png") and os.path.exists(os.path.join(out_dir, n)))
    for name in names:
      shutil.copyfile(os.path.join(tmp, name), os.path.join(out_dir, name))
  return names


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", required=True, help="a workdir or a packed .tar.gz")
  parser.add_argument("--out", default=report.RESULTS, help="the report's directory")
  parser.add_argument("--pack", default="", help="write --records (a workdir) here instead")
  args = parser.parse_args()
  if args.pack:
    print(f"Packed {pack(args.records, args.pack)} runs into {args.pack}.")
    return
  with tempfile.TemporaryDirectory() as scratch:
    names = redraw(load(args.records, scratch), args.out)
  print(f"Redrew {', '.join(names)} in {args.out}.")


if __name__ == "__main__":
  main()
