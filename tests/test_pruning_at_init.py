"""Pruning at initialisation: SNIP, GraSP, SynFlow and random masks."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sparse_jax
from sparse_jax import _pruning_at_init as pai


def two_layer_params(key, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"dense1": {"kernel": jax.random.normal(k1, (3, 4), dtype),
                     "bias": 0.1 * jax.random.normal(k3, (4,), dtype)},
          "dense2": {"kernel": jax.random.normal(k2, (4, 2), dtype)}}


def two_layer_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  logits = h @ params["dense2"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def numpy_loss(flat, unravel, batch):
  p = jax.tree.map(np.asarray, unravel(flat))
  h = np.tanh(np.asarray(batch["x"]) @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  z = h @ p["dense2"]["kernel"]
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.mean(logp[np.arange(len(z)), np.asarray(batch["y"])])


def batch_of(key, n=5):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (n, 3)), "y": jax.random.randint(ky, (n,), 0, 2)}


def test_snip_scores_match_finite_differences():
  with jax.enable_x64(True):
    params = two_layer_params(jax.random.PRNGKey(0), jnp.float64)
    batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype.kind == "f" else x,
                         batch_of(jax.random.PRNGKey(1)))
    scores = pai.snip_scores(params, two_layer_loss, batch)
    flat, unravel = ravel_pytree(params)
    flat = np.asarray(flat)
    # Brute force: central differences of an independent numpy loss, per weight.
    eps = 1e-6
    grad = np.zeros_like(flat)
    for i in range(flat.size):
      e = np.zeros_like(flat)
      e[i] = eps
      grad[i] = (numpy_loss(flat + e, unravel, batch) - numpy_loss(flat - e, unravel, batch)) / (2 * eps)
    g = unravel(jnp.asarray(grad))
    assert scores["dense1"]["bias"] is None  # biases are not prunable
    for layer in ("dense1", "dense2"):
      expected = np.abs(np.asarray(params[layer]["kernel"]) * np.asarray(g[layer]["kernel"]))
      np.testing.assert_allclose(scores[layer]["kernel"], expected, rtol=1e-6, atol=1e-10)


def test_grasp_hg_matches_dense_hessian():
  with jax.enable_x64(True):
    params = two_layer_params(jax.random.PRNGKey(2), jnp.float64)
    batches = [jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype.kind == "f" else x,
                            batch_of(jax.random.PRNGKey(s))) for s in (3, 4)]
    scores = pai.grasp_scores(params, two_layer_loss, batches)
    flat, unravel = ravel_pytree(params)
    mean_loss = lambda f: sum(two_layer_loss(unravel(f), b) for b in batches) / 2
    # Dense Hessian of the mean loss (22 x 22); g restricted to the kernels.
    hess = jax.hessian(mean_loss)(flat)
    g = unravel(jax.grad(mean_loss)(flat))
    g["dense1"]["bias"] = jnp.zeros_like(g["dense1"]["bias"])
    hg = unravel(hess @ ravel_pytree(g)[0])
    for layer in ("dense1", "dense2"):
      np.testing.assert_allclose(scores[layer]["kernel"],
                                 params[layer]["kernel"] * hg[layer]["kernel"],
                                 rtol=1e-9, atol=1e-12)
    # GraSP keeps the LARGEST w*Hg (prunes the largest -w*Hg): check the ranking.
    masks = pai.grasp_masks(params, two_layer_loss, batches, sparsity=0.5)
    all_scores = np.concatenate([np.ravel(scores[l]["kernel"]) for l in ("dense1", "dense2")])
    kept = np.concatenate([np.ravel(masks[l]["kernel"]) for l in ("dense1", "dense2")])
    assert kept.sum() == 10  # round(0.5 * 20)
    assert all_scores[kept].min() > all_scores[~kept].max()


def test_synflow_scores_match_hand_computation():
  # Linear two-layer net without bias on the all-ones input:
  #   R = sum_k sum_j (sum_i |W1_ij|) |W2_jk|,
  #   score(W1_ij) = |W1_ij| * sum_k |W2_jk|,  score(W2_jk) = |W2_jk| * sum_i |W1_ij|.
  w1 = jnp.array([[1., -2.], [3., 0.5]])  # column sums of |W1|: [4, 2.5]
  w2 = jnp.array([[-1., 2., 1.], [0.5, 0.5, -4.]])  # row sums of |W2|: [4, 5]
  params = {"a": w1, "b": w2}
  apply_fn = lambda p, x: jnp.maximum(x @ p["a"], 0) @ p["b"]
  scores = pai.synflow_scores(params, apply_fn, (1, 2))
  np.testing.assert_allclose(scores["a"], [[1 * 4, 2 * 5], [3 * 4, 0.5 * 5]])
  np.testing.assert_allclose(scores["b"], [[1 * 4, 2 * 4, 1 * 4], [0.5 * 2.5, 0.5 * 2.5, 4 * 2.5]])
  # Masking W1[1, 0] (|3|) removes it from R: column sum 4 -> 1.
  masks = {"a": jnp.array([[True, True], [False, True]]), "b": jnp.ones((2, 3), bool)}
  scores = pai.synflow_scores(params, apply_fn, (1, 2), masks)
  np.testing.assert_allclose(scores["b"][0], [1 * 1, 2 * 1, 1 * 1])
  assert scores["a"][1, 0] == 0


def mlp_apply(p, x):
  for i in range(len(p) - 1):
    x = jax.nn.relu(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
  return x @ p[f"l{len(p) - 1}"]["kernel"]


def mlp_params(key, widths):
  keys = jax.random.split(key, len(widths) - 1)
  p = {}
  for i, (a, b, k) in enumerate(zip(widths[:-1], widths[1:], keys)):
    p[f"l{i}"] = {"kernel": jax.random.uniform(k, (a, b), minval=-1, maxval=1) / np.sqrt(a)}
    if i < len(widths) - 2:
      p[f"l{i}"]["bias"] = jnp.zeros((b,))
  return p


def test_synflow_is_data_free_and_batch_invariant():
  params = mlp_params(jax.random.PRNGKey(0), (6, 8, 8, 3))
  one = pai.synflow_scores(params, mlp_apply, (1, 6))
  eight = pai.synflow_scores(params, mlp_apply, (8, 6))
  # R is linear in the (all-ones) batch: 8 copies give exactly 8x every score.
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(8 * np.asarray(a), b, rtol=1e-6)
  m1 = pai.synflow_masks(params, mlp_apply, (1, 6), 0.8, num_iterations=3)
  m8 = pai.synflow_masks(params, mlp_apply, (8, 6), 0.8, num_iterations=3)
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)):
    np.testing.assert_array_equal(a, b)


def test_synflow_iterative_exact_counts_and_single_round_is_one_shot():
  params = mlp_params(jax.random.PRNGKey(1), (6, 8, 8, 3))
  n = 6 * 8 + 8 * 8 + 8 * 3  # 136 prunable weights
  masks = pai.synflow_masks(params, mlp_apply, (1, 6), 0.9, num_iterations=4)
  assert int(sparse_jax.count_active(masks)) == round(0.1 * n)
  one_round = pai.synflow_masks(params, mlp_apply, (1, 6), 0.9, num_iterations=1,
                                precision="rescaled")
  scores = pai.synflow_scores(params, mlp_apply, (1, 6))
  flat = np.concatenate([np.ravel(s) for s in jax.tree.leaves(scores)])
  kept = np.concatenate([np.ravel(m) for m in jax.tree.leaves(one_round)])
  # One round = keep the 14 largest one-shot scores.
  np.testing.assert_array_equal(np.sort(np.flatnonzero(kept)), np.sort(np.argsort(-flat, kind="stable")[:14]))


def test_synflow_float64_and_rescaled_avoid_float32_overflow():
  # 4 layers of width 32 with |w| ~ 1e11 * U(0, 1): R ~ (32 * 0.5e11)^4 ~ 1e50, above
  # float32's 3.4e38 (a deep net overflows the same way with ordinary weights).
  params = mlp_params(jax.random.PRNGKey(2), (32,) * 5)
  params = jax.tree.map(lambda x: x * 1e11 * np.sqrt(32), params)
  raw = pai.synflow_scores(params, mlp_apply, (1, 32))
  assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(raw))
  m64 = pai.synflow_masks(params, mlp_apply, (1, 32), 0.9, num_iterations=2)
  mres = pai.synflow_masks(params, mlp_apply, (1, 32), 0.9, num_iterations=2,
                           precision="rescaled")
  assert int(sparse_jax.count_active(m64)) == round(0.1 * 4 * 32 * 32)
  # Zero biases: per-layer rescaling scales all scores alike, so the masks agree
  # (up to float32 rounding at the threshold).
  agree = np.mean(np.concatenate([np.ravel(a == b) for a, b in
                                  zip(jax.tree.leaves(m64), jax.tree.leaves(mres))]))
  assert agree > 0.995


def test_masks_from_scores_signed_order_and_distributions():
  scores = {"a": jnp.array([[-2., -1.], [0., 1.]]), "b": jnp.array([[3., -5.], [0.5, 2.]]),
            "bias": None}
  # Global: keep the 3 largest signed scores of 8: 3, 2, 1.
  m = pai.masks_from_scores(scores, 0.625)
  np.testing.assert_array_equal(m["a"], [[False, False], [False, True]])
  np.testing.assert_array_equal(m["b"], [[True, False], [False, True]])
  assert m["bias"] is None
  # Uniform: 2 of 4 per layer: a keeps 0 and 1 (ties to lower index none), b keeps 3, 2.
  m = pai.masks_from_scores(scores, 0.5, distribution="uniform")
  np.testing.assert_array_equal(m["a"], [[False, False], [True, True]])
  np.testing.assert_array_equal(m["b"], [[True, False], [False, True]])
  with pytest.raises(ValueError, match="outside"):
    pai.masks_from_scores(scores, 1.0)


def test_random_pruning_masks_equal_static_start_masks():
  params = mlp_params(jax.random.PRNGKey(3), (20, 30, 10))
  tx = sparse_jax.static(optax.sgd(0.1), sparsity=0.8, distribution="erk", seed=4)
  expected = sparse_jax.get_masks(tx.init(params))
  mask_key, _ = jax.random.split(jax.random.PRNGKey(4))
  got = pai.random_pruning_masks(mask_key, params, 0.8, distribution="erk")
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_snip_masks_train_with_static_and_stay_fixed():
  params = mlp_params(jax.random.PRNGKey(5), (3, 16, 2))
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      mlp_apply(p, b["x"]), b["y"]).mean()
  batches = iter([batch_of(jax.random.PRNGKey(s), 16) for s in range(3)])
  masks = pai.snip_masks(params, loss, batches, 0.75)
  assert int(sparse_jax.count_active(masks)) == round(0.25 * (3 * 16 + 16 * 2))
  tx = sparse_jax.static(optax.sgd(0.1, momentum=0.9), initial_masks=masks)
  state = tx.init(params)
  p = sparse_jax.apply_masks(params, masks)
  step = jax.jit(lambda p, s, b: tx.update(jax.grad(loss)(p, b), s, p))
  for s in range(5):
    updates, state = step(p, state, batch_of(jax.random.PRNGKey(10 + s), 16))
    p = optax.apply_updates(p, updates)
  for w, m, m0 in zip(jax.tree.leaves(p), jax.tree.leaves(sparse_jax.get_masks(state)),
                      jax.tree.leaves(masks)):
    np.testing.assert_array_equal(m, m0)
  for name in ("l0", "l1"):
    assert not np.any(np.asarray(p[name]["kernel"])[~np.asarray(masks[name]["kernel"])])
  with pytest.raises(ValueError, match="No batch"):
    pai.snip_masks(params, loss, [], 0.5)


def test_trainer_snip_scores_the_first_training_batch(tmp_path):
  from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from experiments import models  # pylint: disable=g-import-not-at-top
  from experiments.trainer import train  # pylint: disable=g-import-not-at-top
  from experiments.trainer import feed as feed_lib
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  config = default.lenet300_mnist5k("snip", "sparsity=0.95,seed=1")
  config.num_train_steps = 3
  config.log_every_steps = 1
  summary = train.train_and_evaluate(config, str(tmp_path))
  with np.load(tmp_path / "export.npz") as f:
    exported = dict(f)
  # Independently: the same init, the trainer's first batch (epoch-0 permutation of
  # the training set), the cross-entropy loss, SNIP at 95%.
  model = models.get_model("lenet300_100", 10)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(1))
  params = model.init({"params": init_rng, "dropout": init_rng}, jnp.zeros((1, 28, 28, 1)),
                      train=False)["params"]
  arrays = input_pipeline.load_arrays("mnist5k", "train")
  idx = feed_lib.epoch_permutation(1, 0, len(arrays["label"]))[:128]
  batch = {"image": jnp.asarray(arrays["image"][idx]), "label": jnp.asarray(arrays["label"][idx])}
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, b["image"], train=True), b["label"]).mean()
  expected = pai.snip_masks(params, loss, batch, 0.95)
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    np.testing.assert_array_equal(exported[f"masks/{name}/kernel"], expected[name]["kernel"])
  assert summary["mask_sparsity"] == pytest.approx(1 - round(0.05 * 266_200) / 266_200)
  assert summary["inference_flops_vs_dense"] < 0.06


@pytest.mark.parametrize("masks_fn", [pai.snip_masks, pai.grasp_masks],
                         ids=["snip", "grasp"])
def test_a_batch_is_passed_to_the_loss_as_it_is(masks_fn):
  # One batch is any pytree, given to loss_fn unchanged: a dict, or an (x, y) tuple
  # (which was taken for two batches: "too many values to unpack"). A list (or an
  # iterator) is several batches, whose mean gradient scores the weights.
  params = mlp_params(jax.random.PRNGKey(6), (3, 8, 2))
  dict_loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      mlp_apply(p, b["x"]), b["y"]).mean()

  def tuple_loss(p, batch):
    x, y = batch
    return dict_loss(p, {"x": x, "y": y})

  b1, b2 = batch_of(jax.random.PRNGKey(7), 16), batch_of(jax.random.PRNGKey(8), 16)
  as_tuple = lambda b: (b["x"], b["y"])
  one = masks_fn(params, dict_loss, b1, 0.5)
  two = masks_fn(params, dict_loss, [b1, b2], 0.5)
  assert int(sparse_jax.count_active(one)) == int(sparse_jax.count_active(two)) == 20
  for got, want in ((masks_fn(params, tuple_loss, as_tuple(b1), 0.5), one),
                    (masks_fn(params, tuple_loss, [as_tuple(b1), as_tuple(b2)], 0.5), two),
                    (masks_fn(params, tuple_loss, iter([as_tuple(b1), as_tuple(b2)]), 0.5),
                     two),
                    (masks_fn(params, dict_loss, [b1], 0.5), one)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  # Two batches are not one: the mean gradient of both ranks differently here.
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one),
                                                      jax.tree.leaves(two)))


def test_snip_scores_of_a_list_are_the_mean_gradients():
  params = mlp_params(jax.random.PRNGKey(9), (3, 8, 2))
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      mlp_apply(p, b[0]), b[1]).mean()
  batches = [tuple(batch_of(jax.random.PRNGKey(s), 8).values()) for s in (10, 11)]
  scores = pai.snip_scores(params, loss, batches)
  grads = [jax.grad(loss)(params, b) for b in batches]
  for name in ("l0", "l1"):
    want = np.abs(np.asarray(params[name]["kernel"])
                  * (np.asarray(grads[0][name]["kernel"]) + np.asarray(grads[1][name]["kernel"]))
                  / 2)
    np.testing.assert_allclose(scores[name]["kernel"], want, rtol=1e-6)
