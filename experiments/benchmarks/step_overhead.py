r"""Step time of each sparse method relative to a plain dense optax step.

For LeNet-300-100 (784-300-100-10) and an MLP of about 30M parameters, batch 128,
this times the jitted train step (forward, backward, optimizer update,
``optax.apply_updates``) of plain dense SGD-momentum and of every sparse_jax
method, both on an ordinary step and on a mask-update step (the state's count is
set so that the timed update is an event). "ordinary_host" is the ordinary step
compiled without the event branch (``tx.update(..., mask_update=False)``), as a
loop that decides the event steps on the host runs it. Rounds are interleaved over all
variants so that machine noise hits them alike; medians are reported.

  python -m experiments.benchmarks.step_overhead --rounds=15 --out=step_overhead.json

Targets: an ordinary step within 1.05x of dense for every method on both models; a
GraNet mask-update step within 3x of a dense step at 30M parameters.
"""

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.trainer import compilation_cache
from experiments.benchmarks import _harness


def bench_model(name, sizes, rounds, batch, every=100):
  """The ratio-to-dense rows of one model: ordinary, ordinary_host and update steps."""
  # Small models: time 10 back-to-back calls, as a training loop dispatches them,
  # so per-call Python dispatch latency is not mistaken for device time.
  reps = 10 if sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) < 5_000_000 else 1
  params = _harness.init_mlp(jax.random.PRNGKey(0), sizes)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
  # Each variant owns its params and state and feeds its outputs back into the
  # next call (donated buffers). Ordinary steps come from the same method with
  # mask updates so rare (every 10**6 steps) that none falls in the run: the same
  # compiled program, never taking the event branch. Mask-update steps reset the
  # wrapper's count to every - 1 before each call, so each call is the event at
  # t = every (for GraNet/GMP inside the pruning window: prune + drop + grow).
  variants = {}
  rare = _harness.make_methods(total_steps=10**7, every=10**6)
  for method, tx in _harness.make_methods(every=every).items():
    kinds = {"dense": (tx, None, None)} if method == "dense" else {
        f"{method}/ordinary": (rare[method], None, None)}
    if method not in ("dense", "static"):
      # The same ordinary step compiled without the event branch, as a loop that
      # knows its event steps runs it (tx.update(..., mask_update=False)).
      kinds[f"{method}/ordinary_host"] = (rare[method], None, False)
      kinds[f"{method}/update"] = (tx, every - 1, None)
    for variant, (variant_tx, count, mask_update) in kinds.items():
      p = jax.tree.map(jnp.copy, params)
      variants[variant] = [
          _harness.make_step(variant_tx, donate=True, mask_update=mask_update),
          count, p, variant_tx.init(p)]

  def step_once(v):
    step, count, p, s = v
    if count is not None:
      s = _harness.with_count(s, count)
    v[2], v[3] = step(p, s, x, y)
    return v[2]

  # Two interleaved groups, each with its own dense reference: the mask-update
  # steps' large temporaries otherwise disturb the ordinary steps' timings.
  rows = []
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  for group in ("ordinary", "update"):
    members = {k: (step_once, (v,)) for k, v in variants.items()
               if k == "dense" or k.split("/")[-1].startswith(group)}
    for fn, args in members.values():  # compile and warm up
      _harness.time_call(fn, *args, reps=reps)
    times = _harness.interleaved_samples(members, rounds, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows += [{"model": name, "params": n_params, "variant": k, "group": group,
              "median_ms": 1e3 * v, "ratio_to_dense": v / med["dense"]}
             for k, v in med.items() if group == "ordinary" or k != "dense"]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--models", default=",".join(_harness.MODELS))
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args()
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, _harness.MODELS[name], args.rounds, args.batch)
  print(f"{'model':14s} {'variant':20s} {'median ms':>10s} {'x dense':>8s}")
  for r in rows:
    print(f"{r['model']:14s} {r['variant']:20s} {r['median_ms']:10.2f} {r['ratio_to_dense']:8.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "batch": args.batch, "backend": jax.default_backend(),
                 "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
