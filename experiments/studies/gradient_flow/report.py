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
  * for each finding of the EGF paper (SPEC §8) the effect with a 95% CI (paired
    differences, seeds resampled within cells; fixed bootstrap seed), a verdict by
    ``VERDICT_RULE`` and the slices where it holds or reverses; and the
    initialisation factor (``study.inits``) the same way;
``findings.json`` (the numbers) and the plots next to it. Cells of a partial grid
without runs are reported as missing. The default ``--out`` holds the earlier
3-epoch study; give the converged study its own directory (see
``experiments/configs/gradient_flow_converged_mnist5k.py``).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import sys
import warnings

import numpy as np

MEASURES = ("egf_p1", "egf_p2", "gradient_norm", "gradient_norm_active", "ghg")
SGD_LIKE = ("sgd", "momentum", "adagrad")
ADAPTIVE = ("adam", "rmsprop")
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "results", "gradient_flow")


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
      for m in (*MEASURES, "train_loss"):
        if m in row:
          series[m][row["step"]] = row[m]  # a resumed run may log a step twice
  losses = sorted(series.pop("train_loss", {}).items())
  record["loss_drop_last_fifth"] = loss_drop(losses)
  # run.json's "init" is the init scheme (study.inits); "init" below is step 0.
  scheme = record.pop("init", None)
  record["init_scheme"] = scheme if isinstance(scheme, str) else "dense_fan_in"
  record["accuracy"] = summary["final_test_accuracy"]
  record["wall_time_s"] = summary.get("wall_time_s")
  record["num_epochs"] = summary.get("config", {}).get("num_epochs")
  record["measures"] = {m: float(np.mean(list(s.values()))) for m, s in series.items()}
  record["init"] = {m: s[0] for m, s in series.items() if 0 in s}
  record["series"] = {m: sorted(s.items()) for m, s in series.items()}
  return record


PLATEAU_DROP = 0.05  # a run whose training loss fell more over its last fifth is not flat


def loss_drop(losses, fraction: float = 0.8) -> float | None:
  """Relative fall of the logged training loss from ``fraction`` of the run to its end.

  ``(L(t0) - L(T)) / L(t0)`` with ``t0`` the last logged step at or before
  ``fraction * T``; None with fewer than two logged points.

  Example:
    >>> loss_drop([(10, 2.0), (80, 1.0), (100, 0.9)])   # (1.0 - 0.9) / 1.0
    0.1
  """
  if len(losses) < 2:
    return None
  last_step, last = losses[-1]
  before = [v for step, v in losses[:-1] if step <= fraction * last_step]
  if not before or not before[-1]:
    return None
  return (before[-1] - last) / before[-1]


def load_tuning(workdir: str) -> dict | None:
  """The sweep's ``tuning.json`` (grids, validation accuracies, chosen rates), if any."""
  path = os.path.join(workdir, "tuning.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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
# Confidence intervals (bootstrap, fixed seed).
# ----------------------------------------------------------------------------

BOOTSTRAP_SEED = 0
N_BOOTSTRAP = 2000
LEVEL = 0.95
VERDICT_RULE = (
    "The effect is the mean over cells (grid points but the seed) of each cell's mean "
    "paired difference; its 95% CI is the percentile bootstrap "
    f"({N_BOOTSTRAP} resamples of the seeds within each cell, seed {BOOTSTRAP_SEED}). "
    "**supported**: the CI lies above 0 and no slice's CI lies below 0; **not "
    "supported**: the CI does not lie above 0 and no slice's CI does; **mixed**: "
    "otherwise (it holds overall but is reversed in a slice, or holds in some slices "
    "only). Fewer than 2 pairs: not tested.")


def bootstrap_mean_ci(groups, n_boot: int = N_BOOTSTRAP, level: float = LEVEL,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
  """Percentile CI of the mean over ``groups`` of each group's mean.

  Each resample draws every group's values with replacement within the group (a
  group is a cell; its values are its seeds' paired differences), so the CI is of
  seed-to-seed noise on this grid. ``(nan, nan)`` without values.

  Example:
    >>> bootstrap_mean_ci([[0.0, 1.0]])   # resample means 0, .5, 1 w.p. 1/4, 1/2, 1/4
    (0.0, 1.0)
  """
  groups = [np.asarray(g, np.float64) for g in groups if len(g)]
  if not groups:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  total = np.zeros(n_boot)
  for g in groups:
    total += g[rng.integers(0, len(g), (n_boot, len(g)))].mean(axis=1)
  lo, hi = np.quantile(total / len(groups), [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def paired_effect(pairs, slice_names=(), n_boot: int = N_BOOTSTRAP) -> dict:
  """The effect, CI and verdict of paired differences, overall and per slice.

  Args:
    pairs: ``(cell, slices, diff)`` per paired unit: ``cell`` a hashable grid point
      (seeds of one cell are resampled together), ``slices`` a dict of slice
      values (e.g. ``{"density": 0.05}``), ``diff`` the paired difference.
    slice_names: the slice dimensions to break the effect down by.
    n_boot: bootstrap resamples.

  Returns:
    ``{"effect", "ci", "n" (pairs), "cells", "verdict", "slices": {name: {value:
    {"effect", "ci", "n", "holds"}}}, "holds_in": [...], "reversed_in": [...]}``.
  """
  def summarise(ps):
    cells = collections.defaultdict(list)
    for cell, _, d in ps:
      cells[cell].append(d)
    effect = float(np.mean([np.mean(v) for v in cells.values()])) if cells else float("nan")
    ci = bootstrap_mean_ci(list(cells.values()), n_boot)
    return {"effect": effect, "ci": ci, "n": len(ps), "cells": len(cells),
            "holds": len(ps) >= 2 and ci[0] > 0, "reversed": len(ps) >= 2 and ci[1] < 0}

  out = summarise(pairs)
  out["slices"], holds_in, reversed_in = {}, [], []
  for name in slice_names:
    values = sorted({sl[name] for _, sl, _ in pairs}, key=str)
    out["slices"][name] = {}
    for v in values:
      stats = summarise([p for p in pairs if p[1][name] == v])
      out["slices"][name][v] = stats
      (holds_in if stats["holds"] else reversed_in if stats["reversed"] else []).append(
          f"{name}={_value(v)}")
  out["holds_in"], out["reversed_in"] = holds_in, reversed_in
  out["verdict"] = verdict(out, holds_in, reversed_in)
  return out


def verdict(stats, holds_in=(), reversed_in=()) -> str:
  """``VERDICT_RULE`` applied to ``paired_effect``'s overall and slice results."""
  if stats["n"] < 2:
    return "not tested (no paired runs in this sweep)" if not stats["n"] else (
        "not tested (one paired run)")
  if stats["holds"]:
    return "mixed" if reversed_in else "supported"
  return "mixed" if holds_in else "not supported"


def _tau_rows(x, y) -> np.ndarray:
  """Kendall's tau-b of each row pair of ``x``, ``y`` [B, m] (NaN where undefined)."""
  i, j = np.triu_indices(x.shape[1], 1)
  sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
  n0 = len(i)
  denom = np.sqrt((n0 - np.sum(sx == 0, 1)) * (n0 - np.sum(sy == 0, 1)).astype(np.float64))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, np.sum(sx * sy, 1) / denom, np.nan)


def _bootstrap_taus(x, y, idx) -> np.ndarray:
  """tau-b of ``x[idx[b]]`` vs ``y[idx[b]]`` for every resample ``b`` [B]."""
  m = idx.shape[1]
  if m <= 200:  # all pairs of every resample at once: at most ~20k pairs a row
    return _tau_rows(x[idx], y[idx])
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    return np.array([stats.kendalltau(x[r], y[r])[0] for r in idx])  # O(m log m) each
  except ImportError:
    return np.array([kendall_tau(x[r], y[r]) for r in idx])


def tau_with_ci(records, measures=MEASURES, key: str = "measures", within: bool = False,
                n_boot: int = 1000, seed: int = BOOTSTRAP_SEED) -> dict:
  """Kendall's tau of each measure vs accuracy with percentile bootstrap CIs.

  Runs are resampled with replacement (within each (optimizer, activation,
  regularisation) setting if ``within``, whose taus are then averaged); the same
  resamples serve every measure, so differences of |tau| get CIs too.

  Returns:
    ``{"tau": {m: tau}, "ci": {m: (lo, hi)}, "n": runs, "settings": k,
    "abs_diff": {m: (d, lo, hi)}}`` with ``abs_diff[m]`` the CI of
    ``|tau(egf_p2)| - |tau(m)|``. Runs without every measure are left out.
  """
  rs = [r for r in records if all(m in r.get(key, {}) for m in measures)]
  groups = collections.defaultdict(list)
  for r in rs:
    groups[_setting(r) if within else ()].append(r)
  groups = {g: v for g, v in groups.items() if len(v) >= 2}
  rng = np.random.default_rng(seed)
  point = {m: [] for m in measures}
  boots = {m: [] for m in measures}
  for g in groups.values():
    acc = np.array([r["accuracy"] for r in g], np.float64)
    idx = rng.integers(0, len(g), (n_boot, len(g)))
    for m in measures:
      x = np.array([r[key][m] for r in g], np.float64)
      point[m].append(kendall_tau(x, acc))
      boots[m].append(_bootstrap_taus(x, acc, idx))
  q = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]
  out = {"tau": {}, "ci": {}, "n": sum(len(v) for v in groups.values()),
         "settings": len(groups), "abs_diff": {}}
  dist = {}
  for m in measures:
    if not point[m]:
      out["tau"][m], out["ci"][m], dist[m] = float("nan"), (float("nan"),) * 2, None
      continue
    with warnings.catch_warnings():  # an all-NaN resample (constant measure) is NaN
      warnings.simplefilter("ignore", RuntimeWarning)
      out["tau"][m] = float(np.nanmean(point[m]))
      dist[m] = np.nanmean(np.stack(boots[m]), axis=0)
      dist[m] = None if np.all(np.isnan(dist[m])) else dist[m]
    out["ci"][m] = (tuple(float(v) for v in np.nanquantile(dist[m], q))
                    if dist[m] is not None else (float("nan"),) * 2)
  if "egf_p2" in measures:
    for m in measures:
      if m == "egf_p2" or dist["egf_p2"] is None or dist[m] is None:
        continue
      d = np.abs(dist["egf_p2"]) - np.abs(dist[m])
      lo, hi = np.nanquantile(d, q)
      out["abs_diff"][m] = (abs(out["tau"]["egf_p2"]) - abs(out["tau"][m]), float(lo),
                            float(hi))
  return out


# ----------------------------------------------------------------------------
# The paper's findings (SPEC §8).
# ----------------------------------------------------------------------------


def _main_grid(records):
  """The runs of the main grid (dense fan-in init; the init factor is a slice)."""
  return [r for r in records if r.get("init_scheme", "dense_fan_in") == "dense_fan_in"]


def finding_batch_norm(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """Batch norm matters more for sparse than for dense nets.

  Paired over (optimizer, activation, density < 1, seed): the accuracy gain of
  batch norm (batch_norm - none) for the sparse net minus that for its
  same-capacity dense net. Cells: (optimizer, activation, density).
  """
  acc = _index(_main_grid(records))
  pairs, sparse_gain, dense_gain = [], [], []
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
    pairs.append(((o, a, d), {"optimizer": o, "activation": a, "density": d}, sg - dg))
  out = paired_effect(pairs, ("optimizer", "activation", "density"), n_boot)
  out.update(claim="batch normalisation matters more for sparse than for dense networks",
             measure="(sparse BN gain) − (same-capacity dense BN gain)",
             sparse_gain=_mean_se(sparse_gain)[0], dense_gain=_mean_se(dense_gain)[0],
             diff=out["effect"], se=_mean_se([p[2] for p in pairs])[1])
  return out


def _gaps(acc):
  """optimizer -> (activation, regularisation, density, seed) -> sparse - dense."""
  gaps = collections.defaultdict(dict)
  for (o, a, reg, d, s, kind), v in acc.items():
    if kind == "sparse" and (o, a, reg, d, s, "dense") in acc:
      gaps[o][(a, reg, d, s)] = v - acc[(o, a, reg, d, s, "dense")]
  return gaps


def finding_adaptive(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """Adam/RMSProp hurt sparse nets more than SGD/momentum/Adagrad do.

  The sparse-minus-same-capacity-dense gap, per optimizer; the claim holds when
  the gap of an SGD-like optimizer exceeds that of an adaptive one (paired over
  activation, regularisation, density < 1, seed; every SGD-like x adaptive pair
  of optimizers). Also Kendall tau of EGF (p=2) vs accuracy among sparse runs per
  optimizer ("react badly to high gradient flow" predicts a negative tau for the
  adaptive optimizers).
  """
  main = _main_grid(records)
  gaps = _gaps(_index(main))
  pairs = []
  for o_sgd, o_ad in itertools.product(SGD_LIKE, ADAPTIVE):
    for k in sorted(set(gaps.get(o_sgd, {})) & set(gaps.get(o_ad, {})), key=str):
      a, reg, d, _ = k
      pairs.append(((o_sgd, o_ad, a, reg, d),
                    {"pair": f"{o_sgd}-{o_ad}", "regularisation": reg, "density": d,
                     "activation": a}, gaps[o_sgd][k] - gaps[o_ad][k]))
  out = paired_effect(pairs, ("pair", "regularisation", "density", "activation"), n_boot)
  taus = {}
  for o in sorted(gaps):
    rs = [r for r in main if is_sparse_run(r) and r["optimizer"] == o
          and "egf_p2" in r.get("measures", {})]
    t = tau_with_ci(rs, ("egf_p2",), n_boot=min(n_boot, 1000))
    taus[o] = (t["tau"]["egf_p2"], t["n"], t["ci"]["egf_p2"])
  by_reg = collections.defaultdict(list)
  for _, sl, d in pairs:
    by_reg[sl["regularisation"]].append(d)
  out.update(claim="optimizers with a running average of squared gradients (Adam, "
                   "RMSProp) do worse on sparse nets than SGD/momentum/Adagrad",
             measure="(sparse − dense gap, SGD-like) − (gap, adaptive)",
             gap_by_optimizer={o: _mean_se(list(g.values()))[0] for o, g in gaps.items()},
             egf_tau_by_optimizer=taus, diff=out["effect"],
             se=_mean_se([p[2] for p in pairs])[1],
             by_regularisation={r: _mean_se(v) for r, v in sorted(by_reg.items())})
  return out


def finding_adaptive_regularisation(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """Adaptive optimizers' sparse nets are hurt more by L2 / augmentation.

  Paired over (activation, density < 1, seed) and every SGD-like x adaptive pair:
  the sparse net's accuracy change from the regularisation (l2 or augment minus
  none) with the SGD-like optimizer minus that with the adaptive one.
  """
  acc = _index(_main_grid(records))
  pairs = []
  for (o, a, reg, d, s, kind), v in acc.items():
    if kind != "sparse" or reg not in ("l2", "augment") or o not in SGD_LIKE:
      continue
    for o_ad in ADAPTIVE:
      keys = [(o, a, "none", d, s, kind), (o_ad, a, reg, d, s, kind),
              (o_ad, a, "none", d, s, kind)]
      if all(k in acc for k in keys):
        change_sgd = v - acc[keys[0]]
        change_ad = acc[keys[1]] - acc[keys[2]]
        pairs.append(((o, o_ad, a, reg, d), {"regularisation": reg, "pair": f"{o}-{o_ad}",
                                             "density": d}, change_sgd - change_ad))
  out = paired_effect(pairs, ("regularisation", "pair", "density"), n_boot)
  out.update(claim="with Adam/RMSProp, L2 and data augmentation hurt sparse nets more "
                   "than with SGD/momentum/Adagrad",
             measure="(sparse change from the regularisation, SGD-like) − (adaptive)")
  return out


def finding_activation(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """Swish and PReLU with SGD(-momentum) are good activations for sparse nets.

  Paired over (SGD or momentum, regularisation, density < 1, seed): sparse
  accuracy with Swish (or PReLU) minus with ReLU. Cells: (optimizer,
  regularisation, density).
  """
  main = _main_grid(records)
  acc = _index(main)
  out = {"claim": "Swish and PReLU with SGD are promising activations for sparse networks",
         "measure": "sparse accuracy (activation − ReLU), SGD and momentum",
         "by_activation": {}}
  for act in ("swish", "prelu"):
    pairs = [((o, reg, d), {"optimizer": o, "regularisation": reg, "density": d},
              v - acc[(o, "relu", reg, d, s, kind)])
             for (o, a, reg, d, s, kind), v in acc.items()
             if a == act and kind == "sparse" and o in ("sgd", "momentum")
             and (o, "relu", reg, d, s, kind) in acc]
    stats = paired_effect(pairs, ("optimizer", "regularisation", "density"), n_boot)
    diff, se, _ = _mean_se([p[2] for p in pairs])
    stats.update(diff=stats["effect"], se=se, by_regularisation={
        r: _mean_se([p[2] for p in pairs if p[1]["regularisation"] == r])
        for r in sorted({p[1]["regularisation"] for p in pairs})})
    out["by_activation"][act] = stats
  sparse_sgd = [r for r in main if is_sparse_run(r) and r["optimizer"] in ("sgd", "momentum")]
  out["mean_accuracy"] = {a: _mean_sd([r["accuracy"] for r in sparse_sgd
                                       if r["activation"] == a])[0]
                          for a in sorted({r["activation"] for r in sparse_sgd})}
  return out


def finding_egf(records, n_boot: int = 1000) -> dict:
  """EGF (p=2) predicts final accuracy better than ||g||_2 and g^T H g.

  The effect is ``|tau(egf_p2)| - |tau(other)|`` for other in (gradient_norm,
  ghg), on the measures averaged over training, with CIs from shared bootstrap
  resamples of the runs; overall and within settings, also at initialisation.
  Supported when both differences' CIs lie above 0 (overall or within), mixed
  when one of the four (all/within x norm/ghg) does.
  """
  measures = ("egf_p2", "gradient_norm", "ghg")
  results = {}
  for key in ("measures", "init"):
    for within in (False, True):
      results[(key, "within" if within else "all")] = tau_with_ci(
          records, measures, key, within, n_boot)
  main = [results[("measures", g)]["abs_diff"] for g in ("all", "within")]
  held = [d[m][1] > 0 for d in main for m in ("gradient_norm", "ghg") if m in d]
  if not held:
    v = "not tested (too few runs with every measure)"
  else:
    v = "supported" if all(held) else "mixed" if any(held) else "not supported"
  return {"claim": "EGF correlates with final accuracy better than the gradient norm "
                   "or g^T H g", "results": results, "verdict": v,
          "rule": "|tau(EGF p=2)| − |tau(other)| with a 95% bootstrap CI (runs "
                  f"resampled, {n_boot} resamples, seed {BOOTSTRAP_SEED}) for other = "
                  "gradient_norm and ghg, measures averaged over training, across all "
                  "runs and within settings: supported if all four CIs lie above 0, "
                  "mixed if some do, not supported if none does."}


def finding_init(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """The init factor: sparse accuracy with active-fan-in init minus dense fan-in."""
  acc = {(*_setting(r), r["density"], r["seed"], r.get("init_scheme", "dense_fan_in")):
         r["accuracy"] for r in records if is_sparse_run(r)}
  pairs = [((o, a, reg, d), {"optimizer": o, "regularisation": reg, "density": d},
            v - acc[(o, a, reg, d, s, "dense_fan_in")])
           for (o, a, reg, d, s, init), v in acc.items()
           if init == "active_fan_in" and (o, a, reg, d, s, "dense_fan_in") in acc]
  out = paired_effect(pairs, ("optimizer", "regularisation", "density"), n_boot)
  out.update(claim="scaling each sparse unit's init by its active fan-in improves sparse "
                   "accuracy (not a claim of the paper: the factor the first study found "
                   "dominant)", measure="sparse accuracy (active fan-in − dense fan-in)")
  return out


def sparse_minus_dense_table(records, n_boot: int = N_BOOTSTRAP) -> dict:
  """``{(optimizer, regularisation): paired_effect}`` of sparse − dense, density < 1.

  Every optimizer x regularisation seen in the runs is a key; one without pairs
  has ``n == 0`` (missing).
  """
  main = _main_grid(records)
  gaps = _gaps(_index(main))
  opts = sorted({r["optimizer"] for r in main})
  regs = sorted({r["regularisation"] for r in main})
  out = {}
  for o, reg in itertools.product(opts, regs):
    pairs = [((a, d), {"density": d}, g) for (a, r, d, s), g in gaps.get(o, {}).items()
             if r == reg]
    out[(o, reg)] = paired_effect(pairs, ("density",), n_boot)
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


def _ci(stats) -> str:
  """``effect [lo, hi]`` in accuracy points, or ``missing``."""
  if not stats["n"]:
    return "missing"
  lo, hi = stats["ci"]
  return f"{_pct(stats['effect'])} [{_pct(lo)}, {_pct(hi)}]"


def _tau_ci(t, lo, hi) -> str:
  return "n/a" if math.isnan(t) else f"{t:+.3f} [{_tau(lo)}, {_tau(hi)}]"


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
        f"{_value(v)} {_ci(st)} (n={st['n']})" for v, st in values.items()))
  return lines + [""]


def _value(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def _convergence_lines(records) -> list[str]:
  """Whether the recipe's budget is enough: the training loss over the last fifth."""
  drops = sorted((r["loss_drop_last_fifth"], r.get("name", "?")) for r in records
                 if r.get("loss_drop_last_fifth") is not None)
  lines = ["## Convergence", ""]
  if not drops:
    return lines + ["No run logged its training loss twice: not checked.", ""]
  values = np.array([d for d, _ in drops])
  flat = int(np.sum(values <= PLATEAU_DROP))
  return lines + [
      "Relative fall of the training loss (logged means) over the last fifth of each "
      f"run: median {100 * np.median(values):.1f}%, 90th percentile "
      f"{100 * np.quantile(values, 0.9):.1f}%, largest {100 * values[-1]:.1f}% "
      f"({drops[-1][1]}). {flat} of {len(values)} runs fell by at most "
      f"{100 * PLATEAU_DROP:g}% (plateaued by this rule); with a cosine schedule the "
      "rate is near 0 at the end, so read this with the loss curves.", ""]


def budget_check(records, longer, n_boot: int = N_BOOTSTRAP) -> dict:
  """Is the recipe's budget enough? The same runs trained longer, paired by name.

  ``longer`` are runs of a second sweep (``study.rates_from`` = this sweep's
  ``tuning.json``, more epochs): each is paired with the run of the same name here
  (same setting, seed and rate). Returns the test-accuracy change (longer − this
  budget) overall and by sparse/dense, with bootstrap CIs over the pairs, and the
  change of the sparse − dense gap of each (setting, seed) with both sides.
  """
  by_name = {r["name"]: r for r in records}
  pairs, unpaired, other_rate = [], 0, 0
  for r in longer:
    base = by_name.get(r["name"])
    if base is None:
      unpaired += 1
    elif (r.get("learning_rate") is None or base.get("learning_rate") is None
          or not math.isclose(r["learning_rate"], base["learning_rate"])):
      other_rate += 1
    else:
      pairs.append((base, r))
  short_epochs, long_epochs = (
      sorted({p[i].get("num_epochs") for p in pairs if p[i].get("num_epochs")})
      for i in (0, 1))
  if set(short_epochs) & set(long_epochs):
    raise ValueError(
        f"The budget check's runs train for {long_epochs} epochs, as do these "
        f"({short_epochs}): it needs a longer sweep (e.g. "
        "--config.num_epochs=60 --config.study.rates_from=<this tuning.json> into a new "
        "--workdir), given as --budget_workdir.")
  def stats(diffs):
    mean = float(np.mean(diffs)) if diffs else float("nan")
    return {"effect": mean, "ci": bootstrap_mean_ci([diffs], n_boot), "n": len(diffs),
            "largest": float(max(diffs, key=abs)) if diffs else float("nan")}
  diffs = {k: [b["accuracy"] - a["accuracy"] for a, b in pairs
               if k == "all" or b["kind"] == k] for k in ("all", "sparse", "dense")}
  acc = {b["name"]: (a["accuracy"], b["accuracy"]) for a, b in pairs}
  gap = []
  for a, b in pairs:
    if b["kind"] == "sparse" and b.get("init_scheme", "dense_fan_in") == "dense_fan_in":
      dense = b["name"].replace("_sparse_", "_dense_")
      if dense in acc:
        gap.append((b["accuracy"] - acc[dense][1]) - (a["accuracy"] - acc[dense][0]))
  drops = [b["loss_drop_last_fifth"] for _, b in pairs
           if b.get("loss_drop_last_fifth") is not None]
  by_optimizer = collections.defaultdict(list)
  for a, b in pairs:
    if b["kind"] == "sparse" and b.get("optimizer"):
      by_optimizer[b["optimizer"]].append(b["accuracy"] - a["accuracy"])
  # Would the verdicts move with more training? The findings on the paired runs at
  # both budgets (effects only: the check has too few seeds for CIs).
  findings = {}
  if all("optimizer" in b for _, b in pairs):
    for key, fn in (("batch_norm", finding_batch_norm), ("adaptive", finding_adaptive),
                    ("adaptive_regularisation", finding_adaptive_regularisation)):
      short_f, long_f = (fn([p[i] for p in pairs], n_boot=100) for i in (0, 1))
      if short_f["n"]:
        findings[key] = {"effect": short_f["effect"], "longer_effect": long_f["effect"],
                         "n": short_f["n"], "claim": short_f["claim"]}
  return {"n": len(pairs), "unpaired": unpaired, "other_rate": other_rate,
          "epochs": short_epochs, "longer_epochs": long_epochs,
          "pairs": [{"name": b["name"], "kind": b["kind"], "optimizer": b.get("optimizer"),
                     "accuracy": a["accuracy"], "longer_accuracy": b["accuracy"]}
                    for a, b in pairs],
          "accuracy_change": {k: stats(v) for k, v in diffs.items()},
          "gap_change": stats(gap),
          "sparse_change_by_optimizer": {o: float(np.mean(v))
                                         for o, v in sorted(by_optimizer.items())},
          "findings": findings,
          "loss_drop_median": float(np.median(drops)) if drops else None}


def _epochs_text(epochs) -> str:
  return "/".join(str(x) for x in epochs) or "?"


def _budget_lines(check) -> list[str]:
  """The budget check's paragraph (under "Convergence")."""
  if not check or not check["n"]:
    return []
  ch, gap = check["accuracy_change"], check["gap_change"]
  ep = _epochs_text
  lines = [f"**Budget check**: {check['n']} final runs trained again for "
          f"{ep(check['longer_epochs'])} instead of {ep(check['epochs'])} epochs (same "
          "setting, seed and tuned rate; cosine over the longer run). Test accuracy, "
          f"longer − this budget: {_ci(ch['all'])} points overall (largest change "
          f"{_pct(ch['all']['largest'])}), sparse {_ci(ch['sparse'])} (n={ch['sparse']['n']}), "
          f"dense {_ci(ch['dense'])} (n={ch['dense']['n']}); the sparse − dense gap "
          f"changes by {_ci(gap)} points (n={gap['n']} pairs of pairs). Median fall of the "
          "training loss over the last fifth of the longer runs: "
          f"{_pct(check['loss_drop_median'])}%. 95% CIs: percentile bootstrap over the "
          "runs, treated as independent (not seeds within cells, as for the findings)."
          + (f" Left out: {check['unpaired']} longer runs with no run of that name here, "
             f"{check['other_rate']} at another rate." if check["unpaired"]
             or check["other_rate"] else ""), ""]
  if check.get("sparse_change_by_optimizer"):
    lines += ["Sparse runs' change by optimizer: " + ", ".join(
        f"{o} {_pct(v)}" for o, v in check["sparse_change_by_optimizer"].items())
        + " points.", ""]
  if check.get("findings"):
    lines += ["The findings' effects on these runs alone, at "
              f"{ep(check['epochs'])} → {ep(check['longer_epochs'])} epochs (one seed: "
              "effects only, no CIs): " + "; ".join(
                  f"{k} {_pct(f['effect'])} → {_pct(f['longer_effect'])} (n={f['n']})"
                  for k, f in check["findings"].items()) + " points.", ""]
  return lines + ["![budget check](budget_check.png)", ""]


def _unstable_lines(tuning) -> list[str]:
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
      text = "diverged" if acc is None else _pct(acc)
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


def write_report(records, out_dir, command: str = "", note: str = "", tuning=None,
                 n_boot: int = N_BOOTSTRAP, longer=None) -> str:
  """Writes ``README.md``, ``findings.json`` and the plots into ``out_dir``.

  Works on a partial grid: cells without runs are reported as missing. ``longer``:
  the budget check's runs (``budget_check``). Returns the markdown.
  """
  if not records:
    raise ValueError("No finished run to report on: run gradient_flow_sweep first (a run "
                     "is finished when its summary.json has final_test_accuracy).")
  os.makedirs(out_dir, exist_ok=True)
  main_grid = _main_grid(records)
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
  lines += _convergence_lines(records)
  budget = budget_check(records, longer, n_boot) if longer else None
  lines += _budget_lines(budget)
  lines += _tuning_lines(tuning, records)

  # Sparse vs dense per setting.
  lines += ["## Sparse vs same-capacity dense test accuracy (%)", "",
            "Mean ± std over seeds. At density 1 both are the full-width dense net; "
            "'missing' marks a side without finished runs.", "",
            "| optimizer | activation | regularisation | density | sparse | dense | "
            "sparse − dense | seeds |", "|---|---|---|---|---|---|---|---|"]
  by = collections.defaultdict(list)
  for r in main_grid:
    by[(*_setting(r), r["density"], r["kind"])].append(r["accuracy"])
  for key in sorted({k[:4] for k in by}):
    dense = by.get((*key, "dense"), [])
    sparse = dense if key[3] == 1.0 else by.get((*key, "sparse"), [])
    sm, ss, sn = _mean_sd(sparse)
    dm, ds, dn = _mean_sd(dense)
    side = lambda m, sd, n: f"{_pct(m)} ± {_pct(sd)}" if n else "missing"
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {side(sm, ss, sn)} | "
                 f"{side(dm, ds, dn)} | {_pct(sm - dm) if sn and dn else 'missing'} | "
                 f"{min(sn, dn)} |")
  table = sparse_minus_dense_table(records, n_boot)
  opts = sorted({o for o, _ in table})
  regs = sorted({g for _, g in table})
  lines += ["", "![sparse vs dense](sparse_vs_dense.png)", "",
            "Sparse − same-capacity dense accuracy (points) by optimizer × "
            "regularisation, densities below 1 and activations pooled: effect [95% CI] "
            "(paired over seeds, bootstrap as for the findings).", "",
            "| optimizer | " + " | ".join(regs) + " |", "|---|" + "---|" * len(regs)]
  for o in opts:
    lines.append(f"| {o} | " + " | ".join(_ci(table[(o, g)]) for g in regs) + " |")
  lines += ["", "![sparse minus dense](sparse_minus_dense.png)", ""]

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

  taus = {(key, g): tau_with_ci(records, MEASURES, key, g == "within",
                                n_boot=min(n_boot, 1000))
          for key in ("measures", "init") for g in ("all", "within")}
  lines += ["", "Largest |tau| (measure averaged over training): over all runs **"
            f"{best('all')}** (tau = {_tau(corr_mean[best('all')]['all'][0])}); within "
            f"settings **{best('within')}** "
            f"(tau = {_tau(corr_mean[best('within')]['within'][0])}).", "",
            "With 95% bootstrap CIs (runs resampled with replacement, within each setting "
            f"for 'within'; {min(n_boot, 1000)} resamples, seed {BOOTSTRAP_SEED}; runs with "
            "every measure):", "",
            "| measure | mean: all | mean: within | init: all | init: within |",
            "|---|---|---|---|---|"]
  for m in MEASURES:
    lines.append(f"| {m} | " + " | ".join(
        _tau_ci(taus[k]["tau"][m], *taus[k]["ci"][m]) for k in (
            ("measures", "all"), ("measures", "within"), ("init", "all"),
            ("init", "within"))) + " |")
  lines += ["", "![tau with CIs](tau_ci.png)", "",
            "![measures vs accuracy](measures_vs_accuracy.png)", "",
            "EGF (p=2) during training, mean over the runs of each group:", "",
            "![EGF over training](egf_over_training.png)", ""]

  # Findings.
  bn = finding_batch_norm(records, n_boot)
  ad = finding_adaptive(records, n_boot)
  ad_reg = finding_adaptive_regularisation(records, n_boot)
  act = finding_activation(records, n_boot)
  egf = finding_egf(records, n_boot=min(n_boot, 1000))
  init = finding_init(records, n_boot)
  lines += ["## The paper's findings (SPEC §8) in these runs", "", VERDICT_RULE, ""]
  lines += _finding_lines(1, bn)
  lines[-1:] = [f"   Gain from batch norm: sparse {_pct(bn['sparse_gain'])} points, "
                f"same-capacity dense {_pct(bn['dense_gain'])} points.", ""]
  lines += _finding_lines(2, ad)
  lines[-1:] = ["   Sparse − dense gap by optimizer: " + ", ".join(
      f"{o} {_pct(g)}" for o, g in sorted(ad["gap_by_optimizer"].items())) +
      " points. Kendall tau of EGF (p=2) vs accuracy among sparse runs: " + ", ".join(
          f"{o} {_tau_ci(t, *ci)} (n={k})" for o, (t, k, ci) in
          sorted(ad["egf_tau_by_optimizer"].items())) + ".", ""]
  lines += _finding_lines(3, ad_reg, " (the L2 / data-augmentation part of 2)")
  for letter, (a, v) in zip("ab", act["by_activation"].items()):
    lines += _finding_lines(f"4{letter}", {**v, "claim": act["claim"],
                                           "measure": act["measure"]}, f" ({a})")
  lines[-1:] = ["   Mean sparse accuracy with SGD/momentum by activation: " + ", ".join(
      f"{a} {_pct(v)}" for a, v in act["mean_accuracy"].items()) + ".", ""]
  lines += [f"5. *{egf['claim']}*: **{egf['verdict']}**. {egf['rule']}", ""]
  for (key, g), res in egf["results"].items():
    diffs = "; ".join(f"vs {m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                      for m, (d, lo, hi) in res["abs_diff"].items())
    lines.append(f"   - {'averaged over training' if key == 'measures' else 'at init'}, "
                 f"{g} (n = {res['n']} runs, {res['settings']} settings): |tau| difference "
                 f"{diffs or 'n/a'}")
  lines += ["", "## The initialisation factor", ""]
  lines += _finding_lines(6, init)
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(text)
  _write_findings(os.path.join(out_dir, "findings.json"), {
      "batch_norm": bn, "adaptive": ad, "adaptive_regularisation": ad_reg,
      "activation": act, "egf": egf, "init": init,
      "sparse_minus_dense": {f"{o}/{g}": v for (o, g), v in table.items()},
      "tau": {f"{k}/{g}": v for (k, g), v in taus.items()}, "budget_check": budget})
  if budget and budget["n"]:
    plot_budget_check(budget, os.path.join(out_dir, "budget_check.png"))
  plot_sparse_vs_dense(main_grid, os.path.join(out_dir, "sparse_vs_dense.png"))
  plot_sparse_minus_dense(table, os.path.join(out_dir, "sparse_minus_dense.png"))
  plot_tau_ci(taus, os.path.join(out_dir, "tau_ci.png"))
  plot_measures(records, corr_mean, os.path.join(out_dir, "measures_vs_accuracy.png"))
  plot_egf_over_training(main_grid, os.path.join(out_dir, "egf_over_training.png"))
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


def plot_sparse_minus_dense(table, path):
  """Heat map of sparse − dense accuracy by optimizer x regularisation (CI as text)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  opts = sorted({o for o, _ in table})
  regs = sorted({g for _, g in table})
  values = np.array([[100 * table[(o, g)]["effect"] if table[(o, g)]["n"] else np.nan
                      for g in regs] for o in opts])
  fig, ax = plt.subplots(figsize=(1.8 * len(regs) + 2, 0.8 * len(opts) + 1.5))
  bound = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
  im = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
  for (i, o), (j, g) in itertools.product(enumerate(opts), enumerate(regs)):
    st = table[(o, g)]
    text = "missing" if not st["n"] else (
        f"{100 * st['effect']:+.1f}\n[{100 * st['ci'][0]:+.1f}, {100 * st['ci'][1]:+.1f}]")
    ax.text(j, i, text, ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(regs)), regs)
  ax.set_yticks(range(len(opts)), opts)
  ax.set_title("sparse − same-capacity dense accuracy (points), density < 1", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_tau_ci(taus, path):
  """Kendall's tau of each measure vs accuracy with its 95% CI (all / within)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 3.4))
  keys = list(taus)
  width = 0.8 / len(keys)
  for k, key in enumerate(keys):
    res = taus[key]
    xs = np.arange(len(MEASURES)) + (k - (len(keys) - 1) / 2) * width
    t = np.array([res["tau"][m] for m in MEASURES])
    lo = np.array([res["ci"][m][0] for m in MEASURES])
    hi = np.array([res["ci"][m][1] for m in MEASURES])
    ax.errorbar(xs, t, yerr=[t - lo, hi - t], fmt="o", capsize=3, label="/".join(key))
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xticks(range(len(MEASURES)), MEASURES, fontsize=8)
  ax.set_ylabel("Kendall's tau vs final accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_budget_check(check, path):
  """Test accuracy at the recipe's budget vs the same run trained longer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  opts = sorted({p["optimizer"] for p in check["pairs"]})
  colors = dict(zip(opts, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for p in check["pairs"]:
    ax.scatter(100 * p["accuracy"], 100 * p["longer_accuracy"], s=18,
               color=colors[p["optimizer"]], marker="o" if p["kind"] == "sparse" else "s")
  lo = 100 * min(min(p["accuracy"], p["longer_accuracy"]) for p in check["pairs"]) - 0.5
  ax.plot([lo, 100], [lo, 100], "k:", lw=1)
  for o in opts:
    ax.scatter([], [], color=colors[o], label=o)
  ax.legend(fontsize=7, title="o sparse, s dense", title_fontsize=7)
  ep = _epochs_text
  ax.set_xlabel(f"test accuracy (%), {ep(check['epochs'])} epochs")
  ax.set_ylabel(f"test accuracy (%), {ep(check['longer_epochs'])} epochs")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  parser.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP,
                      help="Bootstrap resamples of the CIs (taus: at most 1000).")
  args = parser.parse_args()
  check_out(args.workdir, args.out)
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
  longer = load_runs(args.budget_workdir) if args.budget_workdir else None
  print(write_report(records, args.out, command, note, tuning=load_tuning(args.workdir),
                     n_boot=args.bootstrap, longer=longer))


if __name__ == "__main__":
  sys.exit(main())
