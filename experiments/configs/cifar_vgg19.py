r"""VGG-19 on CIFAR-10/100 with the GraNet paper's recipe (docs/algorithms.md §6).

  python -m experiments.main --config=experiments/configs/cifar_vgg19.py:dataset=cifar10,sparsity=0.95 \
      --workdir=workdirs/vgg19_cifar10_s95 --config.data_dir=/path/to/tensorflow_datasets

Family argument (comma separated): ``dataset`` cifar10 | cifar100, ``sparsity``
0.9 | 0.95 | 0.98, ``method`` granet (default) | granet_st | gmp | rigl | set |
snip | grasp | synflow (pruning at init, then static) | one_shot (prune once at
epoch 80, fine-tune to 160) | static | dense, ``seed`` (the authors used 18-20),
``smoke`` False (default) | True.
Recipe: 160 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 x0.1 at 50% and 75%,
weight decay 5e-4, ΔT = 1000 iterations, pruning from epoch 0 to 110, s_i = 0
(GraNet) or 0.5 (GraNet-ST).
Reference accuracies: the GraNet paper, Table 1 (a full run needs a GPU).

Smoke setting (``smoke=True``): the whole road of a run (data, model, compilation,
training, mask updates, evaluation, checkpoints, summary and export) on a CPU in
about a minute, without the data set or the network; it checks the road, not the
accuracy:

  python -m experiments.main --config=experiments/configs/cifar_vgg19.py:dataset=cifar10,smoke=True \
      --workdir=/tmp/vgg19_smoke

The data are a synthetic CIFAR of the same name, shape and classes (a colour per
class plus noise), written by TFDS's own builder into
``<repo>/.data/tfds/synthetic/128-64`` on first use (``$SPARSE_JAX_DATA_DIR``
instead of ``<repo>/.data/tfds`` if set; experiments/data/synthetic.py) and read
by the same augmented tf.data path: 128 training, 64 evaluation examples. The
model is VGG-19's 16 convs and classifier at 1/16 of each width (4 .. 32
channels). Two epochs of 8 steps at batch 16: the method, optimizer and schedule
shape are the recipe's (pruning ends and the learning rate drops at the same
fractions of training), with a mask update every 4 steps, an evaluation and a
checkpoint after each epoch. Measured on the 2-core CPU: 61 s the first time (the
synthetic set prepared, every program compiled), 18 s once the compilation cache
holds the programs.
"""

from experiments.configs import default
from experiments.data import synthetic
from experiments.models import vgg


DATASETS = ("cifar10", "cifar100")
ARGS = {"dataset": "cifar10", "sparsity": 0.95, "method": "granet", "seed": 18,
        "smoke": "False"}
# "True" / "False" as text: a family argument takes its default's type.
SMOKE_CHOICES = ("False", "True")
# The smoke setting's synthetic set, batch and length (``smoke_setting``).
SMOKE_EXAMPLES = {"cifar10": (128, 64), "cifar100": (128, 64), "imagenet2012": (64, 32)}
SMOKE_BATCH, SMOKE_EPOCHS = 16, 2


def cifar_config(model: str, arg: str | None, **smoke_model_kwargs):
  """The CIFAR recipe of the GraNet code for ``model``, from the family argument.

  ``smoke_model_kwargs``: the narrow model of the smoke setting (``smoke=True``).
  """
  return cifar_recipe(model, default.parse_args(
      arg, ARGS, choices={"dataset": DATASETS, "method": default.METHODS,
                          "smoke": SMOKE_CHOICES}), **smoke_model_kwargs)


def cifar_recipe(model: str, args, **smoke_model_kwargs):
  """The CIFAR recipe for ``model`` and the parsed ``args`` (the keys of ``ARGS``)."""
  config = default.get_base_config()
  config.dataset = args["dataset"]
  config.model = model
  config.data_on_device = False  # augmented: fed by the tf.data pipeline
  config.num_epochs = 160
  config.eval_batch_size = 1000
  config.seed = args["seed"]
  method = args["method"]
  config.sparsity.method = "granet" if method == "granet_st" else method
  config.sparsity.initial = 0.5 if method == "granet_st" else 0.0
  config.sparsity.final = args["sparsity"]
  config.sparsity.update_every = 1000
  config.sparsity.end_epoch = 110.0
  if method == "one_shot":
    config.sparsity.end_epoch = 80.0  # the one prune, half-way (before the LR decay)
  if method in ("rigl", "set"):
    config.sparsity.regrowth_rate = 0.5  # the GraNet code's death rate for its baselines
  config.log_every_steps = 200
  config.checkpoint_every_steps = 5000
  if args.get("smoke") == "True":
    smoke_setting(config, **smoke_model_kwargs)
  return config


def smoke_setting(config, **model_kwargs):
  """``config`` shrunk to run its whole road on a CPU in about a minute (``smoke=True``).

  The data: a synthetic set of ``config.dataset`` (experiments/data/synthetic.py: TFDS's
  own builder and reads; the same input shape and classes) of ``SMOKE_EXAMPLES``
  examples, prepared on first use. The model: ``model_kwargs`` set (narrower).
  ``SMOKE_EPOCHS`` epochs at batch ``SMOKE_BATCH``, each evaluated and checkpointed;
  the schedule keeps its shape (the end of pruning, the warm-up and the learning-rate
  milestones at the recipe's fractions of training); a mask update every half epoch.
  The method, the optimizer and the augmentation are the recipe's.
  """
  num_train, num_eval = SMOKE_EXAMPLES[config.dataset]
  config.data_dir = synthetic.smoke_data_dir(config.dataset, num_train=num_train,
                                             num_eval=num_eval)
  config.model_kwargs.update(model_kwargs)
  fraction = SMOKE_EPOCHS / config.num_epochs
  config.sparsity.end_epoch *= fraction
  config.warmup_epochs *= fraction
  config.num_epochs = SMOKE_EPOCHS
  config.batch_size, config.eval_batch_size = SMOKE_BATCH, num_eval // 2
  steps_per_epoch = num_train // SMOKE_BATCH
  config.sparsity.update_every = steps_per_epoch // 2
  config.log_every_steps = steps_per_epoch // 2
  config.checkpoint_every_steps = steps_per_epoch
  return config


# VGG-19's 16 convs, each 1/16 as wide (4 .. 32 channels): the smoke setting's model.
SMOKE_VGG19 = tuple(v if v == "M" else v // 16 for v in vgg.CFGS[19])


def get_config(arg: str | None = None):
  return cifar_config("vgg19", arg, cfg=SMOKE_VGG19)
