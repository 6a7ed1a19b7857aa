"""The event's intermediate masks kept bit-packed, and the counts that read them.

Large models keep the pruned and dropped masks as ``_sources.Packed`` words (1 bit a
weight, ``_mask_update._packs``) and count masks in ``uint8`` runs
(``_counts.sum_bools``). References: numpy on the bool arrays, and the same training
run with bool intermediates (masks equal at every step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from tests import mask_runs
from sparse_jax import _counts
from sparse_jax import _lazy
from sparse_jax import _mask_update
from sparse_jax import _sources

SHAPES = [(37,), (5, 64), (3, 4, 33), (6, 1000), (2, 8, 96)]


def _mask(shape, seed=0):
  return np.random.default_rng(seed).random(shape) < 0.4


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_reads_back_whole_strided_and_flat(monkeypatch, shape):
  m = _mask(shape)
  p = _sources.pack(jnp.asarray(m))
  assert p.words.dtype == jnp.uint32
  assert p.words.shape == shape[:-1] + (-(-shape[-1] // 32),)
  np.testing.assert_array_equal(np.asarray(_sources.read(p)), m)
  # Bit k of word j is position 32 j + k of the last axis: worked out for one row.
  row = m.reshape(-1, shape[-1])[0]
  first = int(np.asarray(p.words).reshape(-1, p.words.shape[-1])[0, 0])
  assert first == sum(1 << k for k in range(min(32, shape[-1])) if row[k])
  for axis in range(len(shape)):
    for c in (d for d in range(1, shape[axis] + 1) if shape[axis] % d == 0):
      for i in range(c):
        want = np.take(m, np.arange(i, shape[axis], c), axis=axis)
        got = _sources.strided(p, axis, c, jnp.int32(i))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{axis} {c} {i}")
  size = m.size
  for c in (d for d in range(1, size + 1) if size % d == 0 and d <= 12):
    for i in range(c):
      want = m.reshape(c, -1)[i]
      np.testing.assert_array_equal(np.asarray(_sources.flat(p, c, jnp.int32(i))), want)


@pytest.mark.parametrize("shape", [(7,), (1000,), (4, 7), (3, 64), (2, 4096), (5, 250),
                                   (2, 3, 510)])
def test_counts_equal_numpy(shape):
  m = _mask(shape, seed=len(shape))
  assert int(_counts.sum_bools(jnp.asarray(m))) == int(m.sum())
  full = np.ones(shape, bool)  # runs of up to 255 Trues: no uint8 overflow
  assert int(_counts.sum_bools(jnp.asarray(full))) == full.size


def test_count_each_of_arrays_lazy_and_packed(monkeypatch):
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 64)  # chunked leaves as well
  ms = [_mask(s, seed=i) for i, s in enumerate(SHAPES)]
  sources = [jnp.asarray(ms[0]), _lazy.lazy(_sources.pack(jnp.asarray(ms[1]))),
             _lazy.lazy_map(lambda index, x: ~x, jnp.asarray(~ms[2])),
             _lazy.lazy(_sources.pack(jnp.asarray(ms[3]))), jnp.asarray(ms[4])]
  got = jax.jit(lambda: _counts.count_each(sources))()
  np.testing.assert_array_equal(np.asarray(got), [m.sum() for m in ms])


def test_layer_active_counts_of_float_and_int_masks():
  # The public count takes 0/1 masks of any dtype (the ordering of the counts must
  # not need bool values).
  ms = {f"l{i}": {"kernel": _mask(s, seed=i)} for i, s in enumerate(SHAPES)}
  want = [m["kernel"].sum() for m in ms.values()]
  for dtype in (bool, np.float32, np.int32):
    got = sparse_jax.layer_active_counts(jax.tree.map(lambda m: m.astype(dtype), ms))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_materialise_packs_and_keeps_values():
  ms = [_mask(s, seed=i) for i, s in enumerate(SHAPES)]
  lazies = [_lazy.lazy_map(lambda index, x: ~x, jnp.asarray(~m)) for m in ms]
  packed = _lazy.materialise(lazies, True)
  # Packed where the last axis is a multiple of 32 (5 x 64 and 2 x 8 x 96), else bool.
  assert [isinstance(p, _sources.Packed) for p in packed] == [False, True, False, False, True]
  for p, m in zip(packed, ms):
    np.testing.assert_array_equal(np.asarray(_lazy.lazy(p).compute()), m)
  # Packed masks are kept as they are (the no-regrowth branch returns the prune's).
  again = _lazy.materialise(packed, True)
  assert all(a is p for a, p in zip(again, packed) if isinstance(p, _sources.Packed))
  plain = _lazy.materialise(lazies, False)
  assert all(isinstance(p, jax.Array) and p.dtype == jnp.bool_ for p in plain)


def _params(seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Rounded values: ties at the thresholds (the tie split reads packed masks too).
  r = lambda x: jnp.round(x * 4) / 4
  # Last axes 64 and 32 are packed, the head's 10 is not (both kinds in one event).
  return {"blocks": {"w1": r(jax.random.normal(k[0], (3, 16, 64))),
                      "w2": r(jax.random.normal(k[1], (3, 64, 32)))},
          "head": {"kernel": r(jax.random.normal(k[2], (16, 10)))}}


FACTORIES = {
    "granet": lambda: sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.9,
                                        initial_sparsity=0.5, total_steps=12, end_step=8,
                                        update_every=2, layer_axes={"blocks/.*": 1}),
    "rigl": lambda: sparse_jax.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                    total_steps=12, update_every=2,
                                    layer_axes={"blocks/.*": 1}),
    "set": lambda: sparse_jax.sparse_evolutionary_training(optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                                       total_steps=12, update_every=2),
    "granet_2_4": lambda: sparse_jax.granet(optax.sgd(0.1), sparsity=0.5,
                                            initial_sparsity=0.0, total_steps=12,
                                            end_step=8, update_every=2,
                                            structure=sparse_jax.NM(2, 4)),
}


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_masks_equal_with_bool_intermediates(monkeypatch, method):
  monkeypatch.setattr(_lazy, "CHUNK_ELEMENTS", 128)  # many chunks of each layer

  def masks_over_updates(pack_from):
    with monkeypatch.context() as m:
      m.setattr(_mask_update, "_PACK_FROM", pack_from)
      tx, params = FACTORIES[method](), _params(0)
      state, update, out = tx.init(params), jax.jit(tx.update), []
      for t in range(6):
        updates, state = update(_params(10 + t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.tree.leaves(sparse_jax.unpack_masks(sparse_jax.get_masks(state))))
      return out

  got, want = masks_over_updates(1), masks_over_updates(1 << 40)
  mask_runs.assert_same_masks_that_change(got, want)


def test_packs_only_large_models_of_whole_words(monkeypatch):
  small = [jnp.zeros((64, 64), bool)]
  assert not _mask_update._packs(small)
  monkeypatch.setattr(_mask_update, "_PACK_FROM", 64 * 64)  # (default 2**25)
  assert _mask_update._packs(small)
  # Most weights in layers whose last axis is no multiple of 32: bool masks.
  assert not _mask_update._packs([jnp.zeros((64, 64), bool), jnp.zeros((100, 50), bool)])
  assert _mask_update._packs([jnp.zeros((64, 96), bool), jnp.zeros((100, 50), bool)])
