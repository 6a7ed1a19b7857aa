r"""GraNet at 98% sparsity on LeNet-300-100 with the bundled MNIST subset (the main job).

  python -m experiments.main --config=experiments/configs/granet_lenet300_mnist5k.py \
      --workdir=workdirs/granet_lenet300_mnist5k

Family argument: ``granet_lenet300_mnist5k.py:sparsity=0.95,seed=1``.
30 epochs of 31 steps (batch 128), ΔT = 100, pruning from epoch 0 to 20, SGD
Nesterov 0.9, lr 0.1 x0.1 at 50% and 75%, weight decay 5e-4.
Expected: 92.6 ± 0.6% test accuracy over seeds 0-2 (seed 0: 93.1% or 93.3% on jax 0.10.2 /
flax 0.12.8 / optax 0.2.8, depending on the environment's build) at exactly 98%
sparsity, ~14 s as a whole process on a 2-core CPU (the authors' PyTorch code: 93.1 ± 0.3%).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("granet", arg)
