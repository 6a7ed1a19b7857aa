"""A small width-scalable CNN, the convolutional family of the SC-SDC study (docs/algorithms.md §8).

  conv 3x3 w SAME -> (BN) -> act -> maxpool 2 -> conv 3x3 2w SAME -> (BN) -> act
  -> maxpool 2 -> (dropout) -> flatten -> dense classes

One width ``w`` sets every layer, so the weight count is a quadratic in ``w``
(18 w^2 + (9 C_in + 2 H W classes / 16) w for an H x W x C_in input) and the
same-capacity dense width can be solved for (``experiments/studies/scsdc.py``). Parameter
paths: ``Conv_0``, ``Conv_1``, ``Dense_0``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments.models import mlp


class SmallCNN(nn.Module):
  """Two conv blocks and a linear classifier, with the MLP's activations.

  Attributes:
    num_classes: Number of output logits.
    width: Channels of the first conv (the second has ``2 * width``).
    activation: Activation name, one of ``mlp.ACTIVATION_NAMES``.
    batch_norm: BatchNorm after each conv, before the activation.
    dropout_rate: Dropout before the classifier; 0 disables it.
    dtype: Computation dtype; params stay float32.
  """

  num_classes: int
  width: int = 32
  activation: str = 'relu'
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, self.dtype)
    for channels in (self.width, 2 * self.width):
      x = nn.Conv(channels, (3, 3), padding='SAME', dtype=self.dtype,
                  kernel_init=mlp.torch_linear_init)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype)(x)
      x = nn.max_pool(mlp.activate(self.activation, x), (2, 2), strides=(2, 2))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=mlp.torch_linear_init)(
        x.reshape((x.shape[0], -1)))
    return jnp.asarray(x, jnp.float32)
