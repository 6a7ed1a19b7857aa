r"""Dense training of LeNet-300-100 on the bundled MNIST subset (the reference).

  python -m experiments.main --config=experiments/configs/dense_lenet300_mnist5k.py \
      --workdir=workdirs/dense_lenet300_mnist5k

Family argument: ``dense_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov, ΔT = 100).
Expected at 98% sparsity: 94.5 ± 0.2% (dense; the sparsity argument is ignored) (see experiments/results/lenet300_mnist5k.md).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("dense", arg)
