"""VGG-16/19 for CIFAR, following the GraSP/GraNet pruning code bases.

Each conv is 3x3 (stride 1, padding 1), without bias, followed by BatchNorm
and ReLU; 'M' is a 2x2 max pool. As in GraNet's CIFAR ``vgg`` model, the
config omits VGG's fifth max pool, so a 32x32 input leaves a 2x2x512 map.
Where that code applies ``AvgPool2d(2)`` and a single ``Linear(512, classes)``,
we take a global average pool: identical on 32x32 inputs, and it also accepts
other resolutions (like PyTorch's AdaptiveAvgPool). There is no dropout and
no hidden fully connected layer.

Note: this is *not* the VGG16 of sparselearning's ``models.py`` ('C'/'D'/
'like' configs), which keeps five pools and a 2-3 layer classifier with
BatchNorm1d.

Parameter paths: convs ``Conv_0 ... Conv_{L-1}`` with ``BatchNorm_i`` after
each, classifier ``Dense_0``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

# Kaiming-normal, fan_out, ReLU gain: the conv init of torchvision and of the
# GraNet/RigL PyTorch models. Flax's fan_out includes the 3x3 receptive field,
# matching torch.nn.init.kaiming_normal_(mode='fan_out').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); zero bias.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

CFGS: dict[int, tuple[Union[int, str], ...]] = {
    16: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
         512, 512, 512, 'M', 512, 512, 512),
    19: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
         512, 512, 512, 512, 'M', 512, 512, 512, 512),
}


class VGG(nn.Module):
  """VGG with BatchNorm and a single linear classifier.

  Attributes:
    cfg: Conv widths in order, with 'M' marking a 2x2 max pool.
    num_classes: Number of output logits.
    dtype: Computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
  """

  cfg: Sequence[Union[int, str]]
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(
        nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False,
        dtype=self.dtype, kernel_init=conv_kernel_init)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype)

    x = jnp.asarray(x, self.dtype)
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.relu(norm()(conv(v)(x)))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init)(x)
    return jnp.asarray(x, jnp.float32)


VGG16 = functools.partial(VGG, cfg=CFGS[16])
VGG19 = functools.partial(VGG, cfg=CFGS[19])
