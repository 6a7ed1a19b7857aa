"""Multi-layer perceptrons, including LeNet-300-100.

The MLP flattens its input, so it accepts NHWC images (e.g. MNIST
[B, 28, 28, 1]) as well as already-flat [B, D] features.

Parameter paths use Flax auto-names in layer order: hidden layers are
``Dense_0 ... Dense_{n-1}`` and the classifier is ``Dense_n`` (so for
LeNet-300-100: ``params/Dense_0/kernel`` [784, 300], ``params/Dense_1/kernel``
[300, 100], ``params/Dense_2/kernel`` [100, 10]). Optional batch norm layers
are ``BatchNorm_i`` and PReLU slopes are ``PReLU_i/negative_slope``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's nn.Linear default (kaiming_uniform with a=sqrt(5)) is exactly
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in). We use it so
# results are comparable with the PyTorch sparse-training code bases. Biases
# stay at Flax's zero init (PyTorch draws them from the same uniform; the
# difference is immaterial for training and keeps init independent of fan-in).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class PReLU(nn.Module):
  """Parametric ReLU with one learnable scalar slope per layer.

  Mirrors ``torch.nn.PReLU()`` (num_parameters=1, init 0.25). Flax ships an
  ``nn.PReLU`` too, but its default slope init is 0.01; we keep our own so the
  PyTorch default is explicit.

  Attributes:
    negative_slope_init: Initial value of the slope for negative inputs.
    param_dtype: dtype of the slope parameter.
  """

  negative_slope_init: float = 0.25
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    slope = self.param(
        'negative_slope',
        lambda _, shape, dtype: jnp.full(shape, self.negative_slope_init, dtype),
        (),
        self.param_dtype,
    )
    return jnp.where(x >= 0, x, jnp.asarray(slope, x.dtype) * x)


# Stateless activations by name. PyTorch defaults are used where JAX's differ:
# leaky_relu slope 0.01 (same in both), and exact (erf) GELU rather than JAX's
# default tanh approximation.
_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    'relu': nn.relu,
    'leaky_relu': functools.partial(nn.leaky_relu, negative_slope=0.01),
    'swish': nn.swish,
    'silu': nn.silu,
    'selu': nn.selu,
    'tanh': jnp.tanh,
    'gelu': functools.partial(nn.gelu, approximate=False),
}
ACTIVATION_NAMES = tuple(sorted((*_ACTIVATIONS, 'prelu')))


def activate(name: str, x):
  """Applies the activation ``name``; call inside a compact module ('prelu' has a param)."""
  if name == 'prelu':
    return PReLU()(x)
  try:
    return _ACTIVATIONS[name](x)
  except KeyError:
    raise ValueError(f'Unknown activation {name!r}; known: {ACTIVATION_NAMES}') from None


class MLP(nn.Module):
  """Fully connected classifier: [Dense -> (BatchNorm) -> act -> (Dropout)]* -> Dense.

  Attributes:
    num_classes: Number of output logits.
    features: Widths of the hidden layers, input to output.
    activation: Activation name, one of ``ACTIVATION_NAMES``. ``'prelu'``
      creates a learnable scalar slope per hidden layer.
    batch_norm: Insert BatchNorm after each hidden Dense (before the
      activation, as in the usual Dense-BN-ReLU ordering).
    dropout_rate: Dropout rate after each hidden activation; 0 disables it.
    dtype: Computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
  """

  num_classes: int
  features: Sequence[int] = (300, 100)
  activation: str = 'relu'
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def _activate(self, x):
    return activate(self.activation, x)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.Dense(width, dtype=self.dtype, kernel_init=torch_linear_init)(x)
      if self.batch_norm:
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )(x)
      x = self._activate(x)
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_init)(x)
    # Loss/softmax are computed in float32 even under bfloat16 compute.
    return jnp.asarray(x, jnp.float32)


def make_mlp(
    num_classes: int,
    features: Optional[Sequence[int]] = None,
    *,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    **kwargs,
) -> MLP:
  """Builds an MLP from explicit hidden widths or from ``width`` x ``depth``.

  Args:
    num_classes: Number of output logits.
    features: Hidden layer widths. Mutually exclusive with width/depth.
    width: Width of every hidden layer (requires ``depth``).
    depth: Number of hidden layers (requires ``width``).
    **kwargs: Other ``MLP`` fields (activation, batch_norm, dropout_rate,
      dtype).

  Returns:
    An unbound ``MLP`` module. With no size arguments it is LeNet-300-100
    shaped (features=(300, 100)).
  """
  if (width is None) != (depth is None):
    raise ValueError('width and depth must be given together')
  if width is not None:
    if features is not None:
      raise ValueError('give either features or width/depth, not both')
    features = (width,) * depth
  if features is not None:
    kwargs['features'] = tuple(features)
  return MLP(num_classes=num_classes, **kwargs)


def lenet300_100(num_classes: int, **kwargs) -> MLP:
  """LeNet-300-100 (LeCun et al. 1998): 784-300-100-classes with ReLU."""
  return MLP(num_classes=num_classes, features=(300, 100), **kwargs)
