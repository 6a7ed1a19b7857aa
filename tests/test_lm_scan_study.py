"""The lm_scan study's report on fake runs (no training): tables against hand values."""

import json
import math
import os
import shutil

import pytest

from experiments.studies import lm_scan

RIGL = lm_scan.Row("rigl")
RIGL_WARMUP = lm_scan.Row("rigl", warmup=lm_scan.WARMUP)


def _fake_run(workdir, row, seed, loss, accuracy, spikes):
  """A finished run's summary.json and metrics.jsonl; ``spikes``: {step: (spike, events)}."""
  d = os.path.join(workdir, lm_scan.run_name(row, seed))
  os.makedirs(d)
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump({"final_test_loss": loss, "final_test_bits_per_byte": loss / math.log(2),
               "final_test_accuracy": accuracy, "final_sparsity": 0.9,
               "wall_time_s": 100.0 + seed, "steps": 202, "method": row.method,
               "train_flops_vs_dense": 0.2 + seed / 10, "inference_flops_vs_dense": 0.1,
               "config": {}}, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for step in (50, 100, 101, 150, 200, 202):
      record = {"step": step, "train_loss": 3.0 - step / 100}
      if step % 50 == 0:
        record["mask_update"] = True
      if step in spikes:
        record["loss_spike"], record["loss_spike_events"] = spikes[step]
      f.write(json.dumps(record) + "\n")


def _fake_sweep(workdir):
  # seed 0: events 50 (1.2); 100 and 150 together (0.9 mean): run mean (1.2 + 2 * 0.9) / 3 = 1.0
  _fake_run(workdir, RIGL, 0, 2.0, 0.40, {100: (1.2, 1), 200: (0.9, 2)})
  # seed 1: 1.3 and 0.9: run mean 1.1
  _fake_run(workdir, RIGL, 1, 2.2, 0.44, {100: (1.3, 1), 150: (0.9, 1)})
  _fake_run(workdir, RIGL_WARMUP, 0, 2.1, 0.42, {100: (1.05, 1)})


def test_spike_events_tells_the_events_of_each_record(tmp_path):
  _fake_sweep(str(tmp_path))
  records = lm_scan.read_metrics(os.path.join(str(tmp_path), "rigl_s0.9_seed0"))
  assert lm_scan.spike_events(records) == [
      {"step": 100, "spike": 1.2, "events": 1, "event_steps": [50]},
      {"step": 200, "spike": 0.9, "events": 2, "event_steps": [100, 150]}]


def test_tables_against_hand_values(tmp_path):
  workdir, records = str(tmp_path / "work"), str(tmp_path / "records")
  _fake_sweep(workdir)
  runs = lm_scan.load_runs(workdir, lm_scan.ROWS, [0, 1], records=records)
  assert set(runs) == {RIGL, RIGL_WARMUP}
  assert [lm_scan.mean_spike(r) for r in runs[RIGL]] == pytest.approx([1.0, 1.1])
  # After step 50: seed 0's 100-and-150 record (0.9); seed 1's event 100 (0.9).
  assert [lm_scan.mean_spike(r, after=50) for r in runs[RIGL]] == pytest.approx([0.9, 0.9])
  main = lm_scan.main_table(runs)
  assert main[2:] == [
      "| rigl | 0.9 | 2.100 ± 0.100 | 3.030 ± 0.144 | 42.00 ± 2.00 | 0.9000 | 0.250 | 0.100 "
      "| 100 | 2 |"]
  warmup = lm_scan.warmup_table(runs)
  assert warmup[2:] == [
      "| rigl | 0 | 1.0500 ± 0.0500 | 0.9000 ± 0.0000 | 1.3000 | 2.5 | 2.100 ± 0.100 | 2 |",
      "| rigl | 25 | 1.0500 | - | 1.0500 | 1 | 2.100 | 1 |"]

  # The workdirs gone, the records give the same tables; the report and plot are written.
  shutil.rmtree(workdir)
  again = lm_scan.load_runs(workdir, lm_scan.ROWS, [0, 1], records=records)
  assert lm_scan.main_table(again) == main and lm_scan.warmup_table(again) == warmup
  md, png = str(tmp_path / "lm_scan.md"), str(tmp_path / "lm_scan_spikes.png")
  lm_scan.write_report(again, [0, 1], "python -m experiments.studies.lm_scan", md, png)
  text = open(md).read()
  assert main[2] in text and warmup[3] in text
  assert os.path.getsize(png) > 0
