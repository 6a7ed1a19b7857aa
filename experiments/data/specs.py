"""What each data set of the experiment suite is: where it comes from, how it is preprocessed.

One `Spec` per name in `SPECS`; `spec(name)` looks one up and names the known
data sets when it is not there.

Example:
  specs.spec('cifar10').augment  # 'pad_crop_flip'
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.data import bytes_pydoc

Batch = dict[str, np.ndarray]

# Shuffle-buffer cap for data sets too big to shuffle fully in memory. The
# buffer holds encoded images (decoding happens after shuffling).
MAX_SHUFFLE_BUFFER = 50_000

_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to read and preprocess one data set."""
  tfds_name: str
  eval_split: str
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # 'none' (MNIST-like), 'pad_crop_flip' (CIFAR) or 'inception' (ImageNet).
  augment: str
  # Per-example shape after preprocessing.
  input_shape: tuple[int, ...]
  shuffle_buffer: int = MAX_SHUFFLE_BUFFER
  locally_built: bool = False
  # The model input's dtype: 'float32' (images) or 'int32' (token ids).
  input_dtype: str = 'float32'
  # Inputs and targets are bytes (vocabulary 256): bits per byte are reported.
  byte_level: bool = False
  # Prepared as numpy arrays only, without TFDS files: every read is of the .npz.
  arrays_only: bool = False


SPECS = {
    'mnist': Spec('mnist', 'test', 1, _MNIST_MEAN, _MNIST_STD, 'none',
                  (28, 28, 1)),
    'mnist5k': Spec('mnist5k', 'test', 1, _MNIST_MEAN, _MNIST_STD, 'none',
                    (28, 28, 1), locally_built=True),
    'fashion_mnist': Spec('fashion_mnist', 'test', 1, (0.2860,), (0.3530,),
                          'none', (28, 28, 1)),
    # Per-channel statistics of the training sets (std over all pixels).
    'cifar10': Spec('cifar10', 'test', 3, (0.4914, 0.4822, 0.4465),
                    (0.2470, 0.2435, 0.2616), 'pad_crop_flip', (32, 32, 3)),
    'cifar100': Spec('cifar100', 'test', 3, (0.5071, 0.4865, 0.4409),
                     (0.2673, 0.2564, 0.2762), 'pad_crop_flip', (32, 32, 3)),
    # Encoded ImageNet images average ~110 kB, so keep the buffer smaller.
    'imagenet2012': Spec('imagenet2012', 'validation', 3, _IMAGENET_MEAN,
                         _IMAGENET_STD, 'inception', (224, 224, 3),
                         shuffle_buffer=10_000),
    # Byte windows of the Python documentation (experiments/data/bytes_pydoc.py).
    'bytes_pydoc': Spec('bytes_pydoc', 'validation', 0, (), (), 'none',
                        (bytes_pydoc.CONTEXT,), locally_built=True, input_dtype='int32',
                        byte_level=True, arrays_only=True),
}

KNOWN_DATASETS = tuple(sorted(SPECS))


def spec(name: str) -> Spec:
  """The `Spec` of `name`; a `ValueError` naming the known data sets if there is none."""
  if name not in SPECS:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: '
                     f'{", ".join(KNOWN_DATASETS)}.')
  return SPECS[name]
