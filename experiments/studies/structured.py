r"""Structured-sparsity results: N:M and channel runs on LeNet-300-100 / MNIST subset.

2:4 and 1:4 (``config.sparsity.structure``) with GraNet, GMP and RigL, and channel
sparsity (whole output units, the classifier kept dense) with GraNet and GMP at
50/75/90% of the hidden units, ranked globally (the library's default: units of
both hidden layers ranked together by their RMS) and layer-wise (each hidden layer
keeps its own fraction). The recipe is ``default.lenet300_mnist5k``'s. One workdir
per run, skipping runs that already have a ``summary.json`` (an interrupted sweep
resumes); then writes ``experiments/results/structured_lenet300_mnist5k.md``. For
the channel rows the exported model is condensed (``sparse_jax.condense_channels``)
and its forward timed against the masked dense forward (cached per run in
``latency.json``).

SR-STE and STE (trainer methods ``srste``, ``ste``: ``sparse_jax.ste``) at 2:4
and 1:4 too. Each finished run's result fields are recorded in
``experiments/results/structured_runs/<row>_seed<k>.json`` (committed) and read
back when its workdir is gone; the report has every row with a workdir or a
record, and keeps (marked †) the rows of the committed table that have neither.

  python -m experiments.studies.structured --workdir=workdirs/sweep_structured \
      [--seeds=0,1,2] [--rows=granet_2:4,gmp_channels_0.5]
"""

import functools
import json
import os

import numpy as np

from experiments.trainer import train
from experiments.configs import default
from experiments.studies import _grid

RESULTS = _grid.RESULTS
REGROWTH = {"rigl": 0.3}  # the drop fraction of sweep_lenet300 (RigL's paper)


def _rows():
  rows = {}
  for structure in ("2:4", "1:4"):
    n, m = (int(v) for v in structure.split(":"))
    for method in ("granet", "gmp", "rigl", "srste", "ste"):
      rows[f"{method}_{structure}"] = (method, structure, 1 - n / m, {})
  for scope in ("global", "layerwise"):
    for method in ("granet", "gmp"):
      for s in (0.5, 0.75, 0.9):
        tag = "channels" if scope == "global" else "channels_layerwise"
        rows[f"{method}_{tag}_{s}"] = (method, "channels", s,
                                       {"scope": scope, "keep_last_dense": True})
  return rows


ROWS = _rows()  # name -> (method, structure, sparsity.final, other sparsity fields)


def run_config(name, seed):
  method, structure, sparsity, overrides = ROWS[name]
  config = default.lenet300_mnist5k(method, f"sparsity={sparsity},seed={seed}",
                                    **overrides)
  config.sparsity.structure = structure
  if method in REGROWTH:
    config.sparsity.regrowth_rate = REGROWTH[method]
  config.log_every_steps = 100
  return config


def run_dir(workdir, name, seed):
  return os.path.join(workdir, f"{name.replace(':', '-')}_seed{seed}")


def run_all(workdir, names, seeds):
  runs = []
  for seed in seeds:
    for name in names:
      d = run_dir(workdir, name, seed)
      runs.append(_grid.GridRun(d, d, functools.partial(run_config, name, seed),
                                train.train_and_evaluate))
  _grid.run_grid(runs)


def condensed_latency(run_workdir, rounds=15, reps=20):
  """Median forward time (ms) of the masked and the condensed model, batch 1 and 128."""
  cache = os.path.join(run_workdir, "latency.json")
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)
  from experiments.trainer import inference  # pylint: disable=g-import-not-at-top
  out = inference.exported_mlp_latency(os.path.join(run_workdir, "export.npz"),
                                       rounds=rounds, reps=reps)
  with open(cache, "w") as f:
    json.dump(out, f)
  return out


RUNS = os.path.join(RESULTS, "structured_runs")  # one committed record per run
FIELDS = ("method", "steps", "final_test_accuracy", "best_test_accuracy",
          "final_sparsity", "mask_sparsity", "train_flops_vs_dense",
          "inference_flops_vs_dense", "widths", "masked_b1_us", "condensed_b1_us",
          "masked_b128_us", "condensed_b128_us")


def record_path(name, seed, runs_dir=RUNS):
  return run_dir(runs_dir, name, seed) + ".json"


def _result(name, run_workdir, summary):
  """The recorded fields of a finished run (channel rows: kept widths and latency)."""
  summary = _grid.with_flops(summary, run_workdir)
  if ROWS[name][1] == "channels":
    with np.load(os.path.join(run_workdir, "export.npz")) as e:
      widths = [int(e[f"masks/Dense_{i}/kernel"].any(axis=0).sum()) for i in (0, 1)]
    summary = {**summary, **condensed_latency(run_workdir), "widths": widths}
  return {k: summary[k] for k in FIELDS if k in summary}


def load_run(workdir, name, seed, runs_dir=RUNS):
  """A run's result fields: from its workdir (and recorded), else from its record.

  The record (``experiments/results/structured_runs/``, committed) keeps a run's
  result when its workdir (git-ignored) is gone; None if neither exists.
  """
  d = run_dir(workdir, name, seed)
  return _grid.read_run(os.path.join(d, "summary.json"), record_path(name, seed, runs_dir),
                        functools.partial(_result, name, d),
                        label={"row": name, "seed": seed}, rewrite=True)


def load(workdir, names, seeds, runs_dir=RUNS):
  return _grid.collect((name, (load_run(workdir, name, s, runs_dir) for s in seeds))
                       for name in names)


def previous_lines(out_md):
  """The table lines of the report as committed, by (method, structure, scope, target).

  Rows run before the per-run records existed (their workdirs are gone) are
  kept from here as printed.
  """
  if not os.path.exists(out_md):
    return {}
  out = {}
  with open(out_md) as f:
    for line in f:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if len(cells) == 13 and cells[0] in {r[0] for r in ROWS.values()}:
        out[tuple(cells[:4])] = cells
  return out


def _intro_lines(command):
  """The recipe, what the columns count, the command; then the table's header."""
  return [
      "# Structured sparsity on LeNet-300-100 / MNIST subset (4,000 train / 1,000 test)",
      "",
      "The recipe of `experiments/configs/default.py` `lenet300_mnist5k` (30 epochs, "
      "batch 128, SGD Nesterov 0.9, lr 0.1 x0.1 at 50%/75%, weight decay 5e-4, ΔT = 100 "
      "steps, GraNet/GMP pruning from epoch 0 to 20; RigL drop fraction 0.3) with "
      "`config.sparsity.structure`. N:M (`2:4`, `1:4`): every group of M consecutive "
      "inputs of every layer (the classifier included) has exactly N active weights; "
      "GraNet and GMP reach it along their schedule, RigL drops and regrows inside "
      "groups. Channels: whole hidden units are removed, the classifier kept dense; the "
      "target sparsity counts units (of the 400 hidden ones), the sparsity "
      "columns count weights (final: zeros of the final params, which include kept "
      "weights that are exactly 0, e.g. regrown ones; mask: the masks). *Global* ranks the units of both hidden layers together "
      "by their RMS (the library's default for channels), *layer-wise* keeps each "
      "layer's own fraction. Mean ± std over seeds. Dense on the same recipe: "
      "94.53 ± 0.19% (`lenet300_mnist5k.md`).",
      "",
      "FLOPs are relative to dense, from each run's summary (the counting of "
      "`lenet300_mnist5k.md`). Latency (channel rows): median forward time of the "
      "masked dense model and of the condensed one (`sparse_jax.condense_channels` on "
      "the run's export), jitted and warm, on the shared 2-core CPU (not quiet: other "
      "engineers ran tests meanwhile), batch 1 / 128. N:M rows: an exported N:M model's "
      "latency does not depend on the trained values, so it is measured once per "
      "pattern by `experiments/benchmarks/inference.py` on LeNet-300-100 (figures in "
      "`experiments/benchmarks/README.md`, loaded machine): as `nm_compress` storage "
      "with the reference `nm_dense` forward, 2:4 takes 11.5x / 116x the dense forward "
      "(24 µs / 356 µs) at batch 1 / 128 and 1:4 7.6x / 11.4x, in 0.63x / 0.31x of the "
      "bytes; as masked dense it takes the dense time (XLA:CPU has no N:M kernel).",
      "",
      "SR-STE and STE (`sparse_jax.ste`; trainer methods `srste`, `ste`): the "
      "optimizer keeps dense weights, the forward pass sees the N:M magnitude masks "
      "of them, recomputed every step (so at the target structure from step 0); their "
      "train FLOPs count every step's masked forward and input gradient and its "
      "dense weight gradient (the dense weights are updated); SR-STE adds lambda_w = "
      "2e-4 times every pruned weight to its gradient (Zhou et al. 2021). The "
      "exported model is the masked one.",
      "",
      "† Copied as printed from the previous version of this table: those runs' "
      "workdirs are gone and no per-run record was kept then. Every run since is "
      "recorded in `experiments/results/structured_runs/` (read back when its "
      "workdir is gone).",
      "",
      f"Command: `{command}`",
      "",
      "| method | structure | scope | target sparsity | test accuracy (%) | final sparsity "
      "| mask sparsity | train FLOPs (x dense) | inference FLOPs (x dense) "
      "| hidden units kept (of 300-100) "
      "| masked / condensed latency, batch 1 (µs) | batch 128 (µs) | seeds |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]


def _mean(runs, key):
  return float(np.mean([r[key] for r in runs]))


def _table_line(name, runs):
  """The table line of row ``name`` from its runs (mean ± std over the seeds)."""
  method, structure, s, overrides = ROWS[name]
  acc = 100 * np.mean([r["final_test_accuracy"] for r in runs])
  acc_sd = 100 * np.std([r["final_test_accuracy"] for r in runs])
  if structure == "channels":
    units = "-".join(f"{np.mean([r['widths'][i] for r in runs]):.0f}" for i in (0, 1))
    lat = [f"{_mean(runs, f'masked_b{b}_us'):.0f} / {_mean(runs, f'condensed_b{b}_us'):.0f}"
           for b in (1, 128)]
  else:
    units, lat = "300-100", ["-", "-"]
  return (f"| {method} | {structure} | {overrides.get('scope', '-')} | {s:g} | "
          f"{acc:.2f} ± {acc_sd:.2f} | {_mean(runs, 'final_sparsity'):.4f} | "
          f"{_mean(runs, 'mask_sparsity'):.4f} | "
          f"{_mean(runs, 'train_flops_vs_dense'):.3f} | "
          f"{_mean(runs, 'inference_flops_vs_dense'):.3f} | {units} | {lat[0]} | {lat[1]} | "
          f"{len(runs)} |")


def _previous_line(name, previous):
  """Row ``name`` as the previous table printed it, marked †; None if it had none."""
  method, structure, s, overrides = ROWS[name]
  key = (method, structure, overrides.get("scope", "-"), f"{s:g}")
  if key not in previous:
    return None
  cells = [*previous[key][:-1], previous[key][-1].rstrip("†").strip() + " †"]
  return "| " + " | ".join(cells) + " |"


def write_report(rows, command, out_md, previous=None):
  """Writes the table of ``rows`` (name -> runs); rows without runs are taken from
  ``previous`` (``previous_lines``), marked † in the seeds column."""
  lines = _intro_lines(command)
  for name in ROWS:
    line = (_table_line(name, rows[name]) if rows.get(name)
            else _previous_line(name, previous or {}))
    if line is not None:
      lines.append(line)
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  parser = _grid.sweep_parser(__doc__, workdir="workdirs/sweep_structured",
                              out=os.path.join(RESULTS, "structured_lenet300_mnist5k"))
  parser.add_argument("--rows", default=",".join(ROWS))
  args = _grid.parse_lists(parser.parse_args())
  _grid.setup()
  run_all(args.workdir, args.rows.split(","), args.seeds)
  previous = previous_lines(args.out + ".md")
  rows = load(args.workdir, list(ROWS), args.seeds)  # every row with a workdir or record
  write_report(rows, _grid.command("experiments.studies.structured"), args.out + ".md",
               previous)
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()
