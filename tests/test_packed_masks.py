"""Tests of bit-packed masks: ``PackedMask``, ``pack_masks``/``unpack_masks`` and the
``packed_masks=True`` option of every method (same run as with bool masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sparse_jax as sj
from experiments.trainer import sharding

# ---------------------------------------------------------------------------
# pack_masks / unpack_masks
# ---------------------------------------------------------------------------


def _mask_10x3():
  m = np.zeros((10, 3), bool)
  m[[0, 3, 9], 0] = True
  m[[1, 2, 7, 8], 1] = True
  m[[4, 5, 6], 2] = True
  return m


def test_pack_10x3_by_hand():
  # Row 8 i + j goes to bit j of byte row i; rows 10-15 are zero padding.
  #   column 0: rows 0, 3 -> 1 + 8 = 9;        row 9 -> bit 1 of byte row 1 = 2
  #   column 1: rows 1, 2, 7 -> 2 + 4 + 128 = 134; row 8 -> bit 0 = 1
  #   column 2: rows 4, 5, 6 -> 16 + 32 + 64 = 112; nothing in rows 8-9 = 0
  packed = jax.jit(sj.pack_masks)(_mask_10x3())
  assert isinstance(packed, sj.PackedMask)
  assert packed.shape == (10, 3)
  assert packed.bits.dtype == jnp.uint8
  np.testing.assert_array_equal(packed.bits, [[9, 134, 112], [2, 1, 0]])
  np.testing.assert_array_equal(
      packed.bits, np.packbits(_mask_10x3(), axis=0, bitorder="little"))
  out = jax.jit(sj.unpack_masks)(packed)
  assert out.dtype == jnp.bool_ and out.shape == (10, 3)
  np.testing.assert_array_equal(out, _mask_10x3())


@pytest.mark.parametrize("shape, bits_shape", [
    ((1, 5), (1, 5)),            # R = 1: one byte row, 7 padding bits per column
    ((17,), (3,)),               # 1-d: one column of 17 rows
    ((), (1,)),                  # 0-d: one row
    ((3, 5, 4), (2, 4)),         # leading axes merged: 15 rows of 4
    ((3, 3, 4, 6), (5, 6)),      # conv kernel: 36 rows of 6 output channels
    ((16, 2), (2, 2)),           # R a multiple of 8: no padding
])
def test_round_trip_odd_shapes(shape, bits_shape):
  m = np.random.default_rng(sum(shape)).random(shape) < 0.5
  packed = sj.pack_masks(m)
  assert packed.bits.shape == bits_shape and packed.shape == shape
  rows = m.reshape(-1, shape[-1]) if len(shape) > 1 else m.reshape(-1)
  np.testing.assert_array_equal(packed.bits, np.packbits(rows, axis=0, bitorder="little"))
  np.testing.assert_array_equal(jax.jit(sj.unpack_masks)(packed), m)
  # Padding bits stay zero: an all-ones mask packs to exactly size set bits.
  ones = sj.pack_masks(np.ones(shape, bool))
  assert np.unpackbits(np.asarray(ones.bits)).sum() == np.prod(shape)


def test_tree_helpers_keep_none_and_are_idempotent():
  masks = {"a": {"kernel": _mask_10x3(), "bias": None}, "b": [np.ones((2, 9), bool)]}
  packed = sj.pack_masks(masks)
  assert packed["a"]["bias"] is None
  assert isinstance(packed["b"][0], sj.PackedMask)
  assert sj.pack_masks(packed)["a"]["kernel"] is packed["a"]["kernel"]
  # Key paths reach the bits (orbax and sharding see one uint8 array per mask).
  assert sj.leaf_names(packed) == ["a/kernel/bits", "b/0/bits"]
  unpacked = sj.unpack_masks(packed)
  jax.tree.map(np.testing.assert_array_equal, unpacked, masks)
  plain = {"k": jnp.ones((3, 3), bool)}
  assert sj.unpack_masks(plain)["k"] is plain["k"]


def test_measures_and_apply_take_packed_masks():
  masks = {"a": {"kernel": _mask_10x3(), "bias": None}, "b": np.ones((3, 3, 2, 5), bool)}
  packed = sj.pack_masks(masks)
  assert int(jax.jit(sj.count_active)(packed)) == 10 + 90 == int(sj.count_active(masks))
  assert sj.count_prunable(packed) == 30 + 90
  assert float(sj.density(packed)) == pytest.approx(100 / 120)
  densities = sj.layer_densities(packed)
  assert list(densities) == ["a/kernel", "b"]
  assert float(densities["a/kernel"]) == pytest.approx(1 / 3)
  params = {"a": {"kernel": jnp.ones((10, 3)), "bias": jnp.ones((3,))},
            "b": jnp.ones((3, 3, 2, 5))}
  out = jax.jit(sj.apply_masks)(params, packed)
  np.testing.assert_array_equal(out["a"]["kernel"], _mask_10x3().astype(np.float32))
  np.testing.assert_array_equal(out["a"]["bias"], np.ones(3))


def test_bad_input_errors():
  with pytest.raises(ValueError, match="pack_masks takes bool masks.*'a/kernel'.*float32"):
    sj.pack_masks({"a": {"kernel": jnp.ones((4, 4))}})
  with pytest.raises(ValueError, match=r"'k'.*needs uint8 bits of shape \(2, 3\)"):
    sj.unpack_masks({"k": sj.PackedMask(jnp.zeros((1, 3), jnp.uint8), (10, 3))})
  with pytest.raises(ValueError, match="needs uint8 bits"):
    sj.unpack_masks(sj.PackedMask(jnp.zeros((2, 3), jnp.int32), (10, 3)))
  params = {"w": jnp.ones((10, 3)), "b": jnp.zeros((3,))}
  sj.check_mask_tree(params, {"w": sj.pack_masks(_mask_10x3()), "b": None})
  with pytest.raises(ValueError, match="Mask for 'w' has shape"):
    sj.check_mask_tree(params, {"w": sj.pack_masks(np.ones((3, 10), bool)), "b": None})
  with pytest.raises(ValueError, match="PackedMask 'w'"):
    sj.check_mask_tree(params, {"w": sj.PackedMask(jnp.zeros((10, 3), jnp.uint8), (10, 3)),
                                "b": None})


# ---------------------------------------------------------------------------
# packed_masks=True in the optimizer state
# ---------------------------------------------------------------------------


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"l1": {"kernel": jax.random.normal(k1, (16, 24)) * 0.4, "bias": jnp.zeros((24,))},
          "out": {"kernel": jax.random.normal(k2, (24, 4)) * 0.3, "bias": jnp.zeros((4,))}}


def _loss(p, x, y):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = h @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


STEPS = 30
_X = jax.random.normal(jax.random.PRNGKey(1), (STEPS, 16, 16))
_Y = jax.random.randint(jax.random.PRNGKey(2), (STEPS, 16), 0, 4)


def _run(tx):
  """Final params and state after STEPS jitted steps, and how often the step traced."""
  traces = []

  def step(p, s, x, y):
    traces.append(1)
    updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  # Unoptimised machine code: the compile dominates this file's runtime, and both
  # runs of a comparison are compiled the same way.
  step = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})
  params = _params()
  state = tx.init(params)
  params = sj.sparsify_params(params, state)
  for i in range(STEPS):
    params, state = step(params, state, _X[i], _Y[i])
  return params, state, len(traces)


_INNER = lambda: optax.sgd(0.1, momentum=0.9)
METHODS = {
    # Events every 5 updates: pruning at 5..20, drop-and-grow at every event.
    "granet": lambda **kw: sj.granet(_INNER(), sparsity=0.8, total_steps=STEPS, end_step=20,
                                     update_every=5, track_union=True, **kw),
    "gmp": lambda **kw: sj.gmp(_INNER(), sparsity=0.8, end_step=20, update_every=5, **kw),
    "rigl": lambda **kw: sj.rigl(_INNER(), sparsity=0.8, total_steps=STEPS, update_every=5,
                                 **kw),
    "set": lambda **kw: sj.set(optax.adam(1e-2), sparsity=0.8, total_steps=STEPS,
                               update_every=5, **kw),
    "static": lambda **kw: sj.static(_INNER(), sparsity=0.8, **kw),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_packed_run_equals_bool_run(method):
  p_bool, s_bool, _ = _run(METHODS[method]())
  p_packed, s_packed, traces = _run(METHODS[method](packed_masks=True))
  assert traces == 1  # the state's structure (and PackedMask shapes) never changes
  raw = sj.get_sparse_state(s_packed)  # unpacked view
  stored = jax.tree.leaves(s_packed.masks, is_leaf=lambda x: isinstance(x, sj.PackedMask))
  assert stored and all(isinstance(m, sj.PackedMask) for m in stored)
  jax.tree.map(np.testing.assert_array_equal, p_packed, p_bool)
  jax.tree.map(np.testing.assert_array_equal, sj.get_masks(s_packed), s_bool.masks)
  jax.tree.map(np.testing.assert_array_equal, raw.inner_state, s_bool.inner_state)
  if method == "granet":
    jax.tree.map(np.testing.assert_array_equal, raw.union, s_bool.union)
    assert isinstance(s_packed.union["l1"]["kernel"], sj.PackedMask)
    # The masks moved: the union holds more than the final mask.
    assert int(sj.count_active(raw.union)) > int(sj.count_active(raw.masks))
  if method != "static":
    assert int(sj.count_active(raw.masks)) == int(sj.count_active(s_bool.masks))
    assert not jax.tree.all(jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
        raw.masks, sj.get_masks(METHODS[method]().init(_params()))))


def test_packed_state_bytes_are_an_eighth():
  params = _params()
  bool_state = METHODS["granet"]().init(params)
  packed_state = METHODS["granet"](packed_masks=True).init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  # 16 x 24 + 24 x 4 kernels: row counts are multiples of 8, so exactly 1/8.
  assert nbytes(bool_state.masks) == 16 * 24 + 24 * 4
  assert nbytes(packed_state.masks) == (16 * 24 + 24 * 4) // 8
  assert nbytes(packed_state.union) == (16 * 24 + 24 * 4) // 8
  assert packed_state.masks["l1"]["kernel"].bits.shape == (2, 24)
  assert packed_state.masks["l1"]["bias"] is None


def test_packed_initial_masks_and_bool_state_are_accepted():
  params = _params()
  masks = sj.get_masks(sj.static(_INNER(), sparsity=0.7, seed=3).init(params))
  tx = sj.static(_INNER(), initial_masks=sj.pack_masks(masks), packed_masks=True)
  state = tx.init(params)
  jax.tree.map(np.testing.assert_array_equal, sj.get_masks(state), masks)
  # A state given bool masks (e.g. put in with _replace) is packed again by the update.
  grads = jax.tree.map(jnp.ones_like, params)
  _, out = jax.jit(tx.update)(grads, state._replace(masks=masks), params)
  assert isinstance(out.masks["l1"]["kernel"], sj.PackedMask)
  jax.tree.map(np.testing.assert_array_equal, out.masks, state.masks)
  with pytest.raises(ValueError, match="Mask for 'l1/kernel' has shape"):
    sj.static(_INNER(), packed_masks=True,
              initial_masks={"l1": {"kernel": sj.pack_masks(np.ones((24, 16), bool)),
                                    "bias": None},
                             "out": {"kernel": None, "bias": None}}).init(params)


def test_checkpoint_round_trip(tmp_path):
  params = _params()
  tx = sj.granet(_INNER(), sparsity=0.8, initial_sparsity=0.5, total_steps=STEPS,
                 end_step=20, update_every=5, track_union=True, packed_masks=True)
  state = tx.init(params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  abstract = jax.eval_shape(tx.init, params)
  assert isinstance(abstract.masks["out"]["kernel"], sj.PackedMask)
  restored = ckpt.restore(tmp_path / "state", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.masks["out"]["kernel"].bits.dtype == jnp.uint8
  assert 0 < float(sj.density(sj.get_masks(restored))) < 1


def test_packed_fsdp_spec_follows_the_parameter_shard():
  P = jax.sharding.PartitionSpec
  spec = sharding.packed_fsdp_spec
  # Parameter split on axis 0 with whole bytes per device (64 = 8 * 8 rows / 8 devices).
  assert spec((64, 40), 8) == P("data", None)
  assert spec((4096, 2560), 8) == P("data", None)
  # On the last axis: the bits keep the columns.
  assert spec((784, 4096), 8) == P(None, "data")
  assert spec((3, 3, 16, 64), 4) == P(None, "data")
  # 40 rows over 8 devices is 5 rows each, not whole bytes; a split of cin of a conv
  # kernel is strided in the merged rows: replicated.
  assert spec((40, 16), 8) == P()
  assert spec((3, 3, 64, 16), 4) == P()
  assert spec((16,), 2) == P("data")
  assert spec((10, 3), 8) == P()


def test_fsdp_shardings_of_a_packed_state():
  params = _params()
  tx = METHODS["granet"](packed_masks=True)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shardings = sharding.fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  assert isinstance(shardings.masks["l1"]["kernel"], sj.PackedMask)
  assert shardings.masks["l1"]["kernel"].shape == (16, 24)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  jax.tree.map(np.testing.assert_array_equal, state, tx.init(params))
