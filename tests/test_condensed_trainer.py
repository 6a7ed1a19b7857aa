"""``config.sparsity.condense`` in the trainer (issue 32): a channel run that shrinks.

LeNet-300-100 on the MNIST subset, GMP to 75% of the hidden units layer-wise
(events at steps 10, 20, 30). References: the hand count of the weights the
condensed model keeps, the masked run's unit counts, and the uninterrupted run.
"""

import numpy as np
import pytest

from experiments.trainer import config_checks
from experiments.trainer import train
from tests.test_trainer import read_export
from tests.test_trainer import small_config


def _config(**kw):
  config = small_config("gmp", keep_last_dense=True, scope="layerwise")
  config.sparsity.structure = "channels"
  config.sparsity.final = 0.75
  config.sparsity.condense = True
  config.sparsity.condense_wait_steps = 0  # shrink at every event that can
  for k, v in kw.items():
    setattr(config.sparsity, k, v)
  return config


def test_condensed_run_shrinks_and_reports_in_original_units(tmp_path):
  summary = train.train_and_evaluate(_config(), str(tmp_path / "condensed"))
  masked_config = _config(condense=False)
  masked = train.train_and_evaluate(masked_config, str(tmp_path / "masked"))
  # 75 of 300 and 25 of 100 hidden units, as the masked run keeps.
  assert summary["condensed_widths"] == [75, 25, 10]
  exported = read_export(tmp_path / "masked")
  assert [int(exported[f"masks/Dense_{i}/kernel"].any(0).sum()) for i in (0, 1)] == [75, 25]
  # The condensed model's weights, over the full model's prunable ones (784x300 +
  # 300x100): Dense_1 lost the rows of Dense_0's 225 removed units too.
  active = 784 * 75 + 75 * 25
  assert summary["mask_sparsity"] == pytest.approx(1 - active / (784 * 300 + 300 * 100))
  assert masked["mask_sparsity"] == pytest.approx(1 - (784 * 75 + 300 * 25) / 265_200)
  small = read_export(tmp_path / "condensed")
  assert small["params/Dense_0/kernel"].shape == (784, 75)
  assert small["params/Dense_1/kernel"].shape == (75, 25)
  assert small["params/Dense_2/kernel"].shape == (25, 10)
  assert summary["final_test_accuracy"] > 0.5
  assert summary["inference_flops_vs_dense"] < masked["inference_flops_vs_dense"]


def test_a_shrink_waits_for_the_pruning_schedules_last_event_when_it_is_near(
    tmp_path, caplog):
  # Events at 10, 20, 30, t_f = 31, condense_wait_steps=15: at 10 the schedule's end
  # is 21 steps away (shrinks); at 20, 11 (waits); 30 is the last event (shrinks):
  # 2 shrinks instead of 3.
  caplog.set_level("INFO", logger="sparse_jax.train")
  summary = train.train_and_evaluate(_config(condense_wait_steps=15), str(tmp_path))
  shrinks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Condensed:")]
  assert len(shrinks) == 2, shrinks
  assert summary["condensed_widths"] == [75, 25, 10]


def test_granet_shrinks_at_the_schedules_last_event_not_at_the_runs(tmp_path, caplog):
  # GraNet's events go on after t_f = 31 (10, ..., 50 in 60 steps): with the default
  # wait (200) 10 and 20 wait; 30 shrinks, since the next event (40) no longer prunes.
  caplog.set_level("INFO", logger="sparse_jax.train")
  config = _config(method="granet", condense_wait_steps=200)
  config.num_train_steps = 60
  train.train_and_evaluate(config, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records]
  shrinks = [i for i, m in enumerate(lines) if m.startswith("Condensed:")]
  assert shrinks, lines
  step_30 = next(i for i, m in enumerate(lines) if "step 30/60" in m)
  step_40 = next(i for i, m in enumerate(lines) if "step 40/60" in m)
  assert step_30 < shrinks[0] < step_40


def test_resume_after_a_shrink_equals_the_uninterrupted_run(tmp_path):
  whole = train.train_and_evaluate(_config(), str(tmp_path / "whole"))
  config = _config()
  config.halt_after_step = 25  # after the shrinks at 10 and 20
  assert train.train_and_evaluate(config, str(tmp_path / "resumed")) == {
      "halted_at_step": 25}
  config.halt_after_step = None
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["final_test_accuracy"] == whole["final_test_accuracy"]
  a, b = read_export(tmp_path / "whole"), read_export(tmp_path / "resumed")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("change, match", [
    (dict(structure="unstructured"), "structure='channels'"),
    (dict(method="static"), "mask-update events"),
    (dict(condense_patience=0), "condense_patience >= 1"),
    (dict(condense_wait_steps=-1), "condense_wait_steps >= 0"),
])
def test_condense_refuses_what_it_cannot_do_before_any_data(change, match, monkeypatch):
  config = _config(**change)
  monkeypatch.setattr(train.input_pipeline, "load_arrays",
                      lambda *a, **k: pytest.fail("data read before the check"))
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config)


def test_condense_refuses_a_learned_activation_before_any_data(monkeypatch):
  """PReLU's slope is a param per layer: not foldable (it failed at the first cut)."""
  config = _config()
  config.model_kwargs.activation = "prelu"
  monkeypatch.setattr(train.input_pipeline, "load_arrays",
                      lambda *a, **k: pytest.fail("data read before the check"))
  with pytest.raises(ValueError, match="model_kwargs.activation='prelu'.*condense=False"):
    config_checks.validate(config)


def test_condense_refuses_a_residual_model():
  config = _config()
  config.model = "resnet20"
  with pytest.raises(ValueError, match="chain models only"):
    config_checks.validate(config)


def test_condensed_rigl_regrows_among_units_waiting_out_their_patience(tmp_path):
  # RigL keeps 25% of the hidden units from the start; its events (10, 20, 30) drop
  # and regrow whole units. With patience 2 a unit dropped at one event can regrow
  # at the next before it is removed; the counts stay RigL's.
  config = _config(method="rigl", condense_patience=2, distribution="uniform",
                   regrowth_rate=0.3)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["condensed_widths"] == [75, 25, 10]
  small = read_export(tmp_path)
  for name in ("Dense_0/kernel", "Dense_1/kernel"):
    mask = small[f"masks/{name}"]
    assert mask.all(), name  # every unit left is alive: the dead ones were removed
  assert summary["mask_sparsity"] == pytest.approx(1 - (784 * 75 + 75 * 25) / 265_200)
