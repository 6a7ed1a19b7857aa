"""The ViT and byte-level GPT through the trainer, the byte data set, Wanda by hand.

Trainer runs are a few steps of the family configs (experiments/configs/
vit_mnist5k.py, gpt_bytes.py) with smaller models; masks must sit exactly on the
kernels (attention q/k/v/out, MLP, patch projection, head) with exact counts, and
embeddings, biases and LayerNorms stay dense.
"""

import json
import math
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax as sj
from experiments.data import input_pipeline
from experiments.studies import post_training
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import train
from experiments.configs import gpt_bytes
from experiments.configs import vit_mnist5k
from experiments.data import bytes_pydoc
from experiments.models import get_model


def read_export(workdir):
  with np.load(os.path.join(workdir, "export.npz")) as f:
    return dict(f)


def block_kernels(prefix, width, mlp):
  """{name: size} of one block's prunable kernels."""
  sizes = {f"{prefix}/attn/{p}/kernel": width * width for p in ("query", "key", "value", "out")}
  sizes.update({f"{prefix}/mlp_in/kernel": width * mlp, f"{prefix}/mlp_out/kernel": mlp * width})
  return sizes


def check_masked_export(workdir, kernels):
  """Masks exactly on ``kernels``, masked weights 0, the dense leaves without zeros."""
  exported = read_export(workdir)
  masks = {k[len("masks/"):]: v for k, v in exported.items() if k.startswith("masks/")}
  params = {k[len("params/"):]: v for k, v in exported.items() if k.startswith("params/")}
  assert sorted(masks) == sorted(kernels)
  for name, m in masks.items():
    assert m.shape == params[name].shape and m.size == kernels[name]
    assert not np.any(params[name][~m]), name
  dense = [n for n in params if n not in masks]
  assert any(n.endswith("pos_embedding") for n in dense)
  assert any("/attn/query/bias" in n for n in dense) and any("ln1/scale" in n for n in dense)
  for name in dense:
    if not name.endswith(("bias", "cls")):  # zero-initialised leaves may keep zeros
      assert np.all(params[name] != 0), name
  return {n: int(m.sum()) for n, m in masks.items()}


def test_vit_granet_few_steps_exact_counts(tmp_path):
  config = vit_mnist5k.get_config("method=granet,sparsity=0.9,seed=1")
  config.model_kwargs = dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                             dropout_rate=0.0)
  config.num_train_steps = 40
  config.sparsity.update_every = 10
  config.sparsity.end_epoch = 1.0  # 31 steps: events at 10, 20, 30 prune
  config.log_every_steps = 10
  config.checkpoint_every_steps = 40
  summary = train.train_and_evaluate(config, str(tmp_path))
  kernels = {"patch_embed/kernel": 4 * 4 * 1 * 32, "head/kernel": 32 * 10,
             **block_kernels("block0", 32, 64), **block_kernels("block1", 32, 64)}
  n = sum(kernels.values())  # 17,216
  counts = check_masked_export(tmp_path, kernels)
  # Global pruning to 90%: exactly round(0.1 * n) weights kept over all kernels.
  assert sum(counts.values()) == round(0.1 * n)
  assert summary["mask_sparsity"] == pytest.approx(1 - round(0.1 * n) / n, abs=1e-12)
  assert summary["steps"] == 40 and 0.0 < summary["final_test_accuracy"] <= 1.0
  assert summary["inference_flops_vs_dense"] < 0.5 and summary["train_flops_vs_dense"] < 1.0
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if r.get("mask_update")] == [10, 20, 30]
  assert "final_test_bits_per_byte" not in summary  # images: no bits per byte


def test_gpt_rigl_few_steps_exact_counts(tmp_path):
  config = gpt_bytes.get_config("method=rigl,sparsity=0.75,seed=2")
  config.model_kwargs = dict(width=32, depth=1, num_heads=2, mlp_dim=64, dropout_rate=0.0)
  config.sparsity.distribution = "uniform"
  config.num_train_steps = 20
  config.sparsity.update_every = 5
  config.log_every_steps = 5
  config.checkpoint_every_steps = 20
  summary = train.train_and_evaluate(config, str(tmp_path))
  kernels = {"head/kernel": 32 * 256, **block_kernels("block0", 32, 64)}
  counts = check_masked_export(tmp_path, kernels)
  # Uniform 75%: a quarter of every kernel, kept through RigL's drop-and-grow.
  assert counts == {k: v // 4 for k, v in kernels.items()}
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if r.get("mask_update")] == [5, 10, 15]
  assert summary["final_test_bits_per_byte"] == pytest.approx(
      summary["final_test_loss"] / math.log(2), rel=1e-12)
  # 20 steps from uniform predictions (8 bits per byte) already learn byte frequencies.
  assert 2.0 < summary["final_test_bits_per_byte"] < 8.0
  assert 0.0 < summary["final_test_accuracy"] < 1.0
  assert summary["inference_flops_vs_dense"] < 1.0


def test_eval_step_counts_tokens_and_masks_padding():
  model = get_model("gpt", 256, width=16, depth=1, num_heads=2, mlp_dim=32)
  L = 8
  variables = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32), train=False)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats={}, opt_state=(), rng=jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (3, L + 1), 0, 256)
  batch = {"image": tokens[:, :-1], "label": tokens[:, 1:],
           "mask": jnp.array([1.0, 1.0, 0.0])}  # the third example is padding
  out = jax.jit(lambda s, b: steps_lib.eval_step(s, b, model=model, num_classes=256))(
      state, batch)
  logits = model.apply(variables, batch["image"][:2], train=False)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:2, :, None], -1)
  assert float(out["count"]) == 2 * L
  np.testing.assert_allclose(float(out["loss"]), float(nll.sum()), rtol=1e-5)
  assert float(out["correct"]) == float(
      jnp.sum(jnp.argmax(logits, -1) == batch["label"][:2]))


# ---------------------------------------------------------------------------
# The byte data set.


def test_byte_windows_split_deterministic_and_disjoint():
  corpus = bytes_pydoc.corpus_bytes()
  assert len(corpus) > 100_000 and corpus == bytes_pydoc.corpus_bytes()
  splits = bytes_pydoc.split_windows(corpus)
  train_rows, val_rows = splits["train"], splits["validation"]
  num_windows = len(corpus) // (bytes_pydoc.CONTEXT + 1)
  assert not set(train_rows) & set(val_rows)
  assert sorted([*train_rows, *val_rows]) == list(range(num_windows))
  # Every 10th group of 16 windows: groups 9, 19, ... validate.
  assert list(val_rows[:17]) == [*range(144, 160), 304]
  assert abs(len(val_rows) / num_windows - 0.1) < 0.01
  arrays = bytes_pydoc.build_arrays(corpus)
  again = bytes_pydoc.build_arrays(corpus)
  width = bytes_pydoc.CONTEXT + 1
  for split, rows in splits.items():
    image, label = arrays[f"{split}/image"], arrays[f"{split}/label"]
    np.testing.assert_array_equal(image, again[f"{split}/image"])
    assert image.dtype == label.dtype == np.int32
    assert image.shape == label.shape == (len(rows), bytes_pydoc.CONTEXT)
    assert image.min() >= 0 and image.max() <= 255
    np.testing.assert_array_equal(label[:, :-1], image[:, 1:])  # next-byte targets
    for j in (0, len(rows) // 2, len(rows) - 1):  # each example is its own window
      window = corpus[rows[j] * width:(rows[j] + 1) * width]
      assert bytes(image[j].astype(np.uint8)) + bytes([label[j, -1]]) == window
  text = bytes(arrays["validation/image"][:32].astype(np.uint8).ravel()).decode(
      "utf-8", errors="replace")
  assert text.count(" ") > len(text) / 10  # prose, not binary


def test_byte_data_set_through_the_input_pipeline(tmp_path):
  data_dir = str(tmp_path)
  info = input_pipeline.dataset_info("bytes_pydoc", data_dir)
  arrays = bytes_pydoc.build_arrays()
  assert info.input_shape == (bytes_pydoc.CONTEXT,) and info.input_dtype == "int32"
  assert info.num_classes == 256 and info.byte_level and info.eval_split == "validation"
  assert info.num_train_examples == len(arrays["train/label"])
  assert info.num_eval_examples == len(arrays["validation/label"])
  assert input_pipeline.prepare_dataset("bytes_pydoc", data_dir) is None
  loaded = input_pipeline.load_arrays("bytes_pydoc", "train[:100]", data_dir)
  np.testing.assert_array_equal(loaded["image"], arrays["train/image"][:100])
  with pytest.raises(ValueError, match="no split 'test'"):
    input_pipeline.load_arrays("bytes_pydoc", "test", data_dir)
  # Evaluation over 2 processes: every validation window exactly once, same batch count.
  n_val = info.num_eval_examples
  shards = [list(input_pipeline.eval_batches("bytes_pydoc", batch_size=200, data_dir=data_dir,
                                             process_index=i, process_count=2))
            for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == math.ceil(math.ceil(n_val / 2) / 100)
  seen = np.concatenate([b["image"][b["mask"] == 1] for s in shards for b in s])
  np.testing.assert_array_equal(seen, arrays["validation/image"])
  # Training batches: deterministic, and a resume at step k continues the same stream.
  first = input_pipeline.train_batches("bytes_pydoc", batch_size=64, seed=3, data_dir=data_dir)
  stream = [next(first) for _ in range(5)]
  resumed = input_pipeline.train_batches("bytes_pydoc", batch_size=64, seed=3,
                                         data_dir=data_dir, start_step=3)
  for want in stream[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert not np.array_equal(stream[0]["image"], stream[1]["image"])


# ---------------------------------------------------------------------------
# Post-training pruning, by hand.


class TwoLayers(nn.Module):
  """A Dense [3, 2] then an attention-style output DenseGeneral [2, 2] -> 1."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2, use_bias=False, name="fc")(x)  # [B, 2]
    h = jnp.stack([h, 2 * h], axis=-2)  # [B, 2, 2]: two "heads" of width 2
    return nn.DenseGeneral(1, axis=(-2, -1), use_bias=False, name="out")(h)


def test_wanda_scores_and_masks_by_hand():
  model = TwoLayers()
  w_fc = jnp.array([[1.0, -2.0], [3.0, 0.5], [-1.5, 1.25]])
  w_out = jnp.array([[[1.1], [2.5]], [[0.5], [-0.25]]])
  params = {"fc": {"kernel": w_fc}, "out": {"kernel": w_out}}
  x = jnp.array([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
  norms = jax.jit(lambda p, x: post_training.input_feature_norms(model, {"params": p}, x))(
      params, x)
  r2, r5, r425 = math.sqrt(2), math.sqrt(5), math.sqrt(4.25)
  # fc's inputs: feature norms over the batch sqrt(1 + 1), 0, sqrt(4 + 0).
  np.testing.assert_allclose(norms["fc/kernel"], [r2, 0.0, 2.0], rtol=1e-6)
  # out's inputs: h = x @ w_fc = [[-2, 0.5], [1, -2]] (head 0) and 2h (head 1); norms
  # of each (head, feature): sqrt(4 + 1), sqrt(0.25 + 4), twice those.
  np.testing.assert_allclose(norms["out/kernel"], [[r5, r425], [2 * r5, 2 * r425]],
                             rtol=1e-6)
  scores = post_training.wanda_scores(params, norms)
  np.testing.assert_allclose(scores["fc"]["kernel"],
                             [[r2, 2 * r2], [0.0, 0.0], [3.0, 2.5]], rtol=1e-6)
  np.testing.assert_allclose(scores["out"]["kernel"][..., 0],
                             [[1.1 * r5, 2.5 * r425], [r5, 0.5 * r425]], rtol=1e-6)
  masks = post_training.wanda_masks(params, norms, 1 / 3)
  # fc keeps round(2/3 * 3) = 2 inputs per output: rows 0 and 2 in both columns, although
  # |w| alone would keep row 1 (|3| > |1|) in column 0: its input feature is always 0.
  np.testing.assert_array_equal(masks["fc"]["kernel"], [[True, True], [False, False],
                                                        [True, True]])
  # out (fan-in 4) keeps round(2/3 * 4) = 3: drops the smallest score, at (1, 1).
  np.testing.assert_array_equal(masks["out"]["kernel"][..., 0], [[True, True], [True, False]])
  # At 75% it keeps round(0.25 * 4) = 1, the largest score, at (0, 1).
  np.testing.assert_array_equal(
      post_training.wanda_masks(params, norms, 0.75)["out"]["kernel"][..., 0],
      [[False, True], [False, False]])
  # Global magnitude at 50%: the top 5 of the 10 |w| (3, 2.5, 2, 1.5, 1.25) over both layers.
  magnitude = post_training.magnitude_masks(params, 0.5)
  np.testing.assert_array_equal(magnitude["fc"]["kernel"], [[False, True], [True, False],
                                                            [True, True]])
  np.testing.assert_array_equal(magnitude["out"]["kernel"][..., 0], [[False, True],
                                                                     [False, False]])
  assert int(sj.count_active(magnitude)) == 5


def test_sweep_results_outlive_their_workdirs(tmp_path):
  """A finished run is recorded (result fields only) and read back once its workdir is gone."""
  from experiments.studies import transformers as sweep
  workdir, records = tmp_path / "workdirs", tmp_path / "records"
  summary = {"final_test_accuracy": 0.9, "best_test_accuracy": 0.91, "final_sparsity": 0.75,
             "train_flops_vs_dense": 0.5, "inference_flops_vs_dense": 0.4,
             "wall_time_s": 12.0, "steps": 620, "method": "rigl", "config": {"big": 1}}
  run = sweep.run_dir(str(workdir), "vit", "rigl", 0.75, 1)
  os.makedirs(run)
  with open(os.path.join(run, "summary.json"), "w") as f:
    json.dump(summary, f)
  first = sweep.load_runs(str(workdir), "vit", ["rigl"], [0.75], [0, 1], records=str(records))
  expected = {k: v for k, v in summary.items() if k != "config"}
  assert first == {("rigl", 0.75): [expected]}
  os.remove(os.path.join(run, "summary.json"))
  again = sweep.load_runs(str(workdir), "vit", ["rigl"], [0.75], [0, 1], records=str(records))
  assert again == first
  assert sweep.load_runs(str(workdir), "vit", ["set"], [0.75], [1], records=str(records)) == {}


def test_sweep_skips_recorded_runs(tmp_path, monkeypatch):
  """A run whose workdir is gone but whose record is committed is not trained again."""
  from experiments.studies import _grid
  from experiments.studies import transformers as sweep
  records, workdir = str(tmp_path / "records"), str(tmp_path / "workdirs")
  monkeypatch.setattr(sweep, "RECORDS", records)
  _grid.write_record(sweep.run_dir(records, "vit", "rigl", 0.75, 0) + ".json",
                     {"method": "rigl"})
  trained = []
  monkeypatch.setattr(sweep.train, "train_and_evaluate",
                      lambda config, d: trained.append((config.seed, d)))
  sweep.run_all(workdir, ["vit"], ["rigl"], [0.75], [0, 1])
  assert trained == [(1, sweep.run_dir(workdir, "vit", "rigl", 0.75, 1))]


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_gpt_is_the_unscanned_gpt_with_stacked_params(remat):
  """``scan_layers``: one ``blocks`` leaf per block leaf, stacked [depth, ...]; the
  unscanned GPT given slice ``i`` as ``block{i}`` computes the same logits."""
  kwargs = dict(width=32, depth=3, num_heads=4, mlp_dim=48, remat=remat)
  scanned = get_model("gpt", num_classes=256, scan_layers=True, **kwargs)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  params = jax.jit(lambda k: scanned.init(k, tokens, train=False))(jax.random.key(0))["params"]
  names = {"/".join(p): x.shape for p, x in flax.traverse_util.flatten_dict(params).items()}
  assert names["blocks/attn/query/kernel"] == (3, 32, 4, 8)
  assert names["blocks/attn/out/kernel"] == (3, 4, 8, 32)
  assert names["blocks/mlp_in/kernel"] == (3, 32, 48)
  assert names["blocks/mlp_out/kernel"] == (3, 48, 32)
  assert names["blocks/ln1/scale"] == (3, 32) and not any("block0" in n for n in names)
  unstacked = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(3):
    unstacked[f"block{i}"] = jax.tree.map(lambda x: x[i], params["blocks"])
  plain = get_model("gpt", num_classes=256, **kwargs)
  expected = plain.apply({"params": unstacked}, tokens, train=False)
  got = scanned.apply({"params": params}, tokens, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The same loss gradient, restacked (remat recomputes; it changes no number).
  loss = lambda m: lambda p: m.apply({"params": p}, tokens, train=True).mean()
  g_scan = jax.grad(loss(scanned))(params)["blocks"]["mlp_in"]["kernel"]
  g_plain = jax.grad(loss(plain))(unstacked)
  np.testing.assert_allclose(
      g_scan, np.stack([g_plain[f"block{i}"]["mlp_in"]["kernel"] for i in range(3)]),
      rtol=1e-4, atol=1e-7)
