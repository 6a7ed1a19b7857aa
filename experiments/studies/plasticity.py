r"""Pruning plasticity (docs/algorithms.md §7, GraNet section 3): prune once during dense training.

Trains a dense network once, keeping a snapshot (params and optimizer state)
after each epoch ``e`` of ``--prune_epochs``. From every snapshot and every
fraction ``p`` it then prunes ``p`` of the prunable weights once by magnitude
(``--scope=global`` ranks the whole model, ``layerwise`` each layer), and trains
to the end of the same budget under four settings:

- ``prune``: no regrowth, the learning-rate schedule continues where it was;
- ``prune+rewind``: the schedule restarts from its initial value and runs its
  whole shape (same milestone fractions) over the remaining steps;
- ``prune+regrow``: right after the prune, GraNet's zero-cost neuroregeneration:
  per layer drop ``ceil(r(t) * active_l)`` smallest weights and regrow as many by
  dense |gradient| of the next batch (``r(t)`` the cosine rate of docs/algorithms.md §5 at this
  step), so the density stays ``1 - p``;
- ``prune+regrow+rewind``: both.

Newly grown weights start at 0 with zeroed momentum; pruned weights and their
momentum are zeroed. Plasticity is the final test accuracy relative to the dense
run (reported as the difference in points and the ratio). Writes
``<workdir>/plasticity.jsonl`` (one line per run, resumable), then the table and
the plot given by ``--out`` (``.md`` and ``.png``).

The committed CPU sweep (experiments/results/plasticity_lenet300_mnist5k.*):

  nice -n 10 python -m experiments.studies.plasticity --workdir=workdirs/plasticity \
      --seeds=0,1 --out=experiments/results/plasticity_lenet300_mnist5k

(20 epochs, LR x0.1 at epochs 10 and 15, e in 1,4,7,9,12,14,17: just before and
after each decay.)

Shorter: ``--num_epochs=4 --prune_epochs=1,2,3 --fractions=0.5,0.9``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import compilation_cache
from experiments.data import input_pipeline
from experiments.trainer import feed as feed_lib
from experiments.trainer import methods
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.configs import default

SETTINGS = ("prune", "prune+rewind", "prune+regrow", "prune+regrow+rewind")
FRACTIONS = (0.2, 0.5, 0.8, 0.9)
SCOPES = ("global", "layerwise")


def plasticity_config(num_epochs: int = 20, seed: int = 0):
  """LeNet-300-100 on the bundled MNIST subset with the default SGD recipe."""
  config = default.lenet300_mnist5k("static", f"sparsity=0.0,seed={seed}")
  config.num_epochs = num_epochs
  config.optimizer = "sgd"
  return config


def sgd_optimizer(config, schedule) -> optax.GradientTransformation:
  """The trainer's SGD recipe (coupled L2, Nesterov momentum) with ``schedule``."""
  wd = config.weight_decay
  return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.sgd(schedule, momentum=config.momentum or None,
                               nesterov=config.nesterov))


def rewound_schedule(config, steps_per_epoch: int, prune_step: int):
  """The schedule's whole shape compressed into the steps after ``prune_step``."""
  rest = config.copy_and_resolve_references()
  rest.num_train_steps = methods.num_train_steps(config, steps_per_epoch) - prune_step
  base = methods.learning_rate_schedule(rest, steps_per_epoch)
  # The optimizer's step count keeps running from prune_step.
  return lambda count: base(jnp.maximum(count - prune_step, 0))


def prune_once(params, masks, grads, fraction: float, *, scope: str, regrow: bool,
               regrowth_rate):
  """Masks after pruning ``fraction`` of all prunable weights (and regrowing).

  Args:
    params: the params pytree.
    masks: the current (all-True) mask tree.
    grads: dense gradient of a batch (used only when ``regrow``).
    fraction: p, the fraction of prunable weights to remove.
    scope: ``"global"`` or ``"layerwise"`` magnitude ranking.
    regrow: apply zero-cost neuroregeneration after the prune.
    regrowth_rate: r, the fraction of each layer's active weights to drop and regrow.

  Returns:
    ``(new_masks, keep)``: ``keep`` marks the weights that keep their value
    (new masks minus newly grown positions).
  """
  if scope not in SCOPES:
    raise ValueError(f"Unknown scope {scope!r}; use one of {SCOPES}.")
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"Pruning fraction {fraction} must be in (0, 1).")
  n_total = sparse_jax.count_prunable(masks)
  target = sparse_jax.active_count(fraction, n_total)
  if scope == "global":
    pruned = sparse_jax.global_magnitude_prune(params, masks, target)
  else:
    sizes = [int(m.size) for m in jax.tree.leaves(masks)]
    per_layer = sparse_jax.proportional_counts(sizes, target)
    pruned = sparse_jax.layerwise_magnitude_prune(params, masks, jnp.asarray(per_layer))
  if not regrow:
    return pruned, pruned
  active = sparse_jax.layer_active_counts(pruned)
  n = jnp.ceil(regrowth_rate * active.astype(jnp.float32)).astype(jnp.int32)
  dropped = sparse_jax.drop_smallest(sparse_jax.apply_masks(params, pruned), pruned, n)
  n_dropped = active - sparse_jax.layer_active_counts(dropped)
  grown = sparse_jax.regrow_by_gradient(grads, dropped, n_dropped)
  keep = jax.tree.map(lambda a, b: a & b, grown, pruned)
  return grown, keep


def _mask_state(inner, opt_state, masks, keep):
  """``opt_state`` (a SparseState) with new masks and momentum zeroed outside ``keep``."""
  inner_state = sparse_jax.mask_inner_state(inner, opt_state.inner_state, keep)
  return opt_state._replace(masks=masks, inner_state=inner_state)


class Runner:
  """Jitted epochs, evaluation and gradients of one model/data set (compiled once)."""

  def __init__(self, config):
    self.config = config
    info = input_pipeline.dataset_info(config.dataset, config.data_dir)
    self.num_classes = info.num_classes
    self.input_shape = info.input_shape
    train_arrays = input_pipeline.load_arrays(config.dataset, "train", config.data_dir)
    test_arrays = input_pipeline.load_arrays(config.dataset, info.eval_split, config.data_dir)
    self.images = jnp.asarray(train_arrays["image"])
    self.labels = jnp.asarray(train_arrays["label"].astype(np.int32))
    self.n_train = len(train_arrays["label"])
    self.test = {"image": jnp.asarray(test_arrays["image"]),
                 "label": jnp.asarray(test_arrays["label"].astype(np.int32)),
                 "mask": jnp.ones(len(test_arrays["label"]), jnp.float32)}
    self.steps_per_epoch = self.n_train // config.batch_size
    self.total_steps = methods.num_train_steps(config, self.steps_per_epoch)
    self.model = state_lib.create_model(config, self.num_classes)
    schedule = methods.learning_rate_schedule(config, self.steps_per_epoch)
    self.inner = sgd_optimizer(config, schedule)
    self.tx = sparse_jax.static(self.inner, sparsity=0.0)
    self._epoch_fns = {}
    self._eval = jax.jit(lambda s: steps_lib.eval_step(s, self.test, model=self.model,
                                                   num_classes=self.num_classes))

    def grads_fn(params, batch_stats, batch):
      def loss(p):
        variables = {"params": p}
        if batch_stats:
          variables["batch_stats"] = batch_stats
        logits = self.model.apply(variables, batch["image"], train=False)
        return steps_lib.cross_entropy(logits, batch["label"], self.num_classes, 0.0).mean()
      return jax.grad(loss)(params)
    self._grads = jax.jit(grads_fn)

  def init_state(self):
    return state_lib.create_train_state(self.config, self.model, lambda _: self.tx,
                                    self.input_shape, jax.random.PRNGKey(self.config.seed))

  def epoch_fn(self, tx):
    if id(tx) not in self._epoch_fns:
      kwargs = dict(model=self.model, tx=tx, config=self.config,
                    num_classes=self.num_classes)

      def run(state, images, labels, idx):
        return steps_lib.train_steps(state, {"image": images[idx], "label": labels[idx]},
                                 **kwargs)
      self._epoch_fns[id(tx)] = (tx, jax.jit(run))
    return self._epoch_fns[id(tx)][1]

  def batch_indices(self, epoch: int) -> np.ndarray:
    perm = feed_lib.epoch_permutation(self.config.seed, epoch, self.n_train)
    b = self.config.batch_size
    return perm[:self.steps_per_epoch * b].reshape(self.steps_per_epoch, b).astype(np.int32)

  def train_epochs(self, state, first_epoch: int, tx=None):
    fn = self.epoch_fn(tx or self.tx)
    for epoch in range(first_epoch, self.total_steps // self.steps_per_epoch):
      state, _ = fn(state, self.images, self.labels, self.batch_indices(epoch))
    return state

  def accuracy(self, state) -> float:
    out = jax.device_get(self._eval(state))
    return float(out["correct"] / out["count"])

  def grads(self, state, epoch: int):
    idx = self.batch_indices(epoch)[0]
    return self._grads(state.params, state.batch_stats,
                       {"image": self.images[idx], "label": self.labels[idx]})


def dense_with_snapshots(runner: Runner, prune_epochs):
  """Trains dense to the end; returns (final accuracy, {epoch: host state})."""
  state = runner.init_state()
  fn = runner.epoch_fn(runner.tx)
  snaps = {}
  n_epochs = runner.total_steps // runner.steps_per_epoch
  for epoch in range(n_epochs):
    if epoch in prune_epochs:
      snaps[epoch] = jax.device_get(state)
    state, _ = fn(state, runner.images, runner.labels, runner.batch_indices(epoch))
  return runner.accuracy(state), snaps


def pruned_run(runner: Runner, snapshot, epoch: int, fraction: float, setting: str,
               scope: str, regrowth_rate: float = 0.5, min_regrowth_rate: float = 0.005):
  """Final accuracy and density after pruning ``snapshot`` (taken after ``epoch``)."""
  if setting not in SETTINGS:
    raise ValueError(f"Unknown setting {setting!r}; use one of {SETTINGS}.")
  state = jax.device_put(snapshot)
  prune_step = epoch * runner.steps_per_epoch
  regrow, rewind = "regrow" in setting, "rewind" in setting
  sparse_state = sparse_jax.get_sparse_state(state.opt_state)
  rate = sparse_jax.cosine_regrowth_rate(prune_step, initial_rate=regrowth_rate,
                                         total_steps=runner.total_steps,
                                         min_rate=min_regrowth_rate)
  grads = runner.grads(state, epoch) if regrow else None
  prune = jax.jit(prune_once, static_argnames=("fraction", "scope", "regrow"))
  masks, keep = prune(state.params, sparse_state.masks, grads, fraction=fraction,
                      scope=scope, regrow=regrow, regrowth_rate=rate)
  params = sparse_jax.apply_masks(state.params, keep)
  opt_state = _mask_state(runner.inner, state.opt_state, masks, keep)
  state = state.replace(params=params, opt_state=opt_state)
  tx = runner.tx
  if rewind:
    schedule = rewound_schedule(runner.config, runner.steps_per_epoch, prune_step)
    tx = sparse_jax.static(sgd_optimizer(runner.config, schedule), sparsity=0.0)
  state = runner.train_epochs(state, epoch, tx)
  density = float(sparse_jax.density(sparse_jax.get_masks(state.opt_state)))
  return runner.accuracy(state), density


def run_sweep(workdir: str, *, num_epochs: int, prune_epochs, fractions, settings, scope,
              seeds, log=print) -> list[dict]:
  """Runs (or resumes) the sweep; returns one row per run from ``plasticity.jsonl``."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "plasticity.jsonl")
  done = {}
  if os.path.exists(path):
    for line in open(path):
      r = json.loads(line)
      done[(r["seed"], r["epoch"], r["fraction"], r["setting"], r["scope"],
            r["num_epochs"])] = r
  for seed in seeds:
    todo = [(seed, e, p, s, scope, num_epochs) for e in prune_epochs for p in fractions
            for s in settings]
    if all(k in done for k in todo):
      continue
    runner = Runner(plasticity_config(num_epochs, seed))
    if max(prune_epochs) >= num_epochs or min(prune_epochs) < 0:
      raise ValueError(f"prune_epochs {prune_epochs} must lie in [0, {num_epochs}).")
    t0 = time.time()
    dense_acc, snaps = dense_with_snapshots(runner, set(prune_epochs))
    log(f"seed {seed}: dense {dense_acc:.4f} ({time.time() - t0:.1f} s)")
    for i, key in enumerate(todo):
      if key in done:
        continue
      _, e, p, s, _, _ = key
      t0 = time.time()
      acc, density = pruned_run(runner, snaps[e], e, p, s, scope)
      row = dict(seed=seed, epoch=e, fraction=p, setting=s, scope=scope,
                 num_epochs=num_epochs, accuracy=acc, dense_accuracy=dense_acc,
                 density=density, delta=acc - dense_acc, ratio=acc / dense_acc,
                 seconds=time.time() - t0)
      done[key] = row
      with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
      log(f"[{i + 1}/{len(todo)}] seed {seed} epoch {e} p {p} {s}: acc {acc:.4f} "
          f"(dense {dense_acc:.4f}, density {density:.3f}) {time.time() - t0:.1f} s")
  return [done[(seed, e, p, s, scope, num_epochs)] for seed in seeds for e in prune_epochs
          for p in fractions for s in settings]


def summarize(rows: list[dict]) -> dict:
  """Mean and std over seeds of the accuracy difference, keyed (setting, p, e)."""
  groups = {}
  for r in rows:
    groups.setdefault((r["setting"], r["fraction"], r["epoch"]), []).append(r)
  return {k: dict(delta=float(np.mean([r["delta"] for r in v])),
                  delta_std=float(np.std([r["delta"] for r in v])),
                  accuracy=float(np.mean([r["accuracy"] for r in v])),
                  dense=float(np.mean([r["dense_accuracy"] for r in v])), n=len(v))
          for k, v in groups.items()}


def _title(rows: list[dict]) -> str:
  """The model, data and protocol of ``rows`` (all runs use ``plasticity_config``)."""
  scopes = "/".join(sorted({r["scope"] for r in rows}))
  epochs = "/".join(str(n) for n in sorted({r["num_epochs"] for r in rows}))
  seeds = len({r["seed"] for r in rows})
  return (f"Pruning plasticity of LeNet-300-100 on the MNIST subset (4,000 train / 1,000 "
          f"test): one {scopes} magnitude prune after epoch e of {epochs}, mean ± std over "
          f"{seeds} seed{'s' if seeds > 1 else ''}")


def figure(rows: list[dict], lr_milestones=None, num_epochs=None):
  """Final accuracy minus dense (points) against e, as a matplotlib ``Figure``.

  Top row: one panel per setting, a line per fraction p (as in the GraNet paper).
  Bottom row: one panel per p, a line per setting. Dotted: the learning-rate decays.
  A bare ``Figure`` (no pyplot) leaves the caller's backend alone: a notebook
  displays it, ``plot`` saves it.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  stats = summarize(rows)
  settings = [s for s in SETTINGS if any(k[0] == s for k in stats)]
  fractions = sorted({k[1] for k in stats})
  ncols = max(len(settings), len(fractions))
  fig = Figure(figsize=(4 * ncols + 1.6, 7.2))
  axes = fig.subplots(2, ncols, sharey=True, squeeze=False)

  def curve(ax, s, p, label):
    es = sorted(k[2] for k in stats if k[0] == s and k[1] == p)
    ys = [100 * stats[(s, p, e)]["delta"] for e in es]
    err = [100 * stats[(s, p, e)]["delta_std"] for e in es]
    ax.errorbar(es, ys, yerr=err, marker="o", ms=3, capsize=2, label=label)

  rows_of_panels = [
      [(axes[0][i], s, [(s, p, f"p={p}") for p in fractions]) for i, s in enumerate(settings)],
      [(axes[1][i], f"p={p}", [(s, p, s) for s in settings]) for i, p in enumerate(fractions)]]
  for panels in rows_of_panels:
    for ax, title, lines in panels:
      for s, p, label in lines:
        curve(ax, s, p, label)
      if lr_milestones and num_epochs:
        for m in lr_milestones:
          ax.axvline(m * num_epochs, color="gray", ls=":", lw=1)
      ax.axhline(0, color="black", lw=0.8)
      ax.set_title(title)
      ax.set_xlabel("pruning epoch e")
    # The panels of a row share their lines: one legend, right of the row's last
    # panel, where it hides no data.
    panels[-1][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  for row, panels in zip(axes, rows_of_panels):
    for ax in row[len(panels):]:
      ax.set_visible(False)
    row[0].set_ylabel("final accuracy - dense (points)")
  fig.suptitle(_title(rows), fontsize=10)
  fig.tight_layout()
  return fig


def plot(rows: list[dict], path: str, lr_milestones=None, num_epochs=None):
  """Writes ``figure(rows, lr_milestones, num_epochs)`` to ``path`` (PNG)."""
  figure(rows, lr_milestones, num_epochs).savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
  """Markdown table: accuracy minus dense (points, mean ± std over seeds)."""
  stats = summarize(rows)
  epochs = sorted({k[2] for k in stats})
  lines = ["| setting | p | " + " | ".join(f"e={e}" for e in epochs) + " |",
           "|---|---|" + "---|" * len(epochs)]
  for s in SETTINGS:
    for p in sorted({k[1] for k in stats}):
      if (s, p, epochs[0]) not in stats:
        continue
      cells = [f"{100 * stats[(s, p, e)]['delta']:+.2f} ± {100 * stats[(s, p, e)]['delta_std']:.2f}"
               if (s, p, e) in stats else "-" for e in epochs]
      lines.append(f"| {s} | {p} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None, help="path prefix of the .md table and .png plot")
  parser.add_argument("--num_epochs", type=int, default=20)
  parser.add_argument("--prune_epochs", default="1,4,7,9,12,14,17")
  parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--scope", default="global", choices=SCOPES)
  parser.add_argument("--seeds", default="0,1")
  args = parser.parse_args(argv)
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout,
                      force=True)
  log = logging.getLogger("plasticity").info
  prune_epochs = [int(x) for x in args.prune_epochs.split(",")]
  fractions = [float(x) for x in args.fractions.split(",")]
  settings = args.settings.split(",")
  bad = [s for s in settings if s not in SETTINGS]
  if bad:
    raise ValueError(f"Unknown settings {bad}; use some of {SETTINGS}.")
  seeds = [int(x) for x in args.seeds.split(",")]
  t0 = time.time()
  rows = run_sweep(args.workdir, num_epochs=args.num_epochs, prune_epochs=prune_epochs,
                   fractions=fractions, settings=settings, scope=args.scope, seeds=seeds,
                   log=log)
  if args.out:
    config = plasticity_config(args.num_epochs)
    plot(rows, args.out + ".png", config.lr_milestones, args.num_epochs)
    cmd = "nice -n 10 python -m experiments.studies.plasticity " + " ".join(
        sys.argv[1:] if argv is None else argv)
    dense = np.mean([r["dense_accuracy"] for r in rows if r["seed"] in seeds])
    with open(args.out + ".md", "w") as f:
      f.write(f"# Pruning plasticity: LeNet-300-100 on the MNIST subset ({args.scope} "
              f"magnitude)\n\nFinal test accuracy minus the dense run's, in points (mean ± "
              f"std over seeds {seeds}); dense reaches {100 * dense:.2f}%. Pruned once "
              f"after epoch e of {args.num_epochs} (LR x0.1 at epochs "
              f"{', '.join(str(m * args.num_epochs) for m in config.lr_milestones)}).\n\n"
              f"{len(rows)} runs. Command (resumable; rows in "
              f"`{os.path.basename(args.out)}.jsonl`):\n\n    {cmd}\n\n{table(rows)}\n\n"
              f"![plot]({os.path.basename(args.out)}.png)\n")
    with open(args.out + ".jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  log(f"Done in {time.time() - t0:.0f} s.")
  return rows


if __name__ == "__main__":
  main()
