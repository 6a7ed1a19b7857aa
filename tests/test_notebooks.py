"""The analysis notebooks: committed with their outputs, and run from any directory.

The committed notebooks hold the outputs of a full top-to-bottom run (figures as
PNG, no timestamps), so a reader sees them without running anything. The tests run
copies of them, on their short configuration, from a directory outside the
checkout (the notebooks find it through ``SPARSE_JAX_REPO``).
"""

import json
import os
import shutil
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from experiments.studies import mask_dynamics
from experiments.trainer import mask_history

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
# name -> the figures a run displays
FIGURES = {"mask_dynamics.ipynb": 3, "pruning_plasticity.ipynb": 2}
# A committed notebook's outputs are mostly its PNGs; well above that is a mistake
# (a figure at print resolution, an output left from a debugging cell).
MAX_BYTES = 600_000


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def pngs(nb) -> int:
  return sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", []))


def use_this_python(monkeypatch):
  # The kernel spec starts "python": make it this interpreter (the venv's).
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep +
                     os.environ.get("PATH", ""))


def execute(nb, cwd):
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()


def run_elsewhere(name, tmp_path, monkeypatch, **env):
  """Runs a copy of notebook ``name`` (short configuration) in a directory outside the
  checkout; returns the executed notebook."""
  use_this_python(monkeypatch)
  monkeypatch.setenv("SPARSE_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("SPARSE_JAX_REPO", REPO)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  shutil.copy(os.path.join(NOTEBOOKS, name), elsewhere / name)
  nb = nbformat.read(elsewhere / name, as_version=4)
  execute(nb, elsewhere)
  # Runs go to the given workdirs, nothing into the working directory.
  assert os.listdir(elsewhere) == [name]
  assert pngs(nb) == FIGURES[name]
  return nb


def outputs_text(nb) -> str:
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      out.append(o.get("text", ""))
      out.extend(str(v) for v in o.get("data", {}).values())
  return "\n".join(out)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_is_committed_with_outputs(name):
  nb = read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
      f"{name}: run it top to bottom in a fresh kernel before committing it.")
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert pngs(nb) == FIGURES[name], f"{name} is committed without its figures."
  # Timestamps would change the file at every run.
  assert not [c for c in nb.cells if "execution" in c.metadata]
  assert os.path.getsize(os.path.join(NOTEBOOKS, name)) < MAX_BYTES


def test_notebooks_find_the_repository(tmp_path, monkeypatch):
  """Inside the checkout the setup cell finds it unaided; elsewhere it says what to set."""
  setups = {name: read(name).cells[1].source for name in FIGURES}
  assert len(set(setups.values())) == 1  # one setup cell, tested once
  use_this_python(monkeypatch)
  monkeypatch.delenv("SPARSE_JAX_REPO", raising=False)
  nb = nbformat.v4.new_notebook(
      cells=[nbformat.v4.new_code_cell(setups["mask_dynamics.ipynb"]),
             nbformat.v4.new_code_cell("print(root)")],
      metadata=read("mask_dynamics.ipynb").metadata)
  execute(nb, NOTEBOOKS)
  assert nb.cells[1].outputs[0]["text"].strip() == os.path.realpath(REPO)
  with pytest.raises(CellExecutionError, match="set SPARSE_JAX_REPO"):
    execute(nb, tmp_path)


def test_mask_dynamics_notebook_runs(tmp_path, monkeypatch):
  nb = run_elsewhere("mask_dynamics.ipynb", tmp_path, monkeypatch,
                     MASK_DYNAMICS_WORKDIR=str(tmp_path / "md"))
  text = outputs_text(nb)
  # 40 steps, events every 10: the initial mask and 3 events for each method.
  assert "granet: test accuracy" in text and "rigl: test accuracy" in text
  assert text.count("recorded masks at steps [0, 10, 20, 30]") == 2
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
  nb = run_elsewhere("pruning_plasticity.ipynb", tmp_path, monkeypatch,
                     PLASTICITY_WORKDIR=str(tmp_path / "pp"))
  text = outputs_text(nb)
  assert "| prune | 0.5 | " in text and "| prune+regrow+rewind | 0.9 | " in text
  rows = (tmp_path / "pp_quick" / "plasticity.jsonl").read_text().splitlines()
  assert len(rows) == 4  # 1 epoch x 2 fractions x 2 settings
