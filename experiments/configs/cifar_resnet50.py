r"""ResNet-50 (CIFAR stem) on CIFAR-10/100 with the GraNet paper's recipe (docs/algorithms.md §6).

  python -m experiments.main --config=experiments/configs/cifar_resnet50.py:dataset=cifar100,sparsity=0.9 \
      --workdir=workdirs/resnet50_cifar100_s90 --config.data_dir=/path/to/tensorflow_datasets

Family argument: ``dataset`` cifar10 | cifar100, ``sparsity`` 0.9 | 0.95 | 0.98,
``method`` granet | granet_st | gmp | rigl | set | static | dense, ``seed``,
``smoke`` False (default) | True.
Same recipe as cifar_vgg19.py.
Reference accuracies: the GraNet paper, Table 1 (a full run needs a GPU).

Smoke setting (``smoke=True``): the whole road on a CPU in about a minute, as
cifar_vgg19.py's (the same synthetic CIFAR, two epochs of 8 steps, the same
schedule shape); it checks the road, not the accuracy:

  python -m experiments.main --config=experiments/configs/cifar_resnet50.py:dataset=cifar100,smoke=True \
      --workdir=/tmp/resnet50_smoke

The model is ResNet-50's bottleneck blocks at 4 filters (stage widths 4 .. 32,
outputs 16 .. 128) with one block a stage instead of 3, 4, 6, 3 (14 convs instead of
53): with all 53 the first run takes ~100 s here (the mask-update step alone
compiles for ~65 s). Measured on the 2-core CPU: 59 s the first time (the synthetic
set prepared, every program compiled), 20 s once the compilation cache holds the
programs.
"""

from experiments.configs import cifar_vgg19

# The smoke setting's model: ResNet-50's blocks, narrow, one a stage.
SMOKE_RESNET50 = {"num_filters": 4, "stage_sizes": (1, 1, 1, 1)}


def get_config(arg: str | None = None):
  return cifar_vgg19.cifar_config("resnet50_cifar", arg, **SMOKE_RESNET50)
