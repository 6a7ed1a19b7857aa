"""Channel condensation of the experiment models (issue 14): VGG with batch norm,
LeNet-5, an MLP with batch norm, and the residual models that cannot be condensed.

The reference is always the masked model itself (``model.apply`` on the masked
params, eval mode), never the code under test.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sparse_jax as sj
from experiments.trainer import condense
from experiments.trainer import exports
from experiments import models

EPS = 1e-5
NARROW_VGG16 = (4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32)


def _channel_masks(params, layers, rng):
  """Random ``Channels()`` masks: a quarter (at least one) of each layer's units dead."""
  masks, dead = {}, {}
  for name in layers:
    out = params[name]["kernel"].shape[-1]
    d = np.zeros(out, bool)
    d[rng.choice(out, max(1, out // 4), replace=False)] = True
    masks[name] = {"kernel": np.broadcast_to(~d, params[name]["kernel"].shape).copy()}
    dead[name] = d
  return masks, dead


def _masked(params, masks):
  out = jax.tree.map(lambda a: a, params)
  for name, m in masks.items():
    out[name] = {**params[name], "kernel": params[name]["kernel"] * m["kernel"]}
  return out


def _random_norms(params, stats, norms, rng):
  """Non-trivial batch-norm scale, bias, mean and var."""
  params, stats = dict(params), dict(stats)
  for n in norms:
    c = params[n]["scale"].shape[0]
    params[n] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
                                      jnp.float32),
                 "bias": jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)}
    stats[n] = {"mean": jnp.asarray(rng.normal(0, 0.5, c), jnp.float32),
                "var": jnp.asarray(rng.uniform(0.2, 2.0, c), jnp.float32)}
  return params, stats


def _dead_constant(params, stats, norm, bias=0.0):
  """What an eval-mode BatchNorm maps a dead unit's output ``bias`` to."""
  p, s = params[norm], stats[norm]
  return (bias - s["mean"]) / jnp.sqrt(s["var"] + EPS) * p["scale"] + p["bias"]


def _set_dead_constants(params, stats, norm, dead, positive):
  """Sets the BN bias of the ``dead`` units so ReLU(BN(0)) is 0, or > 0 if ``positive``."""
  shift = np.asarray(_dead_constant(params, stats, norm) - params[norm]["bias"])
  bias = np.asarray(params[norm]["bias"]).copy()
  bias[dead] = -shift[dead] + (0.7 if positive else -0.3)
  params[norm] = {**params[norm], "bias": jnp.asarray(bias)}
  return params


def _vgg(rng, positive_before_conv=False):
  model = models.get_model("vgg16", 10, cfg=NARROW_VGG16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  v = model.init(jax.random.PRNGKey(1), x, train=False)
  convs = [f"Conv_{i}" for i in range(13)]
  norms = [f"BatchNorm_{i}" for i in range(13)]
  params, stats = _random_norms(v["params"], v["batch_stats"], norms, rng)
  params["Dense_0"] = {**params["Dense_0"],
                       "bias": jnp.asarray(rng.normal(0, 0.5, 10), jnp.float32)}
  masks, dead = _channel_masks(params, convs, rng)
  for i, (c, n) in enumerate(zip(convs, norms)):
    before_dense = i == len(convs) - 1
    params = _set_dead_constants(params, stats, n, dead[c],
                                 positive=before_dense or (positive_before_conv and i == 1))
  return model, x, _masked(params, masks), stats, masks, dead


def test_vgg_condenses_to_a_narrower_vgg_with_the_masked_logits():
  rng = np.random.default_rng(0)
  model, x, params, stats, masks, dead = _vgg(rng)
  want = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  small = condense.condense_model("vgg16", 10, params, masks, batch_stats=stats,
                                  model_kwargs={"cfg": NARROW_VGG16})
  widths = [int((~dead[f"Conv_{i}"]).sum()) for i in range(13)]
  assert small.features == (*widths, 10)
  assert small.model.cfg == (3, 3, "M", 6, 6, "M", 12, 12, 12, "M", 24, 24, 24, "M",
                             24, 24, 24)
  v = small.variables
  assert v["params"]["Conv_1"]["kernel"].shape == (3, 3, 3, 3)
  assert v["params"]["BatchNorm_12"]["scale"].shape == (24,)
  assert v["batch_stats"]["BatchNorm_12"]["var"].shape == (24,)
  assert v["params"]["Dense_0"]["kernel"].shape == (24, 10)
  got = small.model.apply(v, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  # The last conv's dead channels give ReLU(BN(0)) > 0: folded into the Dense bias.
  const = np.asarray(_dead_constant(params, stats, "BatchNorm_12"))[dead["Conv_12"]]
  assert np.all(const > 0)
  assert not np.allclose(v["params"]["Dense_0"]["bias"], params["Dense_0"]["bias"], atol=1e-3)


def test_vgg_constant_channel_before_a_conv_is_kept_or_a_clear_error():
  rng = np.random.default_rng(1)
  model, x, params, stats, masks, dead = _vgg(rng, positive_before_conv=True)
  with pytest.raises(ValueError, match=r"dead units of 'Conv_1' output "
                                       r"activation\(BatchNorm\(bias\)\) != 0 into the conv "
                                       r"'Conv_2'.*keep_constant_channels=True"):
    condense.condense_model("vgg16", 10, params, masks, batch_stats=stats,
                            model_kwargs={"cfg": NARROW_VGG16}, keep_constant_channels=False)
  # By default such channels stay (zero filters, constant output): exact, Conv_1 unshrunk.
  small = condense.condense_model("vgg16", 10, params, masks, batch_stats=stats,
                                  model_kwargs={"cfg": NARROW_VGG16})
  assert small.features[:3] == (3, 4, 6) and dead["Conv_1"].sum() == 1
  want = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  got = small.model.apply(small.variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_condense_export_of_a_vgg(tmp_path):
  rng = np.random.default_rng(2)
  model, x, params, stats, masks, _ = _vgg(rng)
  want = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  path = str(tmp_path / "export.npz")
  exports.export_model(path, params, stats, masks)
  config = ml_collections.ConfigDict({"model": "vgg16", "model_kwargs": {"cfg": NARROW_VGG16}})
  small = condense.condense_export(config, str(tmp_path))
  got = small.model.apply(small.variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_lenet5_condenses_with_conv_biases_folded_through_the_flatten():
  rng = np.random.default_rng(3)
  model = models.get_model("lenet5", 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  layers = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  masks, dead = _channel_masks(params, layers, rng)
  params = {k: {**p, "bias": jnp.asarray(rng.normal(0, 0.5, p["bias"].shape), jnp.float32)}
            for k, p in params.items()}
  # Dead Conv_0 filters must output 0 into Conv_1; Conv_1's feed the Dense (folded).
  b0 = np.asarray(params["Conv_0"]["bias"]).copy()
  b0[dead["Conv_0"]] = -0.2
  b1 = np.asarray(params["Conv_1"]["bias"]).copy()
  b1[dead["Conv_1"]] = 0.4
  params["Conv_0"]["bias"], params["Conv_1"]["bias"] = jnp.asarray(b0), jnp.asarray(b1)
  params = _masked(params, masks)
  want = model.apply({"params": params}, x)
  small = condense.condense_model("lenet5", 10, params, masks)
  assert small.model.features == tuple(int((~dead[n]).sum()) for n in layers) == (5, 12, 90, 63)
  assert small.variables["params"]["Dense_0"]["kernel"].shape == (25 * 12, 90)
  got = small.model.apply(small.variables, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_mlp_with_batch_norm_condenses():
  rng = np.random.default_rng(4)
  kwargs = {"features": (16, 12), "batch_norm": True}
  model = models.get_model("mlp", 10, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 20))
  v = model.init(jax.random.PRNGKey(1), x, train=False)
  params, stats = _random_norms(v["params"], v["batch_stats"], ["BatchNorm_0", "BatchNorm_1"],
                                rng)
  masks, dead = _channel_masks(params, ["Dense_0", "Dense_1"], rng)
  params = _masked(params, masks)
  want = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  small = condense.condense_model("mlp", 10, params, masks, batch_stats=stats,
                                  model_kwargs=kwargs)
  assert small.model.features == (12, 9)
  assert small.variables["batch_stats"]["BatchNorm_1"]["mean"].shape == (9,)
  got = small.model.apply(small.variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_residual_models_raise_naming_the_skip(name):
  with pytest.raises(ValueError, match=rf"{name!r} has residual connections; a skip adds a "
                                       r"block's input to its output"):
    condense.condense_model(name, 10, {}, {})


def test_unsupported_model_raises():
  with pytest.raises(ValueError, match=r"no channel condensation for 'vit'"):
    condense.condense_model("vit", 10, {}, {})


def test_trainer_channels_run_condenses_from_its_export(tmp_path):
  from experiments.trainer import train  # pylint: disable=g-import-not-at-top
  from tests.test_trainer import small_config  # pylint: disable=g-import-not-at-top
  # As tests/test_structured_trainer.py: 40 steps, each hidden layer keeps 25% of its units.
  config = small_config("gmp", keep_last_dense=True, scope="layerwise")
  config.sparsity.structure = "channels"
  config.sparsity.final = 0.75
  train.train_and_evaluate(config, str(tmp_path))
  e = exports.load_exported(str(tmp_path))
  small = condense.condense_export(config, str(tmp_path))
  assert small.features == (75, 25, 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 28, 28, 1))
  model = models.get_model(config.model, 10, **config.model_kwargs)
  want = model.apply({"params": exports.exported_tree(e, "params")}, x, train=False)
  got = small.model.apply(small.variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
