"""The converged study's statistics (bootstrap CIs, verdicts, taus) on hand-worked cases."""

import json
import math
import os
import sys

import numpy as np
import pytest

from experiments.studies.gradient_flow import findings as findings_lib
from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import report
from experiments.studies.gradient_flow import stats


def test_bootstrap_ci_by_hand():
  # One cell (0, 1): resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
  # so the 2.5% and 97.5% quantiles are 0 and 1.
  assert stats.bootstrap_mean_ci([[0.0, 1.0]]) == (0.0, 1.0)
  # A second, constant cell (5): the statistic (m + 5) / 2 takes 2.5, 2.75, 3.
  assert stats.bootstrap_mean_ci([[0.0, 1.0], [5.0]]) == (2.5, 3.0)
  assert stats.bootstrap_mean_ci([[0.3, 0.3, 0.3]]) == pytest.approx((0.3, 0.3))
  assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([[], []]))
  # Reproducible (fixed seed); another seed differs; the CI brackets the mean and
  # is about mean +- 1.96 sd / sqrt(n) for many draws.
  x = np.random.default_rng(1).normal(2.0, 1.0, 400)
  lo, hi = stats.bootstrap_mean_ci([x])
  assert (lo, hi) == stats.bootstrap_mean_ci([x])
  assert (lo, hi) != stats.bootstrap_mean_ci([x], seed=1)
  assert lo < x.mean() < hi
  assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)


def _pairs(values_by_slice):
  """Pairs of one cell per slice value, its seeds' differences as given."""
  return [((v,), {"density": v}, d) for v, ds in values_by_slice.items() for d in ds]


def test_verdicts_by_the_stated_rule():
  supported = stats.paired_effect(_pairs({0.05: [0.1, 0.2, 0.15], 0.2: [0.05, 0.06, 0.07]}),
                                   ("density",))
  assert supported["verdict"] == "supported"
  assert supported["effect"] == pytest.approx((0.15 + 0.06) / 2)
  assert supported["n"] == 6 and supported["cells"] == 2
  assert supported["holds_in"] == ["density=0.05", "density=0.2"]
  # Holds overall, reversed at density 0.2: mixed.
  reversed_ = stats.paired_effect(_pairs({0.05: [0.5, 0.6, 0.55], 0.2: [-0.1, -0.12, -0.11]}),
                                   ("density",))
  assert reversed_["ci"][0] > 0 and reversed_["reversed_in"] == ["density=0.2"]
  assert reversed_["verdict"] == "mixed"
  # Nothing overall, but it holds at one density: mixed.
  some = stats.paired_effect(_pairs({0.05: [0.1, 0.1, 0.1], 0.2: [-0.1, -0.1, -0.1]}),
                              ("density",))
  assert some["effect"] == pytest.approx(0.0) and some["verdict"] == "mixed"
  # Noise around 0 everywhere, or the opposite everywhere: not supported.
  noise = stats.paired_effect(_pairs({0.05: [0.1, -0.1, 0.05], 0.2: [-0.05, 0.1, -0.1]}),
                               ("density",))
  assert noise["verdict"] == "not supported"
  opposite = stats.paired_effect(_pairs({0.05: [-0.1, -0.2, -0.15]}), ("density",))
  assert opposite["verdict"] == "not supported" and opposite["ci"][1] < 0
  assert stats.paired_effect([], ())["verdict"].startswith("not tested")
  assert stats.paired_effect(_pairs({0.05: [0.1]}))["verdict"] == "not tested (one paired run)"


def record(optimizer="sgd", activation="relu", regularisation="none", density=0.1, seed=0,
           kind="sparse", accuracy=0.5, init_scheme="dense_fan_in", measures=None):
  measures = measures or {}
  return {"optimizer": optimizer, "activation": activation, "regularisation": regularisation,
          "density": density, "seed": seed, "kind": kind, "accuracy": accuracy,
          "init_scheme": init_scheme, "measures": measures, "init": measures,
          "series": {}, "wall_time_s": 1.0, "family": "mlp", "dataset": "synthetic",
          "setting": f"{optimizer}_{activation}_{regularisation}_d{density:g}_{kind}"}


def adaptive_records():
  """sgd: sparse - dense gap +0.02 (+ seed / 100); adam: -0.10; both regularisations."""
  rs = []
  for o, gap in (("sgd", 0.02), ("adam", -0.10)):
    for reg in ("none", "l2"):
      for seed in range(3):
        rs.append(record(o, regularisation=reg, seed=seed, kind="dense", accuracy=0.8))
        rs.append(record(o, regularisation=reg, seed=seed, accuracy=0.8 + gap + seed / 100))
  return rs


def test_adaptive_finding_on_synthetic_records():
  f = findings_lib.finding_adaptive(adaptive_records(), n_boot=500)
  # Every pair: (0.02 + s/100) - (-0.10 + s/100) = 0.12, in 2 cells (none, l2).
  assert f["effect"] == pytest.approx(0.12) and f["n"] == 6 and f["cells"] == 2
  assert f["ci"] == pytest.approx((0.12, 0.12))
  assert f["verdict"] == "supported"
  assert f["holds_in"] == ["pair=sgd-adam", "regularisation=l2", "regularisation=none",
                           "density=0.1", "activation=relu"]
  assert f["gap_by_optimizer"]["adam"] == pytest.approx(-0.09)
  # L2 changes nothing here: the L2 / augmentation part has a zero effect.
  reg = findings_lib.finding_adaptive_regularisation(adaptive_records(), n_boot=500)
  assert reg["effect"] == pytest.approx(0.0) and reg["n"] == 3
  assert reg["verdict"] == "not supported"


def test_init_factor_and_partial_grids():
  rs = [record(seed=s, accuracy=0.5) for s in range(3)]
  rs += [record(seed=s, accuracy=0.6 + s / 100, init_scheme="active_fan_in") for s in range(3)]
  f = findings_lib.finding_init(rs, n_boot=500)
  assert f["effect"] == pytest.approx(0.11) and f["verdict"] == "supported"
  # The active fan-in runs are not mixed into the main grid's findings.
  assert findings_lib.finding_batch_norm(rs)["n"] == 0
  table = findings_lib.sparse_minus_dense_table(adaptive_records()[:6] + [
      record("adam", regularisation="l2")])
  assert table[("sgd", "none")]["n"] == 3
  assert table[("adam", "l2")]["n"] == 0 and report._ci(table[("adam", "l2")]) == "missing"


def test_tau_with_ci_matches_kendall_and_brackets_it():
  rng = np.random.default_rng(0)
  rs = []
  for i in range(30):
    acc = float(rng.uniform())
    rs.append(record(optimizer=("sgd", "adam")[i % 2], seed=i, accuracy=acc,
                     measures={"egf_p2": acc + rng.normal(0, 0.1),
                               "gradient_norm": float(rng.normal()), "ghg": -acc}))
  out = stats.tau_with_ci(rs, ("egf_p2", "gradient_norm", "ghg"), n_boot=300)
  accs = [r["accuracy"] for r in rs]
  assert out["tau"]["egf_p2"] == pytest.approx(
      stats.kendall_tau([r["measures"]["egf_p2"] for r in rs], accs))
  assert out["ci"]["ghg"] == pytest.approx((-1.0, -1.0))  # exactly reversed: every resample
  lo, hi = out["ci"]["egf_p2"]
  assert lo < out["tau"]["egf_p2"] < hi
  # |tau| of EGF vs the unrelated gradient norm: clearly larger; vs ghg (|tau| = 1) smaller.
  assert out["abs_diff"]["gradient_norm"][1] > 0
  assert out["abs_diff"]["ghg"][2] < 0
  within = stats.tau_with_ci(rs, ("egf_p2", "gradient_norm", "ghg"), within=True, n_boot=300)
  assert within["settings"] == 2 and within["n"] == 30
  by_setting = [stats.kendall_tau([r["measures"]["egf_p2"] for r in rs if r["optimizer"] == o],
                                   [r["accuracy"] for r in rs if r["optimizer"] == o])
                for o in ("sgd", "adam")]
  assert within["tau"]["egf_p2"] == pytest.approx(np.mean(by_setting))
  egf = findings_lib.finding_egf(rs, n_boot=300)
  assert egf["verdict"] == "mixed"  # better than the gradient norm, not than ghg


def test_tuning_table_and_report_on_a_partial_grid(tmp_path):
  tuning = {"validation_fraction": 0.1, "tuning_seed": 0, "rule": "best; ties smaller",
            "settings": {
                "sgd_relu_none_d0.1_sparse": {"grid": {"0.03": 0.5, "0.1": 0.9, "0.3": None},
                                              "pending": [], "chosen": 0.1, "complete": True},
                "sgd_relu_none_d0.1_dense": {"grid": {"0.03": 0.8}, "pending": ["0.1", "0.3"],
                                             "chosen": None, "complete": False}}}
  rs = [record(seed=s, accuracy=0.5 + s / 100, measures={m: 1.0 + s for m in records_lib.MEASURES})
        for s in range(3)]
  text = report.write_report(rs, str(tmp_path), tuning=tuning, n_boot=200)
  assert "| sgd_relu_none_d0.1_sparse | 0.03: 50.00, **0.1: 90.00**, 0.3: diverged | 0.1 | 3 |" in (
      text)
  assert "| sgd_relu_none_d0.1_dense | 0.03: 80.00, 0.1: pending, 0.3: pending | pending | " \
         "missing |" in text
  assert "0 settings at the smallest, 0 at the largest, 1 inside" in text
  # No dense runs: the comparisons are missing, nothing crashes.
  assert "| sgd | relu | none | 0.1 | 51.00 ± 0.82 | missing | missing | 0 |" in text
  assert "**not tested (no paired runs in this sweep)**" in text
  findings = json.load(open(tmp_path / "findings.json"))
  assert findings["batch_norm"]["n"] == 0 and findings["sparse_minus_dense"]["sgd/none"][
      "effect"] is None
  for name in ("sparse_minus_dense.png", "tau_ci.png", "sparse_vs_dense.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_loss_drop_over_the_last_fifth_by_hand():
  assert records_lib.loss_drop([(10, 2.0), (80, 1.0), (100, 0.9)]) == pytest.approx(0.1)
  # t0 is the last logged step at or before 0.8 * 100 = 80: step 62 here.
  assert records_lib.loss_drop([(31, 2.0), (62, 0.5), (93, 0.4), (100, 0.45)]) == pytest.approx(
      0.1)
  assert records_lib.loss_drop([(100, 1.0)]) is None
  assert records_lib.loss_drop([(90, 1.0), (100, 0.5)]) is None  # nothing before 80


def test_a_tuned_study_never_overwrites_the_earlier_report(tmp_path, monkeypatch):
  workdir = tmp_path / "converged"
  workdir.mkdir()
  report.check_out(str(workdir), report.RESULTS)  # no tuning.json: the 3-epoch study
  (workdir / "tuning.json").write_text("{}")
  report.check_out(str(workdir), str(tmp_path / "out"))  # its own --out is fine
  before = open(os.path.join(report.RESULTS, "README.md")).read()
  monkeypatch.setattr(sys, "argv", ["gradient_flow_report", f"--workdir={workdir}"])
  with pytest.raises(ValueError, match="--out=experiments/results/gradient_flow/converged"):
    report.main()
  assert open(os.path.join(report.RESULTS, "README.md")).read() == before


class MeasuringTrainer:
  """Stands in for train_and_evaluate: a summary and two lines of measures per run."""

  def __call__(self, config, run_dir):
    name = os.path.basename(run_dir)
    accuracy = 0.5 + len(name) / 1000 + (0.01 if name.endswith("seed1") else 0.0)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for step in (0, 10):
        f.write(json.dumps({"step": step, "train_loss": 2.0 - step / 10, **{
            m: accuracy + step / 100 + k for k, m in enumerate(records_lib.MEASURES)}}) + "\n")
    summary = {"final_test_accuracy": accuracy}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary


def test_redraw_replaces_the_reports_plots_only_from_records_that_reproduce_it(tmp_path):
  from experiments.studies.gradient_flow import redraw  # pylint: disable=g-import-not-at-top
  from tests.test_gradient_flow_sweep import small_study  # pylint: disable=g-import-not-at-top
  from experiments.studies.gradient_flow import sweep  # pylint: disable=g-import-not-at-top
  workdir, out = str(tmp_path / "sweep"), tmp_path / "report"
  sweep.run_sweep(small_study(), workdir, train_fn=MeasuringTrainer())
  # 2 densities x 2 regularisations x 2 seeds: sparse + dense at 0.1, dense at 1: 12 runs.
  assert redraw.pack(workdir, str(tmp_path / "records.tar.gz")) == 12
  records = redraw.load(str(tmp_path / "records.tar.gz"), str(tmp_path / "unpacked"))
  assert [(r["setting"], r["seed"], r["accuracy"], r["series"]) for r in records] == [
      (r["setting"], r["seed"], r["accuracy"], r["series"]) for r in records_lib.load_runs(workdir)]
  report.write_report(records, str(out), n_boot=200)
  for png in out.glob("*.png"):
    png.unlink()
  (out / "sparse_vs_dense.png").write_bytes(b"old")  # the one plot the report holds
  assert redraw.redraw(records, str(out), n_boot=200) == ["sparse_vs_dense.png"]
  assert (out / "sparse_vs_dense.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in out.glob("*.png")) == ["sparse_vs_dense.png"]
  # One accuracy in the README's table changed: the records no longer reproduce it.
  text = (out / "README.md").read_text()
  row = redraw.table_rows(text)[0]
  (out / "README.md").write_text(text.replace(row, row.replace(" ± ", "1 ± ", 1)))
  (out / "sparse_vs_dense.png").write_bytes(b"old")
  with pytest.raises(ValueError, match=r"do not reproduce .*1 of its 4 mean ± std rows"):
    redraw.redraw(records, str(out), n_boot=200)
  assert (out / "sparse_vs_dense.png").read_bytes() == b"old"
