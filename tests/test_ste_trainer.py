"""STE and SR-STE (``sparse_jax.ste``) as trainer methods: ``ste`` and ``srste``.

The optimizer keeps dense weights, the forward pass (loss and eval) sees the
masked ones, the checkpoint keeps the dense ones and the export the masked ones.
"""

import jax
import numpy as np
import pytest

import sparse_jax

from experiments.trainer import config_checks
from experiments.data import input_pipeline
from experiments.trainer import methods
from experiments.trainer import state as state_lib
from experiments.trainer import steps
from experiments.trainer import train
from tests.test_trainer import read_export
from tests.test_trainer import small_config

LAYERS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")


def nm_config(method, structure="2:4", steps_=40):
  n, m = (int(v) for v in structure.split(":"))
  config = small_config(method, steps=steps_)
  config.sparsity.structure = structure
  config.sparsity.final = 1 - n / m
  return config


def hand_nm_masks(kernel, n, m):
  """The ``n`` largest |w| of every ``m`` consecutive inputs (axis 0), by numpy."""
  fan_in, fan_out = kernel.shape
  groups = np.abs(kernel).reshape(fan_in // m, m, fan_out)
  rank = np.argsort(np.argsort(-groups, axis=1), axis=1)
  return (rank < n).reshape(fan_in, fan_out)


def hand_logits(params, masks, images):
  """LeNet-300-100 by numpy on the masked kernels."""
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  for i in range(3):
    w = params[f"Dense_{i}"]["kernel"] * masks[f"Dense_{i}/kernel"]
    x = x @ w + params[f"Dense_{i}"]["bias"]
    if i < 2:
      x = np.maximum(x, 0)
  return x


def hand_loss(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


@pytest.mark.parametrize("change, match", [
    (dict(final=0.0), r"ste needs sparsity\.final > 0 or an N:M"),
    (dict(structure="2:4"), r"sparsity\.final=0\.5"),
    (dict(packed_masks=True), r"packed_masks=True is not supported by ste"),
])
def test_bad_ste_config_is_rejected_before_any_data(change, match, monkeypatch):
  config = small_config("ste")
  for k, v in change.items():
    setattr(config.sparsity, k, v)
  monkeypatch.setattr(train.input_pipeline, "load_arrays",
                      lambda *a, **k: pytest.fail("data read before the check"))
  monkeypatch.setattr(train.input_pipeline, "dataset_info",
                      lambda *a, **k: pytest.fail("data set opened before the check"))
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, "/nonexistent/never/written")


def test_ste_methods_are_known_and_event_free():
  config = nm_config("srste")
  config_checks.validate(config)
  assert methods.mask_update_steps(config, 39) == set()


def _one_step(config, batch):
  """The trainer's state and one jitted train step of it (and its eval of the batch)."""
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  spe = info.num_train_examples // config.batch_size
  model = state_lib.create_model(config, info.num_classes)
  tx = methods.create_tx_fn(config, model, info, spe)(None)
  state = state_lib.create_train_state(config, model, lambda m: tx, info.input_shape,
                                       jax.random.PRNGKey(config.seed))
  kw = dict(model=model, num_classes=info.num_classes)
  new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, tx=tx, config=config, **kw))(
      state, batch)
  ev = jax.jit(lambda s, b: steps.eval_step(s, b, **kw))(
      state, {**batch, "mask": np.ones(len(batch["label"]), np.float32)})
  return jax.device_get((state, new, metrics, ev))


def test_forward_is_the_masked_model_and_srste_decays_the_pruned_weights():
  configs = {}
  for method in ("ste", "srste"):
    config = nm_config(method)
    config.lr_schedule, config.nesterov, config.learning_rate = "constant", False, 0.1
    configs[method] = config
  assert configs["srste"].sparsity.srste_decay == 2e-4  # Zhou et al. 2021's lambda_w
  # 50x it here, so that the difference is well above float32 rounding of w + u.
  configs["srste"].sparsity.srste_decay = 0.01
  batch = input_pipeline.load_arrays(configs["ste"].dataset, "train[:128]",
                                     configs["ste"].data_dir)
  batch = {"image": batch["image"], "label": batch["label"]}
  runs = {m: _one_step(c, batch) for m, c in configs.items()}
  state, new_ste, metrics, ev = runs["ste"]
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
  masks = {n: hand_nm_masks(params[n.split("/")[0]]["kernel"], 2, 4) for n in LAYERS}
  got = sparse_jax.get_masks(state.opt_state)
  for name in LAYERS:
    np.testing.assert_array_equal(got[name.split("/")[0]]["kernel"], masks[name])
  # The loss and the eval are those of the masked weights, by numpy.
  loss = hand_loss(hand_logits(params, masks, batch["image"]), batch["label"])
  np.testing.assert_allclose(metrics["train_loss"], loss.mean(), rtol=1e-5)
  np.testing.assert_allclose(ev["loss"], loss.sum(), rtol=1e-5)
  # One step of SR-STE from the same start: momentum SGD's first update is
  # -lr * (g + wd * w + lambda_w * w off the mask), so the two differ by
  # -lr * lambda_w * w on the pruned weights and by nothing elsewhere.
  _, new_srste, _, _ = runs["srste"]
  lam = configs["srste"].sparsity.srste_decay
  for name in LAYERS:
    layer = name.split("/")[0]
    w = params[layer]["kernel"]
    diff = (np.asarray(new_srste.params[layer]["kernel"], np.float64)
            - np.asarray(new_ste.params[layer]["kernel"], np.float64))
    np.testing.assert_allclose(diff, -0.1 * lam * np.where(masks[name], 0.0, w),
                               rtol=1e-3, atol=1e-8)
    assert np.abs(diff[~masks[name]]).max() > 0
    np.testing.assert_array_equal(new_srste.params[layer]["bias"],
                                  new_ste.params[layer]["bias"])


@pytest.mark.parametrize("method, structure", [("srste", "2:4"), ("ste", "1:4")])
def test_trainer_exports_exact_nm_model_and_resumes(method, structure, tmp_path):
  n, m = (int(v) for v in structure.split(":"))
  full = tmp_path / "full"
  summary = train.train_and_evaluate(nm_config(method, structure), str(full))
  assert summary["method"] == method
  assert summary["mask_sparsity"] == pytest.approx(1 - n / m, abs=1e-12)
  assert summary["final_sparsity"] >= summary["mask_sparsity"]
  assert summary["final_test_accuracy"] > 0.5
  exported = read_export(full)
  for name in LAYERS:
    mask = exported[f"masks/{name}"]
    fan_in, fan_out = mask.shape
    np.testing.assert_array_equal(mask.reshape(fan_in // m, m, fan_out).sum(axis=1), n)
    assert not np.any(exported[f"params/{name}"][~mask])
    assert np.all(exported[f"params/{name}"][mask] != 0)
  if method != "srste":
    return
  # Resumed from the step-20 checkpoint: the same model, so the checkpoint held
  # the dense weights (pruned weights restored at 0 would change the masks).
  parts = tmp_path / "parts"
  halted = nm_config(method, structure)
  halted.halt_after_step = 20
  assert train.train_and_evaluate(halted, str(parts)) == {"halted_at_step": 20}
  train.train_and_evaluate(nm_config(method, structure), str(parts))
  a, b = exported, read_export(parts)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sweep_structured_report_from_records_and_previous_table(tmp_path):
  from experiments.studies import structured as sweep
  runs_dir, out_md = str(tmp_path / "runs"), str(tmp_path / "table.md")
  record = {"row": "srste_2:4", "seed": 0, "method": "srste", "final_test_accuracy": 0.9,
            "final_sparsity": 0.5, "mask_sparsity": 0.5, "train_flops_vs_dense": 0.8,
            "inference_flops_vs_dense": 0.5}
  (tmp_path / "runs").mkdir()
  with open(sweep.record_path("srste_2:4", 0, runs_dir), "w") as f:
    f.write(__import__("json").dumps(record))
  old = "| gmp | 1:4 | - | 0.75 | 93.87 ± 0.09 | 0.7500 | 0.7500 | 0.493 | 0.251 | 300-100 | - | - | 3 |"
  with open(out_md, "w") as f:
    f.write("# t\n\n| method | ...\n|---|\n" + old + "\n")
  rows = sweep.load(str(tmp_path / "no_workdirs"), list(sweep.ROWS), [0, 1], runs_dir)
  assert list(rows) == ["srste_2:4"]
  sweep.write_report(rows, "cmd", out_md, sweep.previous_lines(out_md))
  table = [l for l in open(out_md) if l.startswith("| ") and "---" not in l][1:]
  assert table == [
      "| srste | 2:4 | - | 0.5 | 90.00 ± 0.00 | 0.5000 | 0.5000 | 0.800 | 0.500 | 300-100 "
      "| - | - | 1 |\n", old[:-4] + " 3 † |\n"]
