"""The LeNet-300-100 study's plot: its numbers from runs, and again from the table alone."""

import os

import pytest

from experiments.studies import lenet300

COMMITTED = os.path.join(lenet300.RESULTS, "lenet300_mnist5k.md")


def summary(accuracy, train_flops):
  return {"final_test_accuracy": accuracy, "best_test_accuracy": accuracy,
          "final_sparsity": 0.9, "wall_time_s": 6.0, "train_flops_vs_dense": train_flops,
          "inference_flops_vs_dense": 0.1}


def test_the_plot_redrawn_from_the_written_table_shows_the_same_numbers(tmp_path):
  rows = {("dense", None): [summary(0.94, 1.0), summary(0.96, 1.0)],
          ("granet", 0.9): [summary(0.90, 0.30), summary(0.92, 0.32)]}
  cells, seeds = lenet300.plot_cells(rows)
  # Mean and population std in points: (94 + 96) / 2 = 95 +- 1; (90 + 92) / 2 = 91 +- 1.
  assert seeds == 2
  assert cells[("dense", None)] == pytest.approx((95.0, 1.0, 1.0))
  assert cells[("granet", 0.9)] == pytest.approx((91.0, 1.0, 0.31))
  md, png = str(tmp_path / "t.md"), str(tmp_path / "t.png")
  lenet300.write_report(rows, [0.9], "python -m experiments.studies.lenet300", 60.0, md, png)
  read, read_seeds = lenet300.read_cells(md)  # the table keeps what the plot shows
  assert read_seeds == seeds and list(read) == list(cells)
  for key, cell in cells.items():
    assert read[key] == pytest.approx(cell, abs=0.005)
  os.remove(png)
  lenet300.redraw(md, png)
  assert os.path.getsize(png) > 10_000


def test_the_committed_table_is_read_back_row_by_row():
  cells, seeds = lenet300.read_cells(COMMITTED)
  assert seeds == 3
  # Dense once, then 11 methods x 3 sparsities, in the table's order.
  assert len(cells) == 1 + 11 * 3
  assert list(cells)[:2] == [("dense", None), ("granet", 0.9)]
  # | granet | 0.9 | 93.97 ± 0.21 | ... | train FLOPs 0.301 | ... and IMP's last row.
  assert cells[("granet", 0.9)] == (93.97, 0.21, 0.301)
  assert cells[("imp", 0.98)] == (93.00, 0.22, 1.369)
