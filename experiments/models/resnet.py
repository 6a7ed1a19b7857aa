"""ResNets: CIFAR ResNet-20/32, ResNet-50 for CIFAR and ResNet-50 for ImageNet.

* CIFAR ResNet-20/32 (He et al. 2016, Sec. 4.2): 3x3 conv stem with 16
  channels, three stages of n = 3 / 5 BasicBlocks with 16/32/64 channels
  (stride 2 at the start of stages 2 and 3), global average pool, linear.
  Shortcuts are option B: a 1x1 conv + BN projection whenever the shape
  changes, identity otherwise (ResNet-20: 272,474 params for 10 classes).
* ResNet-50 for CIFAR, as in the GraNet/RigL PyTorch CIFAR code: a 3x3
  stride-1 stem with 64 channels and no max pool, then the ImageNet
  Bottleneck stages [3, 4, 6, 3] (strides 1, 2, 2, 2).
* ResNet-50 for ImageNet: 7x7 stride-2 stem + 3x3 stride-2 max pool, then
  Bottleneck stages [3, 4, 6, 3]. The stride sits on the 3x3 conv (the
  torchvision "v1.5" layout), giving torchvision's 25,557,032 params.

All convs are bias-free and followed by BatchNorm. Padding is explicit and
symmetric as in PyTorch (Flax's 'SAME' pads stride-2 convs asymmetrically).

Parameter paths are named: ``stem_conv``, ``stem_bn``, blocks
``stage{s}_block{b}`` (1-based) containing ``conv1/bn1, conv2/bn2[, conv3/bn3]``
and, where the shape changes, ``proj_conv/proj_bn``; the classifier is
``head``. E.g. ``params/stage2_block1/conv1/kernel``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# Kaiming-normal, fan_out, ReLU gain: the conv init of torchvision and the
# GraNet/RigL PyTorch ResNets. Flax's fan_out includes the receptive field,
# matching torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); zero bias.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style symmetric 'same' padding for an odd kernel size."""
  p = kernel // 2
  return ((p, p), (p, p))


class _ResidualBlock(nn.Module):
  """What every residual block is built with; subclasses define ``__call__``.

  Attributes:
    features: Output channels (BasicBlock); the bottleneck width (Bottleneck,
      which outputs ``4 * features`` channels).
    strides: Stride of the strided conv (and of the projection shortcut).
    conv: Conv constructor (bias-free, with the model's dtype and init).
    norm: BatchNorm constructor (with train/eval mode bound).
    zero_init_residual: Init the last BN scale to zero so the block starts as
      identity (Goyal et al. 2017).
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  def _close(self, x, y, bn_name: str):
    """The last BN of the residual branch ``y``, plus the shortcut of ``x``, ReLU.

    Called inside the subclass's compact ``__call__``, so the BN and the
    projection become that block's children.
    """
    y = self.norm(
        name=bn_name,
        scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones,
    )(y)
    return nn.relu(y + _shortcut(x, y, self.strides, self.conv, self.norm))


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs with a residual connection (ResNet-18/34, CIFAR ResNets).

  The first conv carries the stride.
  """

  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, _pad(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), 1, _pad(3), name='conv2')(y)
    return self._close(x, y, 'bn2')


class Bottleneck(_ResidualBlock):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with a residual connection."""

  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (1, 1), 1, 0, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), self.strides, _pad(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.features * self.expansion, (1, 1), 1, 0, name='conv3')(y)
    return self._close(x, y, 'bn3')


def _shortcut(x, y, strides: int, conv: Callable[..., nn.Module],
              norm: Callable[..., nn.Module]):
  """Identity, or a 1x1 conv + BN projection (option B) when shapes differ.

  Called inside a block's compact ``__call__``, so the projection layers
  become that block's children.
  """
  if x.shape == y.shape:
    return x
  x = conv(y.shape[-1], (1, 1), strides, 0, name='proj_conv')(x)
  return norm(name='proj_bn')(x)


class ResNet(nn.Module):
  """Generic ResNet; see the module docstring for the concrete variants.

  Attributes:
    stage_sizes: Number of blocks per stage.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_classes: Number of output logits.
    num_filters: Stem width and width of the first stage; each later stage
      doubles it (Bottleneck stages output 4x this width).
    imagenet_stem: 7x7/2 conv + 3x3/2 max pool stem if True, else a 3x3/1
      conv stem without pooling (CIFAR).
    zero_init_residual: Zero-init the last BN scale of each block.
    dtype: Computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  imagenet_stem: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype)

    x = jnp.asarray(x, self.dtype)
    if self.imagenet_stem:
      x = conv(self.num_filters, (7, 7), 2, _pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    else:
      x = conv(self.num_filters, (3, 3), 1, _pad(3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            features=self.num_filters * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            conv=conv,
            norm=norm,
            zero_init_residual=self.zero_init_residual,
            name=f'stage{i + 1}_block{j + 1}',
        )(x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=dense_kernel_init, name='head')(x)
    return jnp.asarray(x, jnp.float32)


ResNet20 = functools.partial(
    ResNet, stage_sizes=(3, 3, 3), block_cls=BasicBlock, num_filters=16)
ResNet32 = functools.partial(
    ResNet, stage_sizes=(5, 5, 5), block_cls=BasicBlock, num_filters=16)
ResNet50CIFAR = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, num_filters=64)
ResNet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, num_filters=64,
    imagenet_stem=True)
