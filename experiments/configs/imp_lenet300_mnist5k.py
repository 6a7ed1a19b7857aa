r"""Iterative magnitude pruning / lottery ticket on LeNet-300-100 / MNIST subset.

  python -m experiments.main --config=experiments/configs/imp_lenet300_mnist5k.py \
      --workdir=workdirs/imp_lenet300_mnist5k

Family argument: ``imp_lenet300_mnist5k.py:sparsity=0.95,rounds=4,seed=1``. Round 0
trains dense; each of the ``rounds - 1`` later rounds prunes the same fraction
``p = 1 - (1 - sparsity) ** (1 / (rounds - 1))`` of the remaining weights (global
magnitude) and retrains 30 epochs with the mask fixed, from the surviving weights'
values at step ``imp.rewind_step`` (0: the original lottery ticket). Options:
``--config.imp.rewind=lr`` (keep the weights, rewind only the LR schedule),
``--config.imp.rewind_step=100`` (weight rewinding), ``--config.imp.scope=layerwise``,
``--config.imp.reset_optimizer_state=True``. See experiments/trainer/imp.py.
Results: experiments/results/lenet300_mnist5k.md.
"""

import ml_collections

from experiments.configs import default


ARGS = {**default.LENET_ARGS, "rounds": 4, "rewind_step": 0}


def add_imp_fields(config, args):
  """Adds ``config.imp`` for the parsed ``args`` (``rounds``, ``rewind_step``) to a recipe."""
  rounds = args["rounds"]
  if rounds < 2:
    raise ValueError(f"rounds={rounds}: IMP needs at least 2 rounds (dense, then pruned).")
  config.sparsity.method = "imp"
  config.imp = ml_collections.ConfigDict()
  config.imp.num_rounds = rounds
  config.imp.prune_fraction = 1.0 - (1.0 - config.sparsity.final) ** (1.0 / (rounds - 1))
  config.imp.rewind = "weights"  # weights | lr
  config.imp.rewind_step = args["rewind_step"]
  config.imp.scope = "global"  # global | layerwise
  config.imp.reset_optimizer_state = False
  return config


def get_config(arg: str | None = None):
  args = default.parse_args(arg, ARGS)
  return add_imp_fields(default.lenet300_recipe("static", args), args)
