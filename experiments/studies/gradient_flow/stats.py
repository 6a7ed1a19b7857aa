"""The gradient-flow report's statistics: Kendall's tau, bootstrap CIs, verdicts.

Every CI is a percentile bootstrap with a fixed seed (``BOOTSTRAP_SEED``), so a
report is regenerated identically from the same records. ``paired_effect`` turns
paired differences (seeds resampled within cells) into an effect, its CI and a
verdict by ``VERDICT_RULE``; ``tau_with_ci`` does the same for the rank
correlation of each gradient-flow measure with the final accuracy.
"""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np

from experiments.studies.gradient_flow import formatting
from experiments.studies.gradient_flow import records as records_lib

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


def mean_sd(values):
  """Mean, std and count of ``values``, Nones left out (NaNs and 0 without any)."""
  values = [v for v in values if v is not None]
  if not values:
    return float("nan"), float("nan"), 0
  return float(np.mean(values)), float(np.std(values)), len(values)


def mean_se(diffs):
  """Mean and standard error of paired differences."""
  if not diffs:
    return float("nan"), float("nan"), 0
  d = np.asarray(diffs, np.float64)
  se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
  return float(np.mean(d)), se, len(d)


def correlations(records, key="measures") -> dict[str, dict[str, tuple[float, int]]]:
  """Kendall tau of each measure (``records[i][key][m]``) vs accuracy, per group.

  Returns ``{measure: {"all"|"sparse"|"dense"|"within": (tau, n)}}``; the dense
  group is every dense run (same-capacity and full width); "within" is the mean of
  the taus computed inside each (optimizer, activation, regularisation) setting,
  across densities, sparse/dense and seeds (n = number of settings), which keeps
  differences between settings out of the ranking.
  """
  sparse = records_lib.is_sparse_run
  groups = {"all": records, "sparse": [r for r in records if sparse(r)],
            "dense": [r for r in records if not sparse(r)]}
  out = {}
  for m in records_lib.MEASURES:
    out[m] = {}
    for g, rs in groups.items():
      rs = [r for r in rs if m in r.get(key, {})]
      out[m][g] = (kendall_tau([r[key][m] for r in rs], [r["accuracy"] for r in rs]),
                   len(rs))
    settings = collections.defaultdict(list)
    for r in records:
      if m in r.get(key, {}):
        settings[records_lib.setting_key(r)].append(r)
    taus = [kendall_tau([r[key][m] for r in rs], [r["accuracy"] for r in rs])
            for rs in settings.values()]
    taus = [t for t in taus if not math.isnan(t)]
    out[m]["within"] = (float(np.mean(taus)) if taus else float("nan"), len(taus))
  return out


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
          f"{name}={formatting.value(v)}")
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


def tau_with_ci(records, measures=records_lib.MEASURES, key: str = "measures",
                within: bool = False, n_boot: int = 1000, seed: int = BOOTSTRAP_SEED) -> dict:
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
    groups[records_lib.setting_key(r) if within else ()].append(r)
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
