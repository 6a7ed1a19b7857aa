r"""Inference latency of channel-condensed models vs the masked ones; N:M storage size.

For LeNet-300-100 (784-300-100-10) and a wider MLP (784-2048-2048-10) with random
weights, masks of ``structure=Channels()`` (uniform: every hidden layer loses the
same fraction of its units; the classifier stays dense) at 50, 75 and 90% of the
hidden units: the jitted forward of the masked model (original shapes, zeros) vs
that of ``sparse_jax.condense_channels``'s smaller dense model, batch 1 and 128,
warm. Rounds are interleaved over all variants and the median per-call time of
each is reported, with the ratio masked / condensed (> 1: the condensed model is
faster). The logits of the two are checked to agree first.

Also printed: the bytes of the hidden kernels in N:M storage (``nm_compress``,
float32 values + uint8 indices) at 2:4 and 1:4 against the dense kernels, and the
latency of the reference N:M forward (``nm_dense``, a gather) against the dense
masked matmul of the first layer at batch 8, which it does not beat on CPU.

VGG-16 at CIFAR shapes (32x32x3, batch norm after every conv, eval mode) is opt-in
(``--models=vgg16``): its masked forward takes a quarter of a second at batch 1 on
a 2-core CPU, so it is timed at batches 1 and 16 with ``--conv_reps`` calls per
sample, and condensed by ``experiments.trainer.condense.condense_model`` (the same family
at the condensed ``cfg`` widths, batch-norm entries removed).

The load average before and after is printed: other jobs on the machine move the
absolute times; the ratios, taken within one round, move less.

  python -m experiments.benchmarks.condensed_inference --rounds=15 --out=condensed_inference.json
  python -m experiments.benchmarks.condensed_inference --models=vgg16 --rounds=5 \
      --out=condensed_inference_vgg16.json
"""

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import compilation_cache
from experiments.trainer import condense
from experiments.trainer import inference
from experiments import models
from experiments.benchmarks import _harness

MODELS = {
    "lenet300_100": (784, 300, 100, 10),
    "mlp_2048": (784, 2048, 2048, 10),
}
# Conv models by registry name: their input shape (opt-in, slow on CPU).
CONV_MODELS = {"vgg16": (32, 32, 3)}
UNIT_SPARSITIES = (0.5, 0.75, 0.9)
BATCHES = (1, 128)
CONV_BATCHES = (1, 16)
# The reference N:M forward gathers one input per kept weight and batch row
# (128 x 784/4 x 2 x 2048 floats, 400 MB, for the wide MLP's first layer at batch
# 128): it is timed at a small batch.
NM_BATCH = 8


def variants(sizes, key):
  """{name: (fn, args)} of every timed variant, and the N:M memory table."""
  params = _harness.init_mlp(key, sizes, bias_scale=0.1)
  layers = [f"Dense_{i}" for i in range(len(sizes) - 1)]
  fwd = jax.jit(inference.mlp_forward)
  out, memory = {}, {}
  for s in UNIT_SPARSITIES:
    tx = sparse_jax.static(optax.sgd(0.1), sparsity=s, structure=sparse_jax.Channels(),
                           distribution="uniform", keep_last_dense=True)
    state = tx.init(params)
    masked = sparse_jax.sparsify_params(params, state)
    small = sparse_jax.condense_channels(masked, sparse_jax.get_masks(state), layers)
    for batch in BATCHES:
      x = jax.random.normal(jax.random.PRNGKey(batch), (batch, sizes[0]))
      np.testing.assert_allclose(np.asarray(fwd(small.params, x)),
                                 np.asarray(fwd(masked, x)), rtol=1e-4, atol=1e-4)
      out[(s, batch, "masked")] = (fwd, (masked, x))
      out[(s, batch, "condensed")] = (fwd, (small.params, x))
      out[(s, batch, "widths")] = small.features
  hidden = layers[:-1]
  for n, m in ((2, 4), (1, 4)):
    state = sparse_jax.static(optax.sgd(0.1), structure=sparse_jax.NM(n, m),
                              keep_last_dense=True).init(params)
    masked = sparse_jax.sparsify_params(params, state)
    masks = sparse_jax.get_masks(state)
    packed = {l: sparse_jax.nm_compress(masked[l]["kernel"], masks[l]["kernel"],
                                        sparse_jax.NM(n, m), name=l) for l in hidden}
    memory[f"{n}:{m}"] = dict(
        dense_bytes=sum(int(masked[l]["kernel"].nbytes) for l in hidden),
        nm_bytes=sum(k.nbytes for k in packed.values()))
    l0 = hidden[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (NM_BATCH, sizes[0]))
    np.testing.assert_allclose(np.asarray(sparse_jax.nm_dense(x, packed[l0])),
                               np.asarray(x @ masked[l0]["kernel"]), rtol=1e-4, atol=1e-4)
    out[(f"{n}:{m}", NM_BATCH, "dense_matmul")] = (jax.jit(jnp.matmul),
                                                   (x, masked[l0]["kernel"]))
    out[(f"{n}:{m}", NM_BATCH, "nm_dense")] = (jax.jit(sparse_jax.nm_dense), (x, packed[l0]))
  return out, memory


def conv_variants(name, key):
  """``variants`` of a registered conv model (10 classes), eval mode, no N:M table."""
  model = models.get_model(name, 10)
  variables = model.init(key, jnp.zeros((1, *CONV_MODELS[name])), train=False)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = {}
  for s in UNIT_SPARSITIES:
    tx = sparse_jax.static(optax.sgd(0.1), sparsity=s, structure=sparse_jax.Channels(),
                           distribution="uniform", keep_last_dense=True)
    state = tx.init(variables["params"])
    masked = {**variables, "params": sparse_jax.sparsify_params(variables["params"], state)}
    small = condense.condense_model(name, 10, masked["params"], sparse_jax.get_masks(state),
                                    batch_stats=variables["batch_stats"])
    small_fwd = jax.jit(lambda v, x, m=small.model: m.apply(v, x, train=False))
    for batch in CONV_BATCHES:
      x = jax.random.normal(jax.random.PRNGKey(batch), (batch, *CONV_MODELS[name]))
      np.testing.assert_allclose(np.asarray(small_fwd(small.variables, x)),
                                 np.asarray(fwd(masked, x)), rtol=1e-3, atol=1e-3)
      out[(s, batch, "masked")] = (fwd, (masked, x))
      out[(s, batch, "condensed")] = (small_fwd, (small.variables, x))
      out[(s, batch, "widths")] = small.features
  return out, {}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--reps", type=int, default=20, help="calls per timing sample")
  parser.add_argument("--conv_reps", type=int, default=2,
                      help="calls per timing sample of a conv model")
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"of {', '.join([*MODELS, *CONV_MODELS])}")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  compilation_cache.enable()
  load_before = os.getloadavg()
  results = {"load_before": load_before, "cores": os.cpu_count(), "models": {}}
  for model in args.models.split(","):
    if model in CONV_MODELS:
      sizes, batches, reps = CONV_MODELS[model], CONV_BATCHES, args.conv_reps
      table, memory = conv_variants(model, jax.random.PRNGKey(0))
    else:
      sizes, batches, reps = MODELS[model], BATCHES, args.reps
      table, memory = variants(sizes, jax.random.PRNGKey(0))
    timed = {k: v for k, v in table.items() if k[2] != "widths"}
    samples = _harness.interleaved_samples(timed, args.rounds, reps, warmup=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    print(f"\n{model} {sizes}: median ms per call over {args.rounds} interleaved rounds")
    print("| units removed | widths | batch | masked | condensed | masked / condensed |")
    print("|---|---|---|---|---|---|")
    for s in UNIT_SPARSITIES:
      for b in batches:
        a, c = med[(s, b, "masked")], med[(s, b, "condensed")]
        ratios = [x / y for x, y in zip(samples[(s, b, "masked")],
                                        samples[(s, b, "condensed")])]
        row = dict(unit_sparsity=s, batch=b, widths=table[(s, b, "widths")],
                   masked_ms=1e3 * a, condensed_ms=1e3 * c, ratio=a / c,
                   ratio_of_rounds_median=statistics.median(ratios))
        rows.append(row)
        print(f"| {s:.0%} | {'-'.join(map(str, row['widths']))} | {b} | {1e3 * a:.4f} | "
              f"{1e3 * c:.4f} | {a / c:.2f} |")
    if memory:
      print("\nN:M storage of the hidden kernels (float32 values + uint8 indices):")
    for nm, mem in memory.items():
      d, q = med[(nm, NM_BATCH, "dense_matmul")], med[(nm, NM_BATCH, "nm_dense")]
      mem.update(dense_matmul_ms=1e3 * d, nm_dense_ms=1e3 * q)
      print(f"  {nm}: {mem['nm_bytes'] / 1e6:.3f} MB vs dense {mem['dense_bytes'] / 1e6:.3f}"
            f" MB ({mem['nm_bytes'] / mem['dense_bytes']:.3f}x); first layer, batch {NM_BATCH}: "
            f"reference nm_dense {1e3 * q:.3f} ms vs dense masked matmul {1e3 * d:.3f} ms")
    results["models"][model] = dict(sizes=sizes, rows=rows, nm_storage=memory)
  results["load_after"] = os.getloadavg()
  quiet = max(results["load_before"][0], results["load_after"][0]) < 0.5 * os.cpu_count()
  results["quiet"] = quiet
  print(f"\nload average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in results['load_after'])} on {os.cpu_count()} "
        f"cores: {'quiet' if quiet else 'NOT quiet (other jobs running)'}; "
        f"{jax.devices()[0].platform}, jax {jax.__version__}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
