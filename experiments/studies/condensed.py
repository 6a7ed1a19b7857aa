r"""Accuracy vs training time vs training FLOPs: dense, unstructured and channel runs,
masked and condensed (issue 32), on the bundled MNIST subset.

Rows (``experiments/configs/channels_mnist5k.py``, MLP 784-2048-2048-10 by default,
75% sparsity): dense; unstructured GraNet and RigL (of the weights); GraNet and
RigL with ``structure=channels`` (of the hidden units), masked and condensed; and
Chase (``method=chase``, experiments/trainer/chase.py): RigL on the weights at 90%
whose lowest-UMM hidden units are removed, to the same 75% of them by epoch 5, the
weight budget regrown in the units left.
Condensed RigL removes a unit once it has been dead after 2 events in a row
(``condense_patience=2``): with 1, the units a RigL event drops would be removed
before the next event could regrow any (its drop and its growth are at the same
event). Each run is trained in its own sub-workdir (resumable), with the
persistent compilation cache shared by the runs (a row's later seeds reuse the
programs of its first): the time is each run's own time to result, the median
over seeds. Every run's result is recorded in ``experiments/results/condensed_runs/``.

  python -m experiments.studies.condensed --workdir=workdirs/condensed --seeds=0,1,2
"""

from __future__ import annotations

import os
import statistics
import time

from experiments.configs import channels_mnist5k
from experiments.studies import _grid
from experiments.trainer import train

ROWS = {  # name -> family argument
    "dense": "method=dense",
    "granet_unstructured": "method=granet,structure=unstructured",
    "rigl_unstructured": "method=rigl,structure=unstructured",
    "granet_channels_masked": "method=granet",
    "granet_channels_condensed": "method=granet,condense=1",
    "rigl_channels_masked": "method=rigl",
    "rigl_channels_condensed": "method=rigl,condense=1",
    "chase_condensed": "method=chase",
}
CHASE_WEIGHT_SPARSITY = 0.9  # at 75% of the units the budget binds from ~89%
OUT = os.path.join(_grid.RESULTS, "condensed_mnist5k.md")
RECORDS = os.path.join(_grid.RESULTS, "condensed_runs")
KEYS = ("final_test_accuracy", "wall_time_s", "train_flops_vs_dense",
        "inference_flops_vs_dense", "mask_sparsity", "condensed_widths", "steps")


def config_of(row: str, width: int, sparsity: float, seed: int):
  density = (f"sparsity={CHASE_WEIGHT_SPARSITY},channel_sparsity={sparsity}"
             if row == "chase_condensed" else f"sparsity={sparsity}")
  config = channels_mnist5k.get_config(f"{ROWS[row]},width={width},{density},seed={seed}")
  if row == "rigl_channels_condensed":
    config.sparsity.condense_patience = 2
  return config


def runs(workdir, width, sparsity, seeds, rows=tuple(ROWS)):
  """The sweep's ``GridRun``s (row x seed)."""
  out = []
  for row in rows:
    for seed in seeds:
      d = os.path.join(workdir, f"{row}_w{width}_s{sparsity}_seed{seed}")
      out.append(_grid.GridRun(f"{row} seed {seed}", d,
                               lambda r=row, s=seed: config_of(r, width, sparsity, s),
                               train.train_and_evaluate))
  return out


def load(workdir, width, sparsity, seeds, rerun=()) -> dict[str, list[dict]]:
  """``{row: results}``: each run's summary fields, else its committed record
  (the records of the ``rerun`` rows rewritten from their runs)."""
  def results(row):
    for seed in seeds:
      name = f"{row}_w{width}_s{sparsity}_seed{seed}"
      yield _grid.read_run(os.path.join(workdir, name, "summary.json"),
                           os.path.join(RECORDS, f"{name}.json"),
                           lambda s: {k: s.get(k) for k in KEYS},
                           label={"row": row, "seed": seed}, rewrite=row in rerun)
  return _grid.collect((row, results(row)) for row in ROWS)


def _mean_std(values, scale=1.0, digits=2):
  values = [scale * v for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows: dict[str, list[dict]]) -> list[str]:
  """The report's table lines."""
  dense_t = statistics.median(r["wall_time_s"] for r in rows.get("dense", [{"wall_time_s": 1}]))
  lines = ["| run | test accuracy (%) | time to result (s, median) | x dense | train FLOPs "
           "(x dense) | inference FLOPs (x dense) | final widths | seeds |",
           "|---|---|---|---|---|---|---|---|"]
  for row, results in rows.items():
    t = statistics.median(r["wall_time_s"] for r in results)
    widths = results[0].get("condensed_widths")
    lines.append(
        f"| {row} | {_mean_std([r['final_test_accuracy'] for r in results], 100)} "
        f"| {t:.1f} | {dense_t / t:.2f} "
        f"| {statistics.mean(r['train_flops_vs_dense'] for r in results):.3f} "
        f"| {statistics.mean(r['inference_flops_vs_dense'] for r in results):.3f} "
        f"| {'-'.join(map(str, widths[:-1])) if widths else '-'} | {len(results)} |")
  return lines


def plot(rows: dict[str, list[dict]], out_png: str, width: int, sparsity: float):
  """Accuracy against time to result and against training FLOPs, one point per row."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for row, results in rows.items():
    acc = [100 * r["final_test_accuracy"] for r in results]
    y, e = statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
    for ax, x in ((axes[0], statistics.median(r["wall_time_s"] for r in results)),
                  (axes[1], statistics.mean(r["train_flops_vs_dense"] for r in results))):
      ax.errorbar(x, y, yerr=e, fmt="s" if "condensed" in row else "o", capsize=3,
                  label=row)
  axes[0].set_xlabel("time to result (s, median over seeds)")
  axes[1].set_xlabel("training FLOPs (x dense)")
  axes[0].set_ylabel("test accuracy (%)")
  fig.suptitle(f"MLP 784-{width}-{width}-10 on the MNIST subset (4,000 train): "
               f"{int(100 * sparsity)}% sparsity, masked vs condensed")
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110, bbox_inches="tight")
  plt.close(fig)


def main():
  parser = _grid.sweep_parser(__doc__, workdir="workdirs/condensed", out=OUT)
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--sparsity", type=float, default=0.75)
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument("--rows", default=",".join(ROWS),
                      help="the rows to run (the others are read from their records)")
  args = _grid.parse_lists(parser.parse_args())
  unknown = set(args.rows.split(",")) - set(ROWS)
  if unknown:
    parser.error(f"--rows: unknown {sorted(unknown)}; the rows are {','.join(ROWS)}")
  _grid.setup()
  t0 = time.time()
  if not args.report_only:
    _grid.run_grid(runs(args.workdir, args.width, args.sparsity, args.seeds,
                        args.rows.split(",")))
  rows = load(args.workdir, args.width, args.sparsity, args.seeds,
              () if args.report_only else args.rows.split(","))
  total = sum(r["wall_time_s"] for results in rows.values() for r in results)
  png = os.path.splitext(args.out)[0] + ".png"
  plot(rows, png, args.width, args.sparsity)
  doc = __doc__.split("\n\n")
  with open(args.out, "w") as f:
    f.write("# Condensed channel-sparse training on the MNIST subset\n\n")
    f.write(" ".join(doc[0].split()) + "\n\n" + " ".join(doc[1].split()) + "\n\n")
    f.write(f"Command: `{_grid.command('experiments.studies.condensed')}` "
            f"(the runs' times to result sum to {total:.0f} s on the shared 2-core CPU; "
            f"this invocation took {time.time() - t0:.0f} s).\n\n")
    f.write("\n".join(table(rows)) + "\n\n")
    f.write(f"![accuracy vs time and FLOPs]({os.path.basename(png)})\n")


if __name__ == "__main__":
  main()
