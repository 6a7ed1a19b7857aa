"""FLOPs accounting: closed forms, XLA's cost analysis, densities, training runs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import sparse_jax
from experiments.trainer import flops as run_flops_lib
from experiments import models
from experiments.trainer import train
from experiments.configs import default
from tests import test_stacked_layers


def test_dense_mlp_matches_closed_form_and_xla():
  model = models.get_model("mlp", 10, features=(30, 20))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((4, 8)), train=False)
  f = sparse_jax.model_flops(model, v, (4, 8), train=False)
  # 2 FLOPs per multiply-add, batch 4: 2*4*8*30, 2*4*30*20, 2*4*20*10.
  assert f.layers == {"Dense_0/kernel": 1920, "Dense_1/kernel": 4800, "Dense_2/kernel": 1600}
  # The rest, from XLA: bias adds 4*(30+20+10) = 240 and ReLUs 4*(30+20) = 200.
  assert f.other == 440
  total = sparse_jax.xla_flops(lambda v, x: model.apply(v, x, train=False), v,
                               jnp.zeros((4, 8)))
  assert sum(f.layers.values()) + f.other == total


@pytest.mark.parametrize("padding,strides,expected", [
    # VALID 3x3 on 10x10: 8x8 outputs, every tap inside: 2 * 2 * 64 * 27 * 8.
    ("VALID", 1, 2 * 2 * 64 * 27 * 8),
    # SAME, stride 1, pad (1, 1): per dim 10 outputs * 3 taps - 2 at the borders = 28
    # valid taps, so 2 * batch 2 * 28 * 28 * 3 * 8 (zero-padding MACs are not counted).
    ("SAME", 1, 2 * 2 * 28 * 28 * 3 * 8),
    # SAME, stride 2, pad (0, 1): 5 outputs * 3 taps - 1 past the end = 14 per dim.
    ("SAME", 2, 2 * 2 * 14 * 14 * 3 * 8),
])
def test_conv_layer_matches_closed_form_and_xla(padding, strides, expected):
  conv = nn.Conv(8, (3, 3), strides=strides, padding=padding, use_bias=False)
  x = jnp.ones((2, 10, 10, 3))
  v = conv.init(jax.random.PRNGKey(0), x)
  f = sparse_jax.model_flops(conv, v, x.shape, count_other=False)
  assert f.layers == {"kernel": expected}
  assert sparse_jax.xla_flops(lambda v, x: conv.apply(v, x), v, x) == expected


def test_lenet300_layers_and_xla_total():
  model = models.get_model("lenet300_100", 10)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
  f = sparse_jax.model_flops(model, v, (1, 28, 28, 1), train=False)
  assert sum(f.layers.values()) == 2 * (784 * 300 + 300 * 100 + 100 * 10)
  # Bias adds (300 + 100 + 10) and ReLUs (300 + 100).
  assert f.other == 810


def test_inference_flops_scale_with_layer_density():
  f = sparse_jax.ModelFlops({"a/kernel": 1000, "b/kernel": 400}, other=50)
  assert sparse_jax.inference_flops(f, {}) == 1450
  # 0.5 * 1000 + 0.25 * 400 + 50
  assert sparse_jax.inference_flops(f, {"a/kernel": 0.5, "b/kernel": 0.25}) == 650
  # From a mask tree: a at 3/4, b at 1/2 -> 750 + 200 + 50.
  masks = {"a": {"kernel": jnp.array([True, True, True, False]), "bias": None},
           "b": {"kernel": jnp.array([True, False])}}
  assert sparse_jax.inference_flops(f, masks) == 1000
  with pytest.raises(ValueError, match="not Dense, DenseGeneral or Conv kernels"):
    sparse_jax.inference_flops(f, {"c/kernel": 0.5})


def test_masked_mlp_inference_flops_scale_with_density():
  model = models.get_model("mlp", 10, features=(30, 20))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)), train=False)
  f = sparse_jax.model_flops(model, v, (1, 8), train=False)
  masks = sparse_jax.random_pruning_masks(jax.random.PRNGKey(1), v["params"], 0.8,
                                          distribution="uniform")
  # Uniform 20% of every kernel: 0.2 * (480 + 1200 + 400) + 110 (other).
  assert sparse_jax.inference_flops(f, masks) == pytest.approx(0.2 * 2080 + 110)


def test_training_flops_hand_computed():
  f = sparse_jax.ModelFlops({"a": 100, "b": 50}, other=10)
  # Dense step: 3 * 160 = 480. After the event at t=2 (a at 0.5, b at 0.2): forward
  # 50 + 10 + 10 = 70, sparse step 3 * 70 = 210, with a dense weight gradient
  # 2 * 70 + 160 = 300. Steps 1, 2 dense; 3, 5 sparse; 4 dense-gradient:
  # 960 + 420 + 300 = 1680.
  total = sparse_jax.training_flops(f, [(0, {}), (2, {"a": 0.5, "b": 0.2})], 5,
                                    dense_gradient_steps=[4])
  assert total == 1680
  assert sparse_jax.dense_training_flops(f, 5) == 2400
  with pytest.raises(ValueError, match="t=0"):
    sparse_jax.training_flops(f, [(2, {})], 5)


def small_config(method, **sparsity):
  config = default.lenet300_mnist5k(method, "sparsity=0.9,seed=3", **sparsity)
  config.num_train_steps = 20
  config.sparsity.update_every = 10
  config.sparsity.end_epoch = 10 / 31  # one_shot prunes after step 10
  config.log_every_steps = 10
  config.checkpoint_every_steps = 20
  return config


def test_trainer_writes_flops_ratios_and_posthoc_agrees(tmp_path):
  summary = train.train_and_evaluate(small_config("one_shot"), str(tmp_path))
  saved = json.load(open(tmp_path / "summary.json"))
  dense_flops = 2 * 266_200 + 810
  inf = (2 * 266_200 * 0.1 + 810) / dense_flops  # global prune: 10% of the kernels
  assert saved["inference_flops_vs_dense"] == pytest.approx(inf, rel=1e-6)
  # One-shot at step 10 of 20: 10 dense steps, then 10 at the pruned densities
  # (the global prune's per-layer densities average to 0.1 weighted by FLOPs).
  assert saved["train_flops_vs_dense"] == pytest.approx((10 + 10 * inf) / 20, rel=1e-6)
  assert summary["train_flops_vs_dense"] == saved["train_flops_vs_dense"]
  posthoc = run_flops_lib.posthoc_run_flops(str(tmp_path))
  for key in ("train_flops_vs_dense", "inference_flops_vs_dense"):
    assert posthoc[key] == pytest.approx(saved[key], rel=1e-6)


def test_trainer_flops_read_stacked_leaf_densities():
  """The trainer's FLOPs filter kept only exact layer names: scanned blocks counted dense."""
  scanned, layers = test_stacked_layers._Scanned, test_stacked_layers.LAYERS
  x = jnp.zeros((2, 16))
  variables = nn.unbox(scanned().init(jax.random.PRNGKey(0), x))
  flops = sparse_jax.model_flops(scanned(), variables, (2, 16), count_other=False)
  masks = sparse_jax.get_masks(sparse_jax.static(
      optax.sgd(0.1), sparsity=0.8, layer_axes=layers).init(variables["params"]))
  for densities in (sparse_jax.layer_densities(masks), sparse_jax.layer_densities(masks, layers),
                    masks):
    kept = run_flops_lib._kernel_densities(densities, flops)
    assert sparse_jax.inference_flops(flops, kept) == pytest.approx(
        sparse_jax.inference_flops(flops, sparse_jax.layer_densities(masks, layers)), rel=1e-6)
    assert sparse_jax.inference_flops(flops, kept) < 0.3 * sparse_jax.inference_flops(flops, {})
