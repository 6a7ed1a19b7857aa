r"""The small-scale results table: every method on LeNet-300-100 / MNIST subset.

Runs dense, GraNet, GraNet-ST, GMP, RigL, SET and static at 90/95/98% sparsity with
3 seeds each (dense once per seed), one workdir per run, skipping runs that
already have a ``summary.json`` (so an interrupted sweep resumes), then writes
``experiments/results/lenet300_mnist5k.md`` and ``lenet300_mnist5k.png``.

  python -m experiments.sweep_lenet300 --workdir=workdirs/sweep_lenet300 \
      [--seeds=0,1,2] [--sparsities=0.9,0.95,0.98] [--methods=granet,rigl]
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from experiments import train
from experiments.configs import default

# name -> (method, overrides of config.sparsity)
METHODS = {
    "dense": ("dense", {}),
    "granet": ("granet", {}),
    "granet_st": ("granet", {"initial": 0.5}),
    "gmp": ("gmp", {}),
    "rigl": ("rigl", {"regrowth_rate": 0.3}),
    "set": ("set", {"regrowth_rate": 0.3}),
    "static": ("static", {}),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def run_dir(workdir, name, sparsity, seed):
  tag = "dense" if name == "dense" else f"{name}_s{sparsity}"
  return os.path.join(workdir, f"{tag}_seed{seed}")


def run_all(workdir, methods, sparsities, seeds):
  for seed in seeds:
    for name in methods:
      for s in ([sparsities[0]] if name == "dense" else sparsities):
        d = run_dir(workdir, name, s, seed)
        if os.path.exists(os.path.join(d, "summary.json")):
          continue
        method, overrides = METHODS[name]
        config = default.lenet300_mnist5k(method, f"sparsity={s},seed={seed}", **overrides)
        config.log_every_steps = 100
        train.train_and_evaluate(config, d)


def load(workdir, methods, sparsities, seeds):
  rows = {}
  for name in methods:
    for s in ([None] if name == "dense" else sparsities):
      runs = []
      for seed in seeds:
        path = os.path.join(run_dir(workdir, name, s if s else sparsities[0], seed),
                            "summary.json")
        if os.path.exists(path):
          with open(path) as f:
            runs.append(json.load(f))
      if runs:
        rows[(name, s)] = runs
  return rows


def write_report(rows, sparsities, command, elapsed, out_md, out_png):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  stat = lambda runs, k: (100 * np.mean([r[k] for r in runs]), 100 * np.std([r[k] for r in runs]))
  lines = [
      "# LeNet-300-100 on the bundled MNIST subset (4,000 train / 1,000 test)",
      "",
      "Every method with the recipe of `experiments/configs/granet_lenet300_mnist5k.py` "
      "(30 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 x0.1 at 50%/75%, weight decay "
      "5e-4, ΔT = 100 steps, pruning from epoch 0 to 20; RigL/SET drop fraction 0.3). "
      "Mean ± std over seeds; sparsity is measured from the final params.",
      "",
      f"Command: `{command}`",
      "",
      f"Sweep wall time: {elapsed / 60:.1f} min on this 2-core CPU.",
      "",
      "| method | target sparsity | test accuracy (%) | best test acc. (%) | final sparsity | wall time (s) | seeds |",
      "|---|---|---|---|---|---|---|",
  ]
  for (name, s), runs in rows.items():
    acc, acc_sd = stat(runs, "final_test_accuracy")
    best, best_sd = stat(runs, "best_test_accuracy")
    sp = np.mean([r["final_sparsity"] for r in runs])
    wall = np.mean([r["wall_time_s"] for r in runs])
    lines.append(f"| {name} | {'-' if s is None else s} | {acc:.2f} ± {acc_sd:.2f} | "
                 f"{best:.2f} ± {best_sd:.2f} | {sp:.4f} | {wall:.1f} | {len(runs)} |")
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n\n![accuracy vs sparsity](lenet300_mnist5k.png)\n")

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(n for n, _ in rows):
    if name == "dense":
      acc, sd = stat(rows[("dense", None)], "final_test_accuracy")
      ax.axhspan(acc - sd, acc + sd, color="gray", alpha=0.2)
      ax.axhline(acc, color="gray", ls="--", label="dense")
      continue
    xs = [s for s in sparsities if (name, s) in rows]
    ms = [stat(rows[(name, s)], "final_test_accuracy") for s in xs]
    ax.errorbar([100 * x for x in xs], [m for m, _ in ms], yerr=[e for _, e in ms],
                marker="o", capsize=3, label=name)
  ax.set_xlabel("sparsity (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("LeNet-300-100, MNIST subset")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/sweep_lenet300")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--sparsities", default="0.9,0.95,0.98")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(RESULTS, "lenet300_mnist5k"))
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
  methods = args.methods.split(",")
  sparsities = [float(s) for s in args.sparsities.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.time()
  run_all(args.workdir, methods, sparsities, seeds)
  elapsed = time.time() - start
  rows = load(args.workdir, methods, sparsities, seeds)
  command = "python -m experiments.sweep_lenet300 " + " ".join(sys.argv[1:])
  write_report(rows, sparsities, command.strip(), elapsed, args.out + ".md", args.out + ".png")
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()
