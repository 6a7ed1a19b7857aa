"""Chase (issue 32; experiments/trainer/chase.py): UMM, the channel schedule, the
choice with floors, the budget refill, and a condensed RigL run that follows them.

References are worked out by hand in the comments.
"""

import json

import numpy as np
import pytest

from experiments.trainer import chase
from experiments.trainer import config_checks
from experiments.trainer import train
from tests.test_trainer import read_export
from tests.test_trainer import small_config


def test_umm_counts_only_active_weights_over_the_whole_fan_in():
  kernel = np.array([[1.0, -2.0], [3.0, 0.5]])
  mask = np.array([[True, False], [True, True]])
  # unit 0: (|1| + |3|) / 2 = 2; unit 1: -2 is inactive, |0.5| / 2 = 0.25.
  np.testing.assert_allclose(chase.umm(kernel, mask, 2), [2.0, 0.25])
  # A conv kernel [3, 3, 1, 2]: 9 inputs per unit, over a fan-in of 9.
  conv = np.ones((3, 3, 1, 2))
  conv[..., 1] = -2.0
  np.testing.assert_allclose(chase.umm(conv, None, 9), [1.0, 2.0])


def test_the_schedule_is_cubic_to_the_channel_sparsity():
  c = chase.Chase(channel_sparsity=0.5, floor=0.2, end_step=10, budget=0)
  # s_5 = 0.5 (1 - 0.5^3) = 0.4375: ceil(100 * 0.5625) = 57 units kept.
  assert c.alive_target(100, 5) == 57
  assert c.alive_target(100, 10) == 50
  assert c.alive_target(100, 30) == 50  # held after end_step
  assert c.alive_target(100, 0) == 100
  assert c.layer_floor(300) == 30 and c.layer_floor(4) == 1  # int(4 * 0.5 * 0.2) = 0


def test_choose_removes_the_lowest_across_layers_down_to_each_floor():
  scores = {"a": np.array([0.1, 0.5, 0.2]), "b": np.array([0.05, 0.3])}
  floors = {"a": 1, "b": 1}
  # Ascending: b0 0.05, a0 0.1, a2 0.2, b1 0.3, a1 0.5.
  got = chase.choose(scores, floors, 3)
  assert got["a"].tolist() == [True, False, True] and got["b"].tolist() == [True, False]
  # A fourth would be b1 or a1, but each layer is at its floor of 1.
  got = chase.choose(scores, floors, 4)
  assert got["a"].tolist() == [True, False, True] and got["b"].tolist() == [True, False]
  # Ties: layer order, then unit index.
  tied = chase.choose({"a": np.zeros(2), "b": np.zeros(2)}, {"a": 0, "b": 0}, 3)
  assert tied["a"].tolist() == [True, True] and tied["b"].tolist() == [True, False]


class _State:  # what chase.refill reads and replaces of a TrainState
  def __init__(self, params, opt_state):
    self.params, self.opt_state = params, opt_state

  def replace(self, **kw):
    return _State(kw.get("params", self.params), kw.get("opt_state", self.opt_state))


def _sparse_state(masks):
  import jax.numpy as jnp
  import sparse_jax
  return sparse_jax.SparseState(count=jnp.zeros((), jnp.int32), masks=masks,
                                rng=jnp.zeros(2, jnp.uint32), inner_state=())


def test_refill_grows_the_largest_gradients_globally_at_zero():
  masks = {"A": {"kernel": np.array([[True, False], [False, False]]), "bias": None},
           "B": {"kernel": np.array([[False, True]]), "bias": None}}
  params = {"A": {"kernel": np.array([[1.0, 7.0], [7.0, 7.0]]), "bias": np.zeros(2)},
            "B": {"kernel": np.array([[7.0, 2.0]]), "bias": np.zeros(2)}}
  grads = {"A": {"kernel": np.array([[9.0, 0.1], [-0.5, 0.2]]), "bias": np.ones(2)},
           "B": {"kernel": np.array([[-0.4, 5.0]]), "bias": np.ones(2)}}
  state = _State(params, _sparse_state(masks))
  # 2 active, budget 4: the two inactive positions of largest |g| are A[1,0] (0.5)
  # and B[0,0] (0.4); A[0,0] (9) and B[0,1] (5) are active already.
  new, grown = chase.refill(state, grads, budget=4)
  assert grown == 2
  import sparse_jax
  got = sparse_jax.get_masks(new.opt_state)
  assert got["A"]["kernel"].tolist() == [[True, False], [True, False]]
  assert got["B"]["kernel"].tolist() == [[True, True]]
  assert new.params["A"]["kernel"].tolist() == [[1.0, 7.0], [0.0, 7.0]]  # grown at 0
  assert new.params["B"]["kernel"].tolist() == [[0.0, 2.0]]
  assert chase.refill(new, grads, budget=4)[1] == 0  # at the budget: nothing


def _config(**kw):
  config = small_config("rigl", keep_last_dense=True, regrowth_rate=0.3)
  config.sparsity.condense = True
  config.sparsity.channel_sparsity = 0.5
  for k, v in kw.items():
    setattr(config.sparsity, k, v)
  return config


@pytest.mark.parametrize("change, match", [
    (dict(method="granet"), "one of \\('rigl', 'set'\\)"),
    (dict(structure="channels"), "structure='unstructured'"),
    (dict(channel_sparsity=1.0), "channel_sparsity must be in"),
    (dict(condense=False), r"channel_sparsity=0.5 \(Chase\) needs sparsity.condense=True"),
    (dict(regrowth_warmup=5), "regrowth_warmup=0"),
    (dict(condense_patience=0), "condense_patience >= 1"),
])
def test_chase_refuses_bad_settings_before_any_data(change, match, monkeypatch):
  _refused_before_data(_config(**change), match, monkeypatch)


@pytest.mark.parametrize("field, value, match", [
    ("model", "resnet20", "chain models only"),
    ("param_sharding", "fsdp", "replicated params only"),
    ("record_mask_history", True, "mask history"),
])
def test_chase_keeps_the_condense_checks(field, value, match, monkeypatch):
  config = _config()
  setattr(config, field, value)
  _refused_before_data(config, match, monkeypatch)


def _refused_before_data(config, match, monkeypatch):
  monkeypatch.setattr(train.input_pipeline, "load_arrays",
                      lambda *a, **k: pytest.fail("data read before the check"))
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config)


def test_chase_run_keeps_its_budget_and_follows_the_schedule(tmp_path, caplog):
  caplog.set_level("INFO", logger="sparse_jax.train")
  summary = train.train_and_evaluate(_config(), str(tmp_path / "whole"))
  # Events at 10, 20, 30 (RigL's end: 75% of 40 steps), t_f = 31 (end_epoch 1), 400
  # hidden units: s_10 = 0.5 (1 - (21/31)^3) = 0.34457 keeps ceil(262.17) = 263;
  # s_20 = 0.5 (1 - (11/31)^3) = 0.47766 keeps ceil(208.94) = 209; 30 is the last
  # event at or before t_f (the run's last), so it goes to S_c: 200.
  cuts = [r.args[1] for r in caplog.records if r.getMessage().startswith("Condensed:")]
  assert [sum(w[:2]) for w in cuts] == [263, 209, 200]
  widths = summary["condensed_widths"]
  assert sum(widths[:2]) == 200 and widths[2] == 10
  assert widths[0] >= 30 and widths[1] >= 10  # floors: int(300 * 0.5 * 0.2), int(100 * .1)
  small = read_export(tmp_path / "whole")
  # The budget: ERK's exact 10% of the 784x300 + 300x100 prunable weights, regrown
  # in the smaller model after each removal.
  active = int(small["masks/Dense_0/kernel"].sum() + small["masks/Dense_1/kernel"].sum())
  assert active == round(0.1 * 265_200)
  assert summary["mask_sparsity"] == pytest.approx(1 - active / 265_200)
  assert summary["final_test_accuracy"] > 0.5
  # RigL's event at 20, in the model cut and refilled at 10, keeps the budget too.
  records = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
  event = next(r for r in records if r.get("mask_update") and r["step"] == 20)
  assert event["sparsity"] == pytest.approx(1 - round(0.1 * 265_200) / 265_200)
  # A resume between the removals equals the uninterrupted run.
  config = _config()
  config.halt_after_step = 25
  assert train.train_and_evaluate(config, str(tmp_path / "resumed")) == {
      "halted_at_step": 25}
  config.halt_after_step = None
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["final_test_accuracy"] == summary["final_test_accuracy"]
  again = read_export(tmp_path / "resumed")
  assert again.keys() == small.keys()
  for k in small:
    np.testing.assert_array_equal(small[k], again[k], err_msg=k)


def test_chase_leaves_an_unmasked_hidden_layer_whole(tmp_path):
  # keep_first_dense: Dense_0 has no mask, so only Dense_1's 100 units are ranked and
  # cut; the last event (30) goes to S_c = 0.5: 50 of them.
  summary = train.train_and_evaluate(_config(keep_first_dense=True), str(tmp_path))
  assert summary["condensed_widths"] == [300, 50, 10]
