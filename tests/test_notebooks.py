"""The analysis notebooks run top to bottom (on their short configuration)."""

import json
import os
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from experiments.studies import mask_dynamics
from experiments.trainer import mask_history

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "notebooks")


def run_notebook(name, monkeypatch, **env):
  # The kernel spec starts "python": make it this interpreter (the venv's).
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep +
                     os.environ.get("PATH", ""))
  monkeypatch.setenv("SPARSE_JAX_NOTEBOOK_QUICK", "1")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{name} is stored with outputs; clear them before committing.")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return nb


def outputs_text(nb) -> str:
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      out.append(o.get("text", ""))
      out.extend(str(v) for v in o.get("data", {}).values())
  return "\n".join(out)


def test_mask_dynamics_notebook_runs(tmp_path, monkeypatch):
  nb = run_notebook("mask_dynamics.ipynb", monkeypatch,
                    MASK_DYNAMICS_WORKDIR=str(tmp_path / "md"))
  text = outputs_text(nb)
  # 40 steps, events every 10: the initial mask and 3 events for each method.
  assert "granet: test accuracy" in text and "rigl: test accuracy" in text
  assert text.count("recorded masks at steps [0, 10, 20, 30]") == 2
  assert sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", [])) == 3
  # The trainer's per-event log agrees with the stored history: the device-side
  # union (itop_rate) with the union of the recorded masks, and the counts.
  for method in ("granet", "rigl"):
    workdir = tmp_path / "md_quick" / method
    history = mask_history.load_history(str(workdir))
    events = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    events = [r for r in events if r.get("mask_update")]
    steps, itop = mask_dynamics.itop_curve(history)
    assert [r["step"] for r in events] == list(steps[1:]) == [10, 20, 30]
    np.testing.assert_allclose([r["itop_rate"] for r in events], itop[1:])
    table = mask_dynamics.event_count_table(history)
    for key in ("pruned", "dropped", "regrown"):
      assert [r[key] for r in events] == list(sum(t[key] for t in table.values())[1:])
    assert history.union_packed is not None
  assert events[0]["dropped"] > 0  # RigL swaps at its first event


def test_pruning_plasticity_notebook_runs(tmp_path, monkeypatch):
  nb = run_notebook("pruning_plasticity.ipynb", monkeypatch,
                    PLASTICITY_WORKDIR=str(tmp_path / "pp"))
  text = outputs_text(nb)
  assert "| prune | 0.5 | " in text and "| prune+regrow+rewind | 0.9 | " in text
  rows = (tmp_path / "pp_quick" / "plasticity.jsonl").read_text().splitlines()
  assert len(rows) == 4  # 1 epoch x 2 fractions x 2 settings
