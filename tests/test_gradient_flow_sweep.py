"""The gradient-flow sweep runner (resume, skip, slices) and its report."""

import json
import os

import numpy as np
import pytest

from experiments.studies.gradient_flow import findings as findings_lib
from experiments.studies.gradient_flow import plots
from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import report
from experiments.studies.gradient_flow import stats
from experiments.studies.gradient_flow import sweep
from experiments.studies.gradient_flow import tuning as tuning_lib
from experiments.configs import gradient_flow_mnist5k


def small_study():
  config = gradient_flow_mnist5k.get_config()
  study = config.study
  study.width = 64
  study.densities = (0.1, 1.0)
  study.optimizers = ("momentum",)
  study.activations = ("relu",)
  study.regularisations = ("none", "batch_norm")
  study.seeds = (0, 1)
  return config


class FakeTrainer:
  """Stands in for train_and_evaluate: records calls, writes a summary (or fails)."""

  def __init__(self, fail=()):
    self.calls, self.fail = [], set(fail)

  def __call__(self, config, run_dir):
    name = os.path.basename(run_dir)
    self.calls.append((name, config))
    if name in self.fail:
      raise RuntimeError("boom")
    summary = {"final_test_accuracy": 0.5}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary


def test_grid_and_slices_partition_the_runs():
  runs = sweep.grid_runs(small_study().study)
  # Per (seed, regularisation): sparse + dense at 0.1, one dense at 1.0 -> 2*2*3.
  assert len(runs) == 12
  assert len({r.name for r in runs}) == 12
  assert sum(r.density == 1.0 for r in runs) == 4
  assert all(r.kind == "dense" for r in runs if r.density == 1.0)
  assert runs[0].name == "momentum_relu_none_d0.1_sparse_seed0"
  assert [r.seed for r in runs] == [0] * 6 + [1] * 6  # seeds outermost
  slices = [sweep.slice_runs(runs, i, 5) for i in range(5)]
  assert sorted(r.name for s in slices for r in s) == sorted(r.name for r in runs)
  assert [len(s) for s in slices] == [3, 3, 2, 2, 2]
  assert sweep.parse_slice("2/5") == (2, 5)
  for bad in ("5/5", "1", "a/b", "0/0"):
    with pytest.raises(ValueError, match="slice"):
      sweep.parse_slice(bad)


def test_run_config_differs_only_in_width_and_method():
  config = small_study()
  cap = sweep.scsdc.same_capacity("mlp", 64, 0.1)
  sparse = sweep.run_config(config, sweep.Run("momentum", "swish", "batch_norm", 0.1, 3,
                                               "sparse"), cap)
  dense = sweep.run_config(config, sweep.Run("momentum", "swish", "batch_norm", 0.1, 3,
                                              "dense"), cap)
  assert sparse.model_kwargs.features == (64, 64)
  assert dense.model_kwargs.features == (cap.dense_width,) * 2
  assert (sparse.sparsity.method, sparse.sparsity.final) == ("static", pytest.approx(0.9))
  assert dense.sparsity.method == "dense"
  for c in (sparse, dense):
    assert (c.optimizer, c.momentum, c.learning_rate, c.seed) == ("sgd", 0.9, 0.02, 3)
    assert c.model_kwargs.batch_norm and c.model_kwargs.activation == "swish"
    assert c.weight_decay == 0.0 and "study" not in c
  l2 = sweep.run_config(config, sweep.Run("adam", "relu", "l2", 0.1, 0, "sparse"), cap)
  assert (l2.optimizer, l2.weight_decay, l2.learning_rate) == ("adam", 5e-4, 1e-3)
  # The CNN family: the dense run gets the solved width of the small CNN.
  config.study.family = "cnn"
  cnn_cap = sweep.scsdc.SameCapacity(32, 0.2, 50_080, 10_016, 9, 10_359)
  cnn = sweep.run_config(config, sweep.Run("sgd", "prelu", "dropout", 0.2, 0, "dense"),
                         cnn_cap)
  assert (cnn.model, cnn.model_kwargs.width, cnn.model_kwargs.dropout_rate) == (
      "small_cnn", 9, 0.2)
  assert (cnn.optimizer, cnn.momentum, cnn.learning_rate) == ("sgd", 0.0, 0.1)


def test_sweep_skips_finished_runs_and_resumes(tmp_path):
  config = small_study()
  fake = FakeTrainer(fail={"momentum_relu_none_d1_dense_seed0"})
  counts = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert counts == {"total": 12, "skipped": 0, "trained": 11, "failed": 1, "pending": 0}
  run_json = json.load(open(tmp_path / "momentum_relu_none_d0.1_dense_seed0" / "run.json"))
  assert run_json["width"] == run_json["dense_width"] < run_json["sparse_width"] == 64
  assert run_json["leftover"] == run_json["dense_weights"] - run_json["active_weights"]
  # Again: only the failed run is tried.
  fake2 = FakeTrainer()
  assert sweep.run_sweep(config, str(tmp_path), train_fn=fake2)["skipped"] == 11
  assert [n for n, _ in fake2.calls] == ["momentum_relu_none_d1_dense_seed0"]
  # A halted run (summary without final accuracy) and a deleted summary are redone.
  halted = tmp_path / "momentum_relu_batch_norm_d0.1_sparse_seed1"
  json.dump({"halted_at_step": 3}, open(halted / "summary.json", "w"))
  os.remove(tmp_path / "momentum_relu_none_d0.1_sparse_seed0" / "summary.json")
  fake3 = FakeTrainer()
  sweep.run_sweep(config, str(tmp_path), train_fn=fake3)
  assert sorted(n for n, _ in fake3.calls) == [
      "momentum_relu_batch_norm_d0.1_sparse_seed1", "momentum_relu_none_d0.1_sparse_seed0"]


def test_sweep_slice_trains_only_its_runs(tmp_path):
  config = small_study()
  fake = FakeTrainer()
  counts = sweep.run_sweep(config, str(tmp_path), index=1, count=4, train_fn=fake)
  expected = [r.name for r in sweep.grid_runs(config.study)[1::4]]
  assert [n for n, _ in fake.calls] == expected and counts["trained"] == 3
  assert sorted(os.listdir(tmp_path)) == sorted(expected)


# ----------------------------------------------------------------------------
# Learning-rate tuning, the augment regularisation and the init factor.
# ----------------------------------------------------------------------------


def tuning_study():
  config = small_study()
  study = config.study
  study.densities = (0.1,)
  study.regularisations = ("none", "augment")
  study.seeds = (0, 1)
  study.learning_rates = dict(momentum=(0.1, 0.01, 0.03))
  study.validation_fraction = 0.1
  study.tuning_seed = 7
  study.augment_shift = 2
  study.inits = ("dense_fan_in", "active_fan_in")
  return config


class FakeTuner(FakeTrainer):
  """Validation accuracy by rate (dense runs prefer 0.03, sparse 0.1); 0.01 diverges
  for the augmented sparse setting; final runs get 0.5 + seed / 100."""

  def __call__(self, config, run_dir):
    name = os.path.basename(run_dir)
    self.calls.append((name, config))
    if "validation_fraction" not in config:
      acc = 0.5 + config.seed / 100
    elif config.learning_rate == 0.01 and "augment" in name and "sparse" in name:
      raise FloatingPointError("Step 3: the loss is NaN")
    else:
      best = 0.1 if "sparse" in name else 0.03
      acc = 0.9 if config.learning_rate == best else 0.8
      if "active_fan_in" in name:  # a tie between 0.03 and 0.1: the smaller wins
        acc = 0.8 if config.learning_rate == 0.01 else 0.85
    summary = {"final_test_accuracy": acc}
    json.dump(summary, open(os.path.join(run_dir, "summary.json"), "w"))
    return summary


def swept_on_two_rates(tmp_path):
  """One sparse and one dense setting swept on the rates (0.01, 0.03) into tmp_path."""
  config = tuning_study()
  config.study.inits = ("dense_fan_in",)
  config.study.regularisations = ("none",)
  config.study.learning_rates = dict(momentum=(0.01, 0.03))
  sweep.run_sweep(config, str(tmp_path), train_fn=FakeTuner())
  return config


def test_grid_with_inits_and_augment_names_and_configs():
  config = tuning_study()
  runs = sweep.grid_runs(config.study)
  # Per seed and regularisation: sparse + dense (dense fan-in) + sparse (active).
  assert len(runs) == 2 * 2 * 3
  names = {r.name for r in runs}
  assert "momentum_relu_augment_d0.1_sparse_active_fan_in_seed1" in names
  assert "momentum_relu_none_d0.1_dense_seed0" in names  # as in the earlier grids
  assert not any("dense_active" in n for n in names)
  tunes = tuning_lib.tuning_runs(config.study, runs)
  assert len(tunes) == 2 * 3 * 3 and {t.seed for t in tunes} == {7}
  assert tunes[0].name == "tune/momentum_relu_none_d0.1_sparse_lr0.01_seed7"
  cap = sweep.scsdc.same_capacity("mlp", 64, 0.1)
  tune = sweep.run_config(config, tunes[0], cap)
  assert (tune.learning_rate, tune.validation_fraction) == (0.01, 0.1)
  assert "augment_shift" not in tune and "init_scaling" not in tune
  aug = next(r for r in runs if r.regularisation == "augment" and r.init != "dense_fan_in")
  c = sweep.run_config(config, aug, cap, learning_rate=0.03)
  assert (c.learning_rate, c.augment_shift, c.init_scaling) == (0.03, 2, "active_fan_in")
  assert "validation_fraction" not in c and c.weight_decay == 0.0
  with pytest.raises(ValueError, match="tuned learning_rate"):
    sweep.run_config(config, aug, cap)


@pytest.mark.parametrize("field,value,match", [
    ("regularisations", ("none", "mixup"), "Unknown regularisation"),
    ("inits", ("lecun",), "Unknown init"),
    ("validation_fraction", 0.0, "validation_fraction"),
    ("augment_shift", 0, "augment_shift"),
    ("densities", (0.0,), "outside"),
])
def test_bad_study_fields_are_clear_errors_before_any_data(tmp_path, field, value, match):
  config = tuning_study()
  config.study[field] = value
  with pytest.raises(ValueError, match=match):
    sweep.run_sweep(config, str(tmp_path), train_fn=FakeTuner())
  assert not os.listdir(tmp_path)
  config = tuning_study()
  config.study.learning_rates = dict(momentum=(0.1, 0.1))
  with pytest.raises(ValueError, match="learning_rates.momentum"):
    sweep.grid_runs(config.study)


def test_choose_learning_rate_best_then_smaller_diverged_last():
  assert tuning_lib.choose_learning_rate({0.1: 0.8, 0.03: 0.9, 0.01: 0.7}) == 0.03
  assert tuning_lib.choose_learning_rate({0.1: 0.9, 0.03: 0.9, 0.01: 0.7}) == 0.03  # tie
  assert tuning_lib.choose_learning_rate({0.1: None, 0.03: 0.1}) == 0.03
  assert tuning_lib.choose_learning_rate({0.1: None, 0.03: None}) == 0.03
  with pytest.raises(ValueError, match="at least one"):
    tuning_lib.choose_learning_rate({})


def test_tuning_then_final_runs_at_the_chosen_rates(tmp_path):
  config = tuning_study()
  fake = FakeTuner()
  counts = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert counts == {"total": 18 + 12, "skipped": 0, "trained": 30, "failed": 0, "pending": 0}
  # Tuning first, then the final runs.
  phases = ["validation_fraction" in c for _, c in fake.calls]
  assert phases == [True] * 18 + [False] * 12
  tuning = json.load(open(tmp_path / "tuning.json"))
  settings = tuning["settings"]
  assert tuning["tuning_seed"] == 7 and "smaller" in tuning["rule"]
  assert settings["momentum_relu_none_d0.1_sparse"]["chosen"] == 0.1
  assert settings["momentum_relu_none_d0.1_dense"]["chosen"] == 0.03
  assert settings["momentum_relu_none_d0.1_sparse_active_fan_in"]["chosen"] == 0.03  # tie
  aug = settings["momentum_relu_augment_d0.1_sparse"]
  assert aug["grid"] == {"0.01": None, "0.03": 0.8, "0.1": 0.9} and aug["chosen"] == 0.1
  assert (tmp_path / "tune" / "momentum_relu_augment_d0.1_sparse_lr0.01_seed7" /
          "diverged.json").exists()
  final = {n: c for n, c in fake.calls if "validation_fraction" not in c}
  assert final["momentum_relu_none_d0.1_dense_seed1"].learning_rate == 0.03
  assert final["momentum_relu_augment_d0.1_sparse_seed0"].learning_rate == 0.1
  run_json = json.load(open(tmp_path / "momentum_relu_none_d0.1_dense_seed1" / "run.json"))
  assert (run_json["learning_rate"], run_json["tuned"], run_json["phase"]) == (0.03, True,
                                                                            "final")
  # Everything is finished: a rerun trains nothing (the diverged rate included).
  fake2 = FakeTuner()
  assert sweep.run_sweep(config, str(tmp_path), train_fn=fake2)["skipped"] == 30
  assert not fake2.calls


def test_a_sweep_of_another_grid_keeps_the_tuning_of_earlier_ones(tmp_path):
  # The converged study runs its init factor as a second sweep into the same
  # workdir, on a sub-grid: its tuning.json must add to the first grid's, not replace it.
  config = tuning_study()
  config.study.inits = ("dense_fan_in",)
  sweep.run_sweep(config, str(tmp_path), train_fn=FakeTuner())
  first = json.load(open(tmp_path / "tuning.json"))["settings"]
  assert "momentum_relu_augment_d0.1_sparse" in first
  sub = tuning_study()
  sub.study.regularisations = ("none",)
  sweep.run_sweep(sub, str(tmp_path), train_fn=FakeTuner())
  merged = json.load(open(tmp_path / "tuning.json"))["settings"]
  assert set(merged) == set(first) | {"momentum_relu_none_d0.1_sparse_active_fan_in"}
  for setting, entry in first.items():
    assert merged[setting] == entry
  assert merged["momentum_relu_none_d0.1_sparse_active_fan_in"]["chosen"] == 0.03


def test_a_final_run_at_an_outdated_rate_is_retrained_and_the_old_one_kept(tmp_path):
  # Widening a grid can change a setting's chosen rate; a final run trained at the
  # old rate must not be skipped as finished (its name carries no rate).
  config = tuning_study()
  config.study.inits = ("dense_fan_in",)
  config.study.regularisations = ("none",)
  config.study.learning_rates = dict(momentum=(0.01, 0.03))  # sparse: a tie, 0.01
  sweep.run_sweep(config, str(tmp_path), train_fn=FakeTuner())
  run_dir = tmp_path / "momentum_relu_none_d0.1_sparse_seed0"
  assert json.load(open(run_dir / "run.json"))["learning_rate"] == 0.01
  config.study.learning_rates = dict(momentum=(0.01, 0.03, 0.1))  # sparse best: 0.1
  fake = FakeTuner()
  counts = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  retrained = sorted(n for n, c in fake.calls if "validation_fraction" not in c)
  # The sparse runs move to 0.1; the dense ones keep 0.03 and are skipped.
  assert retrained == ["momentum_relu_none_d0.1_sparse_seed0",
                       "momentum_relu_none_d0.1_sparse_seed1"]
  assert counts["trained"] == 2 + 2  # two new tuning runs (rate 0.1), two finals
  assert json.load(open(run_dir / "run.json"))["learning_rate"] == 0.1
  kept = list((tmp_path / "previous").glob("momentum_relu_none_d0.1_sparse_seed0_*"))
  assert len(kept) == 1
  assert json.load(open(kept[0] / "run.json"))["learning_rate"] == 0.01
  assert (kept[0] / "summary.json").exists()


def test_a_finished_final_run_waits_while_its_widened_grid_is_unfinished(tmp_path):
  # A wider grid's new tuning runs of a setting may lie in another slice: until
  # they are done the finished final run is pending (not skipped as finished).
  config = swept_on_two_rates(tmp_path)
  config.study.learning_rates = dict(momentum=(0.01, 0.03, 0.1))
  fake = FakeTuner()
  # Slice 0 of 3: the old rates' tuning runs (finished) and two finished final
  # runs; both settings' new rate (0.1) is in slice 2.
  counts = sweep.run_sweep(config, str(tmp_path), index=0, count=3, train_fn=fake)
  assert counts == {"total": 4, "skipped": 2, "trained": 0, "failed": 0, "pending": 2}
  assert not fake.calls
  counts = sweep.run_sweep(config, str(tmp_path), index=2, count=3, train_fn=fake)
  assert counts["trained"] == 2 + 1  # the new tuning runs; sparse seed 1 at 0.1
  counts = sweep.run_sweep(config, str(tmp_path), index=0, count=3, train_fn=fake)
  assert counts == {"total": 4, "skipped": 3, "trained": 1, "failed": 0, "pending": 0}
  assert fake.calls[-1][0] == "momentum_relu_none_d0.1_sparse_seed0"
  run_dir = tmp_path / "momentum_relu_none_d0.1_sparse_seed0"
  assert json.load(open(run_dir / "run.json"))["learning_rate"] == 0.1


def test_rates_from_trains_the_finals_at_another_sweeps_chosen_rates(tmp_path):
  # The budget check: the tuned sweep's settings again at twice the epochs, at the
  # rates that sweep chose, with no tuning runs.
  config = tuning_study()
  sweep.run_sweep(config, str(tmp_path / "tuned"), train_fn=FakeTuner())
  check = tuning_study()
  check.num_epochs = 2 * config.num_epochs
  check.study.seeds = (0,)
  check.study.rates_from = str(tmp_path / "tuned" / "tuning.json")
  fake = FakeTuner()
  counts = sweep.run_sweep(check, str(tmp_path / "budget"), train_fn=fake)
  assert counts == {"total": 6, "skipped": 0, "trained": 6, "failed": 0, "pending": 0}
  rates = {n: c.learning_rate for n, c in fake.calls}
  assert all("validation_fraction" not in c and c.num_epochs == 2 * config.num_epochs
             for _, c in fake.calls)
  assert rates == {"momentum_relu_none_d0.1_sparse_seed0": 0.1,
                   "momentum_relu_none_d0.1_dense_seed0": 0.03,
                   "momentum_relu_none_d0.1_sparse_active_fan_in_seed0": 0.03,
                   "momentum_relu_augment_d0.1_sparse_seed0": 0.1,
                   "momentum_relu_augment_d0.1_dense_seed0": 0.03,
                   "momentum_relu_augment_d0.1_sparse_active_fan_in_seed0": 0.03}
  assert not (tmp_path / "budget" / "tune").exists()
  assert not (tmp_path / "budget" / "tuning.json").exists()


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "nowhere.json"), "is not a file"),
    (lambda p: p.joinpath("t.json").write_text(json.dumps({"settings": {
        "momentum_relu_none_d0.1_sparse": {"chosen": 0.1}}})) and str(p / "t.json"),
     "no finished tuning on this study's learning-rate grids for 6 settings"),
    (lambda p: str(p / "w" / "tuning.json"), "this sweep's own tuning.json"),
])
def test_bad_rates_from_is_a_clear_error_before_any_training(tmp_path, make, match):
  config = tuning_study()
  (tmp_path / "w").mkdir()
  config.study.rates_from = make(tmp_path)
  if "own" in match:
    (tmp_path / "w" / "tuning.json").write_text("{}")
  fake = FakeTuner()
  with pytest.raises(ValueError, match=match):
    sweep.run_sweep(config, str(tmp_path / "w"), train_fn=fake)
  assert not fake.calls and sorted(os.listdir(tmp_path / "w")) in ([], ["tuning.json"])


def test_rates_from_a_sweep_of_another_grid_is_refused(tmp_path):
  # Its chosen rates were picked on fewer rates than this study tunes on.
  narrow = tuning_study()
  narrow.study.learning_rates = dict(momentum=(0.01, 0.03))
  sweep.run_sweep(narrow, str(tmp_path / "narrow"), train_fn=FakeTuner())
  config = tuning_study()
  config.study.rates_from = str(tmp_path / "narrow" / "tuning.json")
  with pytest.raises(ValueError, match="learning-rate grids for 6 settings"):
    sweep.run_sweep(config, str(tmp_path / "w"), train_fn=FakeTuner())
  # One fixed rate for the optimizer: no tuning needed, that rate is used.
  config.study.learning_rates = dict(momentum=0.05)
  fake = FakeTuner()
  sweep.run_sweep(config, str(tmp_path / "w"), train_fn=fake)
  assert {c.learning_rate for _, c in fake.calls} == {0.05} and len(fake.calls) == 12


def test_an_interrupted_final_run_at_an_outdated_rate_starts_again(tmp_path):
  # A final run killed mid-training (run.json, no summary) at the old tuned rate:
  # resuming its checkpoint at the new rate would mix two rates; it starts afresh
  # and the interrupted one is kept.
  config = swept_on_two_rates(tmp_path)
  run_dir = tmp_path / "momentum_relu_none_d0.1_sparse_seed0"
  (run_dir / "summary.json").unlink()  # as if killed before the end
  (run_dir / "checkpoint_marker").write_text("half-trained at 0.01")
  config.study.learning_rates = dict(momentum=(0.01, 0.03, 0.1))
  fake = FakeTuner()
  sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert ("momentum_relu_none_d0.1_sparse_seed0", 0.1) in [
      (n, c.learning_rate) for n, c in fake.calls]
  assert not (run_dir / "checkpoint_marker").exists()
  kept = list((tmp_path / "previous").glob("momentum_relu_none_d0.1_sparse_seed0_*"))
  assert len(kept) == 1 and (kept[0] / "checkpoint_marker").exists()
  assert json.load(open(kept[0] / "run.json"))["learning_rate"] == 0.01


def test_a_final_run_that_diverges_moves_its_setting_to_the_next_best_rate(tmp_path):
  # The tuning seed trained at 0.1, another seed diverges there: the setting is
  # retrained at the next best rate (0.01: a tie with 0.03, the smaller wins), every
  # seed, and 0.1 is not chosen again; the runs at 0.1 are kept in previous/.
  config = tuning_study()
  config.study.inits = ("dense_fan_in",)
  config.study.regularisations = ("none",)

  class Unstable(FakeTuner):
    def __call__(self, config, run_dir):
      if (os.path.basename(run_dir) == "momentum_relu_none_d0.1_sparse_seed1"
          and config.learning_rate == 0.1):
        self.calls.append((os.path.basename(run_dir), config))
        raise FloatingPointError("Step 7: the loss is NaN")
      return super().__call__(config, run_dir)

  fake = Unstable()
  counts = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert counts["failed"] == 1 and counts["trained"] == 6 + 3
  sparse = "momentum_relu_none_d0.1_sparse"
  assert (tmp_path / f"{sparse}_seed1" / "diverged.json").exists()
  tuning = json.load(open(tmp_path / "tuning.json"))["settings"]
  # Rewritten at the end of the pass: the next pass knows 0.1 is unstable.
  assert tuning[sparse]["chosen"] == 0.01 and tuning[sparse]["unstable"] == ["0.1"]
  counts = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert counts["failed"] == 0 and counts["trained"] == 2
  assert sorted((n, c.learning_rate) for n, c in fake.calls[-2:]) == [
      (f"{sparse}_seed0", 0.01), (f"{sparse}_seed1", 0.01)]
  tuning = json.load(open(tmp_path / "tuning.json"))["settings"]
  assert tuning[sparse]["chosen"] == 0.01 and tuning[sparse]["unstable"] == ["0.1"]
  assert tuning["momentum_relu_none_d0.1_dense"]["unstable"] == []
  kept = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "previous").iterdir())
  assert kept == [f"{sparse}_seed0", f"{sparse}_seed1"]
  # Settled: the diverged run's rate stays out although it now lies in previous/.
  again = sweep.run_sweep(config, str(tmp_path), train_fn=fake)
  assert again["trained"] == 0 and again["failed"] == 0
  assert tuning_lib.choose_learning_rate({0.1: 0.9, 0.03: 0.8}, unstable=[0.1]) == 0.03
  assert tuning_lib.choose_learning_rate({0.1: 0.9}, unstable=[0.1]) == 0.1  # nothing else
  lines = "\n".join(report._tuning_lines(json.load(open(tmp_path / "tuning.json")), []))
  assert f"1 settings had a final run diverge at the chosen rate" in lines
  assert "0.1: 90.00 (a final run diverged: not chosen)" in lines and "**0.01: 80.00**" in lines


def test_final_runs_wait_for_another_slices_tuning(tmp_path):
  config = tuning_study()
  fake = FakeTuner()
  counts = sweep.run_sweep(config, str(tmp_path), index=0, count=2, train_fn=fake)
  # Slice 0 of 2: 9 tuning runs, 6 final runs; every setting has a rate in slice 1.
  assert counts["total"] == 15 and counts["pending"] == 6 and counts["trained"] == 9
  sweep.run_sweep(config, str(tmp_path), index=1, count=2, train_fn=fake)
  again = sweep.run_sweep(config, str(tmp_path), index=0, count=2, train_fn=fake)
  assert again == {"total": 15, "skipped": 9, "trained": 6, "failed": 0, "pending": 0}
  assert len(fake.calls) == 30 and len({n for n, _ in fake.calls}) == 30


# ----------------------------------------------------------------------------
# The report, on synthetic run records.
# ----------------------------------------------------------------------------


def test_kendall_tau_by_hand_and_against_scipy():
  # (1,3,2,4) vs (1,2,3,4): 5 concordant pairs, 1 discordant -> (5-1)/6.
  assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
  assert stats.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # Ties: x = (1,2,2,3), y = (1,2,3,3): C = 4, D = 0, one tie in each of the 6 pairs
  # -> 4 / sqrt(5 * 5) = 0.8 (tau-b).
  assert stats.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
  assert np.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 40), rng.normal(size=40)
  assert stats.kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0])


def write_run(root, *, optimizer="momentum", activation="relu", regularisation="none",
              density=0.1, seed=0, kind="sparse", accuracy=0.5, measures=None):
  run = sweep.Run(optimizer, activation, regularisation, density, seed, kind)
  d = root / run.name
  d.mkdir()
  json.dump({"optimizer": optimizer, "activation": activation,
             "regularisation": regularisation, "density": density, "seed": seed,
             "kind": kind, "family": "mlp", "dataset": "synthetic", "sparse_width": 64,
             "dense_width": 8, "total_weights": 1000, "active_weights": 100,
             "dense_weights": 104, "leftover": 4, "width": 64}, open(d / "run.json", "w"))
  json.dump({"final_test_accuracy": accuracy, "wall_time_s": 1.0},
            open(d / "summary.json", "w"))
  with open(d / "metrics.jsonl", "w") as f:
    for step, scale in ((0, 1.0), (10, 3.0)):  # mean over steps = 2 * the step-0 value
      f.write(json.dumps({"step": step, **{k: v * scale for k, v in measures.items()}}) + "\n")
      f.write(json.dumps({"step": step + 1, "train_loss": 1.0}) + "\n")


def test_report_on_synthetic_runs(tmp_path):
  runs = tmp_path / "runs"
  runs.mkdir()
  # Four sparse/dense pairs: batch norm adds 30 points to sparse nets, 6 to dense.
  # egf_p2 rises with accuracy (tau +1); gradient_norm falls (tau -1); ghg is
  # ordered (1, 3, 2, 4, ...) against accuracy.
  accs = {("none", "sparse"): [0.50, 0.52], ("none", "dense"): [0.79, 0.81],
          ("batch_norm", "sparse"): [0.80, 0.82], ("batch_norm", "dense"): [0.85, 0.87]}
  rows = []
  for (reg, kind), values in accs.items():
    for seed, acc in enumerate(values):
      rows.append(dict(regularisation=reg, kind=kind, seed=seed, accuracy=acc))
  rows.sort(key=lambda r: r["accuracy"])
  ghg_order = [1, 3, 2, 4, 5, 6, 7, 8]
  for rank, (row, g) in enumerate(zip(rows, ghg_order)):
    write_run(runs, **row, measures={"egf_p1": 1.0, "egf_p2": 0.1 * (rank + 1),
                                     "gradient_norm": 10.0 - rank, "gradient_norm_active": 1.0,
                                     "ghg": float(g)})
  (runs / "unfinished").mkdir()  # no summary: ignored
  records = records_lib.load_runs(str(runs))
  assert len(records) == 8
  r0 = next(r for r in records if r["accuracy"] == 0.50)
  assert r0["init"]["egf_p2"] == pytest.approx(0.1) and r0["measures"]["egf_p2"] == (
      pytest.approx(0.2))
  corr = stats.correlations(records)
  assert corr["egf_p2"]["all"] == (pytest.approx(1.0), 8)
  assert corr["gradient_norm"]["all"][0] == pytest.approx(-1.0)
  # ghg: of the 28 pairs only (3, 2) is discordant -> (27 - 1) / 28.
  assert corr["ghg"]["all"][0] == pytest.approx(26 / 28)
  assert np.isnan(corr["egf_p1"]["all"][0])  # constant measure
  assert corr["egf_p2"]["sparse"] == (pytest.approx(1.0), 4)
  # Inside each regularisation setting (4 runs each) egf_p2 still orders accuracy.
  assert corr["egf_p2"]["within"] == (pytest.approx(1.0), 2)
  assert corr["gradient_norm"]["within"] == (pytest.approx(-1.0), 2)
  bn = findings_lib.finding_batch_norm(records)
  # Pairs per seed: sparse gain 0.30, dense gain 0.06 -> 0.24, identical for both seeds.
  assert bn["diff"] == pytest.approx(0.24) and bn["n"] == 2
  assert bn["sparse_gain"] == pytest.approx(0.30) and bn["dense_gain"] == pytest.approx(0.06)
  assert bn["verdict"] == "supported"  # s.e. 0 < diff / 2
  assert findings_lib.finding_adaptive(records)["verdict"].startswith("not tested")
  text = report.write_report(records, str(tmp_path / "out"), command="python -m x")
  assert "**supported**" in text and "`python -m x`" in text
  assert "| momentum | relu | batch_norm | 0.1 | 81.00 ± 1.00 | 86.00 ± 1.00 | -5.00 | 2 |" in text
  for name in ("README.md", "sparse_vs_dense.png", "measures_vs_accuracy.png",
               "egf_over_training.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0
  with pytest.raises(ValueError, match="No finished run"):
    report.write_report([], str(tmp_path / "empty"))


def test_tiny_converged_sweep_end_to_end_through_the_report(tmp_path):
  """The real trainer: 2 rates tuned on a validation split, augment, both inits."""
  from experiments.configs import gradient_flow_converged_mnist5k
  config = gradient_flow_converged_mnist5k.get_config()
  config.num_train_steps = 4
  config.batch_size = 64
  config.gradient_flow_every_steps = 2
  config.log_every_steps = 2
  study = config.study
  study.width = 16
  study.densities = (0.2,)
  study.optimizers = ("momentum",)
  study.activations = ("relu",)
  study.regularisations = ("augment",)
  study.seeds = (1,)
  study.inits = ("dense_fan_in", "active_fan_in")
  study.learning_rates = dict(momentum=(0.01, 0.1))
  workdir = tmp_path / "sweep"
  counts = sweep.run_sweep(config, str(workdir))
  # 3 settings (sparse, dense, sparse with active fan-in) x (2 rates + 1 seed).
  assert counts == {"total": 9, "skipped": 0, "trained": 9, "failed": 0, "pending": 0}
  tuning = json.load(open(workdir / "tuning.json"))["settings"]
  assert set(tuning) == {"momentum_relu_augment_d0.2_sparse", "momentum_relu_augment_d0.2_dense",
                         "momentum_relu_augment_d0.2_sparse_active_fan_in"}
  for setting, e in tuning.items():
    assert e["complete"] and set(e["grid"]) == {"0.01", "0.1"}
    final = json.load(open(workdir / f"{setting}_seed1" / "config.json"))
    assert final["learning_rate"] == e["chosen"] and final["augment_shift"] == 2
    assert "validation_fraction" not in final
  tune_dir = workdir / "tune" / "momentum_relu_augment_d0.2_dense_lr0.1_seed0"
  assert json.load(open(tune_dir / "summary.json"))["evaluated_on"] == "validation"
  assert json.load(open(tune_dir / "config.json"))["validation_fraction"] == 0.1
  # The active fan-in run starts from larger weights than its dense-fan-in twin.
  egf = lambda name: json.loads(open(workdir / name / "metrics.jsonl").readline())["egf_p2"]
  assert egf("momentum_relu_augment_d0.2_sparse_active_fan_in_seed1") > egf(
      "momentum_relu_augment_d0.2_sparse_seed1")
  records = records_lib.load_runs(str(workdir))
  assert len(records) == 3 and {r["init_scheme"] for r in records} == {
      "dense_fan_in", "active_fan_in"}
  # The budget check: the same final runs at twice the steps, at the chosen rates.
  longer = config.copy_and_resolve_references()
  longer.num_train_steps = 8
  longer.num_epochs = 2 * config.num_epochs  # what the report pairs the budgets by
  longer.study.rates_from = str(workdir / "tuning.json")
  counts = sweep.run_sweep(longer, str(tmp_path / "budget"))
  assert counts == {"total": 3, "skipped": 0, "trained": 3, "failed": 0, "pending": 0}
  text = report.write_report(records, str(tmp_path / "out"),
                             tuning=records_lib.load_tuning(str(workdir)), n_boot=100,
                             longer=records_lib.load_runs(str(tmp_path / "budget")))
  assert "| momentum_relu_augment_d0.2_dense | " in text and "## The initialisation factor" in text
  assert "**Budget check**: 3 final runs trained again for 60 instead of 30 epochs" in text
  assert (tmp_path / "out" / "budget_check.png").exists()
  findings = json.load(open(tmp_path / "out" / "findings.json"))
  assert findings["budget_check"]["n"] == 3


def test_budget_check_pairs_runs_by_name_and_rate():
  def rec(kind, seed, acc, lr=0.1, epochs=30):
    name = f"adam_relu_none_d0.05_{kind}_seed{seed}"
    return {"name": name, "kind": kind, "accuracy": acc, "learning_rate": lr,
            "num_epochs": epochs, "loss_drop_last_fifth": 0.02}
  short = [rec("sparse", 0, 0.80), rec("dense", 0, 0.85), rec("sparse", 1, 0.70),
           rec("dense", 1, 0.90), rec("sparse", 2, 0.5)]
  longer = [rec("sparse", 0, 0.82, epochs=60), rec("dense", 0, 0.86, epochs=60),
            rec("sparse", 1, 0.71, epochs=60), rec("dense", 1, 0.90, epochs=60),
            rec("sparse", 2, 0.9, lr=0.3, epochs=60),  # another rate: not a pair
            rec("dense", 5, 0.9, epochs=60)]  # no run of that name: not a pair
  check = findings_lib.budget_check(short, longer, n_boot=200)
  assert check["n"] == 4 and check["epochs"] == [30] and check["longer_epochs"] == [60]
  assert (check["unpaired"], check["other_rate"]) == (1, 1)
  change = check["accuracy_change"]
  np.testing.assert_allclose([change[k]["effect"] for k in ("all", "sparse", "dense")],
                             [0.01, 0.015, 0.005], atol=1e-12)
  assert change["all"]["largest"] == pytest.approx(0.02)
  lo, hi = change["all"]["ci"]
  assert 0.0 <= lo <= 0.01 <= hi <= 0.02
  # Gap change: seed 0 (0.82 - 0.86) - (0.80 - 0.85) = 0.01; seed 1 the same.
  assert check["gap_change"]["n"] == 2
  np.testing.assert_allclose([check["gap_change"]["effect"], *check["gap_change"]["ci"]],
                             0.01, atol=1e-12)
  text = "\n".join(report._budget_lines(check))
  assert "4 final runs trained again for 60 instead of 30 epochs" in text
  assert "1.00 [" in text and "largest change 2.00" in text and "sparse 1.50 [" in text
  assert [(p["accuracy"], p["longer_accuracy"]) for p in check["pairs"]] == [
      (0.80, 0.82), (0.85, 0.86), (0.70, 0.71), (0.90, 0.90)]
  assert "Left out: 1 longer runs with no run of that name here, 1 at another rate" in text
  # The same budget twice (e.g. --budget_workdir = --workdir) is refused.
  with pytest.raises(ValueError, match="needs a longer sweep"):
    findings_lib.budget_check(short, short)


def test_budget_check_plot(tmp_path):
  check = {"epochs": [30], "longer_epochs": [60], "pairs": [
      {"name": "a", "kind": "sparse", "optimizer": "adam", "accuracy": 0.9,
       "longer_accuracy": 0.91},
      {"name": "b", "kind": "dense", "optimizer": "sgd", "accuracy": 0.95,
       "longer_accuracy": 0.94}]}
  plots.plot_budget_check(check, str(tmp_path / "b.png"))
  assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_tuning_json_survives_a_write_that_fails_midway(tmp_path):
  # json.dump streams into the file: a value it cannot encode (a circular list),
  # deep in the dict, fails after part of the file is written. The last complete
  # tuning.json must stay.
  config = tuning_study()
  sweep.run_sweep(config, str(tmp_path), train_fn=FakeTuner())
  before = (tmp_path / "tuning.json").read_text()
  circular = []
  circular.append(circular)
  with pytest.raises(ValueError, match="Circular"):
    records_lib.write_tuning(str(tmp_path), {"rule": "x" * 10_000, "settings": {
        "zz_last": {"chosen": circular}}})
  assert (tmp_path / "tuning.json").read_text() == before
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_budget_check_recomputes_the_findings_at_both_budgets():
  def rec(reg, kind, acc, epochs):
    return {"name": f"sgd_relu_{reg}_d0.05_{kind}_seed0", "optimizer": "sgd",
            "activation": "relu", "regularisation": reg, "density": 0.05, "seed": 0,
            "kind": kind, "accuracy": acc, "learning_rate": 0.1, "num_epochs": epochs}
  accs = {("batch_norm", "sparse"): (0.90, 0.92), ("none", "sparse"): (0.80, 0.83),
          ("batch_norm", "dense"): (0.86, 0.87), ("none", "dense"): (0.85, 0.86)}
  short = [rec(r, k, a, 30) for (r, k), (a, _) in accs.items()]
  longer = [rec(r, k, b, 60) for (r, k), (_, b) in accs.items()]
  check = findings_lib.budget_check(short, longer, n_boot=50)
  bn = check["findings"]["batch_norm"]
  # (0.90 - 0.80) - (0.86 - 0.85) = 0.09; (0.92 - 0.83) - (0.87 - 0.86) = 0.08.
  assert bn["n"] == 1
  np.testing.assert_allclose([bn["effect"], bn["longer_effect"]], [0.09, 0.08], atol=1e-12)
  assert check["sparse_change_by_optimizer"] == pytest.approx({"sgd": 0.025})
  assert "batch_norm 9.00 → 8.00 (n=1)" in "\n".join(report._budget_lines(check))
