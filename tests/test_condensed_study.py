"""The condensed-training study's report, read back from its committed run records."""

import glob
import json
import os
import statistics

from experiments.studies import condensed


def test_report_from_the_committed_records(tmp_path):
  rows = condensed.load(str(tmp_path / "workdirs_gone"), 2048, 0.75, [0, 1, 2])
  assert list(rows) == list(condensed.ROWS)
  lines = condensed.table(rows)
  for row in condensed.ROWS:
    files = sorted(glob.glob(os.path.join(condensed.RECORDS, f"{row}_w2048_s0.75_seed*.json")))
    records = [json.load(open(f)) for f in files]
    assert len(records) == 3
    acc = [100 * r["final_test_accuracy"] for r in records]
    time = statistics.median(r["wall_time_s"] for r in records)
    line = next(l for l in lines if l.startswith(f"| {row} |"))
    assert f"| {statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} | {time:.1f} |" in line
  condensed.plot(rows, str(tmp_path / "plot.png"), 2048, 0.75)
  assert os.path.getsize(tmp_path / "plot.png") > 10_000
