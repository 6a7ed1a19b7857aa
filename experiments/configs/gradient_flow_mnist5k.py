r"""The gradient-flow study (docs/algorithms.md §8): sparse vs same-capacity dense, with EGF logged.

One config holds the recipe shared by every run and the grid (``config.study``);
``experiments/studies/gradient_flow/sweep.py`` turns each grid point into a run config
(``optimizer``, activation, regularisation, density, seed, sparse or dense).

  python -m experiments.studies.gradient_flow.sweep \
      --config=experiments/configs/gradient_flow_mnist5k.py \
      --workdir=workdirs/gradient_flow [--slice=0/4]

Other data sets through TFDS (prepared beforehand; no download from here), e.g.
  --config.dataset=fashion_mnist
  --config.dataset=cifar10 --config.study.family=cnn --config.study.width=32
  --config.dataset=cifar100 --config.study.family=cnn --config.num_epochs=30

The committed report (experiments/results/gradient_flow/README.md) used the grid
below restricted to densities (0.05, 0.2, 1.0) x {momentum, adam} x {relu, swish} x
{none, batch_norm} x 3 seeds: 120 runs, 34 min on a busy 2-core CPU; its command is
in the report. Expected: full-width dense 86.6-93.2% test accuracy after the 3
epochs; at density 0.05 with batch norm sparse 88-91% vs same-capacity dense
72-84%, without batch norm and with momentum SGD sparse 17-36% vs dense 83-84%.
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None):
  """A 784-256-256-10 MLP on the MNIST subset, 3 epochs per run, static ERK masks."""
  default.parse_args(arg, {})  # no family argument: fields are set with --config.FIELD
  config = default.get_base_config()
  config.dataset = "mnist5k"
  config.model = "mlp"  # set per run from study.family and the width
  config.num_epochs = 3
  config.lr_schedule = "cosine"
  config.weight_decay = 0.0  # the "l2" regularisation sets study.l2
  config.nesterov = False
  config.sparsity.method = "static"  # the sparse runs; dense runs use "dense"
  config.sparsity.distribution = "erk"
  config.gradient_flow_every_steps = 31  # about once per epoch on mnist5k, and step 0
  config.log_every_steps = 31
  config.checkpoint_every_steps = 1_000_000  # short runs: only the final checkpoint
  config.keep_checkpoints = 1

  study = config.study = ml_collections.ConfigDict()
  study.family = "mlp"  # mlp | cnn (experiments/models/small_cnn.py)
  study.width = 256  # the sparse networks' width
  study.depth = 2  # hidden layers of the mlp family
  study.densities = (0.05, 0.1, 0.2, 0.5, 1.0)
  study.optimizers = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
  study.activations = ("relu", "leaky_relu", "prelu", "swish", "selu", "tanh")
  study.regularisations = ("none", "l2", "batch_norm", "dropout")
  study.seeds = (0, 1, 2)
  # Per optimizer: the learning rate (momentum is SGD with momentum 0.9).
  study.learning_rates = ml_collections.ConfigDict(dict(
      sgd=0.1, momentum=0.02, adam=1e-3, rmsprop=1e-3, adagrad=0.02))
  study.l2 = 5e-4  # weight decay of the "l2" regularisation
  study.dropout_rate = 0.2  # of the "dropout" regularisation
  # A finished sweep's tuning.json: train at its chosen rates, no tuning runs (e.g.
  # the converged study's budget check at twice the epochs).
  study.rates_from = ""
  return config
