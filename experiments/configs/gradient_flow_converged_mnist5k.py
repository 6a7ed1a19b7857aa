r"""The gradient-flow study, converged (issue 15): the paper's grid with tuned rates.

The recipe of ``gradient_flow_mnist5k.py`` trained 10x longer (30 epochs, cosine
schedule), every setting's learning rate tuned on a validation split carved from
the training set (``study.validation_fraction``; never the test set), and the
paper's grid (docs/algorithms.md §8): SGD, momentum, Adam, RMSProp, Adagrad x ReLU, Swish,
PReLU x none, L2, batch norm, data augmentation (random shifts of up to
``study.augment_shift`` = 2 pixels) x densities 0.05, 0.1, 0.2, 0.5, 1 x 3 seeds,
sparse at width ``study.width`` vs the SC-SDC same-capacity dense net.

Densities {0.05, 0.2, 1.0} first (the same workdir later adds the rest; finished
runs and tuning runs are never redone), MLP family:

  python -m experiments.studies.gradient_flow.sweep \
      --config=experiments/configs/gradient_flow_converged_mnist5k.py \
      --workdir=workdirs/gradient_flow_converged "--config.study.densities=(0.05,0.2,1.0)" \
      --slice=0/1

then without the densities override for 0.1 and 0.5. The small-CNN family in its
own workdir: ``--config.study.family=cnn --config.study.width=32
--workdir=workdirs/gradient_flow_converged_cnn``. The initialisation factor on one
slice of the grid (its dense_fan_in runs are the main grid's, skipped there):

  ... --workdir=workdirs/gradient_flow_converged \
      "--config.study.inits=('dense_fan_in','active_fan_in')" \
      "--config.study.optimizers=('momentum','adam')" \
      "--config.study.activations=('relu',)" \
      "--config.study.regularisations=('none','batch_norm')"

Is 30 epochs enough? The budget check trains some final runs again for 60 epochs
at the rates the sweep chose (``study.rates_from``; no tuning runs), in its own
workdir; the report pairs them with the 30-epoch runs by name:

  python -m experiments.studies.gradient_flow.sweep --config=<this file> \
      --workdir=workdirs/gradient_flow_budget --config.num_epochs=60 \
      --config.study.rates_from=workdirs/gradient_flow_converged/tuning.json \
      "--config.study.seeds=(0,)" "--config.study.activations=('relu',)" \
      "--config.study.densities=(0.05,1.0)" --slice=0/1

Report (a new directory: the 3-epoch study's README stays as it is):

  python -m experiments.studies.gradient_flow.report --workdir=workdirs/gradient_flow_converged \
      --budget_workdir=workdirs/gradient_flow_budget \
      --out=experiments/results/gradient_flow/converged

Size, MLP family: 540 settings, 5 tuning rates (6 for Adam and RMSProp) + 3 seeds:
2,916 tuning runs of 840 steps and 1,620 final runs of 930 (``--dry_run`` lists
them). The first sweep (on 2026-12-03, three rates per optimizer, densities
{0.05, 0.2, 1.0}: 1,800 runs plus the 48 of the init factor) took 65 min of wall
time on the 2-core CPU as two slices in parallel (``--slice=0/2`` and ``1/2``, one
per core), 3-5 s a run; the wider grids, densities 0.1 and 0.5 and the budget
check 102 min more (about 3,320 runs trained). With 6 rates round robin over 2
slices, every sixth rate falls into slice 1: use an odd slice count (or 3) to
balance a grid widened by one rate.
When a grid is widened, a final run trained (or started) at a rate that is no
longer its setting's chosen one is trained again, the old one moved to
``<workdir>/previous/``; a final run whose setting still has tuning runs to do
(in this or another slice) is pending: run the slices again once they are done.
Its report is ``experiments/results/gradient_flow/converged/``, and its run records
(run.json, summary.json, metrics.jsonl, config.json, tuning.json; no checkpoints
or exports) are ``records.tar.gz`` there. Restore them before adding runs, so the
finished ones are skipped:

  mkdir -p workdirs/gradient_flow_converged && tar xzf \
      experiments/results/gradient_flow/converged/records.tar.gz \
      -C workdirs/gradient_flow_converged

The small CNN at width 32 is slow on that CPU (a jitted gradient of a batch of 128
takes ~0.16 s, XLA:CPU's conv backward; 3 epochs with the measures took 172 s), so
its grid (930 steps a run) needs an accelerator or a smaller slice.
"""

import ml_collections

from experiments.configs import default
from experiments.configs import gradient_flow_mnist5k


def get_config(arg: str | None = None):
  """The 784-256-256-10 MLP on the MNIST subset, 30 epochs, cosine, tuned rates."""
  default.parse_args(arg, {})  # no family argument: fields are set with --config.FIELD
  config = gradient_flow_mnist5k.get_config()
  config.num_epochs = 30
  config.lr_schedule = "cosine"
  config.eval_every_epochs = 5  # and at the end: the final accuracy is the result
  config.gradient_flow_every_steps = 62  # about every 2 epochs, and step 0
  config.log_every_steps = 62

  study = config.study
  study.densities = (0.05, 0.1, 0.2, 0.5, 1.0)
  study.optimizers = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
  study.activations = ("relu", "swish", "prelu")
  study.regularisations = ("none", "l2", "batch_norm", "augment")
  study.seeds = (0, 1, 2)
  study.inits = ("dense_fan_in",)  # add "active_fan_in" on one slice (docstring)
  # Per optimizer the grid tuned per setting (momentum is SGD with momentum 0.9):
  # rates a factor of about 3 apart. The first sweep ran only the lower three
  # (bracketing the 3-epoch study's rate) and 273 of 308 settings chose the
  # largest, so the grids were widened by two rates upwards; with five, Adam and
  # RMSProp still chose the largest in 30 of 124 settings tuned by then (mostly
  # with batch norm), so they have a sixth. Now 31 of 548 settings choose the
  # largest rate, 1 the smallest.
  study.learning_rates = ml_collections.ConfigDict(dict(
      sgd=(0.03, 0.1, 0.3, 1.0, 3.0), momentum=(0.01, 0.03, 0.1, 0.3, 1.0),
      adam=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
      rmsprop=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
      adagrad=(0.01, 0.03, 0.1, 0.3, 1.0)))
  study.validation_fraction = 0.1  # 400 of the 4,000 training digits held out
  study.tuning_seed = 0
  study.augment_shift = 2  # pixels, each direction, of the "augment" regularisation
  return config
