"""Model registry for the experiment suite.

Every model is a Flax linen module called as ``model.apply(variables, x,
train=...)`` on NHWC float images and returns float32 logits
[B, num_classes]; the ``gpt`` takes int32 tokens [B, L] and returns next-token
logits [B, L, num_classes]. Models with BatchNorm keep running statistics in the
``'batch_stats'`` collection (pass ``mutable=['batch_stats']`` when
``train=True``); dropout draws from the ``'dropout'`` rng.

Example:
  model = get_model('resnet20', num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from experiments.models import lenet, mlp, resnet, vgg
from experiments.models import small_cnn
from experiments.models import transformer

# name -> constructor(num_classes=..., **kwargs) returning an unbound module.
MODELS: dict[str, Callable[..., nn.Module]] = {
    'mlp': mlp.make_mlp,
    'lenet300_100': mlp.lenet300_100,
    'lenet5': lenet.LeNet5,
    'vgg16': vgg.VGG16,
    'vgg19': vgg.VGG19,
    'resnet20': resnet.ResNet20,
    'resnet32': resnet.ResNet32,
    'resnet50_cifar': resnet.ResNet50CIFAR,
    'resnet50': resnet.ResNet50,
    'small_cnn': small_cnn.SmallCNN,
    'vit': transformer.ViT,
    'gpt': transformer.GPT,
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model.

  Args:
    name: Key of ``MODELS``.
    num_classes: Number of output logits.
    **kwargs: Extra constructor arguments for that model (e.g. ``dtype``,
      ``activation``, ``zero_init_residual``).

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: If ``name`` is not registered.
  """
  try:
    constructor = MODELS[name]
  except KeyError:
    raise ValueError(
        f'Unknown model {name!r}; known models: {", ".join(sorted(MODELS))}'
    ) from None
  return constructor(num_classes=num_classes, **kwargs)
