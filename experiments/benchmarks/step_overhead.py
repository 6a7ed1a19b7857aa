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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import compilation_cache

MODELS = {
    "lenet300_100": (784, 300, 100, 10),
    "mlp_30m": (784, 4096, 4096, 2560, 10),
}


def init_mlp(key, sizes):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(sub, (a, b), jnp.float32) / np.sqrt(a),
        "bias": jnp.zeros((b,), jnp.float32)}
  return params


def loss_fn(params, x, y):
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_methods(total_steps=1000, every=100, **options):
  """Dense SGD and each sparse method; ``options`` go to every sparse factory
  (e.g. ``packed_masks=True``)."""
  inner = lambda: optax.sgd(0.01, momentum=0.9, nesterov=True)
  return {
      "dense": inner(),
      "granet": sparse_jax.granet(inner(), sparsity=0.9, total_steps=total_steps,
                                  end_step=total_steps // 2, update_every=every, **options),
      "granet_st": sparse_jax.granet(inner(), sparsity=0.9, initial_sparsity=0.5,
                                     total_steps=total_steps, end_step=total_steps // 2,
                                     update_every=every, **options),
      "gmp": sparse_jax.gmp(inner(), sparsity=0.9, end_step=total_steps // 2,
                            update_every=every, **options),
      "rigl": sparse_jax.rigl(inner(), sparsity=0.9, total_steps=total_steps,
                              update_every=every, **options),
      "set": sparse_jax.set(inner(), sparsity=0.9, total_steps=total_steps,
                            update_every=every, **options),
      "static": sparse_jax.static(inner(), sparsity=0.9, **options),
  }


def make_step(tx, donate=False, mask_update=None):
  """The jitted train step; ``mask_update`` is the wrapper's static extra argument."""
  extra = {} if mask_update is None else {"mask_update": mask_update}

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state
  # Donated, as a training loop runs it: without donation every call allocates
  # (and page-faults) fresh output buffers, which swamps the comparison at 30M.
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def with_count(opt_state, count):
  """The same optimizer state with the wrapper's update count set to ``count``."""
  return jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(count, jnp.int32))
      if isinstance(s, sparse_jax.SparseState) else s,
      opt_state, is_leaf=lambda s: isinstance(s, sparse_jax.SparseState))


def time_call(fn, *args, reps=1):
  """Seconds per call over ``reps`` back-to-back (asynchronously dispatched) calls."""
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def bench_model(name, sizes, rounds, batch, every=100):
  # Small models: time 10 back-to-back calls, as a training loop dispatches them,
  # so per-call Python dispatch latency is not mistaken for device time.
  reps = 10 if sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) < 5_000_000 else 1
  params = init_mlp(jax.random.PRNGKey(0), sizes)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
  # Each variant owns its params and state and feeds its outputs back into the
  # next call (donated buffers). Ordinary steps come from the same method with
  # mask updates so rare (every 10**6 steps) that none falls in the run: the same
  # compiled program, never taking the event branch. Mask-update steps reset the
  # wrapper's count to every - 1 before each call, so each call is the event at
  # t = every (for GraNet/GMP inside the pruning window: prune + drop + grow).
  variants = {}
  rare = make_methods(total_steps=10**7, every=10**6)
  for method, tx in make_methods(every=every).items():
    kinds = {"dense": (tx, None, None)} if method == "dense" else {
        f"{method}/ordinary": (rare[method], None, None)}
    if method not in ("dense", "static"):
      # The same ordinary step compiled without the event branch, as a loop that
      # knows its event steps runs it (tx.update(..., mask_update=False)).
      kinds[f"{method}/ordinary_host"] = (rare[method], None, False)
      kinds[f"{method}/update"] = (tx, every - 1, None)
    for variant, (variant_tx, count, mask_update) in kinds.items():
      p = jax.tree.map(jnp.copy, params)
      variants[variant] = [make_step(variant_tx, donate=True, mask_update=mask_update),
                           count, p, variant_tx.init(p)]

  def call(v):
    step, count, p, s = v
    for _ in range(reps):
      if count is not None:
        s = with_count(s, count)
      p, s = step(p, s, x, y)
    v[2], v[3] = p, s
    return p

  # Two interleaved groups, each with its own dense reference: the mask-update
  # steps' large temporaries otherwise disturb the ordinary steps' timings.
  rows = []
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  for group in ("ordinary", "update"):
    members = {k: v for k, v in variants.items()
               if k == "dense" or k.split("/")[-1].startswith(group)}
    for v in members.values():  # compile and warm up
      jax.block_until_ready(call(v))
    times = {k: [] for k in members}
    for _ in range(rounds):
      for k, v in members.items():
        start = time.perf_counter()
        jax.block_until_ready(call(v))
        times[k].append((time.perf_counter() - start) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows += [{"model": name, "params": n_params, "variant": k, "group": group,
              "median_ms": 1e3 * v, "ratio_to_dense": v / med["dense"]}
             for k, v in med.items() if group == "ordinary" or k != "dense"]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args()
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, MODELS[name], args.rounds, args.batch)
  print(f"{'model':14s} {'variant':20s} {'median ms':>10s} {'x dense':>8s}")
  for r in rows:
    print(f"{r['model']:14s} {r['variant']:20s} {r['median_ms']:10.2f} {r['ratio_to_dense']:8.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "batch": args.batch, "backend": jax.default_backend(),
                 "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
