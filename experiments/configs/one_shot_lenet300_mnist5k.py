r"""One-shot global magnitude pruning at epoch 10, then fine-tuning with the mask fixed.

  python -m experiments.main --config=experiments/configs/one_shot_lenet300_mnist5k.py \
      --workdir=workdirs/one_shot_lenet300_mnist5k

Family argument: ``one_shot_lenet300_mnist5k.py:sparsity=0.95,seed=1``; the prune step
is ``--config.sparsity.end_epoch`` (10 of 30 epochs, before the first LR decay at 15).
Same recipe as granet_lenet300_mnist5k.py otherwise. ``--config.sparsity.scope=layerwise``
prunes each layer to the same density instead.
Results: experiments/results/lenet300_mnist5k.md.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  return default.lenet300_mnist5k("one_shot", arg, end_epoch=10.0)
