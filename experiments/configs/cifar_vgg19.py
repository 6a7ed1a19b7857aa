r"""VGG-19 on CIFAR-10/100 with the GraNet paper's recipe (docs/algorithms.md §6).

  python -m experiments.main --config=experiments/configs/cifar_vgg19.py:dataset=cifar10,sparsity=0.95 \
      --workdir=workdirs/vgg19_cifar10_s95 --config.data_dir=/path/to/tensorflow_datasets

Family argument (comma separated): ``dataset`` cifar10 | cifar100, ``sparsity``
0.9 | 0.95 | 0.98, ``method`` granet (default) | granet_st | gmp | rigl | set |
snip | grasp | synflow (pruning at init, then static) | one_shot (prune once at
epoch 80, fine-tune to 160) | static | dense, ``seed`` (the authors used 18-20).
Recipe: 160 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 x0.1 at 50% and 75%,
weight decay 5e-4, ΔT = 1000 iterations, pruning from epoch 0 to 110, s_i = 0
(GraNet) or 0.5 (GraNet-ST).
Reference accuracies: the GraNet paper, Table 1 (a full run needs a GPU).
"""

from experiments.configs import default


DATASETS = ("cifar10", "cifar100")
ARGS = {"dataset": "cifar10", "sparsity": 0.95, "method": "granet", "seed": 18}


def cifar_config(model: str, arg: str | None):
  """The CIFAR recipe of the GraNet code for ``model``, from the family argument."""
  return cifar_recipe(model, default.parse_args(
      arg, ARGS, choices={"dataset": DATASETS, "method": default.METHODS}))


def cifar_recipe(model: str, args):
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
  return config


def get_config(arg: str | None = None):
  return cifar_config("vgg19", arg)
