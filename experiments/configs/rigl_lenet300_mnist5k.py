r"""RigL (ERK start at the final sparsity, gradient regrowth) on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/rigl_lenet300_mnist5k.py \
      --workdir=workdirs/rigl_lenet300_mnist5k

Family argument: ``rigl_lenet300_mnist5k.py:sparsity=0.95,seed=1``. Same recipe as
granet_lenet300_mnist5k.py (30 epochs, batch 128, SGD Nesterov, ΔT = 100).
Expected at 98% sparsity: 90.3 ± 0.6% (3 seeds) (see experiments/results/lenet300_mnist5k.md).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("rigl", arg, regrowth_rate=0.3)
