"""Structured sparsity (issue 14): N:M, blocks and channels in every method.

Every method runs on a small MLP and a small conv tree (4-D kernels) with plain
SGD at a power-of-two learning rate (so ``p - lr * g`` is exact in NumPy too) and
random gradients. After every update the masks are checked for their structure
(every group exactly its count, every block and unit all or nothing, exact
counts), and the deterministic methods (GraNet, GMP, RigL, one-shot) are
replayed step by step by an independent NumPy implementation of the structured
prune -> drop -> grow. Default (unstructured) runs are compared bit for bit with
fingerprints of the code before structures existed.
"""

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj

LR = 1.0 / 16
SGD = optax.sgd(LR)
M = 4  # the m of every N:M run

# ---------------------------------------------------------------------------
# Trees and runs
# ---------------------------------------------------------------------------

TREES = {
    # Dense [in, out] kernels; every fan-in divisible by 4, every fan-out too.
    "mlp": {"l1": (8, 12), "l2": (12, 8), "out": (8, 4)},
    # Conv [h, w, in, out] kernels and a dense head.
    "conv": {"conv1": (3, 3, 4, 8), "conv2": (2, 2, 8, 8), "head": (8, 4)},
}


def make_params(tree, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(TREES[tree]))
  return {n: {"kernel": jax.random.normal(k, s) * 0.5, "bias": jnp.zeros(s[-1:])}
          for k, (n, s) in zip(keys, TREES[tree].items())}


STRUCTURES = {
    "nm": (sj.NM(1, M), {}),  # sparsity 0.75, omitted
    "block": (sj.Block(2, 2), dict(sparsity=0.75)),
    "channels": (sj.Channels(), dict(sparsity=0.5, keep_last_dense=True)),
}

# Events every 2 updates; the pruning schedule ends at 8, RigL's end_step is
# 0.75 * 12 = 9, SET's is set to 9, GraNet regrows until total_steps - 1 = 11.
METHODS = {
    "granet": lambda **kw: sj.granet(SGD, total_steps=12, end_step=8, update_every=2, **kw),
    "granet_st": lambda **kw: sj.granet(SGD, total_steps=12, end_step=8, update_every=2,
                                        initial_sparsity=0.5, **kw),
    "gmp": lambda **kw: sj.gmp(SGD, end_step=8, update_every=2, **kw),
    "rigl": lambda **kw: sj.rigl(SGD, total_steps=12, update_every=2, **kw),
    "set": lambda **kw: sj.set(SGD, total_steps=12, update_every=2, end_step=9, **kw),
    "static": lambda **kw: sj.static(SGD, **kw),
    "one_shot": lambda **kw: sj.one_shot(SGD, prune_step=4, **kw),
}
STEPS = 12


def grads_at(params, t):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.PRNGKey(1000 + t), x.shape), params)


def run(tx, params, steps=STEPS):
  """Records after every update: params, bool masks and grads (record 0: init)."""
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = jax.jit(tx.init)(params)
  recs = [dict(t=0, params=jax.device_get(params), masks=jax.device_get(sj.get_masks(state)))]
  for t in range(1, steps + 1):
    g = grads_at(params, t)
    params, state = step(params, state, g)
    recs.append(dict(t=t, params=jax.device_get(params), grads=jax.device_get(g),
                     masks=jax.device_get(sj.get_masks(state))))
  assert len(traces) == 1
  return recs


_RUNS = {}


def get_run(method, structure, tree):
  key = (method, structure, tree)
  if key not in _RUNS:
    st, kw = STRUCTURES[structure]
    _RUNS[key] = run(METHODS[method](structure=st, **kw), make_params(tree))
  return _RUNS[key]


def kernels(rec, what="masks"):
  return {n: np.asarray(v["kernel"]) for n, v in rec[what].items()
          if v["kernel"] is not None}


# ---------------------------------------------------------------------------
# An independent NumPy implementation of the structures
# ---------------------------------------------------------------------------


def np_group_counts(mask, m=M):
  """Active weights of every group of m along axis -2, shape [*rec, G, fout]."""
  *rec, fin, fout = mask.shape
  return mask.reshape(*rec, fin // m, m, fout).sum(-2)


def np_group_top(keys, counts, m=M):
  """Per group of m along axis -2, the ``counts`` largest keys (ties: lower index)."""
  *rec, fin, fout = keys.shape
  g = np.moveaxis(keys.reshape(*rec, fin // m, m, fout), -2, -1)  # [*rec, G, fout, m]
  c = np.broadcast_to(np.asarray(counts), g.shape[:-1]).reshape(-1)
  rows = g.reshape(-1, m)
  sel = np.zeros(rows.shape, bool)
  for i, (row, k) in enumerate(zip(rows, c)):
    sel[i, np.argsort(-row, kind="stable")[:int(k)]] = True
  return np.moveaxis(sel.reshape(g.shape), -1, -2).reshape(keys.shape)


def np_units(structure, x):
  """x as [*units..., inside] pieces: (array split, axes inside a unit)."""
  *rec, fin, fout = x.shape
  if isinstance(structure, sj.Block):
    r, c = structure.rows, structure.cols
    return x.reshape(*rec, fin // r, r, fout // c, c), (len(rec) + 1, len(rec) + 3)
  return x.reshape(-1, fout), (0,)


def np_rms(structure, x):
  split, axes = np_units(structure, x.astype(np.float64))
  return np.sqrt(np.mean(split ** 2, axis=axes))


def np_unit_mask(structure, mask):
  split, axes = np_units(structure, mask)
  on, off = split.all(axis=axes), ~split.any(axis=axes)
  assert np.all(on | off), "a unit is partly active"
  return on


def np_expand(structure, units, shape):
  if isinstance(structure, sj.Block):
    return np.repeat(np.repeat(units, structure.rows, -2), structure.cols, -1).reshape(shape)
  return np.broadcast_to(units, shape).copy()


def np_top(keys_list, k, forced=None):
  """The k largest of the concatenation (forced first, key desc, index asc)."""
  flat = np.concatenate([x.reshape(-1) for x in keys_list]).astype(np.float64)
  f = (np.zeros(flat.size, bool) if forced is None
       else np.concatenate([x.reshape(-1) for x in forced]))
  order = np.lexsort((np.arange(flat.size), -flat, ~f))
  sel = np.zeros(flat.size, bool)
  sel[order[:k]] = True
  out, off = [], 0
  for x in keys_list:
    out.append(sel[off:off + x.size].reshape(x.shape))
    off += x.size
  return out


def np_global_prune(scores, masks, k):
  """Keeps the k largest active scores over all layers, each layer's largest forced."""
  keys = [np.where(m, s, -1.0) for s, m in zip(scores, masks)]
  forced = []
  for x, m in zip(keys, masks):
    f = np.zeros(x.size, bool)
    if m.any():
      f[int(np.argmax(x.reshape(-1)))] = True
    forced.append(f.reshape(x.shape))
  active = int(sum(m.sum() for m in masks))
  k = min(max(int(k), sum(bool(m.any()) for m in masks)), active)
  return np_top(keys, k, forced)


def np_drop(score, mask, rate):
  """Keeps all but ceil(rate * active) of the largest active scores (at least one)."""
  active = int(mask.sum())
  n = int(np.ceil(np.float32(rate) * np.float32(active)))
  keep_n = min(max(active - n, min(active, 1)), active)
  return np_top([np.where(mask, score, -1.0)], keep_n)[0]


def cubic(k, s_i, s_f, k0, kf):
  frac = min(max((k - k0) / (kf - k0), 0.0), 1.0)
  return s_f + (s_i - s_f) * (1.0 - frac) ** 3


def np_group_table(s_i, s_f, k0, kf, m=M):
  return [min(max(math.ceil((1.0 - cubic(k, s_i, s_f, k0, kf)) * m - 1e-9), 1), m)
          for k in range(kf + 1)]


def rate_fn(initial, total, minimum):
  f = jax.jit(lambda t: sj.cosine_regrowth_rate(t, initial_rate=initial, total_steps=total,
                                                min_rate=minimum))
  return lambda t: float(f(jnp.int32(t)))


# What each deterministic method does at update t: (prune k or None, regrow rate or None).
def granet_plan(t, s_i=0.0):
  k = t // 2
  prune = k if t % 2 == 0 and 0 < k <= 4 else None
  regrow = rate_fn(0.5, 12, 0.005)(t) if t % 2 == 0 and t <= 11 else None
  return prune, regrow, (s_i, None)


PLANS = {
    "granet": lambda t: granet_plan(t),
    "granet_st": lambda t: granet_plan(t, 0.5),
    "gmp": lambda t: (t // 2 if t % 2 == 0 and t <= 8 else None, None, (0.0, None)),
    "rigl": lambda t: (None, rate_fn(0.3, 9, 0.0)(t) if t % 2 == 0 and t <= 9 else None,
                       (None, None)),
    "one_shot": lambda t: (1 if t == 4 else None, None, (0.0, "one_shot")),
}


def np_step(method, structure, sparsity, prev, rec):
  """The masks and kernels after update ``rec['t']`` from the record before it."""
  t = rec["t"]
  names = list(kernels(prev))
  m_old = [kernels(prev)[n] for n in names]
  p_old = [kernels(prev, "params")[n] for n in names]
  g = [kernels(rec, "grads")[n] for n in names]
  w = [p + np.float32(-LR) * np.where(m, gg, np.float32(0)) for p, gg, m in zip(p_old, g, m_old)]
  prune_k, rate, (s_i, kind) = PLANS[method](t)
  if prune_k is None and rate is None:
    return m_old, [np.where(m, x, np.float32(0)) for x, m in zip(w, m_old)]
  kf = 1 if kind == "one_shot" else 4
  if isinstance(structure, sj.NM):
    m_pr = m_old
    if prune_k is not None:
      c = np_group_table(s_i, sparsity, 0, kf)[prune_k]
      m_pr = [m & np_group_top(np.where(m, np.abs(x), -1.0), c) for x, m in zip(w, m_old)]
    m_new = m_pr
    if rate is not None:
      m_new = []
      for x, gg, m in zip(w, g, m_pr):
        dropped = np_drop(np.abs(x), m, rate)
        need = np_group_counts(m) - np_group_counts(dropped)
        grown = np_group_top(np.where(dropped, -1.0, np.abs(gg)), need) & ~dropped
        m_new.append(dropped | grown)
  else:
    uw = [np_rms(structure, x) for x in w]
    um = [np_unit_mask(structure, m) for m in m_old]
    u_pr = um
    if prune_k is not None:
      total = sum(u.size for u in um)
      counts = sj.gradual_active_counts(total, initial_sparsity=s_i, final_sparsity=sparsity,
                                        start_step=0, end_step=8 if kf == 4 else 4,
                                        update_every=2 if kf == 4 else 4)
      u_pr = np_global_prune(uw, um, counts[prune_k])
    u_new = u_pr
    if rate is not None:
      u_new = []
      for x, gg, u in zip(uw, g, u_pr):
        dropped = np_drop(x, u, rate)
        n = int(u.sum() - dropped.sum())
        (grown,) = np_top([np.where(dropped, -1.0, np_rms(structure, gg))], n)
        u_new.append(dropped | grown)
    shape = [x.shape for x in w]
    m_pr = [np_expand(structure, u, s) for u, s in zip(u_pr, shape)]
    m_new = [np_expand(structure, u, s) for u, s in zip(u_new, shape)]
  keep = [a & b for a, b in zip(m_new, m_pr)]
  return m_new, [np.where(k, x, np.float32(0)) for x, k in zip(w, keep)]


# ---------------------------------------------------------------------------
# Invariants after every update, every method, every structure, both trees
# ---------------------------------------------------------------------------


def expected_group_count(method, t):
  """Active weights per group of 4 after update t for NM(1, 4)."""
  if method in ("rigl", "set", "static"):
    return 1
  if method == "one_shot":
    return 4 if t < 4 else 1
  s_i = 0.5 if method == "granet_st" else 0.0
  table = np_group_table(s_i, 0.75, 0, 4)
  return table[min(t // 2, 4)]


def expected_unit_total(method, structure, tree, t, units_per_layer):
  """Active units (blocks, channels) over all prunable layers after update t."""
  total = sum(units_per_layer)
  s_f = STRUCTURES[structure][1]["sparsity"]
  if method in ("rigl", "set", "static"):
    return sj.active_count(s_f, total)
  if method == "one_shot":
    return total if t < 4 else sj.active_count(s_f, total)
  s_i = 0.5 if method == "granet_st" else 0.0
  k = min(t // 2, 4)
  return sj.active_count(cubic(k, s_i, s_f, 0, 4), total)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("method", list(METHODS))
def test_structure_and_exact_counts_after_every_update(method, structure, tree):
  recs = get_run(method, structure, tree)
  st = STRUCTURES[structure][0]
  first_layer = {"mlp": "l1", "conv": "conv1"}[tree]
  prev_layer_counts = None
  for prev, rec in zip(recs[:-1], recs[1:]):
    t = rec["t"]
    masks, params = kernels(rec), kernels(rec, "params")
    for n, m in masks.items():
      assert np.all(params[n][~m] == 0), (n, t)  # stored exactly masked
      assert m.shape == TREES[tree][n]
    if isinstance(st, sj.NM):
      c = expected_group_count(method, t)
      for n, m in masks.items():
        counts = np_group_counts(m)
        assert np.all(counts == c), (n, t, np.unique(counts), c)
    else:
      units = {n: np_unit_mask(st, m) for n, m in masks.items()}  # all-or-none asserted
      if structure == "channels":
        assert "out" not in masks and "head" not in masks  # keep_last_dense
      sizes = [u.size for u in units.values()]
      assert sum(int(u.sum()) for u in units.values()) == expected_unit_total(
          method, structure, tree, t, sizes), t
      assert all(int(u.sum()) >= 1 for u in units.values())
    layer_counts = {n: int(m.sum()) for n, m in masks.items()}
    if method in ("rigl", "set", "static") and prev_layer_counts is not None:
      assert layer_counts == prev_layer_counts, t  # dropped = regrown per layer
    prev_layer_counts = layer_counts
    changed = any(not np.array_equal(kernels(prev)[n], m) for n, m in masks.items())
    if method == "static" or t % 2:
      assert not changed, t
    if method in ("rigl", "set") and t % 2 == 0 and t <= 9:
      # Every event swaps something (a weight of a group, a unit of a layer).
      assert changed, t
      grown = sum(int((m & ~kernels(prev)[n]).sum()) for n, m in masks.items())
      assert grown > 0 and all(np.all(params[n][m & ~kernels(prev)[n]] == 0)
                               for n, m in masks.items())
  assert first_layer in kernels(recs[-1])


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("method", list(PLANS))
def test_deterministic_methods_match_numpy_replica(method, structure, tree):
  recs = get_run(method, structure, tree)
  st, kw = STRUCTURES[structure]
  sparsity = kw.get("sparsity", 0.75)
  changes = 0
  for prev, rec in zip(recs[:-1], recs[1:]):
    m_want, p_want = np_step(method, st, sparsity, prev, rec)
    for n, mw, pw in zip(kernels(prev), m_want, p_want):
      np.testing.assert_array_equal(kernels(rec)[n], mw,
                                    err_msg=f"mask of {n} after update {rec['t']}")
      np.testing.assert_array_equal(kernels(rec, "params")[n], pw,
                                    err_msg=f"params of {n} after update {rec['t']}")
    changes += any(not np.array_equal(kernels(prev)[n], kernels(rec)[n])
                   for n in kernels(prev))
  assert changes >= 1


def test_group_count_table_by_hand():
  # 1:4 from dense over 3 events: s_k = 0.75 - 0.75 (1 - k/3)^3:
  #   k=1: 0.75 - 0.75 * 8/27 = 0.5278 -> d = 0.4722 -> ceil(1.889) = 2;
  #   k=2: 0.75 - 0.75/27 = 0.7222 -> d = 0.2778 -> ceil(1.111) = 2;  k=3: 1.
  table = sj._structure.group_count_table(  # pylint: disable=protected-access
      sj.NM(1, 4), initial_sparsity=0.0, final_sparsity=0.75, start_step=0,
      end_step=300, update_every=100)
  assert table.tolist() == [4, 2, 2, 1]
  # 2:4 from dense in 4 events (the schedule of the runs above, 1:4 there):
  assert np_group_table(0.0, 0.5, 0, 4) == [4, 3, 3, 3, 2]
  assert np_group_table(0.0, 0.75, 0, 4) == [4, 3, 2, 2, 1]
  # 1 - 2/8 = 0.75 in float64 gives exactly 2 of 8, not 3.
  assert sj._structure.group_count(1 - 2 / 8, 8) == 2  # pylint: disable=protected-access
  assert sj._structure.group_count(1 - 3 / 7, 7) == 3  # pylint: disable=protected-access


def test_nm_prune_within_groups_by_hand():
  # One 8 x 1 kernel: groups [3, -1, 2, 0.5] and [1, 1, -4, 1] (ties at 1).
  w = jnp.asarray([3.0, -1.0, 2.0, 0.5, 1.0, 1.0, -4.0, 1.0]).reshape(8, 1)
  tx = sj.one_shot(SGD, structure=sj.NM(2, 4), prune_step=1, include="w")
  params = {"w": w}
  state = tx.init(params)
  zero = {"w": jnp.zeros_like(w)}
  _, state = jax.jit(lambda s: tx.update(zero, s, params))(state)
  got = np.asarray(sj.get_masks(state)["w"]).reshape(-1)
  # Group 1 keeps 3 and 2; group 2 keeps -4 and the first of the tied 1s.
  assert got.tolist() == [True, False, True, False, True, False, True, False]


def test_channels_global_prune_ranks_by_rms():
  # Two layers: "a" has 16 inputs per unit, "b" 1. Unit RMS: a = 0.3, 0.31, 0.3;
  # b = 0.5, 0.35. Raw L2 norms would be a = 1.2, 1.24, 1.2 (4x the RMS) and
  # b = 0.5, 0.35, and would rank every unit of a above b's 0.35.
  params = {"a": {"kernel": jnp.full((16, 3), 0.3).at[:, 1].set(0.31)},
            "b": {"kernel": jnp.asarray([[0.5, 0.35]])}}
  tx = sj.one_shot(SGD, sparsity=0.4, prune_step=1, structure=sj.Channels())
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = jax.jit(lambda s: tx.update(zero, s, params))(state)
  masks = sj.get_masks(state)
  # 5 units, keep round(0.6 * 5) = 3: each layer's largest (a's 0.31, b's 0.5) is
  # forced, then the largest RMS left is b's 0.35 (by raw norm it would be a's 1.2).
  assert np.asarray(masks["a"]["kernel"])[0].tolist() == [False, True, False]
  assert np.asarray(masks["b"]["kernel"])[0].tolist() == [True, True]


def test_block_scores_are_block_norms_by_hand():
  # A 4 x 4 kernel in 2 x 2 blocks; block norms 4, 2, 6, 1 (row-major blocks).
  vals = np.asarray([[2.0, 1.0], [3.0, 0.5]])
  w = np.kron(vals, np.ones((2, 2), np.float32))  # each block constant
  params = {"w": {"kernel": jnp.asarray(w)}}
  tx = sj.one_shot(SGD, sparsity=0.5, prune_step=1, structure=sj.Block(2, 2))
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = jax.jit(lambda s: tx.update(zero, s, params))(state)
  got = np.asarray(sj.get_masks(state)["w"]["kernel"])
  np.testing.assert_array_equal(got, np.kron([[True, False], [True, False]],
                                             np.ones((2, 2), bool)))


# ---------------------------------------------------------------------------
# Start masks, distributions, include/exclude
# ---------------------------------------------------------------------------


def test_start_masks_follow_the_distribution_in_units():
  params = make_params("conv")
  tx = sj.static(SGD, sparsity=0.5, structure=sj.Channels(), distribution="erk")
  masks = sj.get_masks(tx.init(params))
  layers = sj.prunable_layers(params, sj.select_prunable(params))
  dens = sj.layer_densities_for(layers, 0.5, "erk")
  units = [8, 8, 4]
  # ERK densities of the real kernels, turned into unit counts adding to 10 of 20.
  want = sj.layer_counts([sj._masks.LayerInfo(l.name, (u,), u) for l, u in zip(layers, units)],  # pylint: disable=protected-access
                         dens, 10)
  got = [int(np_unit_mask(sj.Channels(), np.asarray(masks[n]["kernel"])).sum())
         for n in ("conv1", "conv2", "head")]
  assert got == want and sum(got) == 10
  uniform = sj.get_masks(sj.static(SGD, sparsity=0.5, structure=sj.Block(4, 4),
                                   distribution="uniform").init(params))
  # Blocks: conv1 3*3*1*2 = 18, conv2 2*2*2*2 = 16, head 2*1 = 2 -> 9, 8, 1.
  assert [int(np.asarray(uniform[n]["kernel"]).sum()) // 16
          for n in ("conv1", "conv2", "head")] == [9, 8, 1]


def test_exclude_and_keep_first_dense_leave_layers_dense():
  params = make_params("conv")
  # conv1's 4 inputs are not divisible by 8: an error naming it, unless it is dense.
  with pytest.raises(ValueError, match=r"NM\(n=1, m=8\) groups the 4 inputs of layer "
                                       r"'conv1/kernel' \(shape \(3, 3, 4, 8\)\) by m=8"):
    sj.rigl(SGD, structure=sj.NM(1, 8), total_steps=12, update_every=2).init(params)
  tx = sj.rigl(SGD, structure=sj.NM(1, 8), total_steps=12, update_every=2,
               keep_first_dense=True)
  masks = sj.get_masks(tx.init(params))
  assert masks["conv1"]["kernel"] is None
  assert np.all(np_group_counts(np.asarray(masks["conv2"]["kernel"]), 8) == 1)
  tx = sj.static(SGD, structure=sj.NM(1, 8), exclude="conv1/kernel")
  assert sj.get_masks(tx.init(params))["conv1"]["kernel"] is None


def test_initial_masks_must_fit_the_structure():
  params = make_params("mlp")
  good = sj.get_masks(sj.static(SGD, structure=sj.NM(1, 4)).init(params))
  tx = sj.rigl(SGD, structure=sj.NM(1, 4), total_steps=12, update_every=2,
               initial_masks=good)
  np.testing.assert_array_equal(sj.get_masks(tx.init(params))["l1"]["kernel"],
                                good["l1"]["kernel"])
  bad = jax.tree.map(lambda m: m, good)
  bad["l2"]["kernel"] = np.asarray(bad["l2"]["kernel"]).copy()
  col = np.asarray(bad["l2"]["kernel"])[:4, 0]
  bad["l2"]["kernel"][:4, 0] = ~col  # that group now has 3 active
  with pytest.raises(ValueError, match=r"initial_masks\['l2/kernel'\] breaks structure="
                                       r"NM\(n=1, m=4\): its groups of 4 inputs hold "
                                       r"\[1, 3\] active"):
    sj.gmp(SGD, structure=sj.NM(1, 4), end_step=8, update_every=2, initial_masks=bad)
  partial = {n: {"kernel": np.eye(*s, dtype=bool), "bias": None}
             for n, s in TREES["mlp"].items()}
  with pytest.raises(ValueError, match=r"initial_masks\['l1/kernel'\] breaks structure="
                                       r"Channels\(\): some of its units are partly active"):
    sj.gmp(SGD, sparsity=0.95, end_step=8, update_every=2, structure=sj.Channels(),
           initial_masks=partial)


# ---------------------------------------------------------------------------
# Argument errors, at the factory (before init or any compile)
# ---------------------------------------------------------------------------

FACTORIES = {
    "granet": lambda **kw: sj.granet(SGD, total_steps=12, end_step=8, update_every=2, **kw),
    "gmp": lambda **kw: sj.gmp(SGD, end_step=8, update_every=2, **kw),
    "rigl": lambda **kw: sj.rigl(SGD, total_steps=12, update_every=2, **kw),
    "set": lambda **kw: sj.set(SGD, total_steps=12, update_every=2, **kw),
    "static": lambda **kw: sj.static(SGD, **kw),
    "one_shot": lambda **kw: sj.one_shot(SGD, prune_step=4, **kw),
}


def test_structure_specs_check_their_values():
  with pytest.raises(ValueError, match=r"^NM\(n=4, m=4\) needs n < m"):
    sj.NM(4, 4)
  with pytest.raises(ValueError, match=r"^NM n=0 must be >= 1\."):
    sj.NM(0, 4)
  with pytest.raises(TypeError, match=r"^NM n=2.0 must be an int"):
    sj.NM(2.0, 4)
  with pytest.raises(TypeError, match=r"^NM m='4' must be an int"):
    sj.NM(2, "4")
  with pytest.raises(ValueError, match=r"^Block cols=0 must be >= 1\."):
    sj.Block(4, 0)
  with pytest.raises(TypeError, match=r"^Block rows=True must be an int"):
    sj.Block(True, 4)
  assert sj.NM(np.int64(2), 4) == sj.NM(2, 4) and sj.NM(2, 4).sparsity == 0.5
  assert sj.Channels() == sj.Channels()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_factory_structure_errors(name):
  make = FACTORIES[name]
  with pytest.raises(TypeError, match=r"^structure='2:4' must be sparse_jax.NM\(n, m\), "):
    make(sparsity=0.5, structure="2:4")
  with pytest.raises(TypeError, match=r"^structure=\(2, 4\) must be "):
    make(sparsity=0.5, structure=(2, 4))
  with pytest.raises(ValueError, match=r"^sparsity=0.9 disagrees with structure=NM\(n=2, "
                                       r"m=4\), whose sparsity is 1 - 2/4 = 0.5"):
    make(sparsity=0.9, structure=sj.NM(2, 4))
  with pytest.raises(TypeError, match=r"^sparsity='0.5' must be a real number"):
    make(sparsity="0.5", structure=sj.NM(2, 4))
  make(sparsity=0.5, structure=sj.NM(2, 4))  # the same value is fine
  make(structure=sj.NM(2, 4))  # and so is none
  if name != "static":  # static's default sparsity is 0 (dense)
    with pytest.raises(TypeError, match=r"^sparsity= is required \(only structure="):
      make(structure=sj.Channels())
    with pytest.raises(TypeError, match=r"^sparsity= is required"):
      make()
  if name in ("granet", "rigl", "set", "static"):
    with pytest.raises(ValueError, match=r"^sampling='bernoulli' cannot keep exactly 2 of "):
      make(structure=sj.NM(2, 4), sampling="bernoulli")
    with pytest.raises(ValueError, match=r"^A density map does not apply with structure="):
      make(structure=sj.NM(2, 4), distribution={".*": 0.5})


def test_block_that_does_not_tile_a_layer_is_an_error_at_init():
  params = make_params("mlp")  # l1: [8, 12], whose 12 outputs 8 does not divide
  tx = sj.static(SGD, sparsity=0.5, structure=sj.Block(4, 8))
  with pytest.raises(ValueError, match=r"Block\(rows=4, cols=8\) does not tile layer "
                                       r"'l1/kernel' \(shape \(8, 12\), matrix \[8, 12\]\): "
                                       r"rows must divide 8 and cols 12"):
    tx.init(params)
  # Under jit the error comes while tracing, before anything is compiled.
  with pytest.raises(ValueError, match="does not tile layer 'l1/kernel'"):
    jax.jit(tx.init)(params)
  # Excluding it, the next layer that does not fit is named: l2 [12, 8] has 12 rows.
  with pytest.raises(ValueError, match=r"Block\(rows=8, cols=4\) does not tile layer "
                                       r"'l2/kernel'"):
    sj.static(SGD, sparsity=0.5, structure=sj.Block(8, 4), exclude="l1/kernel").init(params)


# ---------------------------------------------------------------------------
# Default: unstructured, bit for bit the code before structures
# ---------------------------------------------------------------------------


def _fingerprint_params():
  k = jax.random.split(jax.random.PRNGKey(7), 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8)), "bias": jnp.zeros(8)},
          "dense": {"kernel": jax.random.normal(k[1], (8, 12)), "bias": jnp.zeros(12)},
          "out": {"kernel": jax.random.normal(k[2], (12, 4)), "bias": jnp.zeros(4)}}


UNSTRUCTURED = {
    "granet": lambda: sj.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=12,
                                end_step=8, update_every=2),
    "granet_st_layerwise_momentum": lambda: sj.granet(
        optax.adam(1e-2), sparsity=0.9, initial_sparsity=0.5, total_steps=12, end_step=8,
        update_every=2, scope="layerwise", growth="momentum"),
    "gmp": lambda: sj.gmp(optax.sgd(0.1), sparsity=0.8, end_step=8, update_every=2),
    "rigl": lambda: sj.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=12,
                            update_every=2),
    "set": lambda: sj.set(optax.sgd(0.1), sparsity=0.8, total_steps=12, update_every=2),
    "static": lambda: sj.static(optax.sgd(0.1), sparsity=0.7, distribution="er"),
    "one_shot": lambda: sj.one_shot(optax.sgd(0.1), sparsity=0.6, prune_step=4),
}
# sha256 (first 16 hex digits) of every mask and param after each of 12 updates,
# computed with the code of commit d94c505 (before structure= existed).
FINGERPRINTS = {
    "granet": "a00482278731f3bb",
    "granet_st_layerwise_momentum": "edc913217572a2cb",
    "gmp": "e4d747a60c150902",
    "rigl": "44ffda803629bd7f",
    "set": "a7b14f393ad3bd5e",
    "static": "c3d7fcd873828830",
    "one_shot": "543a8ab9704de020",
}


@pytest.mark.parametrize("name", list(UNSTRUCTURED))
def test_default_structure_is_bit_for_bit_unchanged(name):
  params = _fingerprint_params()
  tx = UNSTRUCTURED[name]()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  h = hashlib.sha256()
  for t in range(12):
    g = jax.tree.map(lambda x, i=t: jax.random.normal(jax.random.PRNGKey(100 + i), x.shape),
                     params)
    u, state = step(params, state, g)
    params = optax.apply_updates(params, u)
    for leaf in jax.tree.leaves((sj.get_masks(state), params)):
      h.update(np.asarray(leaf).tobytes())
  assert h.hexdigest()[:16] == FINGERPRINTS[name]


# ---------------------------------------------------------------------------
# Flax: linen Conv/Dense through TrainState, NNX through nnx.Optimizer
# ---------------------------------------------------------------------------


def test_linen_cnn_granet_2_4_and_nnx_channels_rigl():
  import flax.linen as nn
  from flax import nnx
  from flax.training import train_state

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.relu(nn.Conv(8, (3, 3))(x)).mean(axis=(1, 2))
      return nn.Dense(4)(x)

  model = CNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 4))
  y = jnp.arange(8) % 4
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  tx = sj.granet(optax.sgd(0.05, momentum=0.9), structure=sj.NM(2, 4), total_steps=8,
                 end_step=4, update_every=2)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        state.apply_fn({"params": p}, x), y).mean()
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(4):
    state = train_step(state)
  masks = sj.get_masks(state.opt_state)
  for n in ("Conv_0", "Conv_1", "Dense_0"):
    m = np.asarray(masks[n]["kernel"])
    assert np.all(np_group_counts(m) == 2), n
    assert np.all(np.asarray(state.params[n]["kernel"])[~m] == 0)
  assert float(sj.sparsity(masks)) == 0.5

  net = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
                       nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  opt = nnx.Optimizer(net, sj.rigl(optax.adam(1e-2), sparsity=0.5, total_steps=8,
                                   update_every=2, structure=sj.Channels(),
                                   keep_last_dense=True), wrt=nnx.Param)
  xs = jax.random.normal(jax.random.PRNGKey(2), (8, 8))

  @nnx.jit
  def nnx_step(net, opt):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xs), y).mean()
    opt.update(net, nnx.grad(loss)(net))

  for _ in range(4):
    nnx_step(net, opt)
  kernel_masks = [m for m in jax.tree.leaves(sj.get_masks(opt)) if m is not None]
  assert len(kernel_masks) == 1  # the last layer stays dense
  units = np_unit_mask(sj.Channels(), np.asarray(kernel_masks[0]))
  assert int(units.sum()) == 8  # 8 of 16 output units


# ---------------------------------------------------------------------------
# Straight-through training (STE, SR-STE)
# ---------------------------------------------------------------------------


def test_masked_params_value_and_straight_through_gradient():
  params = make_params("conv")
  tx = sj.ste(SGD, structure=sj.NM(2, 4))
  state = tx.init(params)
  masks = sj.get_straight_through_state(state).masks
  mp = sj.masked_params(params, state)
  for n in TREES["conv"]:
    p, m = np.asarray(params[n]["kernel"]), np.asarray(masks[n]["kernel"])
    np.testing.assert_array_equal(np.asarray(mp[n]["kernel"]), np.where(m, p, 0))
    assert np.all(np_group_counts(m) == 2)
    np.testing.assert_array_equal(mp[n]["bias"], params[n]["bias"])
  # f(w~) = sum(c w~ + w~^2): df/dw~ = c + 2 w~, passed to every dense weight, the
  # masked ones included (there w~ = 0 and the gradient is c).
  c = jax.tree.map(lambda p: jnp.full(p.shape, 0.25), params)
  f = lambda p: sum(jnp.sum(ci * x + x * x) for ci, x in zip(
      jax.tree.leaves(c), jax.tree.leaves(sj.masked_params(p, state))))
  g = jax.jit(jax.grad(f))(params)
  for n in TREES["conv"]:
    want = 0.25 + 2 * np.asarray(mp[n]["kernel"])
    np.testing.assert_allclose(np.asarray(g[n]["kernel"]), want, rtol=1e-6)


def _np_magnitude_global(ws, k):
  return np_global_prune([np.abs(w).astype(np.float64) for w in ws],
                         [np.ones(w.shape, bool) for w in ws], k)


@pytest.mark.parametrize("case", ["sr_ste_2_4", "ste_unstructured_every_3"])
def test_ste_matches_numpy_replica(case):
  lam = 1.0 / 8  # a power of two: g + lam * w is one rounding, in NumPy too
  if case == "sr_ste_2_4":
    tx, every = sj.ste(SGD, structure=sj.NM(2, 4), decay=lam), 1
    new_masks = lambda ws: [np_group_top(np.abs(w).astype(np.float64), 2) for w in ws]
  else:
    tx, every = sj.ste(SGD, sparsity=0.7, update_every=3, decay=lam), 3
    # round(0.3 * (96 + 96 + 32)) = 67 of 224, one ranking over the model.
    new_masks = lambda ws: _np_magnitude_global(ws, 67)
  params = make_params("mlp")
  names = list(TREES["mlp"])
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  state = tx.init(params)
  m = [np.asarray(sj.get_straight_through_state(state).masks[n]["kernel"]) for n in names]
  p = [np.asarray(params[n]["kernel"]) for n in names]
  for mw, mg in zip(new_masks(p), m):
    np.testing.assert_array_equal(mg, mw)
  flips = 0
  for t in range(1, 10):
    g = grads_at(params, t)
    updates, state = step(params, state, g)
    params = optax.apply_updates(params, updates)
    gk = [np.asarray(g[n]["kernel"]) for n in names]
    p = [x + np.float32(-LR) * (gg + np.float32(lam) * np.where(mm, np.float32(0), x))
         for x, gg, mm in zip(p, gk, m)]
    m_next = new_masks(p) if t % every == 0 else m
    got = [np.asarray(sj.get_straight_through_state(state).masks[n]["kernel"]) for n in names]
    for n, x, mw, mg in zip(names, p, m_next, got):
      np.testing.assert_array_equal(np.asarray(params[n]["kernel"]), x)  # dense, kept
      np.testing.assert_array_equal(mg, mw, err_msg=f"{n} after update {t}")
    if case != "sr_ste_2_4":
      assert sum(int(x.sum()) for x in got) == 67
    flips += sum(int((a != b).sum()) for a, b in zip(m, m_next))
    m = m_next
  assert flips > 0  # weights come back: the masks do change


def test_ste_decay_shrinks_pruned_weights_only():
  # With zero gradients SR-STE's update is -lr * lam * w on pruned weights only.
  params = make_params("mlp")
  tx = sj.ste(optax.sgd(1.0), structure=sj.NM(1, 4), decay=0.5)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  for n in TREES["mlp"]:
    m = np.asarray(sj.get_straight_through_state(state).masks[n]["kernel"])
    p, u = np.asarray(params[n]["kernel"]), np.asarray(updates[n]["kernel"])
    np.testing.assert_array_equal(u, np.where(m, 0, -0.5 * p))


def test_ste_channels_layerwise_keeps_each_layers_fraction():
  params = make_params("conv")
  tx = sj.ste(SGD, sparsity=0.5, structure=sj.Channels(), scope="layerwise",
              keep_last_dense=True)
  masks = sj.get_straight_through_state(tx.init(params)).masks
  for n in ("conv1", "conv2"):
    units = np_unit_mask(sj.Channels(), np.asarray(masks[n]["kernel"]))
    norms = np_rms(sj.Channels(), np.asarray(params[n]["kernel"]))
    assert int(units.sum()) == 4
    np.testing.assert_array_equal(units, norms >= np.sort(norms)[-4])
  assert masks["head"]["kernel"] is None


def test_ste_argument_errors():
  with pytest.raises(ValueError, match=r"^decay=-0.1 must be >= 0"):
    sj.ste(SGD, sparsity=0.5, decay=-0.1)
  with pytest.raises(TypeError, match=r"^decay='0.1' must be a real number"):
    sj.ste(SGD, sparsity=0.5, decay="0.1")
  with pytest.raises(ValueError, match=r"^update_every=0 must be >= 1"):
    sj.ste(SGD, sparsity=0.5, update_every=0)
  with pytest.raises(TypeError, match=r"^update_every=1.5 must be an int"):
    sj.ste(SGD, sparsity=0.5, update_every=1.5)
  with pytest.raises(TypeError, match=r"^sparsity= is required"):
    sj.ste(SGD)
  with pytest.raises(ValueError, match=r"^sparsity=0.9 disagrees with structure=NM"):
    sj.ste(SGD, sparsity=0.9, structure=sj.NM(2, 4))
  with pytest.raises(ValueError, match=r"^sparsity=1.0 is outside \[0, 1\)"):
    sj.ste(SGD, sparsity=1.0)
  with pytest.raises(ValueError, match=r"^Unknown pruning scope 'uniform'"):
    sj.ste(SGD, sparsity=0.5, scope="uniform")
  with pytest.raises(ValueError, match=r"found 0\. Build the optimizer with sparse_jax.ste"):
    sj.get_straight_through_state(SGD.init(make_params("mlp")))


# ---------------------------------------------------------------------------
# Export: condensed channel models, N:M storage
# ---------------------------------------------------------------------------


def _mlp_and_cnn():
  import flax.linen as nn
  from tests.test_bcoo_export import MLP

  class CNN(nn.Module):
    features: tuple  # conv, conv, classes

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(self.features[0], (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(self.features[1], (3, 3))(x))
      return nn.Dense(self.features[2])(x.reshape(x.shape[0], -1))

  return MLP, CNN


def _with_random_biases(params, seed, scale=0.5):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape) * scale if sj.path_to_name(p).endswith("bias") else x
      for k, (p, x) in zip(keys, leaves)])


def test_condensed_mlp_gives_the_masked_models_logits():
  MLP, _ = _mlp_and_cnn()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 20))
  model = MLP((32, 24, 10))
  params = _with_random_biases(model.init(jax.random.PRNGKey(1), x)["params"], 2)
  tx = sj.static(SGD, sparsity=0.75, structure=sj.Channels(), keep_last_dense=True)
  state = tx.init(params)
  params = sj.sparsify_params(params, state)
  masks = sj.get_masks(state)
  small = sj.condense_channels(params, masks, ["Dense_0", "Dense_1", "Dense_2"])
  widths = [int(np_unit_mask(sj.Channels(), np.asarray(masks[n]["kernel"])).sum())
            for n in ("Dense_0", "Dense_1")]
  assert small.features == (widths[0], widths[1], 10) and sum(widths) == 14  # of 56
  assert small.params["Dense_1"]["kernel"].shape == (widths[0], widths[1])
  want = model.apply({"params": params}, x)
  got = MLP(small.features).apply({"params": small.params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Dead units output relu(bias) != 0 here: without the fold into the next bias
  # the logits would differ.
  unfolded = jax.tree.map(lambda a: a, small.params)
  unfolded["Dense_1"] = {**small.params["Dense_1"], "bias": params["Dense_1"]["bias"]
                         [np_unit_mask(sj.Channels(), np.asarray(masks["Dense_1"]["kernel"]))]}
  off = MLP(small.features).apply({"params": unfolded}, x)
  assert not np.allclose(np.asarray(off), np.asarray(want), atol=1e-3)


def test_condensed_cnn_and_what_cannot_be_condensed():
  _, CNN = _mlp_and_cnn()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  model = CNN((8, 8, 5))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  # conv biases 0 before the second conv (zero padding), random before the Dense.
  params["Conv_1"]["bias"] = jax.random.normal(jax.random.PRNGKey(3), (8,))
  tx = sj.static(SGD, sparsity=0.5, structure=sj.Channels(), keep_last_dense=True)
  state = tx.init(params)
  params = sj.sparsify_params(params, state)
  masks = sj.get_masks(state)
  chain = ["Conv_0", "Conv_1", "Dense_0"]
  small = sj.condense_channels(params, masks, chain)
  widths = tuple(int(np_unit_mask(sj.Channels(), np.asarray(masks[n]["kernel"])).sum())
                 for n in ("Conv_0", "Conv_1"))
  assert small.features == widths + (5,) and sum(widths) == 8  # of 16 conv filters
  assert 0 < min(widths) and max(widths) < 8
  assert small.params["Conv_1"]["kernel"].shape == (3, 3, widths[0], widths[1])
  assert small.params["Dense_0"]["kernel"].shape == (16 * widths[1], 5)  # 4x4 positions
  want = model.apply({"params": params}, x)
  got = CNN(small.features).apply({"params": small.params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  dead = ~np_unit_mask(sj.Channels(), np.asarray(masks["Conv_0"]["kernel"]))
  bad = jax.tree.map(lambda a: a, params)
  bad["Conv_0"] = {**params["Conv_0"], "bias": jnp.where(jnp.asarray(dead), 0.1, 0.0)}
  with pytest.raises(ValueError, match=r"dead units of 'Conv_0' output activation\(bias\) "
                                       r"!= 0 into the conv 'Conv_1'"):
    sj.condense_channels(bad, masks, chain)
  with pytest.raises(ValueError, match=r"layer 'Conv_0' takes 3 inputs, which do not follow "
                                       r"the 5 outputs of 'Dense_0'.*residual connections"):
    sj.condense_channels(params, masks, ["Dense_0", "Conv_0"])
  with pytest.raises(ValueError, match=r"no layer 'Conv_9'"):
    sj.condense_channels(params, masks, ["Conv_9"])


def test_nm_storage_round_trip_and_reference_forward():
  params = make_params("mlp")
  state = sj.static(SGD, structure=sj.NM(2, 4)).init(params)
  params = sj.sparsify_params(params, state)
  masks = sj.get_masks(state)
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 8))
  for n in TREES["mlp"]:
    w, m = params[n]["kernel"], masks[n]["kernel"]
    k = sj.nm_compress(w, m, sj.NM(2, 4), name=n)
    assert k.values.shape == (w.shape[0] // 2, w.shape[1]) and k.indices.dtype == jnp.uint8
    assert k.nbytes == w.size // 2 * 4 + w.size // 2  # 2.5 of 4 bytes per weight
    np.testing.assert_array_equal(np.asarray(sj.nm_decompress(k)), np.asarray(w))
    # Group g's values are its active weights in input order.
    g0 = np.asarray(w)[:4, 0]
    assert np.asarray(k.values)[:2, 0].tolist() == g0[np.asarray(m)[:4, 0]].tolist()
    h = x if n == "l1" else jax.random.normal(jax.random.PRNGKey(6), (3, w.shape[0]))
    np.testing.assert_allclose(np.asarray(jax.jit(sj.nm_dense)(h, k)), np.asarray(h @ w),
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"nm_compress: 'l1' has groups with \[4\] active"):
    sj.nm_compress(params["l1"]["kernel"], np.ones((8, 12), bool), sj.NM(2, 4), name="l1")


def test_readme_structured_sparsity_example_runs():
  import os
  import re
  readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "README.md")
  section = open(readme).read().split("## Structured sparsity", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1
  ns = {}
  exec(compile(blocks[0], "README.md", "exec"), ns)  # pylint: disable=exec-used
  masks = sj.get_masks(ns["state"].opt_state)
  for n in ("Dense_0", "Dense_1", "Dense_2"):
    assert np.all(np_group_counts(np.asarray(masks[n]["kernel"])) == 2), n
  ste_masks = sj.get_straight_through_state(ns["opt_state"]).masks
  for n in ("Dense_0", "Dense_1", "Dense_2"):
    m = np.asarray(ste_masks[n]["kernel"])
    assert np.all(np_group_counts(m) == 2)
    assert np.all(np.asarray(ns["ste_model"][n]["kernel"])[~m] == 0)
    assert np.any(np.asarray(ns["params"][n]["kernel"])[~m] != 0)  # dense weights kept
  assert ns["small"].features == (75, 25, 10)
  want = ns["Net"]().apply({"params": ns["channel_state"].params}, ns["x"])
  np.testing.assert_allclose(np.asarray(ns["logits"]), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
