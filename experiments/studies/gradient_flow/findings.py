"""The findings of the EGF paper (docs/algorithms.md §8), tested on a sweep's records.

Each ``finding_*`` pairs runs that differ in one factor only (batch norm, the
optimizer, the activation, the init scheme; seeds and the other factors held) and
returns ``stats.paired_effect``'s effect, CI and verdict with the claim it tests;
``finding_egf`` compares the measures' rank correlations with accuracy.
``sparse_minus_dense_table`` is the sparse − same-capacity dense gap by optimizer
x regularisation; ``budget_check`` compares runs with the same runs trained longer.
"""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np

from experiments.studies.gradient_flow import records as records_lib
from experiments.studies.gradient_flow import stats

SGD_LIKE = ("sgd", "momentum", "adagrad")
ADAPTIVE = ("adam", "rmsprop")


def main_grid(records):
  """The runs of the main grid (dense fan-in init; the init factor is a slice)."""
  return [r for r in records if r.get("init_scheme", "dense_fan_in") == "dense_fan_in"]


def _index(records):
  """(optimizer, activation, regularisation, density, seed, kind) -> accuracy."""
  return {(*records_lib.setting_key(r), r["density"], r["seed"], r["kind"]): r["accuracy"]
          for r in records}


def finding_batch_norm(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """Batch norm matters more for sparse than for dense nets.

  Paired over (optimizer, activation, density < 1, seed): the accuracy gain of
  batch norm (batch_norm - none) for the sparse net minus that for its
  same-capacity dense net. Cells: (optimizer, activation, density).
  """
  acc = _index(main_grid(records))
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
  out = stats.paired_effect(pairs, ("optimizer", "activation", "density"), n_boot)
  out.update(claim="batch normalisation matters more for sparse than for dense networks",
             measure="(sparse BN gain) − (same-capacity dense BN gain)",
             sparse_gain=stats.mean_se(sparse_gain)[0],
             dense_gain=stats.mean_se(dense_gain)[0],
             diff=out["effect"], se=stats.mean_se([p[2] for p in pairs])[1])
  return out


def _gaps(acc):
  """optimizer -> (activation, regularisation, density, seed) -> sparse - dense."""
  gaps = collections.defaultdict(dict)
  for (o, a, reg, d, s, kind), v in acc.items():
    if kind == "sparse" and (o, a, reg, d, s, "dense") in acc:
      gaps[o][(a, reg, d, s)] = v - acc[(o, a, reg, d, s, "dense")]
  return gaps


def finding_adaptive(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """Adam/RMSProp hurt sparse nets more than SGD/momentum/Adagrad do.

  The sparse-minus-same-capacity-dense gap, per optimizer; the claim holds when
  the gap of an SGD-like optimizer exceeds that of an adaptive one (paired over
  activation, regularisation, density < 1, seed; every SGD-like x adaptive pair
  of optimizers). Also Kendall tau of EGF (p=2) vs accuracy among sparse runs per
  optimizer ("react badly to high gradient flow" predicts a negative tau for the
  adaptive optimizers).
  """
  main = main_grid(records)
  gaps = _gaps(_index(main))
  pairs = []
  for o_sgd, o_ad in itertools.product(SGD_LIKE, ADAPTIVE):
    for k in sorted(set(gaps.get(o_sgd, {})) & set(gaps.get(o_ad, {})), key=str):
      a, reg, d, _ = k
      pairs.append(((o_sgd, o_ad, a, reg, d),
                    {"pair": f"{o_sgd}-{o_ad}", "regularisation": reg, "density": d,
                     "activation": a}, gaps[o_sgd][k] - gaps[o_ad][k]))
  out = stats.paired_effect(pairs, ("pair", "regularisation", "density", "activation"), n_boot)
  taus = {}
  for o in sorted(gaps):
    rs = [r for r in main if records_lib.is_sparse_run(r) and r["optimizer"] == o
          and "egf_p2" in r.get("measures", {})]
    t = stats.tau_with_ci(rs, ("egf_p2",), n_boot=min(n_boot, 1000))
    taus[o] = (t["tau"]["egf_p2"], t["n"], t["ci"]["egf_p2"])
  by_reg = collections.defaultdict(list)
  for _, sl, d in pairs:
    by_reg[sl["regularisation"]].append(d)
  out.update(claim="optimizers with a running average of squared gradients (Adam, "
                   "RMSProp) do worse on sparse nets than SGD/momentum/Adagrad",
             measure="(sparse − dense gap, SGD-like) − (gap, adaptive)",
             gap_by_optimizer={o: stats.mean_se(list(g.values()))[0] for o, g in gaps.items()},
             egf_tau_by_optimizer=taus, diff=out["effect"],
             se=stats.mean_se([p[2] for p in pairs])[1],
             by_regularisation={r: stats.mean_se(v) for r, v in sorted(by_reg.items())})
  return out


def finding_adaptive_regularisation(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """Adaptive optimizers' sparse nets are hurt more by L2 / augmentation.

  Paired over (activation, density < 1, seed) and every SGD-like x adaptive pair:
  the sparse net's accuracy change from the regularisation (l2 or augment minus
  none) with the SGD-like optimizer minus that with the adaptive one.
  """
  acc = _index(main_grid(records))
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
  out = stats.paired_effect(pairs, ("regularisation", "pair", "density"), n_boot)
  out.update(claim="with Adam/RMSProp, L2 and data augmentation hurt sparse nets more "
                   "than with SGD/momentum/Adagrad",
             measure="(sparse change from the regularisation, SGD-like) − (adaptive)")
  return out


def finding_activation(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """Swish and PReLU with SGD(-momentum) are good activations for sparse nets.

  Paired over (SGD or momentum, regularisation, density < 1, seed): sparse
  accuracy with Swish (or PReLU) minus with ReLU. Cells: (optimizer,
  regularisation, density).
  """
  main = main_grid(records)
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
    effect = stats.paired_effect(pairs, ("optimizer", "regularisation", "density"), n_boot)
    diff, se, _ = stats.mean_se([p[2] for p in pairs])
    effect.update(diff=effect["effect"], se=se, by_regularisation={
        r: stats.mean_se([p[2] for p in pairs if p[1]["regularisation"] == r])
        for r in sorted({p[1]["regularisation"] for p in pairs})})
    out["by_activation"][act] = effect
  sparse_sgd = [r for r in main
                if records_lib.is_sparse_run(r) and r["optimizer"] in ("sgd", "momentum")]
  out["mean_accuracy"] = {a: stats.mean_sd([r["accuracy"] for r in sparse_sgd
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
      results[(key, "within" if within else "all")] = stats.tau_with_ci(
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
                  f"resampled, {n_boot} resamples, seed {stats.BOOTSTRAP_SEED}) for other = "
                  "gradient_norm and ghg, measures averaged over training, across all "
                  "runs and within settings: supported if all four CIs lie above 0, "
                  "mixed if some do, not supported if none does."}


def finding_init(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """The init factor: sparse accuracy with active-fan-in init minus dense fan-in."""
  acc = {(*records_lib.setting_key(r), r["density"], r["seed"],
          r.get("init_scheme", "dense_fan_in")): r["accuracy"]
         for r in records if records_lib.is_sparse_run(r)}
  pairs = [((o, a, reg, d), {"optimizer": o, "regularisation": reg, "density": d},
            v - acc[(o, a, reg, d, s, "dense_fan_in")])
           for (o, a, reg, d, s, init), v in acc.items()
           if init == "active_fan_in" and (o, a, reg, d, s, "dense_fan_in") in acc]
  out = stats.paired_effect(pairs, ("optimizer", "regularisation", "density"), n_boot)
  out.update(claim="scaling each sparse unit's init by its active fan-in improves sparse "
                   "accuracy (not a claim of the paper: the factor the first study found "
                   "dominant)", measure="sparse accuracy (active fan-in − dense fan-in)")
  return out


def sparse_minus_dense_table(records, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """``{(optimizer, regularisation): paired_effect}`` of sparse − dense, density < 1.

  Every optimizer x regularisation seen in the runs is a key; one without pairs
  has ``n == 0`` (missing).
  """
  main = main_grid(records)
  gaps = _gaps(_index(main))
  opts = sorted({r["optimizer"] for r in main})
  regs = sorted({r["regularisation"] for r in main})
  out = {}
  for o, reg in itertools.product(opts, regs):
    pairs = [((a, d), {"density": d}, g) for (a, r, d, s), g in gaps.get(o, {}).items()
             if r == reg]
    out[(o, reg)] = stats.paired_effect(pairs, ("density",), n_boot)
  return out


def _pair_by_name(records, longer):
  """``(pairs, unpaired, other_rate)``: each longer run with this sweep's run of its name.

  A longer run without a run of its name here is unpaired; one trained at another
  rate (or without a recorded rate) is left out too.
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
  return pairs, unpaired, other_rate


def _change(diffs, n_boot):
  """Mean change with its bootstrap CI over the pairs, and the largest change."""
  mean = float(np.mean(diffs)) if diffs else float("nan")
  return {"effect": mean, "ci": stats.bootstrap_mean_ci([diffs], n_boot), "n": len(diffs),
          "largest": float(max(diffs, key=abs)) if diffs else float("nan")}


def _gap_changes(pairs) -> list[float]:
  """Change of each (setting, seed)'s sparse − dense gap, where both sides are paired."""
  acc = {b["name"]: (a["accuracy"], b["accuracy"]) for a, b in pairs}
  gap = []
  for a, b in pairs:
    if b["kind"] == "sparse" and b.get("init_scheme", "dense_fan_in") == "dense_fan_in":
      dense = b["name"].replace("_sparse_", "_dense_")
      if dense in acc:
        gap.append((b["accuracy"] - acc[dense][1]) - (a["accuracy"] - acc[dense][0]))
  return gap


def _findings_at_both_budgets(pairs) -> dict:
  """Would the verdicts move with more training? The findings on the paired runs at
  both budgets (effects only: the check has too few seeds for CIs)."""
  findings = {}
  if all("optimizer" in b for _, b in pairs):
    for key, fn in (("batch_norm", finding_batch_norm), ("adaptive", finding_adaptive),
                    ("adaptive_regularisation", finding_adaptive_regularisation)):
      short_f, long_f = (fn([p[i] for p in pairs], n_boot=100) for i in (0, 1))
      if short_f["n"]:
        findings[key] = {"effect": short_f["effect"], "longer_effect": long_f["effect"],
                         "n": short_f["n"], "claim": short_f["claim"]}
  return findings


def budget_check(records, longer, n_boot: int = stats.N_BOOTSTRAP) -> dict:
  """Is the recipe's budget enough? The same runs trained longer, paired by name.

  ``longer`` are runs of a second sweep (``study.rates_from`` = this sweep's
  ``tuning.json``, more epochs): each is paired with the run of the same name here
  (same setting, seed and rate). Returns the test-accuracy change (longer − this
  budget) overall and by sparse/dense, with bootstrap CIs over the pairs, and the
  change of the sparse − dense gap of each (setting, seed) with both sides.
  """
  pairs, unpaired, other_rate = _pair_by_name(records, longer)
  short_epochs, long_epochs = (
      sorted({p[i].get("num_epochs") for p in pairs if p[i].get("num_epochs")})
      for i in (0, 1))
  if set(short_epochs) & set(long_epochs):
    raise ValueError(
        f"The budget check's runs train for {long_epochs} epochs, as do these "
        f"({short_epochs}): it needs a longer sweep (e.g. "
        "--config.num_epochs=60 --config.study.rates_from=<this tuning.json> into a new "
        "--workdir), given as --budget_workdir.")
  diffs = {k: [b["accuracy"] - a["accuracy"] for a, b in pairs
               if k == "all" or b["kind"] == k] for k in ("all", "sparse", "dense")}
  drops = [b["loss_drop_last_fifth"] for _, b in pairs
           if b.get("loss_drop_last_fifth") is not None]
  by_optimizer = collections.defaultdict(list)
  for a, b in pairs:
    if b["kind"] == "sparse" and b.get("optimizer"):
      by_optimizer[b["optimizer"]].append(b["accuracy"] - a["accuracy"])
  return {"n": len(pairs), "unpaired": unpaired, "other_rate": other_rate,
          "epochs": short_epochs, "longer_epochs": long_epochs,
          "pairs": [{"name": b["name"], "kind": b["kind"], "optimizer": b.get("optimizer"),
                     "accuracy": a["accuracy"], "longer_accuracy": b["accuracy"]}
                    for a, b in pairs],
          "accuracy_change": {k: _change(v, n_boot) for k, v in diffs.items()},
          "gap_change": _change(_gap_changes(pairs), n_boot),
          "sparse_change_by_optimizer": {o: float(np.mean(v))
                                         for o, v in sorted(by_optimizer.items())},
          "findings": _findings_at_both_budgets(pairs),
          "loss_drop_median": float(np.median(drops)) if drops else None}
