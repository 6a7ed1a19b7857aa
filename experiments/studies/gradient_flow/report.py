r"""The gradient-flow report: reads a sweep's workdirs, writes markdown and PNG plots.

  python -m experiments.studies.gradient_flow.report --workdir=workdirs/gradient_flow \
      [--out=experiments/results/gradient_flow] [--command="<the sweep command>"]

Writes ``<out>/README.md`` with
  * the SC-SDC widths (sparse width, active weights, dense width, leftover);
  * the learning rates: each setting's tuning grid, validation accuracies and
    chosen rate (``<workdir>/tuning.json``), or the fixed rates;
  * sparse vs same-capacity dense test accuracy per setting (mean ± std over seeds)
    and sparse − dense by optimizer x regularisation with bootstrap CIs;
  * each gradient-flow measure vs final accuracy, Kendall's tau-b across runs (all,
    sparse only, dense only, within settings), for the measure averaged over the
    logged steps and at initialisation (step 0), with bootstrap CIs;
  * for each finding of the EGF paper (docs/algorithms.md §8) the effect with a 95% CI (paired
    differences, seeds resampled within cells; fixed bootstrap seed), a verdict by
    ``stats.VERDICT_RULE`` and the slices where it holds or reverses; and the
    initialisation factor (``study.inits``) the same way;
``findings.json`` (the numbers) and the plots next to it. Cells of a partial grid
without runs are reported as missing. The default ``--out`` holds the earlier
3-epoch study; give the converged study its own directory (see
``experiments/configs/gradient_flow_converged_mnist5k.py``).

This module assembles the text; the runs are read by ``records``, the numbers
computed by ``stats`` and ``findings``, the plots drawn by ``plots``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys

import numpy as np

from experiments.studies.gradient_flow import findings as findings_lib
from experiments.studies.gradient_flow import formatting
from experiments.studies.gradient_flow import plots
from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import stats

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "results",
                       "gradient_flow")


def _ci(effect) -> str:
  """``effect [lo, hi]`` in accuracy points, or ``missing``."""
  if not effect["n"]:
    return "missing"
  lo, hi = effect["ci"]
  return f"{formatting.pct(effect['effect'])} [{formatting.pct(lo)}, {formatting.pct(hi)}]"


def _tau_ci(t, lo, hi) -> str:
  """``tau [lo, hi]``, or ``n/a``."""
  return "n/a" if math.isnan(t) else f"{t:+.3f} [{formatting.tau(lo)}, {formatting.tau(hi)}]"


def _finding_lines(number, f: dict, label: str = "") -> list[str]:
  """One finding: claim, verdict, effect with CI, slices where it holds (or reverses)."""
  head = f"{number}. *{f['claim']}*{label}: **{f['verdict']}**."
  if not f["n"]:
    return [head + " No paired runs in this sweep (missing cells).", ""]
  lines = [head + f" Effect {f['measure']}: {_ci(f)} points (95% CI; n = {f['n']} pairs "
           f"in {f['cells']} cells). Holds in: {', '.join(f['holds_in']) or 'no slice'}; "
           f"reversed in: {', '.join(f['reversed_in']) or 'no slice'}.", ""]
  for name, values in f["slices"].items():
    lines.append(f"   - by {name}: " + "; ".join(
        f"{formatting.value(v)} {_ci(st)} (n={st['n']})" for v, st in values.items()))
  return lines + [""]


def _convergence_lines(records) -> list[str]:
  """Whether the recipe's budget is enough: the training loss over the last fifth."""
  drops = sorted((r["loss_drop_last_fifth"], r.get("name", "?")) for r in records
                 if r.get("loss_drop_last_fifth") is not None)
  lines = ["## Convergence", ""]
  if not drops:
    return lines + ["No run logged its training loss twice: not checked.", ""]
  values, plateau = np.array([d for d, _ in drops]), records_lib.PLATEAU_DROP
  flat = int(np.sum(values <= plateau))
  return lines + [
      "Relative fall of the training loss (logged means) over the last fifth of each "
      f"run: median {100 * np.median(values):.1f}%, 90th percentile "
      f"{100 * np.quantile(values, 0.9):.1f}%, largest {100 * values[-1]:.1f}% "
      f"({drops[-1][1]}). {flat} of {len(values)} runs fell by at most "
      f"{100 * plateau:g}% (plateaued by this rule); with a cosine schedule the "
      "rate is near 0 at the end, so read this with the loss curves.", ""]


def _budget_lines(check) -> list[str]:
  """The budget check's paragraph (under "Convergence")."""
  if not check or not check["n"]:
    return []
  ch, gap = check["accuracy_change"], check["gap_change"]
  ep, pct = formatting.epochs, formatting.pct
  lines = [f"**Budget check**: {check['n']} final runs trained again for "
          f"{ep(check['longer_epochs'])} instead of {ep(check['epochs'])} epochs (same "
          "setting, seed and tuned rate; cosine over the longer run). Test accuracy, "
          f"longer − this budget: {_ci(ch['all'])} points overall (largest change "
          f"{pct(ch['all']['largest'])}), sparse {_ci(ch['sparse'])} (n={ch['sparse']['n']}), "
          f"dense {_ci(ch['dense'])} (n={ch['dense']['n']}); the sparse − dense gap "
          f"changes by {_ci(gap)} points (n={gap['n']} pairs of pairs). Median fall of the "
          "training loss over the last fifth of the longer runs: "
          f"{pct(check['loss_drop_median'])}%. 95% CIs: percentile bootstrap over the "
          "runs, treated as independent (not seeds within cells, as for the findings)."
          + (f" Left out: {check['unpaired']} longer runs with no run of that name here, "
             f"{check['other_rate']} at another rate." if check["unpaired"]
             or check["other_rate"] else ""), ""]
  if check.get("sparse_change_by_optimizer"):
    lines += ["Sparse runs' change by optimizer: " + ", ".join(
        f"{o} {pct(v)}" for o, v in check["sparse_change_by_optimizer"].items())
        + " points.", ""]
  if check.get("findings"):
    lines += ["The findings' effects on these runs alone, at "
              f"{ep(check['epochs'])} → {ep(check['longer_epochs'])} epochs (one seed: "
              "effects only, no CIs): " + "; ".join(
                  f"{k} {pct(f['effect'])} → {pct(f['longer_effect'])} (n={f['n']})"
                  for k, f in check["findings"].items()) + " points.", ""]
  return lines + ["![budget check](budget_check.png)", ""]


def _unstable_lines(tuning) -> list[str]:
  """The settings retrained at their next best rate after a final run diverged."""
  bad = sorted(s for s, e in tuning["settings"].items() if e.get("unstable"))
  if not bad:
    return []
  return [f"{len(bad)} settings had a final run diverge at the chosen rate and were "
          "retrained, every seed, at the next best: " + ", ".join(
              f"{s} (not {', '.join(tuning['settings'][s]['unstable'])})" for s in bad)
          + ".", ""]


def _tuning_lines(tuning, records) -> list[str]:
  """The learning-rate grid and chosen rate of every setting (or the fixed rates)."""
  lines = ["## Learning rates", ""]
  if not tuning:
    rates = collections.defaultdict(set)
    for r in records:
      if r.get("learning_rate") is not None:
        rates[r["optimizer"]].add(r["learning_rate"])
    lines += ["No tuning (`study.learning_rates` one rate per optimizer): " + (", ".join(
        f"{o} {', '.join(f'{v:g}' for v in sorted(v))}" for o, v in sorted(rates.items()))
        or "rates not recorded in these runs' run.json") + ".", ""]
    return lines
  lines += [f"Tuned per setting on a validation split of the training set (fraction "
            f"{tuning['validation_fraction']}, seed {tuning['tuning_seed']}; the test set "
            f"is not used): {tuning['rule']}. Validation accuracy (%) by rate; the chosen "
            "rate in bold; 'pending' rates have not finished.", "",
            *_unstable_lines(tuning),
            "| setting | validation accuracy by rate | chosen | final runs |",
            "|---|---|---|---|"]
  finals = collections.Counter(r.get("setting") for r in records)
  for setting, e in sorted(tuning["settings"].items()):
    cells = []
    for lr, acc in e["grid"].items():
      text = "diverged" if acc is None else formatting.pct(acc)
      if lr in e.get("unstable", []):
        text += " (a final run diverged: not chosen)"
      chosen = e["chosen"] is not None and float(lr) == e["chosen"]
      cells.append(f"**{lr}: {text}**" if chosen else f"{lr}: {text}")
    cells += [f"{lr}: pending" for lr in e.get("pending", [])]
    chosen = "pending" if e["chosen"] is None else f"{e['chosen']:g}"
    lines.append(f"| {setting} | {', '.join(cells)} | {chosen} | "
                 f"{finals.get(setting, 0) or 'missing'} |")
  chosen = collections.Counter()
  for setting, e in tuning["settings"].items():
    if e["chosen"] is not None:
      grid = sorted(float(x) for x in [*e["grid"], *e.get("pending", [])])
      chosen[("smallest" if e["chosen"] == grid[0] else "largest"
              if e["chosen"] == grid[-1] else "inside")] += 1
  lines += ["", "Chosen rate at the edge of its grid: "
            f"{chosen['smallest']} settings at the smallest, {chosen['largest']} at the "
            f"largest, {chosen['inside']} inside (an edge suggests widening the grid).", ""]
  return lines


def _header_lines(records, command, note) -> list[str]:
  """Title, data, run count and wall time, the command and the note."""
  lines = ["# Gradient flow in sparse networks: EGF and the same-capacity comparison", ""]
  datasets = sorted({r.get("dataset", "?") for r in records})
  family = sorted({r.get("family", "?") for r in records})
  lines += [f"Data: {', '.join(datasets)}; family: {', '.join(family)}; "
            f"{len(records)} finished runs "
            f"(sum of run wall times {sum(r['wall_time_s'] or 0 for r in records) / 60:.1f} "
            "min). Sparse runs use static masks (ERK unless the config says otherwise) at "
            "the sparse width; dense runs use the SC-SDC width with the same active "
            "weight count (`experiments/studies/scsdc.py`), the same init scheme and recipe.", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  if note:
    lines += [note, ""]
  return lines


def _widths_lines(records) -> list[str]:
  """The SC-SDC widths and weight counts at each density (from the runs' run.json)."""
  lines = ["## Same-capacity widths (SC-SDC)", "",
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
  return lines + [""]


def _sparse_vs_dense_lines(main_grid, table) -> list[str]:
  """Sparse vs same-capacity dense accuracy per setting, then the gap by optimizer x
  regularisation with CIs (``findings.sparse_minus_dense_table``)."""
  lines = ["## Sparse vs same-capacity dense test accuracy (%)", "",
           "Mean ± std over seeds. At density 1 both are the full-width dense net; "
           "'missing' marks a side without finished runs.", "",
           "| optimizer | activation | regularisation | density | sparse | dense | "
           "sparse − dense | seeds |", "|---|---|---|---|---|---|---|---|"]
  by = collections.defaultdict(list)
  for r in main_grid:
    by[(*records_lib.setting_key(r), r["density"], r["kind"])].append(r["accuracy"])
  side = lambda m, sd, n: f"{formatting.pct(m)} ± {formatting.pct(sd)}" if n else "missing"
  for key in sorted({k[:4] for k in by}):
    dense = by.get((*key, "dense"), [])
    sparse = dense if key[3] == 1.0 else by.get((*key, "sparse"), [])
    sm, ss, sn = stats.mean_sd(sparse)
    dm, ds, dn = stats.mean_sd(dense)
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {side(sm, ss, sn)} | "
                 f"{side(dm, ds, dn)} | {formatting.pct(sm - dm) if sn and dn else 'missing'} | "
                 f"{min(sn, dn)} |")
  opts = sorted({o for o, _ in table})
  regs = sorted({g for _, g in table})
  lines += ["", "![sparse vs dense](sparse_vs_dense.png)", "",
            "Sparse − same-capacity dense accuracy (points) by optimizer × "
            "regularisation, densities below 1 and activations pooled: effect [95% CI] "
            "(paired over seeds, bootstrap as for the findings).", "",
            "| optimizer | " + " | ".join(regs) + " |", "|---|" + "---|" * len(regs)]
  for o in opts:
    lines.append(f"| {o} | " + " | ".join(_ci(table[(o, g)]) for g in regs) + " |")
  return lines + ["", "![sparse minus dense](sparse_minus_dense.png)", ""]


def _correlation_lines(corr_mean, corr_init) -> list[str]:
  """Kendall's tau of each measure vs accuracy, averaged over training and at init."""
  lines = ["## Which measure predicts final accuracy? (Kendall's tau-b)", "",
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
  for m in records_lib.MEASURES:
    cm, ci = corr_mean[m], corr_init[m]
    lines.append(f"| {m} | " + " | ".join(
        f"{formatting.tau(c[g][0])} (n={c[g][1]})" for c in (cm, ci) for g in groups) + " |")
  return lines


def _tau_ci_lines(corr_mean, taus, n_boot) -> list[str]:
  """The best measure, the taus with their bootstrap CIs, and the plots."""
  def best(group):
    return max(records_lib.MEASURES, key=lambda m: -1 if math.isnan(corr_mean[m][group][0])
               else abs(corr_mean[m][group][0]))

  lines = ["", "Largest |tau| (measure averaged over training): over all runs **"
           f"{best('all')}** (tau = {formatting.tau(corr_mean[best('all')]['all'][0])}); "
           f"within settings **{best('within')}** "
           f"(tau = {formatting.tau(corr_mean[best('within')]['within'][0])}).", "",
           "With 95% bootstrap CIs (runs resampled with replacement, within each setting "
           f"for 'within'; {min(n_boot, 1000)} resamples, seed {stats.BOOTSTRAP_SEED}; runs "
           "with every measure):", "",
           "| measure | mean: all | mean: within | init: all | init: within |",
           "|---|---|---|---|---|"]
  for m in records_lib.MEASURES:
    lines.append(f"| {m} | " + " | ".join(
        _tau_ci(taus[k]["tau"][m], *taus[k]["ci"][m]) for k in (
            ("measures", "all"), ("measures", "within"), ("init", "all"),
            ("init", "within"))) + " |")
  return lines + ["", "![tau with CIs](tau_ci.png)", "",
                  "![measures vs accuracy](measures_vs_accuracy.png)", "",
                  "EGF (p=2) during training, mean over the runs of each group:", "",
                  "![EGF over training](egf_over_training.png)", ""]


def _paper_findings(records, n_boot) -> dict:
  """Every finding of the paper and the init factor, by their findings.json key."""
  return {"batch_norm": findings_lib.finding_batch_norm(records, n_boot),
          "adaptive": findings_lib.finding_adaptive(records, n_boot),
          "adaptive_regularisation": findings_lib.finding_adaptive_regularisation(
              records, n_boot),
          "activation": findings_lib.finding_activation(records, n_boot),
          "egf": findings_lib.finding_egf(records, n_boot=min(n_boot, 1000)),
          "init": findings_lib.finding_init(records, n_boot)}


def _findings_lines(f: dict) -> list[str]:
  """The paper's findings (numbered as in docs/algorithms.md §8) and the init factor."""
  bn, ad, act, egf = f["batch_norm"], f["adaptive"], f["activation"], f["egf"]
  pct = formatting.pct
  lines = ["## The paper's findings (docs/algorithms.md §8) in these runs", "", stats.VERDICT_RULE, ""]
  lines += _finding_lines(1, bn)
  lines[-1:] = [f"   Gain from batch norm: sparse {pct(bn['sparse_gain'])} points, "
                f"same-capacity dense {pct(bn['dense_gain'])} points.", ""]
  lines += _finding_lines(2, ad)
  lines[-1:] = ["   Sparse − dense gap by optimizer: " + ", ".join(
      f"{o} {pct(g)}" for o, g in sorted(ad["gap_by_optimizer"].items())) +
      " points. Kendall tau of EGF (p=2) vs accuracy among sparse runs: " + ", ".join(
          f"{o} {_tau_ci(t, *ci)} (n={k})" for o, (t, k, ci) in
          sorted(ad["egf_tau_by_optimizer"].items())) + ".", ""]
  lines += _finding_lines(3, f["adaptive_regularisation"],
                          " (the L2 / data-augmentation part of 2)")
  for letter, (a, v) in zip("ab", act["by_activation"].items()):
    lines += _finding_lines(f"4{letter}", {**v, "claim": act["claim"],
                                           "measure": act["measure"]}, f" ({a})")
  lines[-1:] = ["   Mean sparse accuracy with SGD/momentum by activation: " + ", ".join(
      f"{a} {pct(v)}" for a, v in act["mean_accuracy"].items()) + ".", ""]
  lines += [f"5. *{egf['claim']}*: **{egf['verdict']}**. {egf['rule']}", ""]
  for (key, g), res in egf["results"].items():
    diffs = "; ".join(f"vs {m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                      for m, (d, lo, hi) in res["abs_diff"].items())
    lines.append(f"   - {'averaged over training' if key == 'measures' else 'at init'}, "
                 f"{g} (n = {res['n']} runs, {res['settings']} settings): |tau| difference "
                 f"{diffs or 'n/a'}")
  lines += ["", "## The initialisation factor", ""]
  return lines + _finding_lines(6, f["init"])


def _write_plots(out_dir, records, main_grid, table, taus, corr_mean, budget):
  about = plots.subject(records)
  if budget and budget["n"]:
    plots.plot_budget_check(budget, os.path.join(out_dir, "budget_check.png"), about)
  plots.plot_sparse_vs_dense(main_grid, os.path.join(out_dir, "sparse_vs_dense.png"), about)
  plots.plot_sparse_minus_dense(table, os.path.join(out_dir, "sparse_minus_dense.png"), about)
  plots.plot_tau_ci(taus, os.path.join(out_dir, "tau_ci.png"), about)
  plots.plot_measures(records, corr_mean, os.path.join(out_dir, "measures_vs_accuracy.png"),
                      about)
  plots.plot_egf_over_training(main_grid, os.path.join(out_dir, "egf_over_training.png"),
                               about=about)


def write_report(records, out_dir, command: str = "", note: str = "", tuning=None,
                 n_boot: int = stats.N_BOOTSTRAP, longer=None) -> str:
  """Writes ``README.md``, ``findings.json`` and the plots into ``out_dir``.

  Works on a partial grid: cells without runs are reported as missing. ``longer``:
  the budget check's runs (``findings.budget_check``). Returns the markdown.
  """
  if not records:
    raise ValueError("No finished run to report on: run gradient_flow_sweep first (a run "
                     "is finished when its summary.json has final_test_accuracy).")
  os.makedirs(out_dir, exist_ok=True)
  main_grid = findings_lib.main_grid(records)
  budget = findings_lib.budget_check(records, longer, n_boot) if longer else None
  table = findings_lib.sparse_minus_dense_table(records, n_boot)
  corr_mean = stats.correlations(records, "measures")
  corr_init = stats.correlations(records, "init")
  taus = {(key, g): stats.tau_with_ci(records, records_lib.MEASURES, key, g == "within",
                                      n_boot=min(n_boot, 1000))
          for key in ("measures", "init") for g in ("all", "within")}
  found = _paper_findings(records, n_boot)
  text = "\n".join([
      *_header_lines(records, command, note), *_widths_lines(records),
      *_convergence_lines(records), *_budget_lines(budget), *_tuning_lines(tuning, records),
      *_sparse_vs_dense_lines(main_grid, table), *_correlation_lines(corr_mean, corr_init),
      *_tau_ci_lines(corr_mean, taus, n_boot), *_findings_lines(found)])
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(text)
  _write_findings(os.path.join(out_dir, "findings.json"), {
      **found, "sparse_minus_dense": {f"{o}/{g}": v for (o, g), v in table.items()},
      "tau": {f"{k}/{g}": v for (k, g), v in taus.items()}, "budget_check": budget})
  _write_plots(out_dir, records, main_grid, table, taus, corr_mean, budget)
  return text


def _write_findings(path, findings):
  """The findings' numbers as JSON (tuple keys joined; NaN as null)."""
  def clean(x):
    if isinstance(x, dict):
      return {(k if isinstance(k, str) else "/".join(map(str, k)) if isinstance(k, tuple)
               else str(k)): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
      return None
    if isinstance(x, (np.floating, np.integer)):
      return clean(x.item())
    return x
  with open(path, "w") as f:
    json.dump(clean(findings), f, indent=1)


def check_out(workdir: str, out: str) -> None:
  """Refuses to write a tuned (converged) study's report over the 3-epoch study's.

  The default ``--out`` holds the earlier study's committed report; a workdir with a
  ``tuning.json`` is a tuned study, whose report needs its own ``--out``.
  """
  if (os.path.exists(os.path.join(workdir, "tuning.json"))
      and os.path.abspath(out) == os.path.abspath(RESULTS)):
    raise ValueError(
        f"{workdir} holds a tuned study (tuning.json), but --out is the 3-epoch study's "
        f"report ({RESULTS}), which would be overwritten: pass "
        "--out=experiments/results/gradient_flow/converged.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/gradient_flow")
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--command", default="", help="The sweep command, for the report.")
  parser.add_argument("--note", default="", help="Free text for the report (e.g. timing).")
  parser.add_argument("--budget_workdir", default="",
                      help="A sweep of some of these runs at more epochs (study.rates_from "
                           "= this workdir's tuning.json): the budget check.")
  parser.add_argument("--bootstrap", type=int, default=stats.N_BOOTSTRAP,
                      help="Bootstrap resamples of the CIs (taus: at most 1000).")
  args = parser.parse_args()
  check_out(args.workdir, args.out)
  records = records_lib.load_runs(args.workdir)
  command, note = args.command, args.note
  log_path = os.path.join(args.workdir, "sweep_log.jsonl")
  if os.path.exists(log_path) and not command:
    with open(log_path) as f:
      entries = [json.loads(l) for l in f if l.strip()]
    command = "; ".join(sorted({e["command"] for e in entries}))
    note = note or ("Sweep wall time: " + ", ".join(
        f"slice {e['slice']}: {e['wall_time_s'] / 60:.1f} min ({e['trained']} trained, "
        f"{e['skipped']} skipped)" for e in entries) + ".")
  longer = records_lib.load_runs(args.budget_workdir) if args.budget_workdir else None
  print(write_report(records, args.out, command, note, tuning=records_lib.load_tuning(args.workdir),
                     n_boot=args.bootstrap, longer=longer))


if __name__ == "__main__":
  sys.exit(main())
