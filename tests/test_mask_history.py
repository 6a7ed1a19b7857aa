"""Mask-dynamics measures on hand-made masks, the bit-packed store, the device union."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from experiments.studies import mask_dynamics as md
from experiments.trainer import mask_history as mh


def bits(s: str) -> np.ndarray:
  return np.array([c == "1" for c in s])


def test_itop_of_two_disjoint_masks():
  # 6 positions: {0, 1} then {2, 3}: union 2/6, then 4/6.
  rates = md.itop_rates([bits("110000"), bits("001100")])
  np.testing.assert_allclose(rates, [2 / 6, 4 / 6])
  # The same mask again adds nothing.
  np.testing.assert_allclose(md.itop_rates([bits("110000"), bits("110000")]), [2 / 6, 2 / 6])


def test_iou_and_hamming():
  # 1100 vs 1010: intersection {0}, union {0, 1, 2} -> 1/3; differ at 1 and 2 -> 2/4.
  assert mh.iou(bits("1100"), bits("1010")) == pytest.approx(1 / 3)
  assert md.hamming(bits("1100"), bits("1010")) == pytest.approx(0.5)
  assert mh.iou(bits("0000"), bits("0000")) == 1.0


def test_survival_after_known_swaps():
  masks = [bits("11110000"),  # m0
           bits("11001100"),  # m1: {2, 3} dropped, {4, 5} grown
           bits("10001110"),  # m2: {1} dropped, {6} grown
           bits("10000111")]  # m3: {4} dropped, {7} grown
  # Hand count: grown at 1 = {4, 5}: active at 1: 2/2, at 2: 2/2, at 3: {5} 1/2.
  #  grown at 2 = {6}: at 2: 1, at 3: 1.  grown at 3 = {7}: at 3: 1.
  s = md.survival_matrix(masks)
  nan = np.nan
  np.testing.assert_allclose(s, [[nan, nan, nan, nan],
                                 [nan, 1.0, 1.0, 0.5],
                                 [nan, nan, 1.0, 1.0],
                                 [nan, nan, nan, 1.0]])


def test_event_counts_split_prune_from_drop():
  # 111100 -> 110010: active 4 -> 3, so the prune removed 1 (drop/grow keep the
  # count); switched off {2, 3} = 2, so 1 dropped; switched on {4} = 1 regrown.
  assert mh.event_counts(bits("111100"), bits("110010")) == {
      "pruned": 1, "dropped": 1, "regrown": 1}
  # Pure RigL swap: 2 off, 2 on, nothing pruned.
  assert mh.event_counts(bits("1100"), bits("0011")) == {
      "pruned": 0, "dropped": 2, "regrown": 2}


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 4, 5)])
def test_pack_unpack_round_trips_exactly(shape):
  rng = np.random.default_rng(sum(shape))
  for p in (0.0, 0.3, 1.0):
    m = rng.random(shape) < p
    packed = mh.pack(m)
    assert packed.dtype == np.uint8 and packed.size == -(-m.size // 8)
    np.testing.assert_array_equal(mh.unpack(packed, shape), m)


def test_history_saves_loads_and_truncates_exactly(tmp_path):
  rng = np.random.default_rng(0)
  shapes = [(5, 3), (3, 2)]
  seq = [[rng.random(s) < 0.5 for s in shapes] for _ in range(4)]
  h = mh.MaskHistory(names=["a/kernel", "b/kernel"], shapes=shapes, final_active=10)
  for step, masks in zip([0, 10, 20, 30], seq):
    h.append(step, masks)
  with pytest.raises(ValueError, match="must increase"):
    h.append(30, seq[0])
  with pytest.raises(ValueError, match="do not match"):
    h.append(40, seq[0][::-1])
  h.save(str(tmp_path / mh.FILENAME))
  loaded = mh.load_history(str(tmp_path))
  assert loaded.steps == [0, 10, 20, 30]
  assert loaded.names == ["a/kernel", "b/kernel"] and loaded.shapes == shapes
  assert loaded.final_active == 10
  for i, masks in enumerate(seq):
    got = loaded.masks_at(i)
    np.testing.assert_array_equal(got["a/kernel"], masks[0])
    np.testing.assert_array_equal(got["b/kernel"], masks[1])
  loaded.truncate(15)
  assert loaded.steps == [0, 10] and len(loaded.packed) == 2
  with pytest.raises(FileNotFoundError, match="record_mask_history"):
    mh.load_history(str(tmp_path / "missing"))


def _hand_history():
  # Two layers (4 and 2 weights); final sparsity 50% -> 3 active of 6.
  h = mh.MaskHistory(names=["l0", "l1"], shapes=[(4,), (2,)], final_active=3)
  h.append(0, [bits("1111"), bits("11")])   # dense start
  h.append(10, [bits("1100"), bits("10")])  # prune 3 (2 from l0, 1 from l1)
  h.append(20, [bits("1010"), bits("10")])  # l0 swaps 1 -> 2
  h.append(30, [bits("1001"), bits("10")])  # l0 swaps 2 -> 3
  return h


def test_analysis_api_on_a_hand_made_history():
  h = _hand_history()
  steps, itop = md.itop_curve(h)
  np.testing.assert_array_equal(steps, [0, 10, 20, 30])
  np.testing.assert_allclose(itop, [1, 1, 1, 1])  # dense start: trivially everything
  # From step 10 (3 active = final): {0,1,4} -> +{2} -> +{3}: 3/6, 4/6, 5/6.
  steps, itop = md.itop_curve(h, since="final")
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(itop, [3 / 6, 4 / 6, 5 / 6])
  dens = md.layer_density_curves(h)
  np.testing.assert_allclose(dens["l0"], [1, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(dens["l1"], [1, 0.5, 0.5, 0.5])
  dist = md.mask_distance_curves(h)
  # Flat masks: 111111, 110010, 101010, 100110.
  # iou_prev: 3/6; {0,4}/{0,1,2,4} = 2/4; {2,4}/{0,2,3,4} = 2/4.
  np.testing.assert_allclose(dist["iou_prev"], [np.nan, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(dist["iou_init"], [1, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(dist["hamming_prev"], [np.nan, 3 / 6, 2 / 6, 2 / 6])
  table = md.event_count_table(h)
  np.testing.assert_array_equal(table["l0"]["pruned"], [0, 2, 0, 0])
  np.testing.assert_array_equal(table["l1"]["pruned"], [0, 1, 0, 0])
  np.testing.assert_array_equal(table["l0"]["regrown"], [0, 0, 1, 1])
  np.testing.assert_array_equal(table["l0"]["dropped"], [0, 0, 1, 1])
  by_layer = md.regrowth_by_layer(h, normalize=True)
  np.testing.assert_allclose(by_layer["l0"], [np.nan, np.nan, 1, 1])
  np.testing.assert_allclose(by_layer["l1"], [np.nan, np.nan, 0, 0])
  # Grown at 20: {2}; inactive at 30 -> survival 0.  Grown at 30: {3} -> 1.
  s = md.regrowth_survival(h)
  assert s[2, 2] == 1.0 and s[2, 3] == 0.0 and s[3, 3] == 1.0
  with pytest.raises(ValueError, match="since"):
    md.itop_curve(h, since="end")


def test_recorder_logs_event_scalars_and_resumes(tmp_path):
  h = _hand_history()
  tree = lambda i: {"l0": {"kernel": jnp.asarray(h.masks_at(i)["l0"])},
                    "l1": {"kernel": jnp.asarray(h.masks_at(i)["l1"]), "bias": None}}
  rec = mh.Recorder.for_run(str(tmp_path), tree(0), start_step=0, final_sparsity=0.5)
  assert rec.history.names == ["l0/kernel", "l1/kernel"] and rec.history.final_active == 3
  out = rec.record(10, tree(1))
  assert out == {"itop_rate": 1.0, "itop_rate_since_final": 0.5, "iou_prev": 0.5,
                 "iou_init": 0.5, "pruned": 3, "dropped": 0, "regrown": 0}
  rec.save()
  out = rec.record(20, tree(2))
  assert out["itop_rate_since_final"] == pytest.approx(4 / 6)
  assert (out["pruned"], out["dropped"], out["regrown"]) == (0, 1, 1)
  # Resume from the save at step 10: the record at 20 is replayed identically.
  again = mh.Recorder.for_run(str(tmp_path), tree(0), start_step=10, final_sparsity=0.5)
  assert again.history.steps == [0, 10]
  assert again.record(20, tree(2)) == out


def test_device_union_matches_host_union_and_step_is_traced_once():
  params = {"a": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)},
            "b": {"kernel": jnp.ones((5, 4))}}
  tx = sparse_jax.rigl(optax.sgd(0.1), sparsity=0.6, total_steps=40, update_every=3,
                       end_step=30, regrowth_rate=0.5, track_union=True)
  state = tx.init(params)
  traces = []

  def step(params, state, key):
    traces.append(1)  # runs only while tracing
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step)
  host_union = jax.tree.map(np.asarray, state.masks)
  changed = 0
  for i in range(12):
    before = jax.tree.map(np.asarray, state.masks)
    params, state = step(params, state, jax.random.PRNGKey(i))
    host_union = jax.tree.map(lambda u, m: u | np.asarray(m), host_union, state.masks)
    changed += int(any(np.any(a != np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(before), jax.tree.leaves(state.masks))))
  assert len(traces) == 1
  assert changed >= 3  # events at 3, 6, 9, 12 swapped weights
  for u, h in zip(jax.tree.leaves(state.union), jax.tree.leaves(host_union)):
    np.testing.assert_array_equal(np.asarray(u), h)
  assert state.union["a"]["bias"] is None
  # Off by default: no union in the state.
  plain = sparse_jax.rigl(optax.sgd(0.1), sparsity=0.6, total_steps=40, update_every=3,
                         end_step=30).init(params)
  assert plain.union is None
