r"""Iterative SynFlow (100 data-free rounds, float64 scores, globally), then static training, on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/synflow_lenet300_mnist5k.py \
      --workdir=workdirs/synflow_lenet300_mnist5k

Family argument: ``synflow_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov); the mask is scored
at initialisation and kept fixed (experiments/trainer/baselines.py lists the options).
Results: experiments/results/lenet300_mnist5k.md.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("synflow", arg)
