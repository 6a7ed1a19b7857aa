"""Iterative magnitude pruning / lottery tickets: rewinding, rounds, schedule counts."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import orbax.checkpoint as ocp

import sparse_jax
from experiments.trainer import checkpoints
from experiments.trainer import exports
from experiments.trainer import imp
from experiments.data import input_pipeline
from experiments.trainer import train
from experiments.configs import imp_lenet300_mnist5k

N_PRUNABLE = 784 * 300 + 300 * 100 + 100 * 10  # 266,200


def tiny_imp_config(**imp_fields):
  config = imp_lenet300_mnist5k.get_config("sparsity=0.75,rounds=3,seed=2")
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.eval_every_epochs = 100
  for k, v in imp_fields.items():
    setattr(config.imp, k, v)
  return config


def restore_round(workdir, r, config):
  """The trainer state saved in round ``r``'s workdir at its latest checkpoint."""
  c = imp._round_config(config, os.path.join(workdir, f"round_{r}", "start.npz"))  # pylint: disable=protected-access
  info = input_pipeline.dataset_info(c.dataset)
  state, _ = imp._fresh_state(c, info.num_train_examples // c.batch_size, info)  # pylint: disable=protected-access
  mngr = checkpoints.checkpoint_manager(os.path.join(workdir, f"round_{r}"), c)
  return mngr, state


def test_weight_rewinding_restores_step_k_weights_and_records_rounds(
    tmp_path, monkeypatch, caplog):
  k = 4
  config = tiny_imp_config(rewind_step=k)
  monkeypatch.setattr(checkpoints, "_FINGERPRINTED", set())  # as in a fresh process
  with caplog.at_level(logging.INFO, logger="sparse_jax"):
    summary = imp.run_imp(config, str(tmp_path))
  assert_imp_log_lines([r.getMessage() for r in caplog.records], os.path.realpath(tmp_path), k)
  # Independent reference: a plain run of the same recipe halted after step k.
  ref_config = imp._round_config(config, None)  # pylint: disable=protected-access
  ref_config.halt_after_step = k
  train.train_and_evaluate(ref_config, str(tmp_path / "reference"))
  ref_mngr, target = restore_round(str(tmp_path), 1, config)
  ref_state, step = checkpoints.restore_checkpoint(
      checkpoints.checkpoint_manager(str(tmp_path / "reference"), ref_config), target)
  assert step == k
  # Round 1 starts from its checkpoint at step k (the trainer resumes there).
  mngr, _ = restore_round(str(tmp_path), 1, config)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  state = mngr.restore(k, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      meta=ocp.args.JsonRestore()))["state"]
  masks = sparse_jax.get_masks(state.opt_state)
  for layer in ("Dense_0", "Dense_1", "Dense_2"):
    w, w_ref, m = (np.asarray(t[layer]["kernel"]) for t in (state.params, ref_state.params, masks))
    np.testing.assert_array_equal(w[m], w_ref[m])  # exactly the step-k values
    assert not np.any(w[~m])
  # The schedule (and mask) counts are at k; the trainer step too.
  assert int(state.step) == k
  assert int(sparse_jax.get_sparse_state(state.opt_state).count) == k
  # p = 1 - 0.25 ** (1/2) = 0.5 of the remaining weights per round: 50%, then 75%.
  rounds = [json.loads(l) for l in open(tmp_path / "imp_rounds.jsonl")]
  assert [r["round"] for r in rounds] == [0, 1, 2]
  assert rounds[0]["mask_sparsity"] == 0.0
  assert rounds[1]["mask_sparsity"] == pytest.approx(1 - (N_PRUNABLE // 2) / N_PRUNABLE)
  assert rounds[2]["mask_sparsity"] == pytest.approx(1 - (N_PRUNABLE // 4) / N_PRUNABLE)
  assert all(0.0 < r["final_test_accuracy"] <= 1.0 for r in rounds)
  assert summary["rounds"] == rounds
  # Round 1 keeps a subset of round 0's survivors; round 2 of round 1's.
  ex1, ex2 = (exports.load_exported(str(tmp_path / f"round_{r}")) for r in (1, 2))
  for name in ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"):
    assert not np.any(ex2[f"masks/{name}"] & ~ex1[f"masks/{name}"])
  assert (tmp_path / "imp.png").exists()


def assert_imp_log_lines(lines, workdir, k):
  """The lines that say what IMP does between rounds, and the fingerprint's compile."""
  imp_lines = [l for l in lines if l.startswith("IMP") and "test accuracy" not in l]
  # Half of the active weights pruned each round (see the rounds below): 266,200 / 2.
  assert imp_lines == [
      f"IMP: saving the weights at step {k}, where later rounds rewind to, in "
      f"{workdir}/rewind.npz...",
      *[line for r, active in ((1, N_PRUNABLE // 2), (2, N_PRUNABLE // 4)) for line in (
          f"IMP round {r}: pruning 50% of round {r - 1}'s active weights (global "
          f"magnitude), rewinding the survivors' weights and the schedules to step {k}...",
          f"IMP round {r} starts at step {k} with {active} active weights.")]]
  # Each state layout's fingerprint compile is said once, the first at round 0's
  # checkpoint at step k, before it halts there.
  fingerprint = [i for i, l in enumerate(lines) if "checkpoint fingerprint" in l]
  assert fingerprint and len(fingerprint) == len(checkpoints._FINGERPRINTED)  # pylint: disable=protected-access
  assert fingerprint[0] < lines.index(f"Halting after step {k} (halt_after_step).")
  for i in fingerprint:
    assert lines[i].startswith("Compiling the checkpoint fingerprint (a hash of the state's ")


def test_rewind_schedule_counts_keeps_adam_bias_correction_count():
  lr = optax.linear_schedule(1.0, 0.0, 10)
  tx = sparse_jax.static(optax.chain(optax.add_decayed_weights(1e-4), optax.adam(lr)),
                         sparsity=0.5)
  params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
  state = tx.init(params)
  for _ in range(7):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  rewound = imp.rewind_schedule_counts(state, 2)
  adam, sched = rewound.inner_state[1]
  assert int(sched.count) == 2  # the LR schedule is back at step 2
  assert int(adam.count) == 7  # Adam's bias correction is not reset
  assert int(rewound.count) == 2
  np.testing.assert_array_equal(adam.mu["w"], state.inner_state[1][0].mu["w"])


def test_prune_remaining_fraction_and_bad_input():
  params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.arange(-4.0, 0.0).reshape(2, 2)}
  masks = {"a": jnp.ones((2, 4), bool), "b": jnp.array([[True, True], [True, False]])}
  # 11 active, prune round(0.5 * 11) = 6 (Python rounds 5.5 to even: 6), keep 5. The
  # global prune keeps each layer's largest active weight (b: |-4|), then the largest
  # of the rest: a = 8, 7, 6, 5.
  new = imp.prune_remaining(params, masks, 0.5)
  np.testing.assert_array_equal(new["a"], [[False] * 4, [True] * 4])
  np.testing.assert_array_equal(new["b"], [[True, False], [False, False]])
  with pytest.raises(ValueError, match="prune_fraction"):
    imp.prune_remaining(params, masks, 1.5)


def test_one_shot_prunes_once_at_prune_step_then_keeps_the_mask():
  # SGD lr 1 with gradient -1 everywhere: each update adds 1 to every active weight.
  params = {"a": jnp.array([[0.5, -4.0], [2.0, 1.0]]), "b": jnp.array([[-3.0, 0.1]])}
  tx = sparse_jax.one_shot(optax.sgd(1.0), sparsity=0.5, prune_step=3)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda x: -jnp.ones_like(x), p), s, p))
  history = []
  for _ in range(6):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, sparse_jax.get_masks(state)))
  for m in history[:2]:
    assert all(np.all(x) for x in jax.tree.leaves(m))
  # After update 3 the weights are a = [[3.5, -1], [5, 4]], b = [[0, 3.1]]; keep
  # round(0.5 * 6) = 3. The global prune keeps each layer's largest (a: 5, b: 3.1),
  # then the largest of the rest (a: 4); 3.5 is pruned.
  np.testing.assert_array_equal(history[2]["a"], [[False, False], [True, True]])
  np.testing.assert_array_equal(history[2]["b"], [[False, True]])
  for m in history[3:]:
    for x, y in zip(jax.tree.leaves(m), jax.tree.leaves(history[2])):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(params["a"], [[0.0, 0.0], [8.0, 7.0]])
  with pytest.raises(ValueError, match="prune_step"):
    sparse_jax.one_shot(optax.sgd(1.0), sparsity=0.5, prune_step=0)
