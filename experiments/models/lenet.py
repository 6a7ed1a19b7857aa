"""LeNet-5 for 28x28 MNIST-like inputs.

Layout (the common modern variant: ReLU + max pooling instead of the
original scaled-tanh + trainable subsampling):

  conv 6@5x5 SAME -> relu -> maxpool 2 -> conv 16@5x5 VALID -> relu
  -> maxpool 2 -> dense 120 -> relu -> dense 84 -> relu -> dense classes

The first conv uses SAME padding on the 28x28 input, which reproduces the
original LeNet-5 geometry (VALID conv on MNIST zero-padded to 32x32): the
second conv yields 10x10x16, pooled to 5x5x16 = 400 features, giving the
classic 61,706 parameters for 10 classes. Other input sizes work (the dense
layers infer their fan-in) but change the parameter count.

Parameter paths: ``Conv_0``, ``Conv_1``, ``Dense_0`` (400->120),
``Dense_1`` (120->84), ``Dense_2`` (84->classes). Note the flatten is in
NHWC order, so ``Dense_0`` rows are not in PyTorch's NCHW order.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's nn.Conv2d / nn.Linear default init, U(+-1/sqrt(fan_in)), where fan_in
# includes the receptive field (Flax's variance_scaling does the same).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class LeNet5(nn.Module):
  """LeNet-5 classifier.

  Attributes:
    num_classes: Number of output logits.
    features: Widths of the two convs and two hidden Dense layers (LeNet-5's
      6, 16, 120, 84; smaller ones for a channel-condensed model).
    dtype: Computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
  """

  num_classes: int
  features: Sequence[int] = (6, 16, 120, 84)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No batch norm or dropout; kept for a uniform model interface.
    x = jnp.asarray(x, self.dtype)
    conv = functools.partial(
        nn.Conv, kernel_size=(5, 5), dtype=self.dtype, kernel_init=torch_default_init
    )
    c0, c1, *hidden = self.features
    x = nn.relu(conv(c0, padding='SAME')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(conv(c1, padding='VALID')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=torch_default_init)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_default_init)(x)
    return jnp.asarray(x, jnp.float32)
