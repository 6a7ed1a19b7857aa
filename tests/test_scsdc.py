"""The SC-SDC width solver (experiments/studies/scsdc.py) on known cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from experiments.studies import scsdc
from experiments.trainer import state as state_lib


def test_solver_picks_the_closest_width_ties_to_the_smaller():
  square = lambda w: w * w
  # 7^2 = 49, 8^2 = 64: 50 -> 7 (off by 1), 56 -> 7 (7 vs 8), 57 -> 8 (7 vs 8).
  assert scsdc.same_capacity_width(square, 50) == 7
  assert scsdc.same_capacity_width(square, 56) == 7
  assert scsdc.same_capacity_width(square, 57) == 8
  assert scsdc.same_capacity_width(square, 64) == 8
  # 10w: 25 lies halfway between 20 and 30; ties go to the smaller width.
  assert scsdc.same_capacity_width(lambda w: 10 * w, 25) == 2
  # Below the smallest width's count: width 1.
  assert scsdc.same_capacity_width(lambda w: 100 * w, 3) == 1
  with pytest.raises(ValueError, match="target"):
    scsdc.same_capacity_width(square, 0)


def test_solver_matches_brute_force_on_the_mlp_polynomial():
  # 784-w-w-10 MLP: P(w) = 784 w + w^2 + 10 w.
  count = lambda w: 794 * w + w * w
  for target in (1, 793, 795, 13_440, 53_760, 134_400, 268_800, 99_999):
    best = min(range(1, 400), key=lambda w: (abs(count(w) - target), w))
    assert scsdc.same_capacity_width(count, target) == best, target


def test_weight_counts_of_both_families_by_hand():
  # MLP 784-256-256-10 kernels: 784*256 + 256*256 + 256*10 = 268,800.
  assert scsdc.weight_count("mlp", 256, 2, (28, 28, 1), 10) == 268_800
  # Small CNN, width 32 on 28x28x1: 3*3*1*32 + 3*3*32*64 + (7*7*64)*10
  # = 288 + 18,432 + 31,360 = 50,080 (biases and BN not counted).
  assert scsdc.weight_count("cnn", 32, 2, (28, 28, 1), 10) == 50_080


def test_same_capacity_mlp_at_five_percent_by_hand():
  r = scsdc.same_capacity("mlp", 256, 0.05)
  # A = 0.05 * 268,800 = 13,440. Width 16: 794*16 + 256 = 12,960 (-480);
  # width 17: 794*17 + 289 = 13,787 (+347) -> 17, leftover +347.
  assert (r.total_weights, r.active_weights, r.dense_width, r.dense_weights) == (
      268_800, 13_440, 17, 13_787)
  assert r.leftover == 347
  assert r.relative_leftover == pytest.approx(347 / 13_440)
  full = scsdc.same_capacity("mlp", 256, 1.0)
  assert (full.dense_width, full.leftover) == (256, 0)


def test_same_capacity_cnn_by_hand():
  # P(w) = 9w + 18w^2 + 490*2w = 18 w^2 + 989 w; A = 0.2 * 50,080 = 10,016.
  # w=8: 1152 + 7912 = 9,064 (-952); w=9: 1458 + 8901 = 10,359 (+343) -> 9.
  r = scsdc.same_capacity("cnn", 32, 0.2)
  assert (r.active_weights, r.dense_width, r.dense_weights, r.leftover) == (
      10_016, 9, 10_359, 343)


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown family"):
    scsdc.family_model("transformer", 8)
  with pytest.raises(ValueError, match="density"):
    scsdc.same_capacity("mlp", 64, 0.0)
  with pytest.raises(ValueError, match="depth"):
    scsdc.family_model("cnn", 8, depth=3)


def test_small_cnn_variants_run_and_name_their_params():
  name, kwargs = scsdc.family_model("cnn", 4, activation="prelu", batch_norm=True,
                                    dropout_rate=0.5)
  model = models.get_model(name, 10, **kwargs)
  x = jnp.ones((2, 28, 28, 1))
  # Shapes without compiling init; the forward pass below is the one compile.
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
  # conv 3x3x1x4, conv 3x3x4x8, dense (7*7*8)x10; one PReLU slope per block.
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["Conv_0"]["kernel"] == (3, 3, 1, 4)
  assert shapes["Conv_1"]["kernel"] == (3, 3, 4, 8)
  assert shapes["Dense_0"]["kernel"] == (392, 10)
  assert set(shapes) >= {"PReLU_0", "PReLU_1", "BatchNorm_0", "BatchNorm_1"}
  logits, _ = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.PRNGKey(1)}))(
                                                variables)
  assert logits.shape == (2, 10)
  with pytest.raises(ValueError, match="Unknown activation"):
    jax.eval_shape(lambda: models.get_model("small_cnn", 10, activation="cube").init(
        jax.random.PRNGKey(0), x, train=False))


def test_scale_by_active_fan_in_by_hand():
  # Dense kernel [3 inputs, 2 units]: unit 0 has 1 of 3 active -> x sqrt(3);
  # unit 1 has 3 of 3 -> x 1. A conv [1, 2, 2, 2]: fan-in 4; unit 0 has 2 active
  # -> x sqrt(2); unit 1 none -> unchanged (zeros anyway). The bias has no mask.
  params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
            "c": {"kernel": jnp.ones((1, 2, 2, 2))}}
  conv_mask = np.zeros((1, 2, 2, 2), bool)
  conv_mask[0, 0, :, 0] = True
  masks = {"d": {"kernel": jnp.array([[True, True], [False, True], [False, True]]),
                 "bias": None},
           "c": {"kernel": jnp.asarray(conv_mask)}}
  out = jax.jit(state_lib.scale_by_active_fan_in)(params, masks)
  np.testing.assert_allclose(out["d"]["kernel"], [[3 ** 0.5, 1.0]] * 3, rtol=1e-6)
  np.testing.assert_array_equal(out["d"]["bias"], params["d"]["bias"])
  np.testing.assert_allclose(out["c"]["kernel"][..., 0], np.full((1, 2, 2), 2 ** 0.5),
                             rtol=1e-6)
  np.testing.assert_array_equal(out["c"]["kernel"][..., 1], 1.0)
  assert state_lib.scale_by_active_fan_in(params, None) is params
