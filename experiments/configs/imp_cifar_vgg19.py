r"""Lottery ticket with weight rewinding: IMP on VGG-19 / CIFAR (the GraNet recipe per round).

  python -m experiments.main --config=experiments/configs/imp_cifar_vgg19.py:dataset=cifar10,sparsity=0.95 \
      --workdir=workdirs/imp_vgg19_cifar10_s95 --config.data_dir=/path/to/tensorflow_datasets

Family argument: ``dataset``, ``sparsity``, ``rounds`` (default 6: dense + 5 prunings
of ``1 - (1 - sparsity) ** (1/5)`` each), ``rewind_step`` (default 1000 iterations:
weight rewinding, which Frankle et al. found necessary for VGG-19 on CIFAR-10),
``seed``, ``smoke`` False (default) | True. Every round is a full 160-epoch run (GPU
territory: 6 x 160 epochs).

Smoke setting (``smoke=True``): the whole road of the rounds on a CPU in about a
minute, as cifar_vgg19.py's (the same synthetic CIFAR and narrow VGG-19, two epochs
of 8 steps a round), with 2 rounds (dense, then one prune to ``sparsity``) and the
weights rewound to step 2; ``rounds`` and ``rewind_step`` are then ignored. It
checks the road, not the accuracy:

  python -m experiments.main --config=experiments/configs/imp_cifar_vgg19.py:dataset=cifar10,smoke=True \
      --workdir=/tmp/imp_vgg19_smoke

Measured on the 2-core CPU: 65 s the first time (the synthetic set prepared, every
program compiled), 25 s once the compilation cache holds the programs.
"""

from experiments.configs import cifar_vgg19
from experiments.configs import default
from experiments.configs import imp_lenet300_mnist5k

SMOKE_ROUNDS, SMOKE_REWIND_STEP = 2, 2


def get_config(arg: str | None = None):
  known = {k: v for k, v in cifar_vgg19.ARGS.items() if k != "method"}
  args = default.parse_args(arg, {**known, "rounds": 6, "rewind_step": 1000},
                            choices={"dataset": cifar_vgg19.DATASETS,
                                     "smoke": cifar_vgg19.SMOKE_CHOICES})
  if args["smoke"] == "True":
    args.update(rounds=SMOKE_ROUNDS, rewind_step=SMOKE_REWIND_STEP)
  config = cifar_vgg19.cifar_recipe("vgg19", {**args, "method": "static"},
                                    cfg=cifar_vgg19.SMOKE_VGG19)
  return imp_lenet300_mnist5k.add_imp_fields(config, args)
