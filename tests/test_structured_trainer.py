"""``config.sparsity.structure`` in the trainer: N:M and channel runs end to end."""

import numpy as np
import pytest

import sparse_jax
from experiments.trainer import config_checks
from experiments.trainer import methods
from experiments.trainer import train
from tests.test_trainer import read_export
from tests.test_trainer import small_config

LAYERS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")


def test_parse_structure_forms():
  assert methods.parse_structure("unstructured") is None
  assert methods.parse_structure("2:4") == sparse_jax.NM(2, 4)
  assert methods.parse_structure("1:4") == sparse_jax.NM(1, 4)
  assert methods.parse_structure("block:4x2") == sparse_jax.Block(4, 2)
  assert methods.parse_structure("channels") == sparse_jax.Channels()


@pytest.mark.parametrize("text", ["2-4", "nm", "block:4", "4:2", "channel", "a:b"])
def test_bad_structure_is_rejected_before_any_data(text, monkeypatch):
  config = small_config()
  config.sparsity.structure = text
  monkeypatch.setattr(train.input_pipeline, "load_arrays",
                      lambda *a, **k: pytest.fail("data read before the check"))
  with pytest.raises(ValueError, match=r"config\.sparsity\.structure.*unstructured.*"
                     r"N:M.*block:RxC.*channels"):
    config_checks.validate(config)


def test_nm_needs_its_own_sparsity():
  config = small_config()  # sparsity.final = 0.9
  config.sparsity.structure = "2:4"
  with pytest.raises(ValueError, match=r"sparsity\.final=0\.5"):
    config_checks.validate(config)
  config.sparsity.final = 0.5
  config_checks.validate(config)
  config.sparsity.method = "snip"
  with pytest.raises(ValueError, match="does not apply to snip"):
    config_checks.validate(config)


def test_trainer_2_4_granet_exports_exact_groups(tmp_path):
  config = small_config("granet")  # events at 10, 20, 30; the last one prunes to 2:4
  config.sparsity.structure = "2:4"
  config.sparsity.final = 0.5
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["mask_sparsity"] == pytest.approx(0.5, abs=1e-12)
  assert summary["final_test_accuracy"] > 0.5
  exported = read_export(tmp_path)
  for name in LAYERS:
    mask = exported[f"masks/{name}"]
    fan_in, fan_out = mask.shape
    counts = mask.reshape(fan_in // 4, 4, fan_out).sum(axis=1)
    np.testing.assert_array_equal(counts, 2)
    assert not np.any(exported[f"params/{name}"][~mask])


def test_trainer_channels_gmp_exports_whole_units(tmp_path):
  # Layer-wise: each hidden layer keeps 25% of its units. (A global prune by unit RMS
  # keeps 1 of Dense_0's 300 units here: its 784-input units have the smaller RMS.)
  config = small_config("gmp", keep_last_dense=True, scope="layerwise")
  config.sparsity.structure = "channels"
  config.sparsity.final = 0.75
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["final_test_accuracy"] > 0.5
  exported = read_export(tmp_path)
  alive = []
  for name in LAYERS[:2]:
    mask = exported[f"masks/{name}"]
    units = mask.any(axis=0)
    np.testing.assert_array_equal(mask, np.broadcast_to(units, mask.shape))  # all or none
    alive.append(int(units.sum()))
    assert not np.any(exported[f"params/{name}"][~mask])
  assert alive == [75, 25]  # exact in units
  assert f"masks/{LAYERS[2]}" not in exported or exported[f"masks/{LAYERS[2]}"].all()
  # The export condenses to a 75-25-10 dense MLP with the masked model's logits
  # (checked inside), as experiments/studies/structured.py times it.
  from experiments.trainer import inference  # pylint: disable=g-import-not-at-top
  latency = inference.exported_mlp_latency(str(tmp_path / "export.npz"), rounds=1)
  assert latency["units_kept"] == 100
  assert set(latency) == {"units_kept", "masked_b1_us", "condensed_b1_us",
                          "masked_b128_us", "condensed_b128_us"}


MESH_SCRIPT = """
import sys
from experiments.trainer import train
from tests.test_trainer import small_config
for structure, final in (("2:4", 0.5), ("channels", 0.75)):
  config = small_config("granet")
  config.sparsity.structure, config.sparsity.final = structure, final
  config.sparsity.scope = "layerwise"
  train.train_and_evaluate(config, f"{sys.argv[1]}/{structure.replace(':', '_')}")
"""


def test_structured_runs_on_8_devices_equal_one_device(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests import multidevice  # pylint: disable=g-import-not-at-top
  from tests.test_trainer import REPO  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "mesh")],
                       env=multidevice.env(8), cwd=REPO, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  for structure, final in (("2:4", 0.5), ("channels", 0.75)):
    config = small_config("granet")
    config.sparsity.structure, config.sparsity.final = structure, final
    config.sparsity.scope = "layerwise"
    name = structure.replace(":", "_")
    train.train_and_evaluate(config, str(tmp_path / "one" / name))
    one, mesh = read_export(tmp_path / "one" / name), read_export(tmp_path / "mesh" / name)
    assert one.keys() == mesh.keys()
    for k in one:
      if k.startswith("masks/"):
        # The structure exactly on the mesh too; which weights win a near-tie may
        # differ with the all-reduce's rounding (as unstructured runs: test_trainer).
        m = mesh[k]
        if structure == "2:4":
          np.testing.assert_array_equal(m.reshape(-1, 4, m.shape[-1]).sum(1), 2)
        elif k != "masks/Dense_2/kernel":
          assert set(m.sum(0)) <= {0, m.shape[0]}  # whole units
          assert m.any(0).sum() == one[k].any(0).sum()
        assert np.mean(one[k] != m) <= 1e-3, k
      else:
        mk = k.replace("params/", "masks/")
        both = one[mk] & mesh[mk] if mk in one else np.ones(one[k].shape, bool)
        np.testing.assert_allclose(one[k][both], mesh[k][both], rtol=2e-3, atol=2e-5,
                                   err_msg=k)
