"""Gradient-flow measures (docs/algorithms.md §8) against hand values and a dense Hessian."""

import json
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from experiments.trainer import train
from experiments.configs import default

# A 3-leaf tree: two masked kernels and a dense bias.
GRADS = {
    "a": {"kernel": jnp.array([[3.0, -4.0], [1.0, 1.0]]), "bias": jnp.array([1.0, 1.0])},
    "b": {"kernel": jnp.array([[1.0, -2.0, 2.0]])},
}
MASKS = {
    "a": {"kernel": jnp.array([[True, True], [False, False]]), "bias": None},
    "b": {"kernel": jnp.array([[True, False, True]])},
}


def test_effective_gradient_flow_by_hand():
  egf = jax.jit(sparse_jax.effective_gradient_flow, static_argnums=2)
  # Layer a: active entries (3, -4), 2 active. p=1: (3+4)/2 = 3.5; p=2: 5/2 = 2.5.
  # Layer b: active entries (1, 2), 2 active.  p=1: 3/2 = 1.5;   p=2: sqrt(5)/2.
  # The bias has no mask: not a layer.
  assert float(egf(GRADS, MASKS, 1)) == pytest.approx((3.5 + 1.5) / 2)
  assert float(egf(GRADS, MASKS, 2)) == pytest.approx((2.5 + math.sqrt(5) / 2) / 2)
  layers = sparse_jax.layer_gradient_flow(GRADS, MASKS, p=1)
  assert {k: float(v) for k, v in layers.items()} == pytest.approx(
      {"a/kernel": 3.5, "b/kernel": 1.5})


def test_layer_without_active_weights_contributes_nothing_and_no_nan():
  masks = {"a": {"kernel": jnp.zeros((2, 2), bool), "bias": None}, "b": MASKS["b"]}
  # Only layer b counts: sqrt(1 + 4) / 2.
  assert float(sparse_jax.effective_gradient_flow(masks=masks, grads=GRADS)) == pytest.approx(
      math.sqrt(5) / 2)
  assert float(sparse_jax.layer_gradient_flow(GRADS, masks)["a/kernel"]) == 0.0
  # No active weight anywhere: 0, not NaN (also under jit).
  none = jax.tree.map(lambda m: None if m is None else jnp.zeros_like(m), MASKS,
                      is_leaf=lambda x: x is None)
  assert float(jax.jit(sparse_jax.effective_gradient_flow)(GRADS, none)) == 0.0


def test_dense_network_uses_every_kernel_fully():
  # masks=None: a (4 entries) and b (3 entries) are layers, the bias is not.
  # p=2: (sqrt(9+16+1+1)/4 + sqrt(1+4+4)/3) / 2 = (sqrt(27)/4 + 1) / 2.
  assert float(sparse_jax.effective_gradient_flow(GRADS)) == pytest.approx(
      (math.sqrt(27) / 4 + 1.0) / 2)


def test_gradient_norm_by_hand():
  # Every entry: 9+16+1+1 + 1+1 + 1+4+4 = 38.
  assert float(jax.jit(sparse_jax.gradient_norm)(GRADS)) == pytest.approx(math.sqrt(38))
  # Active only: 9+16 + 1+1 (bias, dense) + 1+4 = 32.
  assert float(sparse_jax.gradient_norm(GRADS, MASKS)) == pytest.approx(math.sqrt(32))


def test_bad_p_is_a_clear_error():
  with pytest.raises(ValueError, match="p=1 or p=2"):
    sparse_jax.effective_gradient_flow(GRADS, MASKS, p=3)


def test_ghg_of_a_quadratic_by_hand():
  # f(x) = 1/2 x^T A x + b^T x at x = (1, 1): g = A x + b, H = A.
  a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
  b = jnp.array([1.0, -1.0])
  f = lambda p: 0.5 * p["x"] @ a @ p["x"] + b @ p["x"]
  params = {"x": jnp.array([1.0, 1.0])}
  # g = (3+1, 4-1) = (4, 3); g^T A g = 2*16 + 2*1*12 + 3*9 = 32 + 24 + 27 = 83.
  assert float(jax.jit(lambda p: sparse_jax.gradient_hessian_gradient(f, p))(params)) == (
      pytest.approx(83.0))
  # Masking x[1] (a 1-D leaf can still carry a mask): (4, 0)^T A (4, 0) = 2*16 = 32.
  masks = {"x": jnp.array([True, False])}
  assert float(sparse_jax.gradient_hessian_gradient(f, params, masks)) == pytest.approx(32.0)


def _tiny_mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def test_ghg_matches_a_dense_hessian_on_a_tiny_net():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k[0], (3, 4)), "b1": jax.random.normal(k[1], (4,)) * 0.1,
            "w2": jax.random.normal(k[2], (4, 2))}
  x = jax.random.normal(k[3], (5, 3))
  y = jnp.array([0, 1, 1, 0, 1])
  masks = {"w1": jax.random.bernoulli(k[0], 0.5, (3, 4)), "b1": None,
           "w2": jnp.array([[True, False]] * 4)}
  loss = lambda p: _tiny_mlp_loss(p, x, y)
  flat, unravel = jax.flatten_util.ravel_pytree(params)

  @jax.jit
  def reference(flat):
    flat_loss = lambda v: loss(unravel(v))
    return jax.grad(flat_loss)(flat), jax.hessian(flat_loss)(flat)  # H [26, 26] formed

  g, hessian = (np.asarray(x, np.float64) for x in reference(flat))
  m = np.concatenate([np.ones(4), np.ravel(masks["w1"]), np.ravel(masks["w2"])])  # b1, w1, w2
  got = jax.jit(sparse_jax.gradient_hessian_gradient, static_argnums=0)
  np.testing.assert_allclose(got(loss, params), g @ hessian @ g, rtol=1e-4)
  np.testing.assert_allclose(got(loss, params, masks), (g * m) @ hessian @ (g * m), rtol=1e-4)
  # All measures at once agree with the single functions, and trace once.
  traces = []

  def measures(p):
    traces.append(1)
    return sparse_jax.gradient_flow_measures(loss, p, masks)

  measures = jax.jit(measures)
  out = measures(params)
  measures(jax.tree.map(lambda v: v * 1.5, params))
  assert len(traces) == 1
  grads = unravel(g)
  # EGF from the flat gradient by hand: per layer ||g*m||_p / sum(m), averaged over w1, w2.
  gw1, gw2 = np.asarray(grads["w1"]), np.asarray(grads["w2"])
  mw1, mw2 = np.asarray(masks["w1"]), np.asarray(masks["w2"])
  for p, norm in ((1, lambda v: np.sum(np.abs(v))), (2, np.linalg.norm)):
    want = (norm(gw1[mw1]) / mw1.sum() + norm(gw2[mw2]) / mw2.sum()) / 2
    np.testing.assert_allclose(out[f"egf_p{p}"], want, rtol=1e-5)
  np.testing.assert_allclose(out["gradient_norm"], np.linalg.norm(g), rtol=1e-6)
  np.testing.assert_allclose(out["gradient_norm_active"], np.linalg.norm(g * m), rtol=1e-6)
  np.testing.assert_allclose(out["loss"], loss(params))
  assert set(out["egf_p2_layers"]) == {"w1", "w2"}


def test_trainer_logs_measures_at_step_zero_and_every_interval(tmp_path):
  config = default.lenet300_mnist5k("static", "sparsity=0.9,seed=0")
  config.model = "mlp"
  config.model_kwargs.features = (32,)
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.gradient_flow_every_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  logged = [r for r in records if "egf_p2" in r]
  # Step 0, the interval (4) and the last step (6).
  assert [r["step"] for r in logged] == [0, 4, 6]
  for r in logged:
    for key in ("egf_p1", "gradient_norm", "gradient_norm_active", "ghg", "gf_loss"):
      assert np.isfinite(r[key]), key
    assert set(r["egf_p2_layers"]) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert r["gradient_norm_active"] <= r["gradient_norm"]
  # Untrained: the loss on the fixed batch is about log(10).
  assert logged[0]["gf_loss"] == pytest.approx(math.log(10), abs=0.3)
  config.gradient_flow_every_steps = 0
  with pytest.raises(ValueError, match="gradient_flow_every_steps"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


# ----------------------------------------------------------------------------
# The study's trainer options (default off): random shifts, a validation split.
# ----------------------------------------------------------------------------


def _numpy_shift(image, dy, dx):
  """out[i, j] = image[i - dy, j - dx], indices clipped to the image (edge pixels)."""
  h, w = image.shape[:2]
  out = np.empty_like(image)
  for i in range(h):
    for j in range(w):
      out[i, j] = image[min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
  return out


def test_random_shift_matches_a_hand_worked_shift():
  from experiments.trainer import steps
  image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  # By hand: shifted down 1 and left 2, edges repeated:
  #   row -1 -> row 0 (0 1 2 3); columns j + 2 clipped to 3.
  want = np.array([[2, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7], [10, 11, 11, 11]],
                  np.float32)[..., None]
  np.testing.assert_array_equal(_numpy_shift(image, 1, -2), want)
  images = np.stack([image, image + 100, image * 2])
  key = jax.random.PRNGKey(3)
  got = np.asarray(jax.jit(steps.random_shift, static_argnums=2)(images, key, 2))
  offsets = np.asarray(jax.random.randint(key, (3, 2), -2, 3))
  assert np.abs(offsets).max() <= 2
  for b in range(3):
    np.testing.assert_array_equal(got[b], _numpy_shift(images[b], *offsets[b]))
  # Deterministic in the key; a shift of 0 is the identity.
  np.testing.assert_array_equal(got, steps.random_shift(images, key, 2))
  np.testing.assert_array_equal(steps.random_shift(images, key, 0), images)


def test_validation_split_is_fixed_disjoint_and_in_file_order():
  from experiments.data import input_pipeline
  arrays = {"image": np.arange(20.0)[:, None], "label": np.arange(20)}
  train_part, val = input_pipeline.split_for_validation(arrays, 0.25)
  assert len(val["label"]) == 5 == input_pipeline.validation_count(20, 0.25)
  assert sorted([*train_part["label"], *val["label"]]) == list(range(20))
  assert list(val["label"]) == sorted(val["label"])  # file order kept
  np.testing.assert_array_equal(val["image"][:, 0], val["label"])
  again = input_pipeline.split_for_validation(arrays, 0.25)[1]
  np.testing.assert_array_equal(again["label"], val["label"])
  assert input_pipeline.validation_count(4000, 0.0) == 0
  with pytest.raises(ValueError, match="validation_fraction"):
    input_pipeline.split_for_validation(arrays, 0.01)


@pytest.mark.parametrize("field,value,match", [
    ("validation_fraction", 1.0, "validation_fraction"),
    ("validation_fraction", -0.1, "validation_fraction"),
    ("augment_shift", -1, "augment_shift"),
    ("augment_shift", 1.5, "augment_shift"),
    ("init_scaling", "fan_out", "init_scaling"),
])
def test_bad_study_options_fail_before_any_data(tmp_path, field, value, match):
  config = default.lenet300_mnist5k("static", "sparsity=0.9,seed=0")
  config[field] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config[field] = {"validation_fraction": 0.1, "augment_shift": 0,
                   "init_scaling": "dense_fan_in"}[field]
  config.data_on_device = False
  if field == "validation_fraction":
    with pytest.raises(ValueError, match="data_on_device"):
      train.train_and_evaluate(config, str(tmp_path / "run"))
