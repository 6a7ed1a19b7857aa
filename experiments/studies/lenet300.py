r"""The small-scale results table: every method on LeNet-300-100 / MNIST subset.

Runs dense, GraNet, GraNet-ST, GMP, RigL, SET, static, the pruning-at-init
baselines (SNIP, GraSP, SynFlow), one-shot magnitude pruning and IMP (lottery
ticket, 4 rounds) at 90/95/98% sparsity with 3 seeds each (dense once per seed),
one workdir per run, skipping runs that already have a ``summary.json`` (so an
interrupted sweep resumes), then writes ``experiments/results/lenet300_mnist5k.md``
and ``lenet300_mnist5k.png``. Training and inference FLOPs relative to dense
(docs/algorithms.md §10) come from each run's summary; runs from before the trainer wrote them
get them post hoc from their workdir (``experiments.trainer.flops.posthoc_run_flops``,
cached in ``flops.json``).

  python -m experiments.studies.lenet300 --workdir=workdirs/sweep_lenet300 \
      [--seeds=0,1,2] [--sparsities=0.9,0.95,0.98] [--methods=granet,rigl]

``--redraw`` draws ``lenet300_mnist5k.png`` again from the committed table alone
(no run; the table's rounding does not show in the plot).
"""

import functools
import os
import time

import numpy as np

from experiments.trainer import imp
from experiments.trainer import train
from experiments.configs import default
from experiments.configs import imp_lenet300_mnist5k
from experiments.studies import _grid

# name -> (method, overrides of config.sparsity)
METHODS = {
    "dense": ("dense", {}),
    "granet": ("granet", {}),
    "granet_st": ("granet", {"initial": 0.5}),
    "gmp": ("gmp", {}),
    "rigl": ("rigl", {"regrowth_rate": 0.3}),
    "set": ("set", {"regrowth_rate": 0.3}),
    "static": ("static", {}),
    "snip": ("snip", {}),
    "grasp": ("grasp", {}),
    "synflow": ("synflow", {}),
    "one_shot": ("one_shot", {"end_epoch": 10.0}),
    "imp": ("imp", {}),
}
RESULTS = _grid.RESULTS


def run_dir(workdir, name, sparsity, seed):
  tag = "dense" if name == "dense" else f"{name}_s{sparsity}"
  return os.path.join(workdir, f"{tag}_seed{seed}")


def run_config(name, sparsity, seed):
  """The config of one run of the table (IMP: of its rounds)."""
  method, overrides = METHODS[name]
  if method == "imp":
    config = imp_lenet300_mnist5k.get_config(f"sparsity={sparsity},seed={seed}")
  else:
    config = default.lenet300_mnist5k(method, f"sparsity={sparsity},seed={seed}", **overrides)
  config.log_every_steps = 100
  return config


def run_all(workdir, methods, sparsities, seeds):
  runs = []
  for seed in seeds:
    for name in methods:
      for s in ([sparsities[0]] if name == "dense" else sparsities):
        d = run_dir(workdir, name, s, seed)
        train_fn = imp.run_imp if METHODS[name][0] == "imp" else train.train_and_evaluate
        runs.append(_grid.GridRun(d, d, functools.partial(run_config, name, s, seed), train_fn))
  _grid.run_grid(runs)


def _read(run_workdir):
  summary = _grid.read_summary(run_workdir)
  return None if summary is None else _grid.with_flops(summary, run_workdir)


def load(workdir, methods, sparsities, seeds):
  """``{(name, sparsity or None for dense): [summary of each seed's run]}``."""
  return _grid.collect(
      ((name, s), (_read(run_dir(workdir, name, s if s else sparsities[0], seed))
                   for seed in seeds))
      for name in methods for s in ([None] if name == "dense" else sparsities))


def _stat(runs, key):
  """Mean and std over the seeds, in percent."""
  return 100 * np.mean([r[key] for r in runs]), 100 * np.std([r[key] for r in runs])


def _table_lines(rows, command, elapsed):
  """The report's text: the recipe, the command, the table of ``rows``."""
  lines = [
      "# LeNet-300-100 on the bundled MNIST subset (4,000 train / 1,000 test)",
      "",
      "Every method with the recipe of `experiments/configs/granet_lenet300_mnist5k.py` "
      "(30 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 x0.1 at 50%/75%, weight decay "
      "5e-4, ΔT = 100 steps, pruning from epoch 0 to 20; RigL/SET drop fraction 0.3). "
      "SNIP/GraSP score the first training batch, SynFlow runs 100 data-free rounds in "
      "float64; all three then train with the mask fixed. One-shot prunes globally by "
      "magnitude after epoch 10 and fine-tunes to epoch 30. IMP is the lottery ticket: "
      "4 rounds of 30 epochs (dense, then 3 global magnitude prunes of the same fraction "
      "of the remaining weights), rewinding the survivors to their initial values. "
      "Mean ± std over seeds; sparsity is measured from the final params. \"Best\" is the "
      "best evaluation during the run, which for one-shot includes its dense epochs "
      "before the prune (hence the same value at every sparsity).",
      "",
      "FLOPs (docs/algorithms.md §10, RigL's counting) are relative to dense: inference = forward pass "
      "of the final masked net; training = forward + input gradient + weight gradient "
      "summed over the run at the densities in force at each step (dense before "
      "GraNet/GMP/one-shot prune), with a dense weight gradient at the mask-update "
      "steps of GraNet and RigL. IMP's training FLOPs add up all its rounds (so > 1).",
      "",
      f"Command: `{command}`",
      "",
      f"Sum of the runs' wall times: "
      f"{sum(r['wall_time_s'] for runs in rows.values() for r in runs) / 60:.1f} min on a "
      f"shared 2-core CPU (this invocation: {elapsed / 60:.1f} min; finished runs are "
      "skipped).",
      "",
      "| method | target sparsity | test accuracy (%) | best test acc. (%) | final sparsity "
      "| train FLOPs (x dense) | inference FLOPs (x dense) | wall time (s) | seeds |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for (name, s), runs in rows.items():
    acc, acc_sd = _stat(runs, "final_test_accuracy")
    best, best_sd = _stat(runs, "best_test_accuracy")
    sp = np.mean([r["final_sparsity"] for r in runs])
    wall = np.mean([r["wall_time_s"] for r in runs])
    train_f = np.mean([r["train_flops_vs_dense"] for r in runs])
    inf_f = np.mean([r["inference_flops_vs_dense"] for r in runs])
    lines.append(f"| {name} | {'-' if s is None else s} | {acc:.2f} ± {acc_sd:.2f} | "
                 f"{best:.2f} ± {best_sd:.2f} | {sp:.4f} | {train_f:.3f} | {inf_f:.3f} | "
                 f"{wall:.1f} | {len(runs)} |")
  return lines


def plot_cells(rows):
  """What the plot shows of ``rows`` (``load``): ``(cells, seeds)``.

  ``cells``: ``{(name, sparsity or None): (test accuracy mean, std (%), train FLOPs
  vs dense)}``, in ``rows``' order; ``seeds``: the most seeds of a cell.
  """
  cells = {key: (*_stat(runs, "final_test_accuracy"),
                 float(np.mean([r["train_flops_vs_dense"] for r in runs])))
           for key, runs in rows.items()}
  return cells, max(len(runs) for runs in rows.values())


def read_cells(md_path):
  """``plot_cells``' ``(cells, seeds)`` from a written report's table (``--redraw``).

  The table rounds accuracies to 0.01 points and FLOPs to 0.001: the plot is the same.
  """
  cells, seeds = {}, 0
  with open(md_path) as f:
    for line in f:
      parts = [p.strip() for p in line.strip().strip("|").split("|")]
      if len(parts) != 9 or "±" not in parts[2]:
        continue  # not a row of the table
      name, sparsity, acc, _, _, train_flops, _, _, n = parts
      mean, sd = (float(v) for v in acc.split("±"))
      cells[(name, None if sparsity == "-" else float(sparsity))] = (
          mean, sd, float(train_flops))
      seeds = max(seeds, int(n))
  return cells, seeds


def _plot(cells, seeds, sparsities, out_png):
  """Accuracy vs sparsity, and vs training FLOPs, one line per method (``plot_cells``)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(13, 4.8))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = {}
  for name in dict.fromkeys(n for n, _ in cells):
    if name == "dense":
      acc, sd, _ = cells[("dense", None)]
      for a in (ax, ax_f):
        a.axhspan(acc - sd, acc + sd, color="gray", alpha=0.2)
        a.axhline(acc, color="gray", ls="--", label="dense")
      continue
    # 10+ methods: cycle colours and line styles together so no two look alike.
    k = len(styles)
    styles[name] = dict(color=cycle[k % len(cycle)], ls="-" if k < len(cycle) else ":")
    ms = [cells[(name, s)] for s in sparsities if (name, s) in cells]
    xs = [s for s in sparsities if (name, s) in cells]
    ax.errorbar([100 * x for x in xs], [m for m, _, _ in ms], yerr=[e for _, e, _ in ms],
                marker="o", capsize=3, label=name, **styles[name])
    # Accuracy against the run's training cost (docs/algorithms.md §10).
    ax_f.plot([f for _, _, f in ms], [m for m, _, _ in ms], marker="o", label=name,
              **styles[name])
  ax.set_xlabel("sparsity (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("accuracy vs sparsity")
  ax_f.set_xscale("log")
  ax_f.set_xlabel("training FLOPs (x dense run), log scale")
  ax_f.set_ylabel("test accuracy (%)")
  ax_f.set_title(f"accuracy vs training cost ({'/'.join(f'{100 * s:g}' for s in sparsities)}% "
                 "per method)")
  # Both panels draw the same methods in the same styles: one legend, right of the
  # second panel, where it hides no data.
  ax_f.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.suptitle("LeNet-300-100 on the MNIST subset (4,000 train / 1,000 test): "
               f"test accuracy, mean ± std over {seeds} seed{'s' if seeds > 1 else ''}")
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def write_report(rows, sparsities, command, elapsed, out_md, out_png):
  """Writes the table of ``rows`` (``load``) to ``out_md`` and its plot to ``out_png``."""
  with open(out_md, "w") as f:
    f.write("\n".join(_table_lines(rows, command, elapsed))
            + "\n\n![accuracy vs sparsity and vs training FLOPs](lenet300_mnist5k.png)\n")
  _plot(*plot_cells(rows), sparsities, out_png)


def redraw(out_md, out_png):
  """Draws ``out_png`` again from the table of ``out_md``, without the runs."""
  cells, seeds = read_cells(out_md)
  _plot(cells, seeds, sorted({s for _, s in cells if s is not None}), out_png)


def main():
  parser = _grid.sweep_parser(__doc__, workdir="workdirs/sweep_lenet300",
                              out=os.path.join(RESULTS, "lenet300_mnist5k"),
                              sparsities="0.9,0.95,0.98", methods=",".join(METHODS))
  parser.add_argument("--redraw", action="store_true",
                      help="redraw <out>.png from the table in <out>.md; no run")
  args = _grid.parse_lists(parser.parse_args())
  if args.redraw:
    redraw(args.out + ".md", args.out + ".png")
    return
  _grid.setup()
  start = time.time()
  run_all(args.workdir, args.methods, args.sparsities, args.seeds)
  elapsed = time.time() - start
  rows = load(args.workdir, args.methods, args.sparsities, args.seeds)
  write_report(rows, args.sparsities, _grid.command("experiments.studies.lenet300"), elapsed,
               args.out + ".md", args.out + ".png")
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()
