r"""The gradient-flow report: reads a sweep's workdirs, writes markdown and PNG plots.

  python -m experiments.gradient_flow_report --workdir=workdirs/gradient_flow \
      [--out=experiments/results/gradient_flow] [--command="<the sweep command>"]

Writes ``<out>/README.md`` with
  * the SC-SDC widths (sparse width, active weights, dense width, leftover);
  * sparse vs same-capacity dense test accuracy per setting (mean ± std over seeds);
  * each gradient-flow measure vs final accuracy, Kendall's tau-b across runs (all,
    sparse only, dense only), for the measure averaged over the logged steps and
    at initialisation (step 0);
  * for each finding of the EGF paper (SPEC §8) whether these runs support it,
    with the numbers;
and ``sparse_vs_dense.png`` and ``measures_vs_accuracy.png`` next to it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import sys

import numpy as np

MEASURES = ("egf_p1", "egf_p2", "gradient_norm", "gradient_norm_active", "ghg")
SGD_LIKE = ("sgd", "momentum", "adagrad")
ADAPTIVE = ("adam", "rmsprop")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "gradient_flow")


# ----------------------------------------------------------------------------
# Reading runs.
# ----------------------------------------------------------------------------


def load_run(run_dir: str) -> dict | None:
  """One finished run as a flat record, or None if it has not finished.

  The record holds the grid point (``run.json``), ``accuracy`` (final test
  accuracy), and for every measure ``<m>`` its mean over the logged steps
  (``measures[m]``) and its value at step 0 (``init[m]``).
  """
  paths = {k: os.path.join(run_dir, f) for k, f in (
      ("run", "run.json"), ("summary", "summary.json"), ("metrics", "metrics.jsonl"))}
  if not all(os.path.exists(p) for p in paths.values()):
    return None
  with open(paths["run"]) as f:
    record = json.load(f)
  with open(paths["summary"]) as f:
    summary = json.load(f)
  if summary.get("final_test_accuracy") is None:
    return None
  series = collections.defaultdict(dict)  # measure -> step -> value
  with open(paths["metrics"]) as f:
    for line in f:
      row = json.loads(line)
      for m in MEASURES:
        if m in row:
          series[m][row["step"]] = row[m]  # a resumed run may log a step twice
  record["accuracy"] = summary["final_test_accuracy"]
  record["wall_time_s"] = summary.get("wall_time_s")
  record["measures"] = {m: float(np.mean(list(s.values()))) for m, s in series.items()}
  record["init"] = {m: s[0] for m, s in series.items() if 0 in s}
  record["series"] = {m: sorted(s.items()) for m, s in series.items()}
  return record


def load_runs(workdir: str) -> list[dict]:
  """Every finished run under ``workdir`` (one subdirectory per run), by name."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; point it at the "
                     "sweep's root (the --workdir of gradient_flow_sweep).")
  records = [load_run(os.path.join(workdir, d)) for d in sorted(os.listdir(workdir))]
  return [r for r in records if r is not None]


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------


def kendall_tau(x, y) -> float:
  """Kendall's tau-b of two equally long sequences (ties in either handled).

  ``(C - D) / sqrt((n0 - n1) (n0 - n2))`` over all pairs, with C/D the
  concordant/discordant pairs, n0 the number of pairs and n1/n2 the pairs tied in
  x/y. O(n^2), fine for a few thousand runs. NaN if either side is constant or
  there are fewer than two points.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"kendall_tau needs two 1-D sequences of one length, got "
                     f"{x.shape} and {y.shape}.")
  n = len(x)
  if n < 2:
    return float("nan")
  i, j = np.triu_indices(n, 1)
  sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  n0 = len(i)
  n1, n2 = int(np.sum(sx == 0)), int(np.sum(sy == 0))
  denom = math.sqrt((n0 - n1) * (n0 - n2))
  return float(np.sum(sx * sy) / denom) if denom else float("nan")


def _mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return float("nan"), float("nan"), 0
  return float(np.mean(values)), float(np.std(values)), len(values)


def _mean_se(diffs):
  """Mean and standard error of paired differences."""
  if not diffs:
    return float("nan"), float("nan"), 0
  d = np.asarray(diffs, np.float64)
  se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
  return float(np.mean(d)), se, len(d)


def _verdict(diff, se, n):
  """'supported' if diff > 2 s.e., 'weakly supported' if 0 < diff, else 'not supported'."""
  if n == 0 or math.isnan(diff):
    return "not tested (no paired runs in this sweep)"
  if n > 1 and diff > 2 * se:
    return "supported"
  return "weakly supported (difference within 2 s.e.)" if diff > 0 else "not supported"


def _setting(r):
  return (r["optimizer"], r["activation"], r["regularisation"])


def _index(records):
  """(optimizer, activation, regularisation, density, seed, kind) -> accuracy."""
  return {(*_setting(r), r["density"], r["seed"], r["kind"]): r["accuracy"] for r in records}


def is_sparse_run(r) -> bool:
  return r["kind"] == "sparse"


def correlations(records, key="measures") -> dict[str, dict[str, tuple[float, int]]]:
  """Kendall tau of each measure (``records[i][key][m]``) vs accuracy, per group.

  Returns ``{measure: {"all"|"sparse"|"dense"|"within": (tau, n)}}``; the dense
  group is every dense run (same-capacity and full width); "within" is the mean of
  the taus computed inside each (optimizer, activation, regularisation) setting,
  across densities, sparse/dense and seeds (n = number of settings), which keeps
  differences between settings out of the ranking.
  """
  groups = {"all": records, "sparse": [r for r in records if is_sparse_run(r)],
            "dense": [r for r in records if not is_sparse_run(r)]}
  out = {}
  for m in MEASURES:
    out[m] = {}
    for g, rs in groups.items():
      rs = [r for r in rs if m in r.get(key, {})]
      out[m][g] = (kendall_tau([r[key][m] for r in rs], [r["accuracy"] for r in rs]),
                   len(rs))
    settings = collections.defaultdict(list)
    for r in records:
      if m in r.get(key, {}):
        settings[_setting(r)].append(r)
    taus = [kendall_tau([r[key][m] for r in rs], [r["accuracy"] for r in rs])
            for rs in settings.values()]
    taus = [t for t in taus if not math.isnan(t)]
    out[m]["within"] = (float(np.mean(taus)) if taus else float("nan"), len(taus))
  return out


# ----------------------------------------------------------------------------
# The paper's findings (SPEC §8).
# ----------------------------------------------------------------------------


def finding_batch_norm(records) -> dict:
  """Batch norm matters more for sparse than for dense nets.

  Paired over (optimizer, activation, density < 1, seed): the accuracy gain of
  batch norm (batch_norm - none) for the sparse net minus that for its
  same-capacity dense net.
  """
  acc = _index(records)
  diffs, sparse_gain, dense_gain = [], [], []
  for (o, a, reg, d, s, kind), v in acc.items():
    if reg != "batch_norm" or kind != "sparse":
      continue
    keys = [(o, a, r, d, s, k) for r in ("batch_norm", "none") for k in ("sparse", "dense")]
    if not all(k in acc for k in keys):
      continue
    sg = acc[(o, a, "batch_norm", d, s, "sparse")] - acc[(o, a, "none", d, s, "sparse")]
    dg = acc[(o, a, "batch_norm", d, s, "dense")] - acc[(o, a, "none", d, s, "dense")]
    sparse_gain.append(sg)
    dense_gain.append(dg)
    diffs.append(sg - dg)
  diff, se, n = _mean_se(diffs)
  return {"claim": "batch normalisation matters more for sparse than for dense networks",
          "sparse_gain": _mean_se(sparse_gain)[0], "dense_gain": _mean_se(dense_gain)[0],
          "diff": diff, "se": se, "n": n, "verdict": _verdict(diff, se, n)}


def finding_adaptive(records) -> dict:
  """Adam/RMSProp hurt sparse nets more than SGD/momentum/Adagrad do.

  The sparse-minus-same-capacity-dense gap, per optimizer family; the claim holds
  when the gap of the SGD-like optimizers exceeds that of the adaptive ones
  (paired over activation, regularisation, density < 1, seed). Also Kendall tau of
  EGF (p=2) vs accuracy among sparse runs per optimizer ("react badly to high
  gradient flow" predicts a negative tau for the adaptive optimizers).
  """
  acc = _index(records)
  gaps = collections.defaultdict(dict)  # optimizer -> (a, reg, d, seed) -> gap
  for (o, a, reg, d, s, kind), v in acc.items():
    if kind == "sparse" and (o, a, reg, d, s, "dense") in acc:
      gaps[o][(a, reg, d, s)] = v - acc[(o, a, reg, d, s, "dense")]
  diffs, by_reg = [], collections.defaultdict(list)
  for o_sgd, o_ad in itertools.product(SGD_LIKE, ADAPTIVE):
    for k in set(gaps.get(o_sgd, {})) & set(gaps.get(o_ad, {})):
      diffs.append(gaps[o_sgd][k] - gaps[o_ad][k])
      by_reg[k[1]].append(diffs[-1])
  diff, se, n = _mean_se(diffs)
  taus = {}
  for o in gaps:
    rs = [r for r in records if is_sparse_run(r) and r["optimizer"] == o
          and "egf_p2" in r.get("measures", {})]
    taus[o] = (kendall_tau([r["measures"]["egf_p2"] for r in rs],
                           [r["accuracy"] for r in rs]), len(rs))
  return {"claim": "optimizers with a running average of squared gradients (Adam, "
                   "RMSProp) do worse on sparse nets than SGD/momentum/Adagrad",
          "gap_by_optimizer": {o: _mean_se(list(g.values()))[0] for o, g in gaps.items()},
          "egf_tau_by_optimizer": taus, "diff": diff, "se": se, "n": n,
          "by_regularisation": {r: _mean_se(v) for r, v in sorted(by_reg.items())},
          "verdict": _verdict(diff, se, n)}


def finding_activation(records) -> dict:
  """Swish and PReLU with SGD(-momentum) are good activations for sparse nets.

  Paired over (SGD-like optimizer, regularisation, density < 1, seed): sparse
  accuracy with Swish (or PReLU) minus with ReLU.
  """
  acc = _index(records)
  out = {"claim": "Swish and PReLU with SGD are promising activations for sparse networks",
         "by_activation": {}}
  for act in ("swish", "prelu"):
    pairs = [(reg, v - acc[(o, "relu", reg, d, s, kind)])
             for (o, a, reg, d, s, kind), v in acc.items()
             if a == act and kind == "sparse" and o in ("sgd", "momentum")
             and (o, "relu", reg, d, s, kind) in acc]
    diff, se, n = _mean_se([x for _, x in pairs])
    out["by_activation"][act] = {
        "diff": diff, "se": se, "n": n, "verdict": _verdict(diff, se, n),
        "by_regularisation": {r: _mean_se([x for q, x in pairs if q == r])
                              for r in sorted({q for q, _ in pairs})}}
  sparse_sgd = [r for r in records if is_sparse_run(r) and r["optimizer"] in ("sgd", "momentum")]
  out["mean_accuracy"] = {a: _mean_sd([r["accuracy"] for r in sparse_sgd
                                       if r["activation"] == a])[0]
                          for a in sorted({r["activation"] for r in sparse_sgd})}
  return out


# ----------------------------------------------------------------------------
# Writing the report.
# ----------------------------------------------------------------------------


def _pct(x):
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _tau(t):
  return "n/a" if math.isnan(t) else f"{t:+.3f}"


def _by_reg(stats) -> str:
  return ", ".join(f"{r} {_pct(m)} ± {_pct(se)} (n = {n})" for r, (m, se, n) in stats.items())


def write_report(records, out_dir, command: str = "", note: str = "") -> str:
  """Writes ``README.md`` and the plots into ``out_dir``; returns the markdown."""
  if not records:
    raise ValueError("No finished run to report on: run gradient_flow_sweep first (a run "
                     "is finished when its summary.json has final_test_accuracy).")
  os.makedirs(out_dir, exist_ok=True)
  lines = ["# Gradient flow in sparse networks: EGF and the same-capacity comparison", ""]
  datasets = sorted({r.get("dataset", "?") for r in records})
  family = sorted({r.get("family", "?") for r in records})
  lines += [f"Data: {', '.join(datasets)}; family: {', '.join(family)}; "
            f"{len(records)} finished runs "
            f"(sum of run wall times {sum(r['wall_time_s'] or 0 for r in records) / 60:.1f} "
            "min). Sparse runs use static masks (ERK unless the config says otherwise) at "
            "the sparse width; dense runs use the SC-SDC width with the same active "
            "weight count (`experiments/scsdc.py`), the same init scheme and recipe.", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  if note:
    lines += [note, ""]

  # SC-SDC widths.
  lines += ["## Same-capacity widths (SC-SDC)", "",
            "| density | sparse width | weights | active weights | dense width | "
            "dense weights | leftover |", "|---|---|---|---|---|---|---|"]
  seen = {}
  for r in records:
    seen.setdefault(r["density"], r)
  for d in sorted(seen):
    r = seen[d]
    if "active_weights" in r:
      lines.append(f"| {d:g} | {r['sparse_width']} | {r['total_weights']} | "
                   f"{r['active_weights']} | {r['dense_width']} | {r['dense_weights']} | "
                   f"{r['leftover']:+d} ({100 * r['leftover'] / r['active_weights']:+.2f}%) |")
  lines.append("")

  # Sparse vs dense per setting.
  lines += ["## Sparse vs same-capacity dense test accuracy (%)", "",
            "Mean ± std over seeds. At density 1 both are the full-width dense net.", "",
            "| optimizer | activation | regularisation | density | sparse | dense | "
            "sparse − dense | seeds |", "|---|---|---|---|---|---|---|---|"]
  by = collections.defaultdict(list)
  for r in records:
    by[(*_setting(r), r["density"], r["kind"])].append(r["accuracy"])
  for key in sorted({k[:4] for k in by}):
    dense = by.get((*key, "dense"), [])
    sparse = dense if key[3] == 1.0 else by.get((*key, "sparse"), [])
    sm, ss, sn = _mean_sd(sparse)
    dm, ds, dn = _mean_sd(dense)
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {_pct(sm)} ± {_pct(ss)} | "
                 f"{_pct(dm)} ± {_pct(ds)} | {_pct(sm - dm)} | {min(sn, dn)} |")
  lines += ["", "![sparse vs dense](sparse_vs_dense.png)", ""]

  # Measures vs accuracy.
  corr_mean, corr_init = correlations(records, "measures"), correlations(records, "init")
  lines += ["## Which measure predicts final accuracy? (Kendall's tau-b)", "",
            "Each measure taken on a fixed training batch at step 0 and about once per "
            "epoch (`config.gradient_flow_every_steps`); 'mean' is its average over the "
            "logged steps, 'init' its value at step 0. `gradient_norm` is the plain "
            "||g||_2 over every entry; `gradient_norm_active` leaves out inactive weights; "
            "`ghg` is g^T H g over the active weights.", "",
            "'within' averages the taus computed inside each (optimizer, activation, "
            "regularisation) setting (n = settings).", "",
            "| measure | mean: all | mean: sparse | mean: dense | mean: within | "
            "init: all | init: sparse | init: dense | init: within |",
            "|---|---|---|---|---|---|---|---|---|"]
  groups = ("all", "sparse", "dense", "within")
  for m in MEASURES:
    cm, ci = corr_mean[m], corr_init[m]
    lines.append(f"| {m} | " + " | ".join(
        f"{_tau(c[g][0])} (n={c[g][1]})" for c in (cm, ci) for g in groups) + " |")
  def best(group):
    return max(MEASURES, key=lambda m: -1 if math.isnan(corr_mean[m][group][0])
               else abs(corr_mean[m][group][0]))

  lines += ["", "Largest |tau| (measure averaged over training): over all runs **"
            f"{best('all')}** (tau = {_tau(corr_mean[best('all')]['all'][0])}); within "
            f"settings **{best('within')}** "
            f"(tau = {_tau(corr_mean[best('within')]['within'][0])}).", "",
            "![measures vs accuracy](measures_vs_accuracy.png)", "",
            "EGF (p=2) during training, mean over the runs of each group:", "",
            "![EGF over training](egf_over_training.png)", ""]

  # Findings.
  bn, ad, act = finding_batch_norm(records), finding_adaptive(records), finding_activation(records)
  lines += ["## The paper's findings (SPEC §8) in these runs", "",
            f"1. *{bn['claim']}*: **{bn['verdict']}**. Gain from batch norm: sparse "
            f"{_pct(bn['sparse_gain'])} points, same-capacity dense {_pct(bn['dense_gain'])} "
            f"points; sparse − dense gain {_pct(bn['diff'])} ± {_pct(bn['se'])} (s.e., "
            f"n = {bn['n']} pairs).",
            f"2. *{ad['claim']}*: **{ad['verdict']}**. Sparse − dense accuracy gap by "
            "optimizer: " + ", ".join(f"{o} {_pct(g)}" for o, g in
                                      sorted(ad["gap_by_optimizer"].items())) +
            f" points; SGD-like gap − adaptive gap {_pct(ad['diff'])} ± {_pct(ad['se'])} "
            f"(n = {ad['n']} pairs); by regularisation: " + _by_reg(ad["by_regularisation"])
            + ". Kendall tau of EGF (p=2) vs accuracy among sparse "
            "runs: " + ", ".join(f"{o} {_tau(t)} (n={k})" for o, (t, k) in
                                 sorted(ad["egf_tau_by_optimizer"].items())) + "."
            + ("" if any(r["regularisation"] == "l2" for r in records) else
               " (The L2 / data-augmentation part is not tested: no L2 runs in this sweep.)"),
            f"3. *{act['claim']}*: " + "; ".join(
                f"{a} − relu (sparse, SGD/momentum) {_pct(v['diff'])} ± {_pct(v['se'])} "
                f"points, n = {v['n']}: **{v['verdict']}** (by regularisation: "
                f"{_by_reg(v['by_regularisation'])})"
                for a, v in act["by_activation"].items() if v["n"]) +
            "".join(f"; {a}: not tested (no runs)" for a, v in act["by_activation"].items()
                    if not v["n"]) +
            ". Mean sparse accuracy with SGD/momentum by activation: " +
            ", ".join(f"{a} {_pct(v)}" for a, v in act["mean_accuracy"].items()) + ".", ""]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(text)
  plot_sparse_vs_dense(records, os.path.join(out_dir, "sparse_vs_dense.png"))
  plot_measures(records, corr_mean, os.path.join(out_dir, "measures_vs_accuracy.png"))
  plot_egf_over_training(records, os.path.join(out_dir, "egf_over_training.png"))
  return text


def plot_sparse_vs_dense(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  opts = sorted({r["optimizer"] for r in records})
  acts = sorted({r["activation"] for r in records})
  regs = sorted({r["regularisation"] for r in records})
  fig, axes = plt.subplots(len(opts), len(acts), figsize=(4 * len(acts), 3 * len(opts)),
                           squeeze=False, sharey=True)
  colors = dict(zip(regs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for (i, o), (j, a) in itertools.product(enumerate(opts), enumerate(acts)):
    ax = axes[i][j]
    for reg, kind in itertools.product(regs, ("sparse", "dense")):
      rs = [r for r in records if _setting(r) == (o, a, reg)
            and (r["kind"] == kind or r["density"] == 1.0)]
      ds = sorted({r["density"] for r in rs})
      if not ds:
        continue
      stats = [_mean_sd([r["accuracy"] for r in rs if r["density"] == d]) for d in ds]
      ax.errorbar(ds, [100 * m for m, _, _ in stats], yerr=[100 * s for _, s, _ in stats],
                  marker="o" if kind == "sparse" else "s", capsize=2, color=colors[reg],
                  ls="-" if kind == "sparse" else "--", label=f"{kind}, {reg}")
    ax.set_xscale("log")
    ax.set_title(f"{o}, {a}", fontsize=9)
    ax.set_xlabel("density (dense: same capacity)")
    if j == 0:
      ax.set_ylabel("test accuracy (%)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_measures(records, corr, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.6 * len(MEASURES), 3.4), sharey=True)
  for ax, m in zip(axes, MEASURES):
    for kind, marker in (("sparse", "o"), ("dense", "s")):
      rs = [r for r in records if (r["kind"] == kind) and m in r.get("measures", {})]
      ax.scatter([r["measures"][m] for r in rs], [100 * r["accuracy"] for r in rs], s=12,
                 marker=marker, alpha=0.7, label=kind)
    ax.set_xscale("symlog" if m == "ghg" else "log")
    ax.set_xlabel(f"{m} (mean over training)")
    ax.set_title(f"tau = {_tau(corr[m]['all'][0])}", fontsize=9)
  axes[0].set_ylabel("final test accuracy (%)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_egf_over_training(records, path, measure="egf_p2"):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  regs = sorted({r["regularisation"] for r in records})
  fig, axes = plt.subplots(1, len(regs), figsize=(4.5 * len(regs), 3.4), squeeze=False,
                           sharey=True)
  for ax, reg in zip(axes[0], regs):
    groups = collections.defaultdict(list)
    for r in records:
      if r["regularisation"] == reg and r.get("series", {}).get(measure):
        groups[(r["kind"], r["density"])].append(dict(r["series"][measure]))
    for (kind, d), curves in sorted(groups.items()):
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      ax.plot(steps, [np.mean([c[t] for c in curves]) for t in steps],
              ls="-" if kind == "sparse" else "--", marker="o", ms=3,
              label=f"{kind}, d={d:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"regularisation: {reg}", fontsize=9)
  axes[0][0].set_ylabel(f"{measure} (fixed batch)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/gradient_flow")
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--command", default="", help="The sweep command, for the report.")
  parser.add_argument("--note", default="", help="Free text for the report (e.g. timing).")
  args = parser.parse_args()
  records = load_runs(args.workdir)
  command, note = args.command, args.note
  log_path = os.path.join(args.workdir, "sweep_log.jsonl")
  if os.path.exists(log_path) and not command:
    with open(log_path) as f:
      entries = [json.loads(l) for l in f if l.strip()]
    command = "; ".join(sorted({e["command"] for e in entries}))
    note = note or ("Sweep wall time: " + ", ".join(
        f"slice {e['slice']}: {e['wall_time_s'] / 60:.1f} min ({e['trained']} trained, "
        f"{e['skipped']} skipped)" for e in entries) + ".")
  print(write_report(records, args.out, command, note))


if __name__ == "__main__":
  sys.exit(main())
