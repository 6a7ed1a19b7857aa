r"""The README's training steps, timed as the README writes them, against dense.

Flax linen: a ``TrainState`` whose ``apply_gradients`` runs the optimizer, jitted
with ``@jax.jit`` (the in-graph mask-update decision) or with
``@sparse_jax.scheduled_jit(tx)`` (two programs chosen on the host). Flax NNX:
``nnx.Optimizer.update`` in an ``@nnx.jit`` step, or ``scheduled_jit(tx,
jit=nnx.jit)``. Each against the same step with the plain (dense) optimizer, on
LeNet-300-100 and an MLP of about 30M parameters, batch 128, ordinary steps
(no mask update falls in the timed steps). ``*_donated``: the same ``jax.jit`` /
``nnx.jit`` step with its state donated (``donate_argnums``), against a donated dense
step. Rounds interleave every variant; medians are reported.

  python -m experiments.benchmarks.readme_path --rounds=15 --out=readme_path.json

Targets (issue 16): the README paths within 1.05x of dense on LeNet-300-100 and
1.10x at 30M.
"""

import argparse
import json
import statistics

import jax
import optax
from flax import nnx
from flax.training import train_state

import sparse_jax
from experiments.trainer import compilation_cache
from experiments.trainer import inference
from experiments.benchmarks import _harness

NEVER = 10**6  # update_every: no mask update in the timed steps


def sparse_tx():
  return sparse_jax.granet(_harness.inner_optimizer(), sparsity=0.9, total_steps=10**7,
                           end_step=5 * 10**6, update_every=NEVER)


class MLP(nnx.Module):
  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


def linen_apply(variables, x):
  return inference.mlp_forward(variables["params"], x)


def linen_step(state, x, y):
  def loss_fn(p):
    logits = state.apply_fn({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def nnx_step(model, optimizer, x, y):
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  optimizer.update(model, nnx.grad(loss_fn)(model))


def linen_variant(sizes, kind):
  model = MLP(sizes, nnx.Rngs(0))
  params = {f"Dense_{i}": {"kernel": l.kernel.value, "bias": l.bias.value}
            for i, l in enumerate(model.layers)}
  tx = _harness.inner_optimizer() if kind.startswith("dense") else sparse_tx()
  state = train_state.TrainState.create(apply_fn=linen_apply, params=params, tx=tx)
  donate = {"donate_argnums": 0} if kind.endswith("_donated") else {}
  step = (sparse_jax.scheduled_jit(tx)(linen_step) if kind == "scheduled_jit"
          else jax.jit(linen_step, **donate))
  box = [state]

  def call(x, y):
    box[0] = step(box[0], x, y)
    return box[0].params
  return call


def nnx_variant(sizes, kind):
  model = MLP(sizes, nnx.Rngs(0))
  tx = _harness.inner_optimizer() if kind.startswith("dense") else sparse_tx()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  donate = {"donate_argnums": (0, 1)} if kind.endswith("_donated") else {}
  step = (sparse_jax.scheduled_jit(tx, jit=nnx.jit)(nnx_step) if kind == "scheduled_jit"
          else nnx.jit(nnx_step, **donate))

  def call(x, y):
    step(model, optimizer, x, y)
    return model.layers[0].kernel.value
  return call


def bench_model(name, sizes, rounds, batch):
  reps = 10 if name == "lenet300_100" else 1  # back-to-back calls, as a loop runs them
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
  variants = {f"{api}/{kind}": make(sizes, kind)
              for api, make in (("linen", linen_variant), ("nnx", nnx_variant))
              for kind in ("dense", "jit", "scheduled_jit", "dense_donated", "jit_donated")}
  table = {k: (call, (x, y)) for k, call in variants.items()}
  for call in variants.values():
    jax.block_until_ready(call(x, y))  # compile, warm up
  times = _harness.interleaved_samples(table, rounds, reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  return [{"model": name, "variant": k, "median_ms": 1e3 * v,
           "ratio_to_dense": v / med[_reference(k)]} for k, v in med.items()]


def _reference(variant):
  """The dense variant a variant is compared with (donated with donated)."""
  api, kind = variant.split("/")
  return f"{api}/dense_donated" if kind.endswith("_donated") else f"{api}/dense"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--models", default=",".join(_harness.MODELS))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  compilation_cache.enable()
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, _harness.MODELS[name], args.rounds, args.batch)
  print(f"{'model':14s} {'variant':22s} {'median ms':>10s} {'x dense':>8s}")
  for r in rows:
    print(f"{r['model']:14s} {r['variant']:22s} {r['median_ms']:10.2f} "
          f"{r['ratio_to_dense']:8.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "batch": args.batch, "jax": jax.__version__,
                 "backend": jax.default_backend(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
