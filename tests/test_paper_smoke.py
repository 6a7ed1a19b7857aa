"""The paper configs' smoke settings (``smoke=True``) and the evaluation's progress lines.

Each paper config's docstring holds a smoke command: the whole road of its run
(synthetic data through TFDS's own builder, the model, compilation, training, mask
updates, evaluations, checkpoints, summary and export) in under a minute on a
CPU. The tests run those commands' configs, parsed as ``experiments.main`` parses
them, on a synthetic set prepared in a temporary ``$SPARSE_JAX_DATA_DIR``.
"""

import logging
import os
import re
import shlex

import pytest

from experiments.configs import cifar_vgg19
from experiments.trainer import feed as feed_lib
from experiments.trainer import imp
from experiments.trainer import programs
from experiments.trainer import train
from tests.test_accelerator_road import assert_sparse_export
from tests.test_accelerator_road import CONFIGS
from tests.test_accelerator_road import parse_command
from tests.test_accelerator_road import read_export
from tests.test_accelerator_road import read_metrics
from tests.test_trainer import small_config

# config file: (steps a round, mask-update steps, evaluation steps, sparsity, classes).
SMOKES = {
    # 128 examples, batch 16: 8 steps an epoch, 2 epochs; an event every 4 steps.
    "cifar_vgg19.py": (16, [4, 8, 12], [8, 16], 0.95, 10),
    "cifar_resnet50.py": (16, [4, 8, 12], [8, 16], 0.95, 100),
    # 64 examples, batch 16: 4 steps an epoch; an event every 2 steps.
    "imagenet_resnet50.py": (8, [2, 4, 6], [4, 8], 0.8, 1000),
    # Static masks within a round: no event; 2 rounds.
    "imp_cifar_vgg19.py": (16, [], [8, 16], 0.95, 10),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def local_data(data_root, monkeypatch):
  """The smoke settings' synthetic sets go to a temporary local data directory."""
  monkeypatch.setenv("SPARSE_JAX_DATA_DIR", data_root)
  return data_root


def smoke_command(config_file: str) -> list[str]:
  """The arguments of the smoke command in a config file's docstring."""
  text = open(os.path.join(CONFIGS, config_file)).read()
  command = re.search(r"Smoke setting.*?python -m experiments\.main (.*?)\n\n", text,
                      re.S).group(1)
  return shlex.split(command.replace("\\\n", " "))


def smoke_config(config_file: str):
  args = [a for a in smoke_command(config_file) if not a.startswith("--workdir")]
  config, _ = parse_command([*args, "--workdir=unused"])
  return config


@pytest.mark.parametrize("config_file", sorted(SMOKES))
def test_smoke_setting_keeps_the_recipe_on_synthetic_data(local_data, config_file):
  smoke = smoke_config(config_file)
  arg = smoke_command(config_file)[0].split(":", 1)[1].replace(",smoke=True", "").replace(
      "smoke=True", "")
  full, _ = parse_command([f"--config=experiments/configs/{config_file}:{arg}",
                           "--workdir=unused"])
  assert smoke.data_dir.startswith(os.path.join(local_data, "synthetic"))
  assert full.data_dir is None
  # The same data set (name, augmentation), model family, method and recipe.
  for field in ("dataset", "data_on_device", "model", "optimizer", "learning_rate",
                "momentum", "nesterov", "lr_schedule", "lr_milestones", "weight_decay",
                "label_smoothing", "seed", "sparsity.method", "sparsity.final",
                "sparsity.initial", "sparsity.distribution", "sparsity.regrowth_rate"):
    get = lambda c: eval(f"c.{field}", {"c": c})  # pylint: disable=eval-used
    assert get(smoke) == get(full), field
  # The schedule's shape: warm-up and the end of pruning at the same fractions.
  for field in ("warmup_epochs", "sparsity.end_epoch"):
    get = lambda c: eval(f"c.{field}", {"c": c})  # pylint: disable=eval-used
    assert get(smoke) / smoke.num_epochs == pytest.approx(get(full) / full.num_epochs)
  assert smoke.num_epochs == cifar_vgg19.SMOKE_EPOCHS and smoke.batch_size == 16


def test_smoke_argument_is_true_or_false(local_data):
  before = sorted(os.walk(local_data))
  with pytest.raises(ValueError, match=r"smoke='yes' is not one of False, True"):
    cifar_vgg19.get_config("smoke=yes")
  assert cifar_vgg19.get_config("smoke=False").data_dir is None
  assert sorted(os.walk(local_data)) == before  # nothing prepared without smoke=True


# In process, the test suite's compilation cache cold (warm: 15-25 s each): VGG-19 28 s,
# ResNet-50 (CIFAR) 43 s, ResNet-50 (ImageNet) 55 s, IMP 50 s on the 2-core CPU.
SLOW_SMOKES = ("cifar_resnet50.py", "imagenet_resnet50.py", "imp_cifar_vgg19.py")


@pytest.mark.parametrize("config_file", [
    pytest.param(f, marks=pytest.mark.slow) if f in SLOW_SMOKES else f for f in sorted(SMOKES)])
def test_smoke_setting_runs_the_whole_road(local_data, tmp_path, config_file):
  steps, events, evals, sparsity, classes = SMOKES[config_file]
  config = smoke_config(config_file)
  workdir = str(tmp_path / "wd")
  if config.sparsity.method == "imp":
    summary = imp.run_imp(config, workdir)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert [r["steps"] for r in summary["rounds"]] == [steps, steps - 2]  # rewound to 2
    workdir = os.path.join(workdir, "round_1")
  else:
    summary = train.train_and_evaluate(config, workdir)
    assert summary["steps"] == steps
  records = read_metrics(workdir)
  assert [r["step"] for r in records if r.get("mask_update")] == events
  tested = [r["step"] for r in records if "test_accuracy" in r]
  assert tested[-len(evals):] == evals
  assert str(steps) in os.listdir(os.path.join(workdir, "checkpoints"))
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  exported = read_export(workdir)
  assert_sparse_export(exported, sparsity)
  head = [v for k, v in exported.items() if k.startswith("params/") and k.endswith("kernel")
          and v.ndim == 2]
  assert [h.shape[-1] for h in head] == [classes]


# Progress lines of a long evaluation.


def test_a_long_evaluation_logs_its_progress(tmp_path, monkeypatch, caplog):
  # 20 evaluation batches of 50 (the first evaluation says so before it starts),
  # and a line after every batch once PROGRESS_EVERY_S (here 0) has passed.
  config = small_config("granet", steps=40)
  config.eval_batch_size = 50
  config.num_train_steps = 62  # two epochs of 31 steps: two evaluations
  monkeypatch.setattr(programs, "PROGRESS_EVERY_S", 0.0)
  with caplog.at_level(logging.INFO, logger="sparse_jax.train"):
    train.train_and_evaluate(config, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluat")]
  assert lines[0] == "Evaluating on 20 batches (progress every 0 s)..."
  progress = [l for l in lines if l.startswith("Evaluating: batch ")]
  assert [l.split()[2] for l in progress] == [f"{k}/20" for k in range(1, 20)] * 2
  assert len([l for l in lines if l.startswith("Evaluated 20 batches in ")]) == 2
  assert len([l for l in lines if l.startswith("Evaluating on")]) == 1  # the first only


def test_a_short_evaluation_logs_nothing(tmp_path, caplog):
  config = small_config("granet", steps=31)  # the main job's evaluation: 2 batches
  with caplog.at_level(logging.INFO, logger="sparse_jax.train"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [r for r in caplog.records if r.getMessage().startswith("Evaluat")]


def test_streamed_evaluation_batches_read_only_what_is_asked():
  reads = []

  def read():
    for i in range(5):
      reads.append(i)
      yield i

  batches = feed_lib.EvalBatches(read, 5)
  assert len(batches) == 5
  assert batches[0] == 0 and reads == [0]  # the eval program's shapes: one batch read
  assert list(batches) == [0, 1, 2, 3, 4]
  with pytest.raises(IndexError):
    batches[5]  # pylint: disable=pointless-statement
