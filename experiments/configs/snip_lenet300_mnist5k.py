r"""SNIP (keep the largest |w * dL/dw| on the first training batch, globally), then static training, on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/snip_lenet300_mnist5k.py \
      --workdir=workdirs/snip_lenet300_mnist5k

Family argument: ``snip_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov); the mask is scored
at initialisation and kept fixed (experiments/trainer/baselines.py lists the options).
Results: experiments/results/lenet300_mnist5k.md.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("snip", arg)
