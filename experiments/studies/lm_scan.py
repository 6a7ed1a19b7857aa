r"""The scanned byte-level GPT on 3 seeds, and the regrowth warm-up's loss spikes.

Runs ``experiments/configs/lm_bytes_scan.py`` (nn.scan over 4 blocks, remat,
bfloat16 compute) on a shorter recipe than the config's: ``num_epochs = 2`` and
GraNet's prune window ending at epoch 1.25 (``sparsity.end_epoch``), the rest as
the config. Two comparisons, one workdir per run, resumable (``_grid``):

  (a) dense, GraNet, RigL, SET and static at 90% sparsity, and RigL with 2:4
      structure (50%);
  (b) GraNet and RigL at 90% with ``sparsity.regrowth_warmup = 25`` (a regrown
      weight's learning rate warms up over 25 updates), against (a)'s (warm-up 0):
      the loss spike of each mask-update event (``loss_spike`` in
      ``metrics.jsonl``, experiments/trainer/loss_spikes.py).

Seed 0 of every row runs first, then seed 1, then seed 2, so a sweep cut short
still compares whole rows. With ``--lock_file``, each run takes that lock (flock)
for itself, so other jobs sharing it can run between two runs. Each finished
run's summary fields, spikes and train-loss records are kept in
``experiments/results/lm_scan_runs/`` (the report is rebuilt from there once the
workdirs are gone). Writes ``experiments/results/lm_scan.md`` and
``lm_scan_spikes.png``.

  python -m experiments.studies.lm_scan --workdir=workdirs/lm_scan \
      [--seeds=0,1,2] [--lock_file=/tmp/sparse_jax_heavy.lock] [--report_only]
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
from typing import NamedTuple

import numpy as np

from experiments.configs import lm_bytes_scan
from experiments.studies import _grid
from experiments.trainer import train

RESULTS = _grid.RESULTS
RECORDS = os.path.join(RESULTS, "lm_scan_runs")
NUM_EPOCHS = 2
END_EPOCH = 1.25  # GraNet's prune window (the config's 2.5 of 4 epochs)
WARMUP = 25
# The learning rate's warm-up (0.25 epoch): the loss falls fast until then, so the
# first event's "spike" (step 50) measures the descent more than the event.
LR_WARMUP_STEPS = 50
SUMMARY_FIELDS = ("final_test_accuracy", "final_test_loss", "final_test_bits_per_byte",
                  "final_sparsity", "train_flops_vs_dense", "inference_flops_vs_dense",
                  "wall_time_s", "steps", "method")


class Row(NamedTuple):
  """One row of the study: a method, its sparsity and structure, its regrowth warm-up."""
  method: str
  sparsity: float | None = 0.9  # None: dense
  structure: str = "unstructured"
  warmup: int = 0

  @property
  def tag(self) -> str:
    """The row's part of a run's directory name (no ':' in a path)."""
    if self.method == "dense":
      return "dense"
    if self.structure != "unstructured":
      return f"{self.method}_{self.structure.replace(':', 'of')}"
    return f"{self.method}_s{self.sparsity}" + (f"_warmup{self.warmup}" if self.warmup else "")


# The order a seed's runs go in: the warm-up pairs first, then the rest of (a).
ROWS = (Row("rigl"), Row("rigl", warmup=WARMUP), Row("granet"),
        Row("granet", warmup=WARMUP), Row("dense", None), Row("static"), Row("set"),
        Row("rigl", 0.5, "2:4"))
MAIN_ROWS = (Row("dense", None), Row("granet"), Row("rigl"), Row("set"), Row("static"),
             Row("rigl", 0.5, "2:4"))
WARMUP_ROWS = (Row("granet"), Row("granet", warmup=WARMUP), Row("rigl"),
               Row("rigl", warmup=WARMUP))


def run_name(row: Row, seed: int) -> str:
  return f"{row.tag}_seed{seed}"


def make_config(row: Row, seed: int):
  """The config of ``row``'s run of ``seed``: lm_bytes_scan.py on the study's recipe."""
  arg = f"method={row.method},seed={seed}"
  if row.structure != "unstructured":
    arg += f",structure={row.structure}"
  elif row.sparsity is not None:
    arg += f",sparsity={row.sparsity}"
  config = lm_bytes_scan.get_config(arg)
  config.num_epochs = NUM_EPOCHS
  config.sparsity.end_epoch = END_EPOCH
  config.sparsity.regrowth_warmup = row.warmup
  return config


@contextlib.contextmanager
def _flock(lock_file: str | None):
  """Holds ``lock_file`` exclusively (as ``flock(1)`` does); nothing without one."""
  if not lock_file:
    yield
    return
  with open(lock_file, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _train_locked(lock_file, config, workdir):
  with _flock(lock_file):
    return train.train_and_evaluate(config, workdir)


def _status(run_workdir, record_path, tag):
  """Done: in its workdir, or recorded (its workdir gone)."""
  del tag
  done = _grid.has_summary(run_workdir) or os.path.exists(record_path)
  return _grid.FINISHED if done else _grid.TO_RUN


def run_all(workdir: str, seeds, lock_file: str | None = None):
  """Trains the runs not done yet: every row of seed 0, then of seed 1, ..."""
  runs = []
  for seed in seeds:
    for row in ROWS:
      d = os.path.join(workdir, run_name(row, seed))
      record = os.path.join(RECORDS, run_name(row, seed) + ".json")
      runs.append(_grid.GridRun(
          d, d, functools.partial(make_config, row, seed),
          functools.partial(_train_locked, lock_file),
          status=functools.partial(_status, d, record), metric="validation"))
  _grid.run_grid(runs)


def read_metrics(run_workdir: str) -> list[dict]:
  """The records of ``metrics.jsonl`` by step (a step logged twice: the last one)."""
  by_step = {}
  with open(os.path.join(run_workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[int(record["step"])] = record
  return [by_step[s] for s in sorted(by_step)]


def spike_events(records: list[dict]) -> list[dict]:
  """``[{"step", "spike", "events", "event_steps"}]`` of the records with a spike.

  A record's ``loss_spike`` is the mean over the ``loss_spike_events`` events whose
  10-update window closed since the record before; ``event_steps`` are those
  events (the mask-update records' steps, oldest first), when they can be told.
  """
  pending = [int(r["step"]) for r in records if r.get("mask_update")]
  out = []
  for r in records:
    if "loss_spike" not in r:
      continue
    n = int(r["loss_spike_events"])
    closed = [e for e in pending if e < r["step"]]
    # A resume inside a window drops an event: then the events are not told apart.
    steps = closed[-n:] if len(closed) >= n else []
    pending = [e for e in pending if e >= r["step"]]
    out.append({"step": int(r["step"]), "spike": float(r["loss_spike"]), "events": n,
                "event_steps": steps})
  return out


def run_result(run_workdir: str, summary: dict) -> dict:
  """A run's record: summary fields, spikes, train loss and mask-update steps."""
  records = read_metrics(run_workdir)
  return {**{k: summary[k] for k in SUMMARY_FIELDS if k in summary},
          "spikes": spike_events(records),
          "train_loss": [[int(r["step"]), float(r["train_loss"])] for r in records
                         if "train_loss" in r],
          "mask_update_steps": [int(r["step"]) for r in records if r.get("mask_update")]}


def load_runs(workdir: str, rows, seeds, records: str = RECORDS) -> dict[Row, list[dict]]:
  """``{row: [result of each seed's run]}`` from the workdirs, else from ``records``."""
  def read(row, seed):
    d = os.path.join(workdir, run_name(row, seed))
    result = _grid.read_run(os.path.join(d, "summary.json"),
                            os.path.join(records, run_name(row, seed) + ".json"),
                            functools.partial(run_result, d), label={"seed": seed})
    return None if result is None else {**result, "seed": seed}
  return _grid.collect((row, (read(row, seed) for seed in seeds)) for row in rows)


def mean_spike(result: dict, after: int = 0) -> float:
  """The run's mean spike over its events after step ``after`` (NaN: none).

  Each record is weighted by its events; with ``after``, a record counts when all
  its events are known to be after it.
  """
  spikes = [s for s in result["spikes"]
            if not after or (s["event_steps"] and min(s["event_steps"]) > after)]
  return (sum(s["spike"] * s["events"] for s in spikes)
          / sum(s["events"] for s in spikes)) if spikes else math.nan


def _ms(values, scale=1.0, digits=3):
  values = [scale * v for v in values if not math.isnan(v)]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _mean_cell(runs, key, digits=3):
  values = [r[key] for r in runs if r.get(key) is not None]
  return f"{np.mean(values):.{digits}f}" if values else "-"


def _label(row: Row) -> tuple[str, str]:
  if row.method == "dense":
    return "dense", "-"
  if row.structure != "unstructured":
    return f"{row.method} ({row.structure})", f"{row.sparsity}"
  return row.method, f"{row.sparsity}"


def main_table(runs: dict[Row, list[dict]]) -> list[str]:
  """Table (a): quality and cost of each method (mean ± std over seeds)."""
  lines = [
      "| method | sparsity | val. loss (nats/byte) | bits per byte | next-byte acc. (%) "
      "| final sparsity | train kernel FLOPs (x dense) | inference kernel FLOPs (x dense) "
      "| wall time (s) | seeds |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in MAIN_ROWS:
    if row not in runs:
      continue
    rs = runs[row]
    lines.append(
        f"| {' | '.join(_label(row))} | {_ms([r['final_test_loss'] for r in rs])} | "
        f"{_ms([r['final_test_bits_per_byte'] for r in rs])} | "
        f"{_ms([r['final_test_accuracy'] for r in rs], 100, 2)} | "
        f"{_mean_cell(rs, 'final_sparsity', 4)} | {_mean_cell(rs, 'train_flops_vs_dense')} | "
        f"{_mean_cell(rs, 'inference_flops_vs_dense')} | {_mean_cell(rs, 'wall_time_s', 0)} | "
        f"{len(rs)} |")
  return lines


def warmup_table(runs: dict[Row, list[dict]]) -> list[str]:
  """Table (b): each warm-up policy's loss spikes and final loss."""
  lines = [
      "| method | regrowth warm-up (updates) | mean loss spike "
      f"| mean spike, events after step {LR_WARMUP_STEPS} | largest spike "
      "| events per run | val. loss (nats/byte) | seeds |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in WARMUP_ROWS:
    if row not in runs:
      continue
    rs = runs[row]
    largest = max((s["spike"] for r in rs for s in r["spikes"]), default=math.nan)
    events = np.mean([sum(s["events"] for s in r["spikes"]) for r in rs])
    lines.append(
        f"| {row.method} | {row.warmup} | {_ms([mean_spike(r) for r in rs], digits=4)} | "
        f"{_ms([mean_spike(r, LR_WARMUP_STEPS) for r in rs], digits=4)} | "
        f"{largest:.4f} | {events:g} | {_ms([r['final_test_loss'] for r in rs])} | "
        f"{len(rs)} |")
  return lines


def _intro_lines(runs, seeds, command) -> list[str]:
  """Title, recipe, seeds, command, wall times, where the records are."""
  all_runs = [r for rs in runs.values() for r in rs]
  return [
      "# The scanned byte-level GPT: sparse methods on 3 seeds, regrowth warm-up",
      "",
      "`experiments/configs/lm_bytes_scan.py`: GPT on `bytes_pydoc` (64-byte windows of "
      "the Python documentation, the next byte predicted at every position), width 128, "
      "4 pre-LN blocks of 4 heads and a 512-wide MLP as one `nn.scan` with `nn.remat`, "
      "bfloat16 compute (float32 params and AdamW state), masks per block "
      "(`sparsity.layer_axes`). **A shorter recipe than the config's**: "
      f"`config.num_epochs = {NUM_EPOCHS}` (202 steps each, batch 32; the config has 4) "
      f"and `config.sparsity.end_epoch = {END_EPOCH}` (GraNet's prune window; the "
      "config's 2.5), everything else as the config: AdamW lr 2e-3, 0.25 epoch of "
      "warm-up then cosine, ΔT = 50, drop fraction 0.3, ERK for RigL/SET/static, "
      "GraNet pruning globally by magnitude; RigL stops updating its masks at 75% of "
      "the run and SET at its end (their defaults). Validation loss per byte in nats; "
      "bits per byte = loss / ln 2. FLOPs (docs/algorithms.md §10) count the kernels "
      "only: XLA's cost analysis counts a scan body once, so the rest of the model "
      "(attention scores, softmax, LayerNorm) reads as 0 here; they were recounted "
      "after the run (`experiments.trainer.flops.posthoc_run_flops`) once the "
      "trainer's count read a stacked leaf's densities (it had counted the scanned "
      "blocks dense).",
      "",
      f"Mean ± std over the seeds of each row (column 'seeds'; asked: {seeds}). "
      f"Command: `{command}`. Sum of the runs' wall times: "
      f"{sum(r['wall_time_s'] for r in all_runs) / 60:.1f} min on a 2-core CPU shared "
      "with other work (wall times are noisy; the first run of a shape also compiles).",
      "",
      "Each run's summary fields, loss spikes and train-loss records are kept in "
      "`experiments/results/lm_scan_runs/` (the report reads a run from its workdir, "
      "else from there).",
      "",
  ]


def _warmup_intro() -> list[str]:
  return [
      "",
      f"## (b) Regrowth warm-up: 0 (the papers') vs {WARMUP} updates",
      "",
      "`sparsity.regrowth_warmup`: a weight regrown at an event takes min(1, (t - t_e) / "
      f"N) of its update for N = {WARMUP} updates (docs/algorithms.md §5). The spike of "
      "an event is the mean train loss of the 10 updates after it over the 10 before "
      "(experiments/trainer/loss_spikes.py; above 1: the loss rose after the event; "
      "the loss still falls between events, which pulls spikes below 1). Mean loss "
      "spike: each run's mean over its events (records weighted by their "
      "`loss_spike_events`), then mean ± std over seeds; largest spike: over every "
      "event of the row's runs. The first event (step 50) ends the learning rate's "
      "warm-up, when the loss still falls fast, so its ratio is well below 1 whatever "
      f"the policy; the column 'events after step {LR_WARMUP_STEPS}' leaves it out. "
      "The warm-up 0 rows are (a)'s runs.",
      "",
  ]


def plot_spikes(runs, out_png, method="rigl", seed=0):
  """Each event's loss spike, and the recorded train loss, of ``method`` at warm-up 0
  and ``WARMUP`` for ``seed``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  for row, style in ((Row(method), dict(color="C0", marker="o")),
                     (Row(method, warmup=WARMUP), dict(color="C3", marker="s"))):
    result = next((r for r in runs.get(row, []) if r.get("seed") == seed), None)
    if result is None:
      continue
    label = f"warm-up {row.warmup}"
    # A record holding several events' mean is put at their mean step.
    points = [(np.mean(s["event_steps"] or [s["step"]]), s["spike"]) for s in result["spikes"]]
    ax.plot(*zip(*points), label=label, **style)
    ax_loss.plot(*zip(*result["train_loss"]), label=label, ms=3, **style)
  for event in next((r["mask_update_steps"] for r in runs.get(Row(method), [])
                     if r.get("seed") == seed), []):
    ax_loss.axvline(event, color="gray", lw=0.5, ls=":")
  ax.axhline(1.0, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("mask-update event (step)")
  ax.set_ylabel("loss spike: mean loss 10 updates after / 10 before")
  ax.set_title(f"loss spike per event (seed {seed})")
  ax_loss.set_yscale("log")
  ax_loss.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  ax_loss.set_xlabel("step (records: every 101 steps and every event, dotted)")
  ax_loss.set_ylabel("train loss (nats/byte), mean since the previous record")
  ax_loss.set_title("train loss as recorded")
  # Both panels draw the same two runs: one legend, right of the second panel, where
  # it hides no data.
  ax_loss.legend(title="regrowth", loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.suptitle("Scanned 4-block byte-level GPT (lm_bytes_scan.py) on bytes_pydoc (64-byte "
               f"windows of Python's pydoc topics)\n{method} at 90% sparsity, regrowth warm-up "
               f"0 vs {WARMUP} updates", fontsize=10)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def write_report(runs, seeds, command, out_md, out_png):
  """Writes the two tables of ``runs`` (``load_runs``) to ``out_md``, the plot to ``out_png``."""
  lines = [*_intro_lines(runs, seeds, command),
           "## (a) Methods at 90% sparsity (RigL 2:4: 50%)", "", *main_table(runs),
           *_warmup_intro(), *warmup_table(runs), "",
           f"![loss spike per event]({os.path.basename(out_png)})"]
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_spikes(runs, out_png)


def main():
  parser = _grid.sweep_parser(__doc__, workdir="workdirs/lm_scan",
                              out=os.path.join(RESULTS, "lm_scan"))
  parser.add_argument("--lock_file", default="",
                      help="a lock (flock) each run holds while it trains")
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from the runs done (workdirs or records)")
  args = _grid.parse_lists(parser.parse_args())
  _grid.setup()
  if not args.report_only:
    run_all(args.workdir, args.seeds, args.lock_file)
  runs = load_runs(args.workdir, ROWS, args.seeds)
  write_report(runs, args.seeds, _grid.command("experiments.studies.lm_scan"),
               args.out + ".md", args.out + "_spikes.png")
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()
