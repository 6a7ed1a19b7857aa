r"""SET (ERK start at the final sparsity, random regrowth) on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/set_lenet300_mnist5k.py \
      --workdir=workdirs/set_lenet300_mnist5k

Family argument: ``set_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov, ΔT = 100).
Expected at 98% sparsity: 90.0 ± 0.9% (3 seeds) (see experiments/results/lenet300_mnist5k.md).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("set", arg, regrowth_rate=0.3)
