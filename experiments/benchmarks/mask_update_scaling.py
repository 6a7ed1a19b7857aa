r"""How the cost of a GraNet mask update grows with the number of prunable weights.

For MLPs with 1M, 3M, 10M, 30M and 100M prunable weights (four layers each) this
times, as medians over interleaved rounds:

* ``event``: the wrapper's update on a mask-update step (prune + drop + grow);
* ``ordinary``: the wrapper's update on an ordinary step;
* ``dense_step``: a full dense train step (forward, backward, SGD), where it fits.

The mask update's own cost is ``event - ordinary``. Writes JSON and a log-log plot.

  python -m experiments.benchmarks.mask_update_scaling --out=mask_update_scaling.json

Targets: linear growth (100M costs at most ~120x what 1M costs) and a GraNet
update within 3x a dense step at 30M.
"""

import argparse
import json
import statistics

import jax
import numpy as np
import optax

import sparse_jax
from experiments.trainer import compilation_cache
from experiments.benchmarks import _harness

SIZES = {"1M": 1_000_000, "3M": 3_000_000, "10M": 10_000_000, "30M": 30_000_000,
         "100M": 100_000_000}


def mlp_sizes(n: int) -> tuple[int, ...]:
  """784 -> w -> w -> w -> 10 with w chosen so the kernels hold about n weights."""
  # 784 w + 2 w^2 + 10 w = n
  w = int((-(794) + np.sqrt(794**2 + 8 * n)) / 4)
  return (784, w, w, w, 10)


def bench(name, n, rounds, batch, dense_limit):
  """The row of one size: median event, ordinary and dense-step seconds."""
  sizes = mlp_sizes(n)
  params = _harness.init_mlp(jax.random.PRNGKey(0), sizes)
  n_prunable = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
  tx = sparse_jax.granet(optax.sgd(0.01, momentum=0.9), sparsity=0.9, total_steps=1000,
                         end_step=500, update_every=100)
  state = tx.init(params)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
  grads = jax.grad(_harness.loss_fn)(params, x, y)
  update = jax.jit(tx.update)
  event_state = _harness.with_count(state, 99)
  ordinary_state = _harness.with_count(state, 0)
  fns = {"event": (update, (grads, event_state, params)),
         "ordinary": (update, (grads, ordinary_state, params))}
  if n <= dense_limit:
    dense = optax.sgd(0.01, momentum=0.9)
    fns["dense_step"] = (_harness.make_step(dense), (params, dense.init(params), x, y))
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  times = _harness.interleaved_samples(fns, rounds)
  med = {k: statistics.median(v) for k, v in times.items()}
  row = {"size": name, "prunable": n_prunable, "layers": list(sizes),
         **{f"{k}_s": v for k, v in med.items()},
         "mask_update_s": med["event"] - med["ordinary"]}
  if "dense_step_s" in row:
    row["event_over_dense_step"] = med["event"] / med["dense_step"]
  del params, state, grads
  return row


def plot(rows, path):
  """Log-log seconds against prunable weights: the mask update, a dense step, linear."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  n = np.array([r["prunable"] for r in rows], float)
  for key, label in (("mask_update_s", "GraNet mask update"), ("dense_step_s", "dense train step")):
    pts = [(r["prunable"], r[key]) for r in rows if key in r]
    ax.loglog(*zip(*pts), marker="o", label=label)
  ref = rows[0]["mask_update_s"] * n / n[0]
  ax.loglog(n, ref, ls=":", color="gray", label="linear from 1M")
  ax.set_xlabel("prunable weights")
  ax.set_ylabel("seconds (median)")
  widths = [r["layers"][1] for r in rows]
  ax.set_title(f"GraNet at 90% sparsity: 4-layer MLPs 784-w-w-w-10 (w = {widths[0]:,} to "
               f"{widths[-1]:,})\non a random Gaussian batch (synthetic data)", fontsize=10)
  # Right of the axes, where it hides no data.
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(SIZES))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dense_limit", type=int, default=100_000_000)
  parser.add_argument("--out", default=None, help="JSON file; a PNG is written beside it")
  args = parser.parse_args()
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  rows = []
  for name in args.sizes.split(","):
    rows.append(bench(name, SIZES[name], args.rounds, args.batch, args.dense_limit))
    r = rows[-1]
    print(f"{name:>5s} {r['prunable']:>11,d} event {r['event_s']:.3f}s ordinary "
          f"{r['ordinary_s']:.3f}s mask update {r['mask_update_s']:.3f}s"
          + (f" dense step {r['dense_step_s']:.3f}s event/dense {r['event_over_dense_step']:.2f}x"
             if "dense_step_s" in r else ""), flush=True)
  first, last = rows[0], rows[-1]
  ratio = last["mask_update_s"] / first["mask_update_s"]
  print(f"mask update {last['size']} / {first['size']}: {ratio:.1f}x for "
        f"{last['prunable'] / first['prunable']:.0f}x the weights")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "jax": jax.__version__, "rows": rows}, f, indent=1)
    plot(rows, args.out.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
  main()
