"""Non-finite values (issue 13, item 12): masked weights stay exactly 0.

The wrapper's update at a masked position is ``-p``, so ``optax.apply_updates``
gives ``p + (-p)``: exactly 0 for a finite ``p``, NaN for a NaN or infinite one,
which no additive update can fix. ``sparse_jax.apply_updates`` applies the update
and then the masks on the params side (a ``where``), so masked weights are 0
whatever the values. ``optax.apply_if_finite`` around the wrapper skips steps
with non-finite gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj

NAN = np.nan


def _granet():
  # One 2 x 4 layer: 8 weights, events at t = 2 (prune to 3 active) and t = 4
  # (prune to 2 = 25%); regrowth rate 0.5 at every event (min_rate = rate).
  return sj.granet(optax.sgd(1.0), sparsity=0.75, total_steps=8, end_step=4,
                   update_every=2, regrowth_rate=0.5, min_regrowth_rate=0.5)


# Gradients of steps 1-4. Steps 1-2: NaN at positions 0-4, so five weights are NaN
# when the prune at t = 2 keeps 3; step 4: only position 3 has a gradient, so the
# event regrows it.
GRADS = [np.array([NAN] * 5 + [0.0] * 3), np.array([NAN] * 5 + [0.0] * 3),
         np.zeros(8), np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])]


def _run(apply):
  tx = _granet()
  params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update({"w": g.reshape(2, 4).astype(jnp.float32)}, state, params)
    return apply(params, updates, state), state

  out = []
  for g in GRADS:
    params, state = step(params, state, jnp.asarray(g))
    out.append((np.asarray(params["w"]).reshape(-1),
                np.asarray(sj.get_masks(state)["w"]).reshape(-1)))
  return out


def _on(*idx):
  m = np.zeros(8, bool)
  m[list(idx)] = True
  return m


# Worked by hand (NaN keys rank above every finite magnitude; ties go to the lower
# index). t = 2: the prune keeps 0, 1, 2 of the five NaNs (3 and 4 are pruned);
# the drop keeps 0 and the growth, by |gradient| (NaN at 1-4), takes back 1 and 2
# (kept with their values). t = 4: the prune keeps 0, 1 (2 is pruned); the drop
# keeps 0 and the growth takes 3, the only nonzero gradient: it restarts at 0.
MASKS = [_on(*range(8)), _on(0, 1, 2), _on(0, 1, 2), _on(0, 3)]


def test_sparse_jax_apply_updates_keeps_masked_weights_exactly_zero():
  out = _run(sj.apply_updates)
  expected = [
      [NAN] * 5 + [6.0, 7.0, 8.0],  # dense: w - g
      [NAN] * 3 + [0.0] * 5,
      [NAN] * 3 + [0.0] * 5,
      [NAN] + [0.0] * 7,  # 3 regrown at 0; 1 and 2 (now masked) at 0
  ]
  for (w, m), e, em in zip(out, expected, MASKS):
    np.testing.assert_array_equal(m, em)
    np.testing.assert_array_equal(w, np.asarray(e, np.float32))
    assert np.all(w[~m] == 0) and not np.any(np.signbit(w[~m]))


def test_optax_apply_updates_cannot_zero_non_finite_masked_weights():
  # The same run with optax.apply_updates: p + (-p) is NaN where p is NaN, so the
  # weights pruned while NaN stay NaN, and position 3, regrown at t = 4, restarts at
  # NaN. This is why the params-side sparse_jax.apply_updates exists.
  out = _run(lambda p, u, s: optax.apply_updates(p, u))
  expected = [
      [NAN] * 5 + [6.0, 7.0, 8.0],
      [NAN] * 5 + [0.0] * 3,
      [NAN] * 5 + [0.0] * 3,
      [NAN] * 5 + [0.0] * 3,
  ]
  for (w, m), e, em in zip(out, expected, MASKS):
    np.testing.assert_array_equal(m, em)
    np.testing.assert_array_equal(w, np.asarray(e, np.float32))


def _params3():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  return {"l1": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.zeros((16,))},
          "out": {"kernel": jax.random.normal(k[1], (16, 4)), "bias": jnp.zeros((4,))}}


def test_apply_updates_equals_optax_bitwise_on_finite_values():
  # granet with momentum, events every 3 steps: on finite values both give the
  # same bits (p + (-p) is +0.0), so the params-side where changes nothing.
  tx = sj.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=20, end_step=12,
                 update_every=3)
  params = _params3()
  keys = jax.random.split(jax.random.PRNGKey(1), 15)

  def run(apply):
    p, s = params, tx.init(params)

    @jax.jit
    def step(p, s, key):
      grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), p)
      updates, s = tx.update(grads, s, p)
      return apply(p, updates, s), s

    for key in keys:
      p, s = step(p, s, key)
    return p, s

  p_sj, s_sj = run(sj.apply_updates)
  p_ox, _ = run(lambda p, u, s: optax.apply_updates(p, u))
  for a, b in zip(jax.tree.leaves(p_sj), jax.tree.leaves(p_ox)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  masks = sj.get_masks(s_sj)
  assert int(sj.count_active(masks)) == round(0.2 * (8 * 16 + 16 * 4))
  for n in ("l1", "out"):
    w = np.asarray(p_sj[n]["kernel"])
    m = np.asarray(masks[n]["kernel"])
    assert np.all(w[~m].view(np.uint32) == 0)  # +0.0 exactly


def test_apply_updates_takes_any_state_holding_one_sparse_state():
  params = _params3()
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sj.static(optax.sgd(0.1), sparsity=0.5))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = sj.apply_updates({**params, "l1": {**params["l1"], "kernel": params["l1"]["kernel"]
                                           * jnp.inf}}, updates, state)
  m = np.asarray(sj.get_masks(state)["l1"]["kernel"])
  w = np.asarray(new["l1"]["kernel"])
  assert np.all(w[~m] == 0) and np.all(~np.isfinite(w[m]))
  # Dense leaves: p + u, as optax.apply_updates.
  np.testing.assert_array_equal(new["out"]["bias"],
                                optax.apply_updates(params, updates)["out"]["bias"])
  with pytest.raises(ValueError, match="found 0"):
    sj.apply_updates(params, updates, optax.sgd(0.1).init(params))


def test_apply_if_finite_skips_non_finite_steps():
  # optax.apply_if_finite around the sparse wrapper: a step with a non-finite
  # gradient changes nothing (zero updates, the whole inner state, count included,
  # kept); the masks are still found inside its state.
  params = _params3()
  plain = sj.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=20,
                    end_step=12, update_every=3)
  tx = optax.apply_if_finite(plain, max_consecutive_errors=5)
  state, ref = tx.init(params), plain.init(params)
  assert isinstance(sj.get_sparse_state(state), sj.SparseState)
  traces = []

  @jax.jit
  def step(p, s, grads):
    traces.append(1)
    updates, s = tx.update(grads, s, p)
    return sj.apply_updates(p, updates, s), s

  ref_step = jax.jit(lambda p, s, g: (lambda u, s: (sj.apply_updates(p, u, s), s))(
      *plain.update(g, s, p)))
  p, rp = params, params
  keys = jax.random.split(jax.random.PRNGKey(2), 6)
  for i, key in enumerate(keys):
    grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), params)
    if i in (2, 4):  # steps 3 and 5: one NaN in the gradient
      bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
      before = p, sj.get_sparse_state(state)
      p, state = step(p, state, bad)
      jax.tree.map(np.testing.assert_array_equal, p, before[0])
      after = sj.get_sparse_state(state)
      assert int(after.count) == int(before[1].count)
      jax.tree.map(np.testing.assert_array_equal, after.masks, before[1].masks)
    p, state = step(p, state, grads)
    rp, ref = ref_step(rp, ref, grads)
  assert len(traces) == 1
  # Six finite steps (two events, t = 3 and 6) in both; the skipped ones left no trace.
  assert int(sj.get_sparse_state(state).count) == 6
  assert int(state.total_notfinite) == 2
  # Inside apply_if_finite's lax.cond XLA may round the momentum update differently
  # (an FMA or not): equal to float32 rounding, masks identical.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), p, rp)
  jax.tree.map(np.testing.assert_array_equal, sj.get_masks(state), sj.get_masks(ref))
  assert int(sj.count_active(sj.get_masks(state))) < 8 * 16 + 16 * 4


def test_apply_if_finite_forwards_mask_update():
  params = _params3()
  tx = optax.apply_if_finite(
      sj.gmp(optax.sgd(0.1), sparsity=0.5, end_step=2, update_every=2), 3)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update, static_argnames="mask_update")
  _, state = update(grads, state, params, mask_update=False)  # t = 1
  _, skipped = update(grads, state, params, mask_update=False)  # t = 2: the event
  assert int(sj.get_sparse_state(skipped).skipped_events) == 1
  _, state = update(grads, state, params, mask_update=True)
  assert int(sj.get_sparse_state(state).skipped_events) == 0
  assert int(sj.count_active(sj.get_masks(state))) == (8 * 16 + 16 * 4) // 2


# The trainer (issue 28, item 3): a diverged run never checkpoints a non-finite
# state, and its error's advice (resume with a lower learning rate through
# --config.allow_changed) works.

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import math  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.trainer import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.trainer import methods  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.trainer import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.trainer import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.test_trainer_faults import metrics_without_clock  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.test_trainer_faults import small_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_weights_that_overflow_are_never_checkpointed(tmp_path, monkeypatch):
  # The update of step 20 (schedule count 19) has an infinite learning rate: the
  # loss and gradient of step 20 are finite (computed before the update), the
  # weights after it are not. The step-20 checkpoint must not be written.
  schedule = methods.learning_rate_schedule
  monkeypatch.setattr(methods, "learning_rate_schedule", lambda config, spe: (
      lambda count: jnp.where(count < 19, schedule(config, spe)(count), jnp.inf)))
  config = small_config(40)
  config.checkpoint_every_steps = 10
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError) as err:
    train.train_and_evaluate(config, workdir)
  message = str(err.value)
  assert message.startswith("Step 20: the state holds NaN or infinite values"), message
  assert ".params['Dense_0']" in message and "Its last checkpoint (step 10) is kept" in message
  assert "--config.allow_changed=learning_rate" in message and "\n" not in message
  assert _steps(workdir) == [10]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  # The loss of step 20 was finite: its record is there, dropped on a resume.
  assert max(r["step"] for r in metrics_without_clock(workdir)) == 20


def test_save_checkpoint_refuses_an_infinite_state(tmp_path):
  config = small_config()
  config.keep_checkpoints = 3
  mngr = checkpoints.checkpoint_manager(str(tmp_path), config)
  state = {"w": jnp.ones((3, 2)), "count": jnp.int32(1)}
  checkpoints.save_checkpoint(mngr, state, 1)
  mngr.wait_until_finished()
  bad = {"w": jnp.ones((3, 2)).at[1, 1].set(jnp.inf), "count": jnp.int32(2)}
  with pytest.raises(FloatingPointError, match=r"Step 2: .*\['w'\]\).*\(step 1\) is kept"):
    checkpoints.save_checkpoint(mngr, bad, 2)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1]


def test_divergence_advice_resumes_with_a_lower_learning_rate(tmp_path):
  # From step 20 the learning rate is 0.1 * 1e30: the loss is NaN at a step after 20.
  config = small_config(40)
  config.lr_schedule = "multistep"
  config.lr_milestones = (0.5,)
  config.lr_decay_factor = 1e30
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match="NaN or infinite") as err:
    train.train_and_evaluate(config, workdir)
  assert "--config.allow_changed=learning_rate" in str(err.value)
  assert _steps(workdir) == [20]
  # Without allow_changed the changed field is refused, naming the flag to add.
  config.lr_decay_factor = 0.1
  with pytest.raises(ValueError, match=r"lr_decay_factor: 1e\+30 -> 0.1\. .*add "
                                       r"--config.allow_changed=lr_decay_factor\.$"):
    train.train_and_evaluate(config, workdir)
  config.allow_changed = "lr_decay_factor"
  summary = train.train_and_evaluate(config, workdir)
  assert summary["steps"] == 40
  records = metrics_without_clock(workdir)
  assert [r["step"] for r in records] == [10, 20, 30, 31, 40]
  assert records[-1]["learning_rate"] == pytest.approx(0.01)
  with open(os.path.join(workdir, "config_changes.jsonl")) as f:
    changes = [json.loads(l) for l in f]
  assert [{k: c[k] for k in ("step", "field", "old", "new")} for c in changes] == [
      {"step": 20, "field": "lr_decay_factor", "old": 1e30, "new": 0.1}]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["lr_decay_factor"] == 0.1  # what a later resume is compared with


def test_allow_changed_names_only_config_fields(tmp_path):
  config = small_config(40)
  config.allow_changed = "learning_rate,lerning_rate"
  with pytest.raises(ValueError, match="names 'lerning_rate', which is not a config field; "
                                       "did you mean 'learning_rate'"):
    train.train_and_evaluate(config, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()


def test_a_nan_field_compares_equal_to_itself(tmp_path):
  saved = {"learning_rate": math.nan, "lr_milestones": [0.5, math.nan], "seed": 0}
  assert workdir_lib.config_differences(saved, dict(saved)) == []
  assert workdir_lib.config_differences(saved, {**saved, "seed": 1}) == [("seed", 0, 1)]
  config = small_config()
  config.label_smoothing = math.nan  # any float field
  workdir_lib.check_config(str(tmp_path), config, write=True)
  assert workdir_lib.check_config(str(tmp_path), config, write=True) == []
