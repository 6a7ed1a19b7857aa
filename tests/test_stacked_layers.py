"""Stacked layers (scan over layers): a [L, ...] leaf is L layers for every rule.

The reference is the same model with its layers unstacked into separate leaves, in
the same order: for the same seed and the same gradients, every mask must be equal
slice by slice (start masks, every event, every method and structure), and the
per-layer densities ERK gives must be those of the unstacked layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax

L = 3
LAYERS = {"blocks/.*": 1}


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"blocks": {"w1": jax.random.normal(k[0], (L, 16, 32)),
                     "w2": jax.random.normal(k[1], (L, 32, 16))},
          "head": {"kernel": jax.random.normal(k[2], (16, 10))}}


def _unstacked(params):
  # Keys "0".."2" flatten in layer order, as the stacked leaf's slices do.
  return {"blocks": {n: {str(i): params["blocks"][n][i] for i in range(L)}
                     for n in ("w1", "w2")}, "head": params["head"]}


def _train(factory, stacked: bool, steps=7, **kw):
  """Masks of a run on the stacked model (or its unstacked twin), same gradients."""
  tx = factory(optax.sgd(0.1, momentum=0.9), layer_axes=LAYERS if stacked else None, **kw)
  convert = (lambda tree: tree) if stacked else _unstacked
  params = convert(_params())
  state = tx.init(params)
  masks = [sparse_jax.unpack_masks(sparse_jax.get_masks(state))]
  update = jax.jit(tx.update)
  for t in range(steps):
    keys = jax.random.split(jax.random.PRNGKey(100 + t), 3)
    grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), _params(),
                         {"blocks": {"w1": keys[0], "w2": keys[1]}, "head": {"kernel": keys[2]}})
    updates, state = update(convert(grads), state, params)
    params = optax.apply_updates(params, updates)
    masks.append(sparse_jax.unpack_masks(sparse_jax.get_masks(state)))
  return masks


def _assert_same(stacked, unstacked):
  for n in ("w1", "w2"):
    for i in range(L):
      np.testing.assert_array_equal(stacked["blocks"][n][i], unstacked["blocks"][n][str(i)],
                                    err_msg=f"{n}[{i}]")
  np.testing.assert_array_equal(stacked["head"]["kernel"], unstacked["head"]["kernel"])


DYNAMIC = dict(total_steps=10, update_every=3)
CASES = {
    "granet_global": (sparse_jax.granet, dict(sparsity=0.9, end_step=6, **DYNAMIC)),
    "granet_layerwise": (sparse_jax.granet, dict(sparsity=0.9, end_step=6, scope="layerwise",
                                                 **DYNAMIC)),
    "gmp_packed": (sparse_jax.gmp, dict(sparsity=0.9, end_step=6, update_every=3,
                                        packed_masks=True)),
    "rigl_momentum": (sparse_jax.rigl, dict(sparsity=0.8, growth="momentum", **DYNAMIC)),
    "set": (sparse_jax.sparse_evolutionary_training, dict(sparsity=0.8, **DYNAMIC)),
    "static_uniform": (sparse_jax.static, dict(sparsity=0.7, distribution="uniform")),
    "set_2of4": (sparse_jax.sparse_evolutionary_training,
                 dict(structure=sparse_jax.NM(2, 4), **DYNAMIC)),
    "rigl_channels": (sparse_jax.rigl, dict(sparsity=0.5, structure=sparse_jax.Channels(),
                                            **DYNAMIC)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_masks_equal_unstacked_slice_by_slice(case):
  factory, kw = CASES[case]
  stacked = _train(factory, True, **kw)
  unstacked = _train(factory, False, **kw)
  for a, b in zip(stacked, unstacked):
    _assert_same(a, b)
  # Some event changed the masks (the comparison is not of start masks only).
  changed = [not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stacked[0]),
                                                         jax.tree.leaves(m)))
             for m in stacked[1:]]
  assert any(changed) or case.startswith("static")


def test_chunked_passes_read_layer_slices():
  """Layers larger than a chunk go through the chunk loops as slices of the stack."""
  chunk = sparse_jax.get_chunk_elements()
  sparse_jax.set_chunk_elements(64)  # a 16x32 layer in 8 chunks
  try:
    test_stacked_masks_equal_unstacked_slice_by_slice("granet_global")
  finally:
    sparse_jax.set_chunk_elements(chunk)


def test_erk_reads_each_layer_not_a_conv():
  """The bug: a [L, in, out] kernel was read as a conv [L(spatial), in, out]."""
  params = _params()
  tx = sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes=LAYERS)
  got = sparse_jax.layer_densities(sparse_jax.get_masks(tx.init(params)), LAYERS)
  ref = sparse_jax.erk_densities([(16, 32)] * L + [(32, 16)] * L + [(16, 10)], 0.1)
  expected = [float(d) for d in got.values()]
  np.testing.assert_allclose(expected, ref, atol=1.5 / (16 * 10))
  assert list(got) == [f"blocks/w1[{i}]" for i in range(L)] + [
      f"blocks/w2[{i}]" for i in range(L)] + ["head/kernel"]
  # Without layer_axes the stacked leaf is one conv-like layer: other densities.
  plain = sparse_jax.layer_densities(sparse_jax.get_masks(
      sparse_jax.static(optax.sgd(0.1), sparsity=0.9).init(params)))
  assert abs(float(plain["blocks/w1"]) - ref[0]) > 0.01


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(32, kernel_init=nn.with_partitioning(init, ("embed", "mlp")),
                 name="mlp_in")(x)
    out = nn.Dense(16, kernel_init=nn.with_partitioning(init, ("mlp", "embed")),
                   name="mlp_out")(nn.relu(h))
    return x + out, None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L, metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks")(x, None)
    return nn.Dense(10, name="head")(x)


def test_linen_scan_metadata_is_detected():
  boxed = _Scanned().init(jax.random.PRNGKey(0), jnp.zeros((2, 16)))["params"]
  found = sparse_jax.layer_axes_of(boxed)
  assert found == {"blocks/mlp_in/kernel": 1, "blocks/mlp_out/kernel": 1}
  params = nn.unbox(boxed)
  by_name = sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes=found)
  by_regex = sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes=r"blocks/.*/kernel")
  a = sparse_jax.get_masks(by_name.init(params))
  b = sparse_jax.get_masks(by_regex.init(params))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  dens = sparse_jax.layer_densities(a, found)
  assert "blocks/mlp_in/kernel[2]" in dens


class _NBlock(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.mlp_in = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                             rngs=rngs)
    self.mlp_out = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                              rngs=rngs)


class _NModel(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return _NBlock(rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)


def test_nnx_vmap_metadata_is_detected_at_init_and_used_at_events():
  mesh = jax.make_mesh((1, 1, 1), ("layers", "embed", "mlp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    model = _NModel(nnx.Rngs(0))
    auto = nnx.Optimizer(model, sparse_jax.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=10,
                                               update_every=2), wrt=nnx.Param)
  explicit = sparse_jax.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=10, update_every=2,
                             layer_axes=r"blocks/.*/kernel")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = explicit.init(params)
  _assert_masks_equal(sparse_jax.get_masks(auto.opt_state), sparse_jax.get_masks(state))
  # An event after init: updates get plain arrays, the detected axes still count.
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  for _ in range(2):
    updates, state = explicit.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    pure = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(pure, grads)
    with jax.set_mesh(mesh):
      auto.update(model, pure)
  _assert_masks_equal(sparse_jax.get_masks(auto.opt_state), sparse_jax.get_masks(state))
  dens = sparse_jax.layer_densities(sparse_jax.get_masks(state), r"blocks/.*/kernel")
  assert len(dens) == 2 * L + 1


def _assert_masks_equal(a, b):
  a = nnx.to_pure_dict(a) if isinstance(a, nnx.State) else a
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bad_layer_axes_are_named_at_init():
  params = _params()
  with pytest.raises(ValueError, match=r"'nothing/.\*' matches no prunable leaf"):
    sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes={"nothing/.*": 1}).init(params)
  with pytest.raises(ValueError, match=r"blocks/w1.*no axis left after 3 leading layer axes"):
    sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes={"blocks/w1": 3}).init(params)
  with pytest.raises(ValueError, match=r"positive int"):
    sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes={"blocks/.*": 0})
  with pytest.raises(TypeError, match=r"regex or a mapping"):
    sparse_jax.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=10, update_every=2,
                    layer_axes=1)
  with pytest.raises(ValueError, match=r"not a valid regex"):
    sparse_jax.granet(optax.sgd(0.1), sparsity=0.9, total_steps=10, end_step=5,
                      update_every=2, layer_axes="blocks/(")
  with pytest.raises(ValueError, match=r"keep_first_dense=True would keep the stacked leaf "
                     r"'blocks/w1' dense: all 3 of its layers"):
    sparse_jax.static(optax.sgd(0.1), sparsity=0.9, layer_axes=LAYERS,
                      keep_first_dense=True).init(params)
  # N:M that does not divide a stacked kernel's input axis names the layer.
  odd = {"blocks": {"w": jnp.ones((L, 6, 8))}}
  with pytest.raises(ValueError, match=r"blocks/w\[0\].*m=4, which does not divide 6"):
    sparse_jax.rigl(optax.sgd(0.1), structure=sparse_jax.NM(2, 4), total_steps=10,
                    update_every=2, layer_axes=LAYERS).init(odd)


class _Unscanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x, _ = _Block(name=f"block{i}")(x, None)
    return nn.Dense(10, name="head")(x)


def test_flops_count_every_scanned_layer():
  x = jnp.zeros((2, 16))
  init = lambda model: nn.unbox(model.init(jax.random.PRNGKey(0), x))
  scanned = sparse_jax.model_flops(_Scanned(), init(_Scanned()), (2, 16), count_other=False)
  plain = sparse_jax.model_flops(_Unscanned(), init(_Unscanned()), (2, 16), count_other=False)
  assert sum(scanned.layers.values()) == sum(plain.layers.values()) == 2 * 2 * (
      L * 2 * 16 * 32 + 16 * 10)
  assert scanned.layers["blocks/mlp_in/kernel[2]"] == plain.layers["block2/mlp_in/kernel"]
  # Per-layer densities (layer_densities with layer_axes) or one per stacked leaf.
  params = init(_Scanned())["params"]
  masks = sparse_jax.get_masks(sparse_jax.static(
      optax.sgd(0.1), sparsity=0.8, layer_axes=LAYERS).init(params))
  by_layer = sparse_jax.inference_flops(scanned, sparse_jax.layer_densities(masks, LAYERS))
  by_leaf = sparse_jax.inference_flops(scanned, sparse_jax.layer_densities(masks))
  active = sum(float(v) * scanned.layers[k] for k, v in
               sparse_jax.layer_densities(masks, LAYERS).items())
  assert by_layer == pytest.approx(active, rel=1e-6)
  assert by_leaf == pytest.approx(active, rel=1e-6)  # equal ERK per layer here

