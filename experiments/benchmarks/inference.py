r"""Inference latency and memory of the export formats (issue 14, item 4).

For LeNet-300-100 (784-300-100-10) and VGG-16 (CIFAR shapes: 32x32x3 inputs, the
repository's config without the fifth pool, global average pool, Dense 512->10; no
batch norm, which folds into the convs at inference) with random weights, at
50/75/90/95/98/99% sparsity:

* ``dense``: the model without masks (one row, the reference);
* ``masked``: the dense forward on masked params (zeros kept; what training
  gives), unstructured uniform masks (every layer at the sparsity);
* ``condensed``: ``structure=Channels()`` masks removing that fraction of the
  hidden units of every layer (uniform; the classifier dense), then
  ``sparse_jax.condense_channels``: a smaller dense model. Its *weight* sparsity
  is higher than the unit sparsity (a hidden layer loses rows and columns) and
  is printed;
* ``bcoo``: the unstructured masked kernels as ``jax.experimental.sparse.BCOO``
  (``sparse_jax.bcoo_kernels``) and the Dense forward ``bcoo_dense``. LeNet only:
  JAX's BCOO convolution is 1-D only (``bcoo_conv_general_dilated``), so VGG-16
  has no BCOO row;
* ``nm``: N:M storage (``nm_compress``) and the reference forward ``nm_dense``
  (a gather) at 2:4 (50%) and 1:4 (75%), LeNet only (``nm_dense`` is 2-D only;
  VGG-16 gets the N:M bytes of its convs, the first one kept dense: 3 inputs).
  No other sparsity has an m that divides LeNet's fan-ins 784, 300 and 100.

Latency: jitted, warm, the median over interleaved rounds (every variant once per
round) of the mean time of a few back-to-back calls, batch 1 and 128. Memory: the
bytes of the stored format (values, indices, biases; a masked model stores its
zeros, like dense). Every format's logits are checked against the masked dense
forward first (VGG-16 at batch 1 only: seconds per call at 128, where its masked
model is timed at 90% only, the same program at every sparsity). The load average
before and after is printed.

  python -m experiments.benchmarks.inference --out=experiments/benchmarks/inference.json
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import compilation_cache
from experiments.trainer import inference as inference_lib
from experiments.benchmarks import _harness

SPARSITIES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 128)
LENET = (784, 300, 100, 10)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512)
NM_FORMS = {0.5: (2, 4), 0.75: (1, 4)}
SGD = optax.sgd(0.1)


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def init_vgg(key, cfg=VGG16, in_channels=3, classes=10):
  params, c, i = {}, in_channels, 0
  for v in cfg:
    if v == "M":
      continue
    key, k = jax.random.split(key)
    params[f"Conv_{i}"] = {
        "kernel": jax.random.normal(k, (3, 3, c, v), jnp.float32) * np.sqrt(2 / (9 * v)),
        "bias": jnp.zeros((v,), jnp.float32)}  # zero: a dead unit outputs relu(0) = 0
    c, i = v, i + 1
  key, k = jax.random.split(key)
  params["Dense_0"] = {"kernel": jax.random.normal(k, (c, classes)) / np.sqrt(c),
                         "bias": jnp.zeros((classes,))}
  return params


def vgg_forward(params, x, cfg=VGG16):
  i = 0
  for v in cfg:
    if v == "M":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      continue
    layer = params[f"Conv_{i}"]
    x = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + layer["bias"])
    i += 1
  x = x.mean(axis=(1, 2))
  return x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]


def masked(params, sparsity, structure=None):
  kw = dict(structure=structure, keep_last_dense=True) if structure else {}
  tx = sparse_jax.static(SGD, sparsity=sparsity, distribution="uniform", **kw)
  state = tx.init(params)
  return sparse_jax.sparsify_params(params, state), sparse_jax.get_masks(state)


def variants(model, key):
  """{(format, sparsity, batch): (fn, args)}, the bytes and weight sparsity of each."""
  if model == "lenet300_100":
    params = _harness.init_mlp(key, LENET, bias_scale=0.1)
    fwd, in_shape = inference_lib.mlp_forward, (LENET[0],)
  else:
    params, fwd, in_shape = init_vgg(key), vgg_forward, (32, 32, 3)
  layers = sorted(params, key=lambda n: (n.startswith("Dense"), int(n.split("_")[1])))
  jfwd = jax.jit(fwd)
  xs = {b: jax.random.normal(jax.random.PRNGKey(b), (b, *in_shape)) for b in BATCHES}
  out, info = {}, {}
  kernels = sum(int(params[l]["kernel"].size) for l in layers)

  # VGG-16 at batch 128 takes seconds per call here: its logits are checked at batch
  # 1 only, and the masked model (the dense program on the same shapes, whatever the
  # sparsity) is timed at batch 128 at 90% only.
  vgg = model == "vgg16"
  check_batches = (1,) if vgg else BATCHES

  def add(fmt, s, fn, p, want, nbytes, weight_sparsity, **extra):
    for b in check_batches:
      np.testing.assert_allclose(np.asarray(fn(p, xs[b])), np.asarray(want[b]),
                                 rtol=2e-3, atol=2e-3)
    for b in BATCHES:
      if not (vgg and fmt == "masked" and s != 0.9 and b > 1):
        out[(fmt, s, b)] = (fn, (p, xs[b]))
    info[(fmt, s)] = dict(bytes=nbytes, weight_sparsity=weight_sparsity, **extra)

  dense_out = {b: jfwd(params, xs[b]) for b in check_batches}
  add("dense", 0.0, jfwd, params, dense_out, tree_bytes(params), 0.0)
  for s in SPARSITIES:
    mparams, masks = masked(params, s)
    want = {b: jfwd(mparams, xs[b]) for b in check_batches}
    ws = 1 - sum(int(np.asarray(mparams[l]["kernel"] != 0).sum()) for l in layers) / kernels
    add("masked", s, jfwd, mparams, want, tree_bytes(mparams), ws)
    if model == "lenet300_100":
      sp = sparse_jax.bcoo_kernels(mparams, masks)
      nbytes = sum(sparse_jax.bcoo_nbytes(sp[l]["kernel"]) + sp[l]["bias"].nbytes
                   for l in layers)
      add("bcoo", s, jax.jit(inference_lib.bcoo_mlp), sp, want, int(nbytes), ws)
    cparams, cmasks = masked(params, s, sparse_jax.Channels())
    small = sparse_jax.condense_channels(cparams, cmasks, layers)
    cw = 1 - sum(int(small.params[l]["kernel"].size) for l in layers) / kernels
    add("condensed", s, jfwd, small.params, {b: jfwd(cparams, xs[b]) for b in check_batches},
        tree_bytes(small.params), cw, widths=small.features)
    if s in NM_FORMS:
      st = sparse_jax.NM(*NM_FORMS[s])
      if model == "lenet300_100":
        state = sparse_jax.static(SGD, structure=st).init(params)
        nparams, nmasks = sparse_jax.sparsify_params(params, state), sparse_jax.get_masks(state)
        packed = {l: {"kernel": sparse_jax.nm_compress(nparams[l]["kernel"],
                                                       nmasks[l]["kernel"], st, name=l),
                      "bias": nparams[l]["bias"]} for l in layers}
        nbytes = sum(packed[l]["kernel"].nbytes + packed[l]["bias"].nbytes for l in layers)
        add("nm", s, jax.jit(inference_lib.nm_mlp), packed,
            {b: jfwd(nparams, xs[b]) for b in BATCHES}, int(nbytes), s)
      else:  # VGG-16's first conv has 3 inputs: it stays dense.
        state = sparse_jax.static(SGD, structure=st, keep_first_dense=True).init(params)
        nparams, nmasks = sparse_jax.sparsify_params(params, state), sparse_jax.get_masks(state)
        nbytes = 0
        for l in layers:
          m = nmasks[l]["kernel"]
          k = nparams[l]["kernel"]
          nbytes += (sparse_jax.nm_compress(k, m, st, name=l).nbytes if m is not None
                     else k.nbytes) + nparams[l]["bias"].nbytes
        info[("nm", s)] = dict(bytes=int(nbytes), weight_sparsity=None, latency="n/a")
  return out, info


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="lenet300_100,vgg16")
  parser.add_argument("--rounds", default="lenet300_100=15,vgg16=2")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  compilation_cache.enable()
  rounds = {k: int(v) for k, v in (kv.split("=") for kv in args.rounds.split(","))}
  results = {"load_before": os.getloadavg(), "cores": os.cpu_count(),
             "platform": jax.devices()[0].platform, "jax": jax.__version__, "models": {}}
  t0 = time.time()
  for model in args.models.split(","):
    table, info = variants(model, jax.random.PRNGKey(0))
    med = _harness.median_latencies(table, rounds[model])
    dense = {b: med[("dense", 0.0, b)] for b in BATCHES}
    rows = []
    print(f"\n{model}: median µs per call over {rounds[model]} interleaved rounds "
          "(x dense in brackets: > 1 is slower than dense)")
    print("| format | sparsity | weight sparsity | bytes | batch 1 (µs) | batch 128 (µs) |")
    print("|---|---|---|---|---|---|")
    for (fmt, s), meta in info.items():
      lat = {b: med.get((fmt, s, b)) for b in BATCHES}
      row = dict(format=fmt, sparsity=s, **meta,
                 **{f"b{b}_us": None if lat[b] is None else 1e6 * lat[b] for b in BATCHES},
                 **{f"b{b}_vs_dense": None if lat[b] is None else lat[b] / dense[b]
                    for b in BATCHES})
      rows.append(row)
      cells = ["n/a" if lat[b] is None else f"{1e6 * lat[b]:.0f} ({lat[b] / dense[b]:.2f}x)"
               for b in BATCHES]
      ws = "-" if meta["weight_sparsity"] is None else f"{meta['weight_sparsity']:.4f}"
      print(f"| {fmt} | {s:g} | {ws} | {meta['bytes']:,} | {cells[0]} | {cells[1]} |")
    results["models"][model] = rows
  results["load_after"] = os.getloadavg()
  results["wall_s"] = time.time() - t0
  print(f"\nload average before {results['load_before']}, after {results['load_after']} on "
        f"{os.cpu_count()} cores; {results['platform']}, jax {jax.__version__}; "
        f"{results['wall_s']:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1, default=list)


if __name__ == "__main__":
  main()
