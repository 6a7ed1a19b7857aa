r"""GraNet-ST (sparse-to-sparse, s_i = 0.5 from an ERK random mask) on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/granet_st_lenet300_mnist5k.py \
      --workdir=workdirs/granet_st_lenet300_mnist5k

Family argument: ``granet_st_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov, ΔT = 100).
Expected at 98% sparsity: 93.2 ± 0.2% (3 seeds) (see experiments/results/lenet300_mnist5k.md).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("granet", arg, initial=0.5)
