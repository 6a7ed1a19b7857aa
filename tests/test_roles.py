"""Leaf roles and kernel fans on attention models (issue 18, items 1, 2 and 5).

Which leaves are prunable is decided by role (docs/algorithms.md §1): kernels are, biases of any
ndim, normalisation scales/offsets and embeddings are not. ER/ERK and the FLOPs
count read each kernel's fan-in and fan-out from its kind (dense, attention input
or output projection, conv).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax as sj
from experiments.models import get_model
from sparse_jax import _distributions
from sparse_jax import _masks
from tests.test_flax_integration import nnx_train_step

VOCAB, D, HEADS, L = 16, 8, 2, 4  # head_dim = D // HEADS = 4


def _flag_dict(tree):
  """{name: flag} of a tree of Python bools."""
  return dict(zip(sj.leaf_names(tree), jax.tree.leaves(tree)))


def _prunable_names(params, **selector):
  return sorted(n for n, f in _flag_dict(sj.select_prunable(params, **selector)).items()
                if f)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class LinenGPT(nn.Module):
  """A one-block pre-LN transformer with linen's own layer names."""

  @nn.compact
  def __call__(self, tokens):  # int [B, L]
    x = nn.Embed(VOCAB, D)(tokens)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, L, D))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h)
    h = nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(x)))
    x = x + nn.Dense(D)(h)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


class LinenZoo(nn.Module):
  """Every other linen layer kind: convs 2-d and 1-d, norms, DenseGeneral."""

  @nn.compact
  def __call__(self, x):  # [B, 8, 8, 3]
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.GroupNorm(num_groups=2)(x)
    x = nn.Conv(4, (3,))(x.reshape(x.shape[0], 64, 4))
    x = nn.RMSNorm()(x)
    x = nn.DenseGeneral((2, 4))(x)
    x = nn.DenseGeneral(6, axis=(-2, -1))(x)
    return nn.Dense(3)(x)


class NnxGPT(nnx.Module):
  """A miniGPT like Flax's NNX example: Embed, MultiHeadAttention, LayerNorm, Linear."""

  def __init__(self, rngs):
    self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Embed(L, D, rngs=rngs)
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.mlp_in = nnx.Linear(D, 2 * D, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * D, D, rngs=rngs)
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    h = self.ln1(x)
    x = x + self.attn(h, mask=nnx.make_causal_mask(tokens))
    h = self.ln2(x)
    x = x + self.mlp_out(nnx.gelu(self.mlp_in(h)))
    return self.head(self.ln_f(x))


class NnxZoo(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.rms = nnx.RMSNorm(4, rngs=rngs)
    self.general = nnx.LinearGeneral(4, (2, 4), rngs=rngs)
    self.linear = nnx.Linear(4, 3, rngs=rngs)


def _linen_params(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


# NNX MultiHeadAttention and linen MultiHeadDotProductAttention have the same
# projections: q/k/v kernels [D, heads, head_dim], biases [heads, head_dim]; the output
# kernel [heads, head_dim, D], its bias [D].
def _attention_leaves(prefix):
  leaves = {}
  for proj in ("key", "query", "value"):
    leaves[f"{prefix}/{proj}/bias"] = ((HEADS, D // HEADS), False)
    leaves[f"{prefix}/{proj}/kernel"] = ((D, HEADS, D // HEADS), True)
  leaves[f"{prefix}/out/bias"] = ((D,), False)
  leaves[f"{prefix}/out/kernel"] = ((HEADS, D // HEADS, D), True)
  return leaves


def _norm_leaves(*names):
  return {f"{n}/{k}": ((D,), False) for n in names for k in ("bias", "scale")}


# name -> (shape, prunable by default).
LINEN_GPT_LEAVES = {
    "Dense_0/bias": ((4 * D,), False), "Dense_0/kernel": ((D, 4 * D), True),
    "Dense_1/bias": ((D,), False), "Dense_1/kernel": ((4 * D, D), True),
    "Dense_2/bias": ((VOCAB,), False), "Dense_2/kernel": ((D, VOCAB), True),
    "Embed_0/embedding": ((VOCAB, D), False),
    **_norm_leaves("LayerNorm_0", "LayerNorm_1", "LayerNorm_2"),
    **_attention_leaves("MultiHeadDotProductAttention_0"),
    "pos_embedding": ((1, L, D), False),
}

NNX_GPT_LEAVES = {
    **_attention_leaves("attn"),
    "head/bias": ((VOCAB,), False), "head/kernel": ((D, VOCAB), True),
    **_norm_leaves("ln1", "ln2", "ln_f"),
    "mlp_in/bias": ((2 * D,), False), "mlp_in/kernel": ((D, 2 * D), True),
    "mlp_out/bias": ((D,), False), "mlp_out/kernel": ((2 * D, D), True),
    "pos/embedding": ((L, D), False),
    "tok/embedding": ((VOCAB, D), False),
}


# ---------------------------------------------------------------------------
# Roles and the selection rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, role", [
    ("Dense_0/kernel", "kernel"), ("attn/query/kernel", "kernel"),
    ("MultiHeadDotProductAttention_0/value/bias", "bias"), ("LayerNorm_0/bias", "bias"),
    ("BatchNorm_0/scale", "scale"), ("RMSNorm_0/scale", "scale"),
    ("Embed_0/embedding", "embedding"), ("tok/embedding", "embedding"),
    ("pos_embedding", "embedding"), ("encoder/position_embeddings", "embedding"),
    ("positional_embedding", "embedding"), ("token_emb", "embedding"),
    ("posemb", "embedding"), ("PosEmbed", "embedding"), ("cls_token", "embedding"),
    ("cls", "embedding"),
    # Unknown names: custom modules, tuple/list leaves, an output projection.
    ("unembed", "other"), ("w", "other"), ("lora_a", "other"), ("0", "other"),
    ("attn/value/w", "other"), ("negative_slope", "other"), ("my_cls", "other"),
])
def test_leaf_role_by_last_key(name, role):
  assert _masks.leaf_role(name) == role


def test_linen_attention_model_every_leaf():
  params = _linen_params(LinenGPT(), jnp.zeros((2, L), jnp.int32))
  shapes = dict(zip(sj.leaf_names(params), (tuple(x.shape) for x in jax.tree.leaves(params))))
  assert shapes == {n: s for n, (s, _) in LINEN_GPT_LEAVES.items()}
  assert _flag_dict(sj.select_prunable(params)) == {
      n: f for n, (_, f) in LINEN_GPT_LEAVES.items()}


def test_nnx_attention_model_every_leaf():
  state = nnx.state(NnxGPT(nnx.Rngs(0)), nnx.Param)
  shapes = dict(zip(sj.leaf_names(state), (tuple(x.shape) for x in jax.tree.leaves(state))))
  assert shapes == {n: s for n, (s, _) in NNX_GPT_LEAVES.items()}
  assert _flag_dict(sj.select_prunable(state)) == {
      n: f for n, (_, f) in NNX_GPT_LEAVES.items()}


def test_norms_convs_and_dense_general_linen_and_nnx():
  params = _linen_params(LinenZoo(), jnp.zeros((2, 8, 8, 3)))
  # DenseGeneral_0's bias is [2, 4]: a bias whatever its ndim.
  assert _prunable_names(params) == [
      "Conv_0/kernel", "Conv_1/kernel", "DenseGeneral_0/kernel", "DenseGeneral_1/kernel",
      "Dense_0/kernel"]
  assert sj.leaf_names(params) == [
      "BatchNorm_0/bias", "BatchNorm_0/scale", "Conv_0/bias", "Conv_0/kernel",
      "Conv_1/bias", "Conv_1/kernel", "DenseGeneral_0/bias", "DenseGeneral_0/kernel",
      "DenseGeneral_1/bias", "DenseGeneral_1/kernel", "Dense_0/bias", "Dense_0/kernel",
      "GroupNorm_0/bias", "GroupNorm_0/scale", "RMSNorm_0/scale"]
  assert tuple(params["DenseGeneral_0"]["bias"].shape) == (2, 4)
  state = nnx.state(NnxZoo(nnx.Rngs(0)), nnx.Param)
  assert _prunable_names(state) == ["conv/kernel", "general/kernel", "linear/kernel"]
  assert tuple(state["general"]["bias"].shape) == (2, 4)
  assert sorted(sj.leaf_names(state)) == [
      "bn/bias", "bn/scale", "conv/bias", "conv/kernel", "general/bias", "general/kernel",
      "gn/bias", "gn/scale", "linear/bias", "linear/kernel", "rms/scale"]


def test_embeddings_option_include_and_exclude_override_roles():
  params = _linen_params(LinenGPT(), jnp.zeros((2, L), jnp.int32))
  default = _prunable_names(params)
  assert _prunable_names(params, embeddings=True) == sorted(
      default + ["Embed_0/embedding", "pos_embedding"])
  # include decides alone (among ndim >= 2): 2-d attention biases if asked, never the
  # 1-d ones.
  assert _prunable_names(params, include=r".*/bias") == [
      f"MultiHeadDotProductAttention_0/{p}/bias" for p in ("key", "query", "value")]
  assert _prunable_names(params, include=[r"Embed_0/.*", r".*/query/kernel"]) == [
      "Embed_0/embedding", "MultiHeadDotProductAttention_0/query/kernel"]
  assert _prunable_names(params, exclude=r".*Attention_0/.*") == [
      "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
  with pytest.raises(ValueError, match="embeddings=True has no effect with include"):
    sj.select_prunable(params, include=r".*/kernel", embeddings=True)


@pytest.mark.parametrize("factory", ["granet", "gmp", "rigl", "set", "static", "one_shot"])
def test_every_factory_takes_the_embeddings_option(factory):
  params = _linen_params(LinenGPT(), jnp.zeros((2, L), jnp.int32))
  kwargs = {"granet": dict(sparsity=0.5, total_steps=10, end_step=10, update_every=5),
            "gmp": dict(sparsity=0.5, end_step=10, update_every=5),
            "rigl": dict(sparsity=0.5, total_steps=10, update_every=5),
            "set": dict(sparsity=0.5, total_steps=10, update_every=5),
            "static": dict(sparsity=0.5), "one_shot": dict(sparsity=0.5, prune_step=5)}
  for embeddings in (False, True):
    tx = sj.METHODS[factory](optax.sgd(0.1), embeddings=embeddings, **kwargs[factory])
    masks = sj.get_masks(tx.init(params))
    masked = [n for n, m in zip(sj.leaf_names(params),
                                jax.tree.structure(params).flatten_up_to(masks))
              if m is not None]
    assert sorted(masked) == _prunable_names(params, embeddings=embeddings)


def test_unknown_names_fall_back_to_ndim():
  params = {"w": jnp.ones((3, 4)), "lora_a": jnp.ones((8, 2)), "gain": jnp.ones((4,)),
            "cls_token": jnp.ones((1, 1, 8)), "blocks": [jnp.ones((2, 2, 2))]}
  assert _flag_dict(sj.select_prunable(params)) == {
      "blocks/0": True, "cls_token": False, "gain": False, "lora_a": True, "w": True}
  assert _flag_dict(sj.select_prunable(params, exclude="lora_a")) == {
      "blocks/0": True, "cls_token": False, "gain": False, "lora_a": False, "w": True}


def test_only_dense_leaves_is_an_error():
  params = {"Embed_0": {"embedding": jnp.ones((5, 4))}, "q": {"bias": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match="No prunable leaf selected.*embeddings unless"):
    sj.select_prunable(params)
  assert _prunable_names(params, embeddings=True) == ["Embed_0/embedding"]


# The MLPs, CNNs, VGGs and ResNets of experiments/models: their kernels are exactly
# their ndim >= 2 leaves, so selection by role is selection by ndim there.
MODEL_SETUPS = {
    "mlp": ((28, 28, 1), 10, {}),
    "lenet300_100": ((28, 28, 1), 10, {}),
    "lenet5": ((28, 28, 1), 10, {}),
    "vgg16": ((32, 32, 3), 10, {}),
    "vgg19": ((32, 32, 3), 10, {}),
    "resnet20": ((32, 32, 3), 10, {}),
    "resnet32": ((32, 32, 3), 10, {}),
    "resnet50_cifar": ((32, 32, 3), 100, {}),
    "resnet50": ((224, 224, 3), 1000, {}),
    "small_cnn": ((28, 28, 1), 10, {}),
    "mlp_bn_prelu": ((28, 28, 1), 10, {"batch_norm": True, "activation": "prelu"}),
}


def _model_params(name):
  hwc, classes, kwargs = MODEL_SETUPS[name]
  model = get_model(name.split("_bn")[0], num_classes=classes, **kwargs)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *hwc)), train=False))["params"]


@pytest.mark.parametrize("name", sorted(MODEL_SETUPS))
def test_model_zoo_selection_is_ndim_at_least_2(name):
  params = _model_params(name)
  names = sj.leaf_names(params)
  ndims = [x.ndim for x in jax.tree.leaves(params)]
  flags = jax.tree.leaves(sj.select_prunable(params))
  assert flags == [d >= 2 for d in ndims]
  assert flags == [n.endswith("/kernel") for n in names]
  assert any(not f for f in flags)  # the model has dense leaves (biases, norms)


# ERK/ER densities at overall density 0.1 of the pre-issue-18 code (commit 96efca8,
# `erk_densities` of the layer shapes), by layer shape: they must stay bit for bit.
BEFORE = {
    ("lenet300_100", "erk"): {(784, 300): 0.0795677705044282,
                              (300, 100): 0.23018867924528305, (100, 10): 1.0},
    ("lenet5", "erk"): {(5, 5, 1, 6): 0.8035294117647058,
                        (5, 5, 6, 16): 0.09453287197231834,
                        (400, 120): 0.07680795847750865, (120, 84): 0.1434873949579832,
                        (84, 10): 0.7934008897676719},
    ("lenet5", "er"): {(5, 5, 1, 6): 1.0, (5, 5, 6, 16): 1.0,
                       (400, 120): 0.047637530562347194, (120, 84): 0.08899318896262663,
                       (84, 10): 0.49207998602864134},
    ("vgg16", "erk"): {(3, 3, 3, 64): 1.0, (3, 3, 64, 64): 0.6702161222306143,
                       (3, 3, 64, 128): 0.49515967239425984,
                       (3, 3, 128, 128): 0.3276056418366063,
                       (3, 3, 128, 256): 0.24382862655777948,
                       (3, 3, 256, 256): 0.16192721609862792,
                       (3, 3, 256, 512): 0.12097651086905213,
                       (3, 3, 512, 512): 0.08049470684439515, (512, 10): 1.0},
    ("resnet20", "erk"): {(3, 3, 3, 16): 0.9829852773533193,
                          (3, 3, 16, 16): 0.28015080404569603,
                          (3, 3, 16, 32): 0.19905451866404716,
                          (3, 3, 32, 32): 0.12901681765262316, (1, 1, 16, 32): 1.0,
                          (3, 3, 32, 64): 0.09399796714691117,
                          (3, 3, 64, 64): 0.06174376273375537,
                          (1, 1, 32, 64): 0.8128059512115259, (64, 10): 1.0},
    ("resnet20", "er"): {(3, 3, 3, 16): 0.8896512624796039,
                         (3, 3, 16, 16): 0.28094250394092757,
                         (3, 3, 16, 32): 0.21070687795569568,
                         (3, 3, 32, 32): 0.14047125197046378,
                         (1, 1, 16, 32): 0.21070687795569568,
                         (3, 3, 32, 64): 0.10535343897784784,
                         (3, 3, 64, 64): 0.07023562598523189,
                         (1, 1, 32, 64): 0.10535343897784784,
                         (64, 10): 0.25987181614535804},
}


@pytest.mark.parametrize("name, kind", sorted(BEFORE))
def test_model_zoo_erk_densities_unchanged(name, kind):
  params = _model_params(name)
  layers = sj.prunable_layers(params, sj.select_prunable(params))
  got = sj.erk_densities([l.shape for l in layers], 0.1, kind=kind,
                         names=[l.name for l in layers])
  assert got == [BEFORE[name, kind][l.shape] for l in layers]  # exact, not approx


# ---------------------------------------------------------------------------
# Kernel fans
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape, fans", [
    ("Dense_0/kernel", (784, 300), (784, 300, ())),
    ("attn/query/kernel", (8, 2, 4), (8, 8, ())),
    ("MultiHeadDotProductAttention_0/key/kernel", (64, 4, 16), (64, 64, ())),
    ("blocks/3/attn/value/kernel", (32, 2, 8), (32, 16, ())),
    ("attn/out/kernel", (2, 4, 8), (8, 8, ())),
    ("MultiHeadDotProductAttention_0/out/kernel", (4, 16, 10), (64, 10, ())),
    ("Conv_0/kernel", (3, 8, 4), (8, 4, (3,))),
    ("Conv_0/kernel", (3, 3, 2, 4), (2, 4, (3, 3))),
    ("Conv_0/kernel", (2, 3, 3, 2, 4), (2, 4, (2, 3, 3))),
    ("shortcut/kernel", (1, 1, 16, 32), (16, 32, (1, 1))),
    # A 4-d kernel in a module named "query" is a conv; so is a DenseGeneral kernel
    # outside attention, whose name does not say which axes meet the input.
    ("query/kernel", (1, 1, 8, 8), (8, 8, (1, 1))),
    ("DenseGeneral_0/kernel", (4, 2, 4), (2, 4, (4,))),
    # Only kernels are read as attention projections.
    ("attn/query/w", (8, 2, 4), (2, 4, (8,))),
    ("", (5, 5, 6, 16), (6, 16, (5, 5))),
])
def test_kernel_fans_by_hand(name, shape, fans):
  assert tuple(_distributions.kernel_fans(name, shape)) == fans


def test_kernel_fans_of_a_vector_is_an_error():
  with pytest.raises(ValueError, match="'gain' of shape \\(5,\\) has no fan-in/fan-out"):
    _distributions.kernel_fans("gain", (5,))
  layers = [_masks.LayerInfo("gain", (5,), 5), _masks.LayerInfo("w", (5, 4), 20)]
  with pytest.raises(ValueError, match="has no fan-in/fan-out"):
    sj.layer_densities_for(layers, 0.5, "erk")
  assert sj.layer_densities_for(layers, 0.5, "uniform") == [0.5, 0.5]


def test_erk_on_attention_by_hand():
  # q, k, v [8, 2, 4] and out [2, 4, 8]: 8x8 matrices, raw (8 + 8) / 64 = 1/4 under ER
  # and ERK; the dense [8, 16]: 24 / 128 = 3/16. At density 1/2:
  # eps = 192 / (4 * 64 / 4 + 128 * 3 / 16) = 192 / 88, so 6/11 and 9/22.
  names = [f"attn/{p}/kernel" for p in ("key", "out", "query", "value")] + ["mlp/kernel"]
  shapes = [(8, 2, 4), (2, 4, 8), (8, 2, 4), (8, 2, 4), (8, 16)]
  want = [6 / 11] * 4 + [9 / 22]
  for kind in ("erk", "er"):
    assert sj.erk_densities(shapes, 0.5, kind=kind, names=names) == pytest.approx(
        want, rel=1e-12)
  layers = [_masks.LayerInfo(n, s, int(np.prod(s))) for n, s in zip(names, shapes)]
  assert sj.layer_densities_for(layers, 0.5, "erk") == pytest.approx(want, rel=1e-12)
  # Without names, 3-d kernels are read as convs: raw 14 / 64 for all four, so
  # eps = 192 / 80 = 2.4 and the densities are 0.525 and 0.45.
  assert sj.erk_densities(shapes, 0.5) == pytest.approx([0.525] * 4 + [0.45], rel=1e-12)
  with pytest.raises(ValueError, match="got 2 names for 5 shapes"):
    sj.erk_densities(shapes, 0.5, names=names[:2])


def test_flops_of_attention_and_dense_general_by_hand():
  model = LinenGPT()
  variables = model.init(jax.random.key(0), jnp.zeros((2, L), jnp.int32))
  f = sj.model_flops(model, variables, (2, L), count_other=False, input_dtype=jnp.int32)
  # 2 FLOPs per multiply-add, B * L = 8 token rows; every projection is an 8x8 matrix.
  rows = 2 * L
  assert f.layers == {
      "MultiHeadDotProductAttention_0/query/kernel": 2 * rows * 64,
      "MultiHeadDotProductAttention_0/key/kernel": 2 * rows * 64,
      "MultiHeadDotProductAttention_0/value/kernel": 2 * rows * 64,
      "MultiHeadDotProductAttention_0/out/kernel": 2 * rows * 64,
      "Dense_0/kernel": 2 * rows * D * 4 * D, "Dense_1/kernel": 2 * rows * 4 * D * D,
      "Dense_2/kernel": 2 * rows * D * VOCAB}
  # The attention projections agree with their kernel_fans.
  for name, shape in zip(sj.leaf_names(variables["params"]),
                         (x.shape for x in jax.tree.leaves(variables["params"]))):
    if name in f.layers:
      fans = _distributions.kernel_fans(name, shape)
      assert f.layers[name] == 2 * rows * fans.fan_in * fans.fan_out
  # Masks of a sparse method cover the attention kernels, which FLOPs now know.
  tx = sj.static(optax.sgd(0.1), sparsity=0.5, distribution="uniform")
  masks = sj.get_masks(tx.init(variables["params"]))
  assert sj.inference_flops(f, masks) == pytest.approx(0.5 * sum(f.layers.values()))

  zoo = LinenZoo()
  variables = zoo.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
  f = sj.model_flops(zoo, variables, (2, 8, 8, 3), count_other=False)
  # SAME 3-tap convs: 3 * n - 2 taps inside the input along a dim of n outputs.
  assert f.layers == {
      "Conv_0/kernel": 2 * 2 * (3 * 8 - 2) ** 2 * 3 * 4,
      "Conv_1/kernel": 2 * 2 * (3 * 64 - 2) * 4 * 4,
      # 128 rows of 4 -> [2, 4], then [2, 4] -> 6 (its own axes, not the conv reading
      # of the name rule), then 6 -> 3.
      "DenseGeneral_0/kernel": 2 * 128 * 4 * 8,
      "DenseGeneral_1/kernel": 2 * 128 * 8 * 6,
      "Dense_0/kernel": 2 * 128 * 6 * 3}


# ---------------------------------------------------------------------------
# Training the NNX miniGPT through nnx.Optimizer
# ---------------------------------------------------------------------------

# Prunable: q, k, v, out (64 weights each), mlp_in, mlp_out, head (128 each).
PRUNABLE = {f"attn/{p}/kernel": 64 for p in ("key", "out", "query", "value")}
PRUNABLE.update({"head/kernel": 128, "mlp_in/kernel": 128, "mlp_out/kernel": 128})
N = sum(PRUNABLE.values())  # 640


def _train(tx, steps):
  """Trains NnxGPT for ``steps`` updates; yields (t, model, masks) after each."""
  model = NnxGPT(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (4, L + 1), 0, VOCAB)
  train_step, traces = nnx_train_step()
  for t in range(1, steps + 1):
    train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:])
    yield t, model, sj.get_masks(optimizer)
  assert len(traces) == 1


def _check_masked(model, masks):
  """Masks exactly on the prunable kernels, masked weights exactly 0, rest untouched."""
  state = nnx.state(model, nnx.Param)
  params = dict(zip(sj.leaf_names(state), map(np.asarray, jax.tree.leaves(state))))
  mask_leaves = dict(zip(sj.leaf_names(masks), map(np.asarray, jax.tree.leaves(masks))))
  assert sorted(mask_leaves) == sorted(PRUNABLE)
  for name, m in mask_leaves.items():
    assert np.all(params[name][~m] == 0), name
  # Embeddings and the [heads, head_dim] value bias are trained densely: no exact zeros.
  for name in ("tok/embedding", "pos/embedding", "attn/value/bias"):
    assert np.all(params[name] != 0), name
  return {n: int(m.sum()) for n, m in mask_leaves.items()}


def test_rigl_on_nnx_gpt_exact_counts():
  # Uniform 50%: exactly half of every prunable kernel, kept through the updates.
  tx = sj.rigl(optax.adam(1e-2), sparsity=0.5, total_steps=8, update_every=2,
               distribution="uniform")
  first = None
  changed = False
  for _, model, masks in _train(tx, 8):
    counts = _check_masked(model, masks)
    assert counts == {n: size // 2 for n, size in PRUNABLE.items()}
    if first is None:
      first = jax.tree.map(np.asarray, masks)
    changed |= any(np.any(a != np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(first), jax.tree.leaves(masks)))
  assert changed  # RigL did move weights


def test_granet_on_nnx_gpt_exact_counts():
  # Cubic schedule, events at t = 2, 4 (end_step), k0 = 0, kf = 2: at t = 2,
  # s = 0.5 - 0.5 * (1 - 1/2)^3 = 0.4375, so round(0.5625 * 640) = 360 active; at
  # t = 4, s = 0.5: 320. Regeneration at t = 6 keeps each layer's count.
  tx = sj.granet(optax.adam(1e-2), sparsity=0.5, total_steps=8, end_step=4,
                 update_every=2)
  expected = {1: 640, 2: 360, 3: 360, 4: 320, 5: 320, 6: 320, 7: 320, 8: 320}
  per_layer = {}
  for t, model, masks in _train(tx, 8):
    counts = _check_masked(model, masks)
    assert sum(counts.values()) == int(sj.count_active(masks)) == expected[t], t
    per_layer[t] = counts
  assert per_layer[4] == per_layer[6] == per_layer[8]
