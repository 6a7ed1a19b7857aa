"""Tests for the experiment-suite model zoo (experiments/models).

Big models are only shape-checked through jax.eval_shape (no FLOPs); only the
small MLP/LeNet models are actually run.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from experiments.models import MODELS, get_model
from experiments.models import mlp as mlp_lib

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
IMAGENET = (224, 224, 3)

# (input HWC, num_classes) per registered model.
SETUPS = {
    'mlp': (MNIST, 10),
    'lenet300_100': (MNIST, 10),
    'lenet5': (MNIST, 10),
    'vgg16': (CIFAR, 10),
    'vgg19': (CIFAR, 10),
    'resnet20': (CIFAR, 10),
    'resnet32': (CIFAR, 10),
    'resnet50_cifar': (CIFAR, 100),
    'resnet50': (IMAGENET, 1000),
    'small_cnn': (MNIST, 10),
    'vit': (MNIST, 10),
    'gpt': ((64,), 256),  # int32 tokens [B, 64] -> logits [B, 64, 256]
}
# Models of token inputs and per-position logits.
TOKEN_MODELS = ('gpt',)


# ---------------------------------------------------------------------------
# Independent, hand-written parameter counts (learnable params only: conv and
# dense kernels/biases, BN scale/bias; running statistics excluded).
# ---------------------------------------------------------------------------


def _dense(n_in, n_out):
  return n_in * n_out + n_out


def _conv_bn(k, c_in, c_out):
  """Bias-free k x k conv followed by BN (scale + bias)."""
  return k * k * c_in * c_out + 2 * c_out


def cifar_resnet_params(n, num_classes):
  """He et al. CIFAR ResNet-(6n+2), option-B projections with BN."""
  total = _conv_bn(3, 3, 16)  # stem
  c_in = 16
  for width in (16, 32, 64):
    for block in range(n):
      total += _conv_bn(3, c_in if block == 0 else width, width)
      total += _conv_bn(3, width, width)
      if block == 0 and c_in != width:
        total += _conv_bn(1, c_in, width)
    c_in = width
  return total + _dense(64, num_classes)


def vgg_params(convs, num_classes):
  """convs: list of (c_in, c_out) 3x3 bias-free conv + BN layers."""
  return sum(_conv_bn(3, a, b) for a, b in convs) + _dense(512, num_classes)


VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256),
               (256, 256), (256, 256), (256, 512), (512, 512), (512, 512),
               (512, 512), (512, 512), (512, 512)]
VGG19_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256),
               (256, 256), (256, 256), (256, 256), (256, 512), (512, 512),
               (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
               (512, 512)]
RESNET50_IMAGENET = 25_557_032  # torchvision resnet50 parameter count


def transformer_block_params(width, mlp):
  """Two LayerNorms, q/k/v/out projections with biases, a 2-layer MLP."""
  return 2 * 2 * width + 4 * _dense(width, width) + _dense(width, mlp) + _dense(mlp, width)


EXPECTED_PARAMS = {
    'mlp': _dense(784, 300) + _dense(300, 100) + _dense(100, 10),
    'lenet300_100': 266_610,
    # conv 1->6 5x5, conv 6->16 5x5, 400->120->84->10.
    'lenet5': (25 * 6 + 6) + (25 * 6 * 16 + 16) + _dense(400, 120)
              + _dense(120, 84) + _dense(84, 10),
    'vgg16': vgg_params(VGG16_CONVS, 10),
    'vgg19': vgg_params(VGG19_CONVS, 10),
    'resnet20': 272_474,
    'resnet32': cifar_resnet_params(5, 10),
    # ImageNet ResNet-50 with a 3x3x3x64 stem instead of 7x7x3x64 and a
    # 2048 -> 100 classifier instead of 2048 -> 1000.
    'resnet50_cifar': RESNET50_IMAGENET - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64
                      - _dense(2048, 1000) + _dense(2048, 100),
    'resnet50': RESNET50_IMAGENET,
    # width 32: conv 1->32 3x3 (+bias), conv 32->64 3x3 (+bias), two 2x2 pools
    # leave 7x7x64 = 3136 features -> 10.
    'small_cnn': (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + _dense(7 * 7 * 64, 10),
    # patch 4 conv 1->64 (+bias), class token, 50 x 64 position embedding, 4 blocks
    # of width 64 / MLP 128, final LayerNorm, 64 -> 10 head.
    'vit': (16 * 64 + 64) + 64 + 50 * 64 + 4 * transformer_block_params(64, 128)
           + 2 * 64 + _dense(64, 10),
    # 256 x 128 token and 64 x 128 position embeddings, 2 blocks of width 128 /
    # MLP 512, final LayerNorm, 128 -> 256 head.
    'gpt': 256 * 128 + 64 * 128 + 2 * transformer_block_params(128, 512) + 2 * 128
           + _dense(128, 256),
}


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_init(model, input_shape, batch=2, dtype=jnp.float32):
  x = jax.ShapeDtypeStruct((batch, *input_shape), dtype)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, x


def test_hand_formulas_agree_with_known_values():
  assert cifar_resnet_params(3, 10) == 272_474
  assert EXPECTED_PARAMS['lenet5'] == 61_706
  assert EXPECTED_PARAMS['mlp'] == 266_610
  assert transformer_block_params(64, 128) == 33_472


def test_every_model_has_a_setup():
  assert set(SETUPS) == set(MODELS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize('name', sorted(SETUPS))
def test_shapes_and_param_counts(name):
  input_shape, num_classes = SETUPS[name]
  model = get_model(name, num_classes=num_classes)
  tokens = name in TOKEN_MODELS
  variables, x = abstract_init(model, input_shape, dtype=jnp.int32 if tokens else jnp.float32)
  out_shape = (2, *input_shape, num_classes) if tokens else (2, num_classes)

  assert count(variables['params']) == EXPECTED_PARAMS[name]

  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == out_shape
  assert logits.dtype == jnp.float32

  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}),
      variables, x)
  assert logits.shape == out_shape
  has_bn = 'batch_stats' in variables
  assert has_bn == name.startswith(('vgg', 'resnet'))
  if has_bn:
    assert (jax.tree.structure(updates['batch_stats'])
            == jax.tree.structure(variables['batch_stats']))


@pytest.mark.parametrize('name', ['vgg16', 'resnet20', 'resnet50'])
def test_convs_have_no_bias(name):
  input_shape, num_classes = SETUPS[name]
  variables, _ = abstract_init(get_model(name, num_classes), input_shape)
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  conv_kernels = [k for k, v in flat.items() if len(v.shape) == 4]
  assert conv_kernels
  for k in conv_kernels:
    assert k.replace('kernel', 'bias') not in flat


def test_param_paths():
  v, _ = abstract_init(get_model('lenet300_100', 10), MNIST)
  flat = traverse_util.flatten_dict(v['params'], sep='/')
  assert {k: s.shape for k, s in flat.items()} == {
      'Dense_0/kernel': (784, 300), 'Dense_0/bias': (300,),
      'Dense_1/kernel': (300, 100), 'Dense_1/bias': (100,),
      'Dense_2/kernel': (100, 10), 'Dense_2/bias': (10,)}

  v, _ = abstract_init(get_model('resnet20', 10), CIFAR)
  p = v['params']
  assert p['stem_conv']['kernel'].shape == (3, 3, 3, 16)
  assert 'proj_conv' not in p['stage1_block1']  # identity shortcut
  assert p['stage2_block1']['proj_conv']['kernel'].shape == (1, 1, 16, 32)
  assert p['head']['kernel'].shape == (64, 10)

  v, _ = abstract_init(get_model('resnet50', 1000), IMAGENET)
  p = v['params']
  assert p['stem_conv']['kernel'].shape == (7, 7, 3, 64)
  assert p['stage1_block1']['proj_conv']['kernel'].shape == (1, 1, 64, 256)
  assert p['stage4_block3']['conv3']['kernel'].shape == (1, 1, 512, 2048)


def test_bfloat16_compute():
  model = get_model('resnet20', 10, dtype=jnp.bfloat16)
  variables, x = abstract_init(model, CIFAR)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.dtype == jnp.float32  # logits are cast back for the loss

  model = get_model('mlp', 10, dtype=jnp.bfloat16, batch_norm=True)
  x = jnp.ones((4, *MNIST))
  variables = model.init(jax.random.key(0), x, train=False)
  out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_unknown_model():
  with pytest.raises(ValueError, match=r"'nope'.*resnet20"):
    get_model('nope', 10)


def test_mlp_width_depth_and_activations():
  model = get_model('mlp', 10, width=32, depth=3)
  assert model.features == (32, 32, 32)
  with pytest.raises(ValueError):
    get_model('mlp', 10, width=32)
  with pytest.raises(ValueError):
    get_model('mlp', 10, features=(8,), width=8, depth=1)

  x = jax.random.normal(jax.random.key(0), (4, *MNIST))
  for act in mlp_lib.ACTIVATION_NAMES:
    model = get_model('mlp', 10, features=(8,), activation=act)
    variables = model.init(jax.random.key(0), x, train=False)
    assert bool(jnp.all(jnp.isfinite(model.apply(variables, x, train=False))))
  with pytest.raises(ValueError, match='activation'):
    model = get_model('mlp', 10, activation='sigmoidish')
    model.init(jax.random.key(0), x, train=False)


def test_prelu_slope_is_learnable():
  model = get_model('mlp', 10, features=(16, 8), activation='prelu')
  x = jax.random.normal(jax.random.key(0), (4, *MNIST))
  params = model.init(jax.random.key(1), x, train=False)['params']
  for i in range(2):
    slope = params[f'PReLU_{i}']['negative_slope']
    assert slope.shape == () and float(slope) == pytest.approx(0.25)

  def loss(p):
    return model.apply({'params': p}, x, train=False).sum()

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads['PReLU_0']['negative_slope'])) > 0


def test_dropout_only_in_train_mode():
  model = get_model('mlp', 10, features=(64,), dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (4, *MNIST))
  variables = model.init(jax.random.key(1), x, train=False)
  train = lambda seed: model.apply(variables, x, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(2), train(3))
  np.testing.assert_array_equal(train(2), train(2))
  eval_a = model.apply(variables, x, train=False)  # no rng needed
  eval_b = model.apply(variables, x, train=False,
                       rngs={'dropout': jax.random.key(4)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train(2))


def test_batch_norm_updates_running_stats_in_train_mode_only():
  model = get_model('mlp', 10, features=(16,), batch_norm=True)
  x = jax.random.normal(jax.random.key(0), (8, *MNIST))
  variables = model.init(jax.random.key(1), x, train=False)
  stats = variables['batch_stats']['BatchNorm_0']
  np.testing.assert_array_equal(stats['mean'], 0.0)
  np.testing.assert_array_equal(stats['var'], 1.0)

  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  new = updates['batch_stats']['BatchNorm_0']
  dense = variables['params']['Dense_0']
  h = x.reshape(8, -1) @ dense['kernel'] + dense['bias']
  # momentum 0.9: running = 0.9 * running + 0.1 * batch statistic.
  np.testing.assert_allclose(new['mean'], 0.1 * h.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new['var'], 0.9 + 0.1 * h.var(0), rtol=1e-4)

  # Eval mode uses running statistics: each example is processed
  # independently of the rest of the batch, and nothing is mutated.
  full = model.apply(variables, x, train=False)
  single = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)


def test_resnet_init_choices():
  model = get_model('resnet20', 10, zero_init_residual=True)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1, *CIFAR)))
  p = variables['params']
  np.testing.assert_array_equal(p['stage1_block1']['bn2']['scale'], 0.0)
  np.testing.assert_array_equal(p['stage1_block1']['bn1']['scale'], 1.0)
  np.testing.assert_array_equal(p['stage2_block1']['proj_bn']['scale'], 1.0)
  # Kaiming normal, fan_out mode: std = sqrt(2 / (3 * 3 * 64)).
  kernel = p['stage3_block2']['conv1']['kernel']
  assert float(kernel.std()) == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)


@pytest.mark.parametrize('name', ['mlp', 'lenet5'])
def test_forward_backward_steps(name):
  input_shape, num_classes = SETUPS[name]
  model = get_model(name, num_classes)
  x = jax.random.normal(jax.random.key(0), (4, *input_shape))
  y = jnp.arange(4) % num_classes
  params = model.init(jax.random.key(1), x, train=False)['params']
  tx = optax.sgd(0.1)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, x, train=True, rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  losses = []
  for i in range(3):
    params, opt_state, loss, grads = step(params, opt_state, jax.random.key(i))
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    losses.append(float(loss))
  assert losses[-1] < losses[0]  # memorising 4 examples must make progress
