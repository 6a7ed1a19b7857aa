"""The gradient-flow report's plots (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import collections
import itertools

import numpy as np

from experiments.studies.gradient_flow import formatting
from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import stats


def _pyplot():
  """matplotlib's pyplot on the Agg backend (files only; imported when first plotting)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# Readable names of the records' "family" and "dataset" fields, for the titles.
FAMILIES = {"mlp": "MLP", "cnn": "small CNN"}
DATASETS = {"mnist5k": "the MNIST subset (mnist5k)"}


def subject(records) -> str:
  """The model family and data set of ``records``: the second line of every title."""
  families = sorted({FAMILIES.get(r.get("family"), str(r.get("family", "?"))) for r in records})
  widths = sorted({r["sparse_width"] for r in records if "sparse_width" in r})
  datasets = sorted({DATASETS.get(r.get("dataset"), str(r.get("dataset", "?")))
                     for r in records})
  width = f" (sparse width {', '.join(map(str, widths))})" if widths else ""
  return f"{' / '.join(families)}{width} on {' / '.join(datasets)}"


def _title(fig, what: str, about: str):
  """``what`` the figure shows over ``about`` (``subject``), if given."""
  fig.suptitle(f"{what}\n{about}" if about else what, fontsize=10)


def _outside_legend(ax, **kwargs):
  """``ax``'s legend right of it, where it hides no data (``_save`` makes room)."""
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), **kwargs)


def _save(fig, path):
  """Writes ``fig`` to ``path`` and closes it (a report draws many figures)."""
  plt = _pyplot()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sparse_minus_dense(table, path, about: str = ""):
  """Heat map of sparse − dense accuracy by optimizer x regularisation (CI as text).

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  opts = sorted({o for o, _ in table})
  regs = sorted({g for _, g in table})
  values = np.array([[100 * table[(o, g)]["effect"] if table[(o, g)]["n"] else np.nan
                      for g in regs] for o in opts])
  fig, ax = plt.subplots(figsize=(1.8 * len(regs) + 2, 0.8 * len(opts) + 1.9))
  bound = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
  im = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
  for (i, o), (j, g) in itertools.product(enumerate(opts), enumerate(regs)):
    st = table[(o, g)]
    text = "missing" if not st["n"] else (
        f"{100 * st['effect']:+.1f}\n[{100 * st['ci'][0]:+.1f}, {100 * st['ci'][1]:+.1f}]")
    ax.text(j, i, text, ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(regs)), regs)
  ax.set_yticks(range(len(opts)), opts)
  _title(fig, "sparse − same-capacity dense accuracy (points), density < 1", about)
  fig.colorbar(im, ax=ax)
  _save(fig, path)


def plot_tau_ci(taus, path, about: str = ""):
  """Kendall's tau of each measure vs accuracy with its 95% CI (all / within).

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.5, 3.8))
  keys, measures = list(taus), records_lib.MEASURES
  width = 0.8 / len(keys)
  for k, key in enumerate(keys):
    res = taus[key]
    xs = np.arange(len(measures)) + (k - (len(keys) - 1) / 2) * width
    t = np.array([res["tau"][m] for m in measures])
    lo = np.array([res["ci"][m][0] for m in measures])
    hi = np.array([res["ci"][m][1] for m in measures])
    ax.errorbar(xs, t, yerr=[t - lo, hi - t], fmt="o", capsize=3, label="/".join(key))
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xticks(range(len(measures)), measures, fontsize=8)
  ax.set_ylabel("Kendall's tau vs final accuracy")
  _outside_legend(ax)
  _title(fig, "Kendall's tau of each measure vs final accuracy, 95% CI", about)
  _save(fig, path)


def plot_budget_check(check, path, about: str = ""):
  """Test accuracy at the recipe's budget vs the same run trained longer.

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.2, 4.9))
  opts = sorted({p["optimizer"] for p in check["pairs"]})
  colors = dict(zip(opts, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for p in check["pairs"]:
    ax.scatter(100 * p["accuracy"], 100 * p["longer_accuracy"], s=18,
               color=colors[p["optimizer"]], marker="o" if p["kind"] == "sparse" else "s")
  lo = 100 * min(min(p["accuracy"], p["longer_accuracy"]) for p in check["pairs"]) - 0.5
  ax.plot([lo, 100], [lo, 100], "k:", lw=1)
  for o in opts:
    ax.scatter([], [], color=colors[o], label=o)
  _outside_legend(ax, title="o sparse, s dense", title_fontsize=7)
  ep = formatting.epochs
  ax.set_xlabel(f"test accuracy (%), {ep(check['epochs'])} epochs")
  ax.set_ylabel(f"test accuracy (%), {ep(check['longer_epochs'])} epochs")
  _title(fig, "budget check: the same runs trained longer", about)
  _save(fig, path)


def plot_sparse_vs_dense(records, path, about: str = ""):
  """Test accuracy vs density, sparse and same-capacity dense, one panel per setting.

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  opts = sorted({r["optimizer"] for r in records})
  acts = sorted({r["activation"] for r in records})
  regs = sorted({r["regularisation"] for r in records})
  fig, axes = plt.subplots(len(opts), len(acts), figsize=(4 * len(acts) + 1.6,
                                                         3 * len(opts) + 0.6),
                           squeeze=False, sharey=True)
  colors = dict(zip(regs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for (i, o), (j, a) in itertools.product(enumerate(opts), enumerate(acts)):
    ax = axes[i][j]
    for reg, kind in itertools.product(regs, ("sparse", "dense")):
      rs = [r for r in records if records_lib.setting_key(r) == (o, a, reg)
            and (r["kind"] == kind or r["density"] == 1.0)]
      ds = sorted({r["density"] for r in rs})
      if not ds:
        continue
      cells = [stats.mean_sd([r["accuracy"] for r in rs if r["density"] == d]) for d in ds]
      ax.errorbar(ds, [100 * m for m, _, _ in cells], yerr=[100 * s for _, s, _ in cells],
                  marker="o" if kind == "sparse" else "s", capsize=2, color=colors[reg],
                  ls="-" if kind == "sparse" else "--", label=f"{kind}, {reg}")
    ax.set_xscale("log")
    ax.set_title(f"{o}, {a}", fontsize=9)
    ax.set_xlabel("density (dense: same capacity)")
    if j == 0:
      ax.set_ylabel("test accuracy (%)")
  # Every panel draws the same (kind, regularisation) lines in the same styles.
  _outside_legend(axes[0][-1])
  _title(fig, "test accuracy vs density: sparse and same-capacity dense (mean ± std "
         "over seeds)", about)
  _save(fig, path)


def plot_measures(records, corr, path, about: str = ""):
  """Final accuracy vs each measure (averaged over training), with its tau.

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  measures = records_lib.MEASURES
  fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures) + 1.2, 3.8),
                           sharey=True)
  for ax, m in zip(axes, measures):
    for kind, marker in (("sparse", "o"), ("dense", "s")):
      rs = [r for r in records if (r["kind"] == kind) and m in r.get("measures", {})]
      ax.scatter([r["measures"][m] for r in rs], [100 * r["accuracy"] for r in rs], s=12,
                 marker=marker, alpha=0.7, label=kind)
    ax.set_xscale("symlog" if m == "ghg" else "log")
    ax.set_xlabel(f"{m} (mean over training)")
    ax.set_title(f"tau = {formatting.tau(corr[m]['all'][0])}", fontsize=9)
  axes[0].set_ylabel("final test accuracy (%)")
  _outside_legend(axes[-1])
  _title(fig, "final test accuracy vs each gradient-flow measure (mean over training)",
         about)
  _save(fig, path)


def plot_egf_over_training(records, path, measure="egf_p2", about: str = ""):
  """``measure`` over the training steps, mean over the runs of each kind and density.

  ``about``: the models and data (``subject``), for the title.
  """
  plt = _pyplot()
  regs = sorted({r["regularisation"] for r in records})
  fig, axes = plt.subplots(1, len(regs), figsize=(4.5 * len(regs) + 1.2, 3.8),
                           squeeze=False, sharey=True)
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
  # The panels share their (kind, density) lines, in the same order and colours.
  if axes[0][-1].get_legend_handles_labels()[0]:
    _outside_legend(axes[0][-1])
  _title(fig, f"{measure} over training (mean over the runs of each kind and density)",
         about)
  _save(fig, path)
