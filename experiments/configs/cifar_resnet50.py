r"""ResNet-50 (CIFAR stem) on CIFAR-10/100 with the GraNet paper's recipe (docs/algorithms.md §6).

  python -m experiments.main --config=experiments/configs/cifar_resnet50.py:dataset=cifar100,sparsity=0.9 \
      --workdir=workdirs/resnet50_cifar100_s90 --config.data_dir=/path/to/tensorflow_datasets

Family argument: ``dataset`` cifar10 | cifar100, ``sparsity`` 0.9 | 0.95 | 0.98,
``method`` granet | granet_st | gmp | rigl | set | static | dense, ``seed``.
Same recipe as cifar_vgg19.py.
Reference accuracies: the GraNet paper, Table 1 (a full run needs a GPU).
"""

from experiments.configs import cifar_vgg19


def get_config(arg: str | None = None):
  return cifar_vgg19.cifar_config("resnet50_cifar", arg)
