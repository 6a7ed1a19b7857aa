"""The accelerator road without an accelerator: CIFAR and ImageNet through TFDS and the trainer.

Small synthetic cifar10, cifar100 and imagenet2012 are prepared on disk by TFDS's own
builders (experiments/data/synthetic.py), so every process reads them as it would
the real ones. The runs take their configs from the commands in the config files'
docstrings, parsed by ``ml_collections.config_flags`` as ``experiments.main`` does,
with small overrides on the command line (steps, batch, schedule) and narrow model
widths set in Python (the model's own attributes: VGG's ``cfg`` at 1/16 of each width,
ResNet's ``num_filters``); the training set is fed by the augmented ``tf.data`` path
(the configs' ``data_on_device=False``).

Also here: bfloat16 on every model family, the device check's skip on CPU (and its
``--smoke`` run), the README's accelerator commands, and (slow) the full-width VGG-19
and ResNet-50 training through two mask updates with exact counts.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import sparse_jax
from experiments.data import input_pipeline
from experiments.data import specs
from experiments.trainer import methods
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import train
from experiments.configs import default
from experiments.data import synthetic
from experiments.models import vgg
from tests import multidevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
# VGG-19's 16 convs and its classifier, each conv 1/16 as wide (4 .. 32 channels).
NARROW_VGG19 = tuple(v if v == "M" else v // 16 for v in vgg.CFGS[19])
SIZES = {"cifar10": (192, 100), "cifar100": (200, 100), "imagenet2012": (48, 20)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  for name, (num_train, num_eval) in SIZES.items():
    synthetic.prepare(name, path, num_train=num_train, num_eval=num_eval)
  return path


def docstring_command(config_file: str) -> list[str]:
  """The arguments of the ``python -m experiments.main`` command in a config's docstring."""
  text = open(os.path.join(CONFIGS, config_file)).read()
  command = re.search(r"python -m experiments\.main (.*?)\n\n", text, re.S).group(1)
  return shlex.split(command.replace("\\\n", " "))


def parse_command(args: list[str]):
  """``(config, workdir)`` from ``experiments.main``'s flags, parsed as it parses them."""
  argv = ["experiments.main", *args]
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  # sys_argv: config_flags finds the --config.* overrides in it.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  # Relative config paths, as in the docstrings, are relative to the repository.
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    flag_values(argv)
    return flag_values.config, flag_values.workdir
  finally:
    os.chdir(cwd)


def command_config(config_file: str, data_dir: str, *overrides: str, **model_kwargs):
  """The docstring command's config on ``data_dir``, with ``--config.*`` ``overrides``."""
  args = [a for a in docstring_command(config_file)
          if not a.startswith(("--workdir", "--config.data_dir"))]
  config, _ = parse_command([*args, "--workdir=unused", f"--config.data_dir={data_dir}",
                             *overrides])
  with config.unlocked():
    config.model_kwargs.update(model_kwargs)  # --config cannot add fields
  return config


# Small runs: one epoch of 12 steps (192 examples, batch 16) and 6 more; evaluations at
# the end of each epoch (12, 18); GraNet prunes at the events 5 and 10 (to the final
# sparsity by step 12) and prunes-and-regrows at 15; checkpoints every 6 steps; a
# record of every step.
VGG_RUN = ("--config.batch_size=16", "--config.eval_batch_size=40",
           "--config.num_train_steps=18", "--config.sparsity.update_every=5",
           "--config.sparsity.end_epoch=1.0", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=6")


def read_export(workdir) -> dict:
  with np.load(os.path.join(workdir, "export.npz")) as f:
    return dict(f)


def read_metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_sparse_export(exported: dict, sparsity: float):
  """Masked weights exactly 0; the masks' sparsity is ``sparsity`` to one weight a layer."""
  names = [k[len("masks/"):] for k in exported if k.startswith("masks/")]
  assert names
  active = total = 0
  for name in names:
    mask, param = exported[f"masks/{name}"], exported[f"params/{name}"]
    assert mask.dtype == bool and mask.shape == param.shape
    assert param.dtype == np.float32
    assert not np.any(param[~mask]), name
    active, total = active + mask.sum(), total + mask.size
  assert abs((1 - active / total) - sparsity) <= len(names) / total


# The data sets, as the trainer reads them.


@pytest.mark.parametrize("name", sorted(SIZES))
def test_synthetic_sets_are_read_as_the_real_ones(data_dir, name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # TFDS's registered builder (not ours) finds the prepared set, in its own format.
  builder = tfds.builder(name, data_dir=data_dir)
  assert builder.is_prepared()
  info = input_pipeline.dataset_info(name, data_dir)
  num_train, num_eval = SIZES[name]
  assert (info.num_train_examples, info.num_eval_examples) == (num_train, num_eval)
  assert info.num_classes == {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[name]
  assert set(builder.info.features) >= {"image", "label"}
  raw = tfds.as_numpy(builder.as_dataset(split=info.eval_split, shuffle_files=False,
                                         batch_size=-1))
  batches = list(input_pipeline.eval_batches(name, batch_size=16, data_dir=data_dir))
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  assert mask.sum() == num_eval and mask[:num_eval].all()  # padding at the end
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(labels, raw["label"])
  images = np.concatenate([b["image"] for b in batches])[mask]
  assert images.shape == (num_eval, *info.input_shape) and images.dtype == np.float32
  if name != "imagenet2012":  # evaluation images are the stored pixels, normalised
    spec = specs.SPECS[name]
    pixels = images * np.asarray(spec.std) + np.asarray(spec.mean)
    np.testing.assert_allclose(pixels * 255, raw["image"], atol=1e-3)
  else:  # variable-sized JPEGs, resized and centre-cropped to 224
    shapes = {ex["image"].shape for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    assert len(shapes) > 1 and all(min(s[:2]) < 224 for s in shapes)
  batch = next(input_pipeline.train_batches(name, batch_size=8, data_dir=data_dir, seed=0))
  assert batch["image"].shape == (8, *info.input_shape)
  assert batch["label"].dtype == np.int32 and batch["label"].max() < info.num_classes


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_augmented_batches_resume_and_shard_per_process(data_dir, name):
  kwargs = dict(batch_size=8, data_dir=data_dir, seed=4)
  spe = SIZES[name][0] // 8
  it = input_pipeline.train_batches(name, **kwargs)
  full = [next(it) for _ in range(spe + 2)]
  # Resumed mid-epoch and in the next epoch: the same crops, flips and order.
  for start in (3, spe + 1):
    resumed = input_pipeline.train_batches(name, start_step=start, **kwargs)
    for expected in full[start:]:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], expected["image"])
      np.testing.assert_array_equal(got["label"], expected["label"])
  # The augmentation changes the images between epochs (same examples, new crops).
  assert not np.array_equal(full[0]["image"], full[spe]["image"])
  # Two processes read the two halves of the training set (per-process shards): an
  # epoch of each holds every training label once.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  raw = tfds.as_numpy(tfds.builder(name, data_dir=data_dir).as_dataset(
      split="train", batch_size=-1))
  epochs = []
  for i in range(2):
    it = input_pipeline.train_batches(name, process_index=i, process_count=2, **kwargs)
    # 4 examples a step each (the global batch of 8 halved): spe steps an epoch.
    epochs.append(np.concatenate([next(it)["label"] for _ in range(spe)]))
  assert len(epochs[0]) == len(epochs[1]) == SIZES[name][0] // 2
  np.testing.assert_array_equal(np.sort(np.concatenate(epochs)), np.sort(raw["label"]))
  assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))


# VGG-19 on CIFAR-10 (cifar_vgg19.py's command): the whole trainer, one device.


def vgg19_cifar10_config(data_dir, *overrides):
  return command_config("cifar_vgg19.py", data_dir, *VGG_RUN, *overrides, cfg=NARROW_VGG19)


@pytest.fixture(scope="module")
def vgg19_runs(data_dir, tmp_path_factory):
  """The run uninterrupted, and halted after step 13 (a checkpoint) then resumed."""
  root = tmp_path_factory.mktemp("vgg19")
  full, parts = str(root / "full"), str(root / "parts")
  summary = train.train_and_evaluate(vgg19_cifar10_config(data_dir), full)
  halted = train.train_and_evaluate(
      vgg19_cifar10_config(data_dir, "--config.halt_after_step=13"), parts)
  checkpoints_at_halt = sorted(os.listdir(os.path.join(parts, "checkpoints")))
  resumed = train.train_and_evaluate(vgg19_cifar10_config(data_dir), parts)
  return dict(full=full, parts=parts, summary=summary, halted=halted, resumed=resumed,
              checkpoints_at_halt=checkpoints_at_halt)


def test_vgg19_cifar10_config_is_the_recipe_on_the_tfdata_path(data_dir):
  config = vgg19_cifar10_config(data_dir)
  assert (config.dataset, config.model, config.sparsity.method) == ("cifar10", "vgg19", "granet")
  assert config.sparsity.final == 0.95 and config.data_on_device is False
  assert input_pipeline.augmentation(config.dataset) == "pad_crop_flip"
  assert config.num_train_steps == 18 and config.model_kwargs.cfg == NARROW_VGG19


def test_vgg19_cifar10_trains_evaluates_and_exports(vgg19_runs):
  summary, workdir = vgg19_runs["summary"], vgg19_runs["full"]
  assert summary["steps"] == 18
  records = read_metrics(workdir)
  assert [r["step"] for r in records if r.get("mask_update")] == [5, 10, 15]
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [12, 18]
  assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in evals)
  assert summary["final_test_accuracy"] == evals[-1]["test_accuracy"]
  assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
  exported = read_export(workdir)
  assert_sparse_export(exported, 0.95)
  assert summary["mask_sparsity"] == pytest.approx(
      1 - sum(exported[k].sum() for k in exported if k.startswith("masks/"))
      / sum(exported[k].size for k in exported if k.startswith("masks/")), abs=1e-12)
  # 16 convs and the classifier are pruned; batch norm keeps running statistics.
  assert len([k for k in exported if k.startswith("masks/")]) == 17
  means = [v for k, v in exported.items() if k.startswith("batch_stats/") and k.endswith("mean")]
  assert len(means) == 16 and all(np.any(m != 0) for m in means)


def test_vgg19_cifar10_halt_and_resume_equal_the_uninterrupted_run(vgg19_runs):
  assert vgg19_runs["halted"] == {"halted_at_step": 13}
  assert "13" in vgg19_runs["checkpoints_at_halt"]
  assert vgg19_runs["resumed"]["steps"] == 18
  assert not os.path.exists(os.path.join(vgg19_runs["full"], "previous"))
  full, parts = read_export(vgg19_runs["full"]), read_export(vgg19_runs["parts"])
  assert full.keys() == parts.keys()
  for k in full:
    np.testing.assert_array_equal(full[k], parts[k], err_msg=k)
  # Each step's record once; the evaluation before the halt carried by the checkpoint
  # into the summary.
  a, b = read_metrics(vgg19_runs["full"]), read_metrics(vgg19_runs["parts"])
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 19))
  for x, y in zip(a, b):
    for key in ("train_loss", "train_accuracy", "test_accuracy", "sparsity"):
      assert x.get(key) == y.get(key), (x["step"], key)
  for key in ("final_test_accuracy", "best_test_accuracy", "mask_sparsity", "final_sparsity"):
    assert vgg19_runs["summary"][key] == vgg19_runs["resumed"][key], key


# A real SIGKILL on the tf.data path: the process dies after step 14 is logged (past the
# step-12 checkpoint and evaluation, mid-epoch 2); the resumed run restores the
# checkpoint and the input pipeline's position, and ends as the uninterrupted run does.
KILL_WORKER = textwrap.dedent(r"""
    import os, signal, sys
    from experiments.trainer import reporting, train
    from tests.test_accelerator_road import vgg19_cifar10_config

    data_dir, workdir = sys.argv[1:3]
    write = reporting.MetricWriter.write
    def write_then_kill(self, record):
      write(self, record)
      if record["step"] == 14:
        os.kill(os.getpid(), signal.SIGKILL)
    reporting.MetricWriter.write = write_then_kill
    train.train_and_evaluate(vgg19_cifar10_config(data_dir), workdir)
""")


@pytest.mark.slow  # ~46 s cold; the SIGKILL logic is tested fast on LeNet (test_trainer_faults)
def test_vgg19_cifar10_sigkill_then_resume_equals_the_uninterrupted_run(
    data_dir, vgg19_runs, tmp_path):
  workdir = str(tmp_path / "killed")
  out = subprocess.run([sys.executable, "-c", KILL_WORKER, data_dir, workdir],
                       env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert "12" in os.listdir(os.path.join(workdir, "checkpoints"))
  resumed = train.train_and_evaluate(vgg19_cifar10_config(data_dir), workdir)
  assert resumed["steps"] == 18
  full, parts = read_export(vgg19_runs["full"]), read_export(workdir)
  assert full.keys() == parts.keys()
  for k in full:
    np.testing.assert_array_equal(full[k], parts[k], err_msg=k)
  a, b = read_metrics(vgg19_runs["full"]), read_metrics(workdir)
  assert [r["step"] for r in b] == list(range(1, 19))
  for x, y in zip(a, b):
    for key in ("train_loss", "test_accuracy", "sparsity"):
      assert x.get(key) == y.get(key), (x["step"], key)
  for key in ("final_test_accuracy", "best_test_accuracy", "mask_sparsity"):
    assert vgg19_runs["summary"][key] == resumed[key], key


# The same run on the mesh path: jax.jit over 8 CPU devices, 2 examples a device.

MESH_WORKER = textwrap.dedent(r"""
    import json, os, sys
    import jax
    from experiments.trainer import train
    from tests.test_accelerator_road import vgg19_cifar10_config

    data_dir, workdir = sys.argv[1:3]
    halted = train.train_and_evaluate(
        vgg19_cifar10_config(data_dir, "--config.halt_after_step=13"), workdir)
    summary = train.train_and_evaluate(vgg19_cifar10_config(data_dir), workdir)
    print(json.dumps({"devices": jax.device_count(), "halted": halted,
                      "steps": summary["steps"], "mask_sparsity": summary["mask_sparsity"],
                      "final_sparsity": summary["final_sparsity"]}))
""")


@pytest.mark.multidevice
@pytest.mark.slow  # ~134 s cold; 8-device equality is tested fast on LeNet (test_trainer)
def test_vgg19_cifar10_on_8_devices_halts_resumes_and_matches_one_device(
    data_dir, vgg19_runs, tmp_path):
  workdir = str(tmp_path / "mesh")
  out = subprocess.run([sys.executable, "-c", MESH_WORKER, data_dir, workdir],
                       env=multidevice.env(8, JAX_PLATFORMS="cpu"), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["halted"] == {"halted_at_step": 13}
  assert report["steps"] == 18
  # The global batch is the one-device run's (same tf.data batches, split over the
  # devices), so the first steps' losses agree to float rounding (later ones drift:
  # this narrow VGG with batch norm on 16 examples amplifies rounding ~10x a step), and
  # the masks' counts exactly.
  one, mesh = read_metrics(vgg19_runs["full"]), read_metrics(workdir)
  assert [r["step"] for r in mesh] == list(range(1, 19))
  for step in (0, 1):
    assert mesh[step]["train_loss"] == pytest.approx(one[step]["train_loss"], rel=1e-5)
  assert report["mask_sparsity"] == vgg19_runs["summary"]["mask_sparsity"]
  exported = read_export(workdir)
  assert_sparse_export(exported, 0.95)
  assert sorted(exported) == sorted(read_export(vgg19_runs["full"]))


# ResNet-50 on CIFAR-100 and on ImageNet (their configs' commands), halted and resumed.
# Slow: tracing ResNet-50's mask-update step alone takes ~30 s here, even when the
# compiled program comes from the persistent cache.

RESNET_RUNS = {
    # 200 examples, batch 16: 12 steps an epoch; events at 5 and 10; evaluations at 12, 14.
    "cifar_resnet50.py": (("--config.batch_size=16", "--config.eval_batch_size=40",
                           "--config.num_train_steps=14", "--config.sparsity.update_every=5",
                           "--config.sparsity.end_epoch=1.0"), 11, "cifar100", 0.9),
    # 48 examples, batch 8: 6 steps an epoch; events at 3 and 6; evaluations at 6, 8.
    "imagenet_resnet50.py": (("--config.batch_size=8", "--config.eval_batch_size=10",
                              "--config.num_train_steps=8", "--config.sparsity.update_every=3",
                              "--config.sparsity.end_epoch=1.0"), 4, "imagenet2012", 0.9),
}


@pytest.mark.slow
@pytest.mark.parametrize("config_file", sorted(RESNET_RUNS))
def test_resnet50_halts_resumes_and_exports(data_dir, tmp_path, config_file):
  overrides, halt, dataset, sparsity = RESNET_RUNS[config_file]
  overrides += ("--config.log_every_steps=1", "--config.checkpoint_every_steps=4")
  config = lambda *more: command_config(config_file, data_dir, *overrides, *more,
                                        num_filters=4)
  assert config().dataset == dataset and config().data_on_device is False
  workdir = str(tmp_path / "wd")
  assert train.train_and_evaluate(config(f"--config.halt_after_step={halt}"), workdir) == {
      "halted_at_step": halt}
  assert str(halt) in os.listdir(os.path.join(workdir, "checkpoints"))
  summary = train.train_and_evaluate(config(), workdir)
  steps = config().num_train_steps
  assert summary["steps"] == steps
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  assert len([r for r in records if r.get("mask_update")]) == 2
  assert [r["step"] for r in records if "test_accuracy" in r] == [
      steps - steps % (SIZES[dataset][0] // config().batch_size), steps]
  exported = read_export(workdir)
  assert_sparse_export(exported, sparsity)
  # 53 convs (the stem, 16 blocks of 3, 4 projections) and the classifier.
  assert len([k for k in exported if k.startswith("masks/")]) == 54
  assert exported["params/head/kernel"].shape[-1] == {"cifar100": 100, "imagenet2012": 1000}[dataset]


# bfloat16 (--config.dtype=bfloat16): the compute dtype of every model family. Params,
# batch statistics, gradients, optimizer state and masks stay float32 / bool (Flax's
# param_dtype); each model casts its input to bfloat16, so every matmul and conv runs in
# bfloat16 forward and backward, and returns float32 logits for the loss.

BF16_RUNS = {
    "mlp": ("lenet300_100", "mnist5k", {}),
    "conv": ("lenet5", "mnist5k", {}),
    "vgg": ("vgg19", "cifar10", {"cfg": NARROW_VGG19}),
    "resnet": ("resnet20", "cifar10", {"num_filters": 4}),
}


def bf16_config(family: str, data_dir: str):
  model, dataset, model_kwargs = BF16_RUNS[family]
  if dataset == "mnist5k":
    config = default.lenet300_mnist5k("rigl", "sparsity=0.9")
    config.model_kwargs.update(model_kwargs)
  else:
    config = command_config("cifar_vgg19.py", data_dir, "--config.sparsity.method=rigl",
                            "--config.sparsity.final=0.9", "--config.batch_size=16",
                            "--config.eval_batch_size=50", **model_kwargs)
  config.model, config.dtype = model, "bfloat16"
  # RigL at 90%: events (drop and regrow, counts kept per layer) at 3 and 6; one
  # program deciding events in the graph (a single trace of the mask update).
  config.num_train_steps, config.steps_per_dispatch = 8, 4
  config.sparsity.update_every, config.host_mask_updates = 3, False
  config.log_every_steps = config.checkpoint_every_steps = 4
  return config


def matmul_dtypes(fn, *args) -> set:
  """The operand dtypes of every dot_general and conv in ``fn``'s jaxpr (nested too)."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


# VGG and ResNet: ~100 s each with a cold compilation cache (bfloat16 convs compile
# slowly on XLA:CPU), ~10-30 s warm.
@pytest.mark.parametrize("family", ["mlp", "conv", pytest.param("vgg", marks=pytest.mark.slow),
                                    pytest.param("resnet", marks=pytest.mark.slow)])
def test_bfloat16_computes_in_bf16_and_keeps_exact_masks(data_dir, tmp_path, family):
  config = bf16_config(family, data_dir)
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  model = state_lib.create_model(config, info.num_classes)
  tx_fn = methods.create_tx_fn(config, model, info, info.num_train_examples // config.batch_size)
  # The trainer's initial state (the same program: the same initial masks).
  init = state_lib.create_sharded_train_state(config, model, tx_fn, info.input_shape,
                                              jax.random.PRNGKey(config.seed))
  f32 = np.dtype("float32")
  assert {x.dtype for x in jax.tree.leaves((init.params, init.batch_stats))} == {f32}
  images = jnp.zeros((2, *info.input_shape), jnp.float32)

  def loss(params):
    logits, _ = steps_lib.apply_train_mode(model, params, init.batch_stats, images,
                                           init.rng)
    assert logits.dtype == np.dtype("float32")
    return logits.sum()

  # Forward and backward: every matmul and conv on bfloat16 operands; float32 gradients.
  assert matmul_dtypes(jax.grad(loss), init.params) == {("bfloat16", "bfloat16")}
  grads = jax.eval_shape(jax.grad(loss), init.params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {f32}

  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 8 and np.isfinite(summary["final_test_loss"])
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if r.get("mask_update")] == [3, 6]
  exported = read_export(tmp_path)
  assert_sparse_export(exported, 0.9)
  masks0 = {sparse_jax.path_to_name(p): np.asarray(m) for p, m in
            jax.tree_util.tree_flatten_with_path(sparse_jax.get_masks(init.opt_state))[0]}
  assert sorted(masks0) == sorted(k[len("masks/"):] for k in exported if k.startswith("masks/"))
  changed = 0
  for name, mask0 in masks0.items():
    mask = exported[f"masks/{name}"]
    assert mask.sum() == mask0.sum(), name  # RigL keeps each layer's count
    changed += int(np.sum(mask != mask0))
  assert changed > 0  # the events dropped and regrew weights
  assert {v.dtype for k, v in exported.items() if not k.startswith("masks/")} == {f32}


# The device check (experiments/benchmarks/device_check.py).


def run_device_check(tmp_path, *args):
  out = tmp_path / "device_check.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.device_check", f"--out={out}", *args],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), cwd=REPO,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout, json.loads(out.read_text())


def test_device_check_skips_cleanly_without_an_accelerator(tmp_path):
  stdout, result = run_device_check(tmp_path)
  assert "Device check skipped: no GPU or TPU" in stdout
  assert result["backend"] == "cpu" and "skipped" in result and "rows" not in result


@pytest.mark.slow
def test_device_check_smoke_runs_every_part_on_cpu(tmp_path):
  stdout, result = run_device_check(tmp_path, "--smoke", "--budget_s=900")
  assert result["smoke"] and result["skipped_parts"] == []
  rows = result["rows"]
  assert [(r["model"], r["variant"]) for r in rows] == [
      (m, v) for m in ("resnet50_imagenet", "vgg19_cifar10")
      for v in ("dense", "granet/ordinary", "granet/event", "rigl/ordinary", "rigl/event")]
  for r in rows:
    assert r["steps_per_s"] > 0 and r["compile_s"] > 0 and r["xla_peak_bytes"] > 0
    if r["variant"] == "dense":
      assert r["time_vs_dense"] == r["peak_vs_dense"] == r["compile_vs_dense"] == 1.0
  # An event program holds the scores and selection buffers: more memory than dense.
  assert all(r["peak_vs_dense"] > 1 for r in rows if r["variant"].endswith("/event"))
  run = result["real_recipe_run"]
  assert run["steps"] == 20 and run["mask_updates"] == [5, 10, 15]
  assert run["mask_sparsity"] == pytest.approx(0.95, abs=1e-3)
  assert "Real recipe" in stdout and "Device check done" in stdout


# IMP on VGG-19 / CIFAR-10 (imp_cifar_vgg19.py's command): two rounds, dense then 95%.
# Slow: ~55 s with a cold compilation cache.


@pytest.mark.slow
def test_imp_vgg19_cifar10_runs_its_rounds(data_dir, tmp_path):
  from experiments.trainer import imp  # pylint: disable=g-import-not-at-top
  config = command_config(
      "imp_cifar_vgg19.py", data_dir, "--config.batch_size=16", "--config.eval_batch_size=50",
      "--config.num_train_steps=8", "--config.imp.num_rounds=2",
      "--config.imp.prune_fraction=0.95", "--config.imp.rewind_step=3",
      "--config.log_every_steps=4", "--config.checkpoint_every_steps=4", cfg=NARROW_VGG19)
  assert (config.sparsity.method, config.dataset, config.data_on_device) == (
      "imp", "cifar10", False)
  summary = imp.run_imp(config, str(tmp_path))
  assert [r["round"] for r in summary["rounds"]] == [0, 1]
  assert [r["steps"] for r in summary["rounds"]] == [8, 5]  # round 1 rewinds to step 3
  assert summary["rounds"][0]["mask_sparsity"] == 0.0  # round 0: dense (a full mask)
  assert_sparse_export(read_export(tmp_path / "round_1"), 0.95)


# The README's accelerator section: its commands are the configs' docstring commands,
# which the tests above run.


def test_readme_accelerator_section_shows_the_tested_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## On GPUs and TPUs: CIFAR and ImageNet", 1)[1].split("\n## ", 1)[0]
  blocks = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S)).replace("\\\n", " ")
  commands = [shlex.split(line.split("python -m experiments.main ", 1)[1])
              for line in blocks.splitlines() if "python -m experiments.main" in line]
  by_file = {os.path.basename(c[0].split("=", 1)[1].split(":")[0]): c for c in commands}
  assert sorted(by_file) == ["cifar_resnet50.py", "cifar_vgg19.py", "imagenet_resnet50.py",
                             "imp_cifar_vgg19.py"]
  for config_file, args in by_file.items():
    assert args == docstring_command(config_file), config_file
    config, _ = parse_command(args)
    # What to prepare, for the data set each command reads.
    row = next(l for l in section.splitlines() if l.startswith(f"| `{config_file}"))
    if config.dataset == "imagenet2012":
      assert "manual download" in row and "--manual_dir" in section
    else:
      assert f"tfds build {config.dataset} --data_dir=" in row
  # The tests that run them: VGG-19 in make test; IMP and the ResNet-50s slow-marked.
  assert {"cifar_vgg19.py", "imp_cifar_vgg19.py", *RESNET_RUNS} == set(by_file)


# The big models train (full width): VGG-19 and ResNet-50 (CIFAR stem) with GraNet and
# RigL on the learnable synthetic CIFAR-10 (a colour per class), 24 steps of 16
# examples. Mask updates every 4 steps: GraNet prunes at 4 and 8, reaching 90% by its
# end step 9, then drops and regrows up to the end; RigL up to 75% of training. The
# recipe's learning rate scaled linearly to the batch (0.1 x 16 / 128) and held
# constant (its decays at 50% and 75% of 24 steps would stop the learning to be seen).
# Slow: on the 2-core CPU ~10 min each for VGG-19 and 33 min each for ResNet-50 (load ~4).
BIG_EVENTS = {"granet": [4, 8, 12, 16, 20], "rigl": [4, 8, 12, 16]}


@pytest.mark.slow
@pytest.mark.parametrize("config_file,method", [
    ("cifar_vgg19.py", "granet"), ("cifar_vgg19.py", "rigl"),
    ("cifar_resnet50.py", "granet"), ("cifar_resnet50.py", "rigl")])
def test_big_models_train_with_exact_mask_counts(data_dir, tmp_path, config_file, method):
  config, _ = parse_command([
      f"--config=experiments/configs/{config_file}:dataset=cifar10,method={method},"
      "sparsity=0.9", "--workdir=unused", f"--config.data_dir={data_dir}",
      "--config.batch_size=16", "--config.learning_rate=0.0125",
      "--config.lr_schedule=constant", "--config.eval_batch_size=50",
      "--config.num_train_steps=24", "--config.sparsity.update_every=4",
      "--config.sparsity.end_epoch=0.75", "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=24"])
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  model = state_lib.create_model(config, info.num_classes)
  tx_fn = methods.create_tx_fn(config, model, info, info.num_train_examples // 16)
  init = state_lib.create_sharded_train_state(config, model, tx_fn, info.input_shape,
                                              jax.random.PRNGKey(config.seed))
  masks0 = {sparse_jax.path_to_name(p): np.asarray(m) for p, m in
            jax.tree_util.tree_flatten_with_path(sparse_jax.get_masks(init.opt_state))[0]}
  sizes = {name: m.size for name, m in masks0.items()}
  summary = train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(tmp_path)
  events = [r for r in records if r.get("mask_update")]
  assert [r["step"] for r in events] == BIG_EVENTS[method]
  exported = read_export(tmp_path)
  assert_sparse_export(exported, 0.9)
  counts = {name: int(exported[f"masks/{name}"].sum()) for name in masks0}
  convs = [n for n in masks0 if exported[f"masks/{n}"].ndim == 4]
  assert len(convs) == (16 if config.model == "vgg19" else 53)
  if method == "rigl":  # drops and regrows the same number in every layer
    assert counts == {name: int(m.sum()) for name, m in masks0.items()}
    assert any(np.any(exported[f"masks/{n}"] != masks0[n]) for n in convs)
  else:  # GraNet starts dense and prunes globally to the schedule's exact counts
    total = sum(sizes.values())
    schedule = sparse_jax.gradual_active_counts(
        total, initial_sparsity=0.0, final_sparsity=0.9, start_step=0, end_step=9,
        update_every=4)
    assert all(m.all() for m in masks0.values())
    for k, event in enumerate(events, start=1):  # after the end step: the final count
      active = sum(round(event["layer_density"][n] * sizes[n]) for n in sizes)
      assert active == schedule[min(k, len(schedule) - 1)], (event["step"], active, schedule)
    assert sum(counts.values()) == schedule[-1] == sparse_jax.active_count(0.9, total)
  # Batch norm's running statistics moved from their initial 0 / 1.
  stats = {k: v for k, v in exported.items() if k.startswith("batch_stats/")}
  assert stats and all(np.any(v != (0.0 if k.endswith("mean") else 1.0))
                       for k, v in stats.items())
  # The loss falls on the learnable task.
  losses = [r["train_loss"] for r in records]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  assert np.isfinite(summary["final_test_loss"])
