r"""Iterative magnitude pruning / lottery tickets, driven round by round (docs/algorithms.md §6).

Round 0 trains the dense net. Each later round prunes a fraction
``config.imp.prune_fraction`` of the weights that are still active (by
magnitude, globally or per layer, from the previous round's final weights),
rewinds, and trains again with the mask fixed (``sparse_jax.static``). Each round
is one ``train.train_and_evaluate`` run in ``workdir/round_<r>``, started from
``round_<r>/start.npz`` (params, batch stats, masks) through ``init_from``.

Rewinding (``config.imp.rewind``):

- ``"weights"``: the surviving weights restart from their values after update
  ``k = config.imp.rewind_step`` of round 0 (k = 0 is the original lottery
  ticket, k > 0 weight rewinding), and the round trains updates k+1 .. T.
- ``"lr"``: the weights keep their trained values; only the learning-rate
  schedule is rewound to step k (learning-rate rewinding).

In both, only the schedules' step counts (and the trainer's step) are set to k:
the rest of the optimizer state (momentum, Adam's moments and its
bias-correction count) carries over from the end of the previous round, zeroed
at the pruned positions, unless ``config.imp.reset_optimizer_state``.

  python -m experiments.main --config=experiments/configs/imp_lenet300_mnist5k.py \
      --workdir=workdirs/imp_lenet300

Writes ``workdir/imp_rounds.jsonl`` (one line per round: sparsity, accuracy,
FLOPs), ``workdir/summary.json`` and ``workdir/imp.png``.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import checkpoints
from experiments.trainer import config_checks
from experiments.trainer import exports
from experiments.data import input_pipeline
from experiments.trainer import methods
from experiments.trainer import preemption
from experiments.trainer import state as state_lib
from experiments.trainer import workdir as workdir_lib
from experiments.trainer import train

REWIND_MODES = ("weights", "lr")


def rewind_schedule_counts(opt_state, step: int):
  """Sets the step count of every schedule in ``opt_state`` to ``step``.

  Touches ``optax.ScaleByScheduleState`` and ``InjectHyperparamsState`` counts and
  the ``SparseState`` count (which drives mask events); every other count, such as
  Adam's bias correction, is left as it is.

  Example:
    >>> opt_state = rewind_schedule_counts(opt_state, 0)  # LR back to its start
  """
  kinds = (optax.ScaleByScheduleState, optax.InjectHyperparamsState, sparse_jax.SparseState)

  def fix(x):
    if not isinstance(x, kinds):
      return x
    x = x._replace(count=jnp.full_like(x.count, step))
    if hasattr(x, "inner_state"):
      x = x._replace(inner_state=rewind_schedule_counts(x.inner_state, step))
    return x

  return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def prune_remaining(params, masks, fraction: float, scope: str = "global"):
  """Masks after pruning ``fraction`` of the active weights by magnitude."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"imp.prune_fraction={fraction} must be in (0, 1), e.g. 0.2 prunes "
                     "20% of the remaining weights each round.")
  if scope == "global":
    active = int(sparse_jax.count_active(masks))
    keep = active - int(round(fraction * active))
    return jax.jit(sparse_jax.global_magnitude_prune)(params, masks, keep)
  if scope == "layerwise":
    active = np.asarray(jax.device_get(sparse_jax.layer_active_counts(masks)))
    keep = active - np.round(fraction * active).astype(np.int64)
    return jax.jit(sparse_jax.layerwise_magnitude_prune)(params, masks,
                                                          jnp.asarray(keep, jnp.int32))
  raise ValueError(f"Unknown imp.scope {scope!r}; use 'global' or 'layerwise'.")


def _round_config(config, init_from):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.sparsity.method = "static"
    c.sparsity.final = 0.0  # round 0: all-ones masks; later rounds: init_from's masks
    c.init_from = init_from
  return c


def _masks_tree(params, exported):
  names = sparse_jax.leaf_names(params)
  return jax.tree.unflatten(jax.tree.structure(params), [
      jnp.asarray(exported[f"masks/{n}"]) if f"masks/{n}" in exported else None
      for n in names])


def _tree_from(exported, prefix, like):
  names = sparse_jax.leaf_names(like)
  return jax.tree.unflatten(jax.tree.structure(like),
                            [jnp.asarray(exported[f"{prefix}/{n}"]) for n in names])


def _fresh_state(config, steps_per_epoch, info):
  model = state_lib.create_model(config, info.num_classes)
  inner = methods.create_optimizer(config, steps_per_epoch)
  tx_fn = lambda m: methods.create_sparse_tx(config, inner, steps_per_epoch, m)
  state = state_lib.create_train_state(config, model, tx_fn, info.input_shape,
                                   jax.random.PRNGKey(config.seed))
  return state, inner


def _check(imp):
  if imp.rewind not in REWIND_MODES:
    raise ValueError(f"Unknown imp.rewind {imp.rewind!r}; use one of {REWIND_MODES}.")
  if imp.rewind_step < 0:
    raise ValueError(f"imp.rewind_step={imp.rewind_step} must be >= 0.")
  if imp.num_rounds < 1:
    raise ValueError(f"imp.num_rounds={imp.num_rounds} must be >= 1.")


def run_imp(config, workdir: str) -> dict:
  """Runs (or resumes) all rounds; returns the last round's summary plus the rounds.

  SIGTERM or SIGINT (experiments/trainer/preemption.py) stops a round's training at the
  end of its dispatch, checkpointed, and a signal between rounds stops before the
  next one; either raises ``preemption.Preempted``. Rerunning resumes there.
  """
  with preemption.signals_caught() as signals:  # shared with each round's trainer
    return _run_rounds(config, workdir, signals)


def _run_rounds(config, workdir: str, signals) -> dict:
  workdir = os.path.realpath(workdir)  # one path for every file (train.train_and_evaluate)
  imp = config.imp
  _check(imp)
  config_checks.validate(_round_config(config, None), workdir)  # as each round's run
  log = logging.getLogger("sparse_jax.imp")
  os.makedirs(workdir, exist_ok=True)
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  steps_per_epoch = info.num_train_examples // config.batch_size
  total = methods.num_train_steps(config, steps_per_epoch)
  k = int(imp.rewind_step)
  if k >= total:
    raise ValueError(f"imp.rewind_step={k} must be below the {total} training steps.")
  rounds = []
  for r in range(int(imp.num_rounds)):
    if signals.should_stop():  # received between rounds (or while one was prepared)
      log.info("Preempted before IMP round %d; rerun the same command to resume.", r)
      raise preemption.Preempted(rounds[-1]["steps"] if rounds else 0, signals.received,
                                 workdir)
    rdir = os.path.join(workdir, f"round_{r}")
    os.makedirs(rdir, exist_ok=True)
    start_path = os.path.join(rdir, "start.npz")
    if r == 0:
      c = _round_config(config, None)
      rewind_path = os.path.join(workdir, "rewind.npz")
      if not os.path.exists(rewind_path):
        _save_rewind_point(c, rdir, rewind_path, steps_per_epoch, info, k, log)
    else:
      prev = os.path.join(workdir, f"round_{r - 1}")
      c = _round_config(config, start_path)
      prepared = os.path.join(rdir, "prepared")
      if not os.path.exists(prepared):
        _prepare_round(config, c, prev, rdir, start_path, steps_per_epoch, info, k, log, r)
        workdir_lib.write_atomic(prepared, lambda f: None)  # a marker: round prepared
    summary_path = os.path.join(rdir, "summary.json")
    if os.path.exists(summary_path):
      summary = workdir_lib.read_json_object(
          summary_path, "the finished round's summary",
          f"Move {rdir} away to train round {r} again.")
    else:
      summary = train.train_and_evaluate(c, rdir)
    steps = total if r == 0 else total - k
    rounds.append({
        "round": r, "sparsity": summary["final_sparsity"],
        "mask_sparsity": summary["mask_sparsity"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "steps": steps, "inference_flops_vs_dense": summary["inference_flops_vs_dense"],
        # A static mask: every step of the round costs its inference ratio.
        "train_flops_vs_dense": summary["inference_flops_vs_dense"] * steps / total,
        "wall_time_s": summary["wall_time_s"],
    })
    log.info("IMP round %d: sparsity %.4f test accuracy %.4f", r, rounds[-1]["sparsity"],
             rounds[-1]["final_test_accuracy"])
  lines = "".join(json.dumps(row) + "\n" for row in rounds).encode()
  workdir_lib.write_atomic(os.path.join(workdir, "imp_rounds.jsonl"),
                           lambda f: f.write(lines))
  out = dict(summary)
  out.update(method="imp", rounds=rounds, config=config.to_dict(),
             # The whole procedure's cost, relative to ONE dense run.
             train_flops_vs_dense=sum(x["train_flops_vs_dense"] for x in rounds),
             wall_time_s=sum(x["wall_time_s"] for x in rounds))
  workdir_lib.write_json(os.path.join(workdir, "summary.json"), out)
  _plot(rounds, os.path.join(workdir, "imp.png"))
  return out


def _save_rewind_point(c, rdir, rewind_path, steps_per_epoch, info, k, log):
  """Writes ``rewind.npz``: round 0's weights after step ``k`` (at init if k = 0)."""
  if k > 0:
    # Train to k, snapshot the weights there, then let the same run finish.
    halted = c.copy_and_resolve_references()
    with halted.unlocked():
      halted.halt_after_step = k
    train.train_and_evaluate(halted, rdir)
  log.info("IMP: saving the weights at step %d, where later rounds rewind to, in %s...",
           k, rewind_path)
  state, _ = _fresh_state(c, steps_per_epoch, info)
  if k > 0:
    state, step = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(rdir, c), state)
    if step != k:
      raise ValueError(f"Round 0 has a checkpoint at step {step}, not at the rewind "
                       f"step {k}; start from an empty workdir.")
  exports.export_model(rewind_path, state.params, state.batch_stats, None)


def _prepare_round(config, c, prev, rdir, start_path, steps_per_epoch, info, k, log, r):
  """Writes ``start.npz`` (and a step-k checkpoint carrying the optimizer state)."""
  imp = config.imp
  log.info("IMP round %d: pruning %g%% of round %d's active weights (%s magnitude), "
           "rewinding %s to step %d...", r, 100 * float(imp.prune_fraction), r - 1,
           imp.scope, "the survivors' weights and the schedules" if imp.rewind == "weights"
           else "the learning-rate schedule", k)
  prev_export = exports.load_exported(prev)
  like, inner = _fresh_state(_round_config(config, None), steps_per_epoch, info)
  prev_params = _tree_from(prev_export, "params", like.params)
  masks = prune_remaining(prev_params, _masks_tree(like.params, prev_export),
                          float(imp.prune_fraction), imp.scope)
  if imp.rewind == "weights":
    rewind = exports.load_exported(os.path.join(os.path.dirname(prev), "rewind.npz"))
    params = _tree_from(rewind, "params", like.params)
    batch_stats = (_tree_from(rewind, "batch_stats", like.batch_stats)
                   if like.batch_stats else like.batch_stats)
  else:
    params = prev_params
    batch_stats = (_tree_from(prev_export, "batch_stats", like.batch_stats)
                   if like.batch_stats else like.batch_stats)
  params = sparse_jax.apply_masks(params, masks)
  exports.export_model(start_path, params, batch_stats, masks)
  if imp.reset_optimizer_state and k == 0:  # the trainer starts fresh from start.npz
    log.info("IMP round %d starts at step 0 with %d active weights.", r,
             int(sparse_jax.count_active(masks)))
    return
  # Carry the optimizer state: restore the previous round's final state, put the new
  # masks in, zero the state at pruned positions, rewind the schedule counts to k.
  target, _ = _fresh_state(c, steps_per_epoch, info)
  if imp.reset_optimizer_state:
    opt_state = target.opt_state
  else:
    prev_state, _ = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(prev, c), target)
    opt_state = prev_state.opt_state
  sparse = sparse_jax.get_sparse_state(opt_state)
  inner_state = sparse_jax.mask_inner_state(inner, sparse.inner_state, masks)
  opt_state = rewind_schedule_counts(sparse._replace(masks=masks, inner_state=inner_state), k)
  state = target.replace(step=jnp.asarray(k, jnp.int32), params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  mngr = checkpoints.checkpoint_manager(rdir, c)
  checkpoints.save_checkpoint(mngr, state, k)
  mngr.wait_until_finished()
  log.info("IMP round %d starts at step %d with %d active weights.", r, k,
           int(sparse_jax.count_active(masks)))


def _plot(rounds, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([100 * x["sparsity"] for x in rounds],
          [100 * x["final_test_accuracy"] for x in rounds], marker="o")
  for x in rounds:
    ax.annotate(str(x["round"]), (100 * x["sparsity"], 100 * x["final_test_accuracy"]),
                fontsize=7)
  ax.set_xlabel("sparsity (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("IMP rounds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
