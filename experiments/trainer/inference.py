r"""Running an exported model: the forwards of an ``export.npz`` MLP and their latency.

The forwards are those of the trainer's MLPs (``Dense_0``, ``Dense_1``, ... with
ReLU between them) on params as exported (dense with zeros, condensed, or with
BCOO / N:M kernels). The timing here is the one the benchmarks use too
(``experiments/benchmarks/_harness.py``): jitted calls, dispatched back to back,
timed until the last result is ready; medians over rounds that interleave the
variants, so that machine noise hits them alike.

Example:
  >>> latency = exported_mlp_latency("workdirs/run/export.npz", rounds=15)
  >>> latency["masked_b1_us"] / latency["condensed_b1_us"]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax
from experiments.trainer import exports


def time_call(fn, *args, reps=1, warmup=False):
  """Seconds per call of ``fn(*args)`` over ``reps`` back-to-back calls.

  The calls are dispatched asynchronously, as a loop runs them; the clock stops when
  the last result is ready, so per-call Python dispatch is not mistaken for device
  time (nor hidden by it).

  Args:
    fn: the function, usually jitted; what it returns is waited on.
    *args: its arguments.
    reps: calls per sample; the sample is their mean.
    warmup: one more call first, waited on and not timed (a sample of its own warm
      program, whatever ran in between).

  Returns:
    Mean seconds per call.
  """
  if warmup:
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def interleaved_samples(table, rounds, reps=1, warmup=False):
  """Per-call seconds of every entry of ``table``, one sample per round each.

  Each round times every entry once, in order (interleaved), so that drift and other
  jobs on the machine hit all variants alike.

  Args:
    table: ``{key: (fn, args)}``.
    rounds: samples per entry.
    reps: calls per sample (``time_call``), an int or ``{key: int}``.
    warmup: passed to ``time_call``.

  Returns:
    ``{key: [seconds per call, one per round]}``.
  """
  reps_of = reps if isinstance(reps, dict) else dict.fromkeys(table, reps)
  samples = {k: [] for k in table}
  for _ in range(rounds):
    for k, (fn, args) in table.items():
      samples[k].append(time_call(fn, *args, reps=reps_of[k], warmup=warmup))
  return samples


def median_latencies(table, rounds, target_s=0.02):
  """Median seconds per call of every entry of ``table``, reps calibrated per entry.

  Each entry is compiled and warmed, then timed once to choose its calls per sample
  (about ``target_s`` per sample, 1 to 50 calls), then timed over ``rounds``
  interleaved rounds.

  Args:
    table: ``{key: (fn, args)}``.
    rounds: samples per entry.
    target_s: seconds one sample should take.

  Returns:
    ``{key: median seconds per call}``.
  """
  reps = {}
  for k, (fn, args) in table.items():
    jax.block_until_ready(fn(*args))  # compile, warm
    t = time_call(fn, *args)
    reps[k] = int(max(1, min(50, target_s / max(t, 1e-7))))
  samples = interleaved_samples(table, rounds, reps)
  return {k: statistics.median(v) for k, v in samples.items()}


def mlp_forward(params, x, dense=jnp.matmul):
  """Logits of an MLP ``{"Dense_<i>": {"kernel", "bias"}}``, ReLU between layers.

  Args:
    params: the layers' params; a kernel is what ``dense`` takes.
    x: inputs, ``[batch, features]``.
    dense: ``dense(x, kernel)``, the layer's product (``jnp.matmul`` for dense or
      masked kernels).
  """
  n = len(params)
  for i in range(n):
    layer = params[f"Dense_{i}"]
    x = dense(x, layer["kernel"]) + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def bcoo_mlp(params, x):
  """``mlp_forward`` with BCOO kernels (``sparse_jax.bcoo_kernels``)."""
  return mlp_forward(params, x, sparse_jax.bcoo_dense)


def nm_mlp(params, x):
  """``mlp_forward`` with N:M-compressed kernels (``sparse_jax.nm_compress``)."""
  return mlp_forward(params, x, sparse_jax.nm_dense)


def exported_mlp_latency(export_path, rounds=15, reps=20, batches=(1, 128)):
  """Masked vs condensed forward (µs) of a ``Channels()`` MLP's ``export.npz``.

  The exported params (zeros kept) and their ``sparse_jax.condense_channels`` form
  are checked to give the same logits, then timed (``median_latencies``).

  Args:
    export_path: the run's ``export.npz`` (or its directory).
    rounds: interleaved rounds.
    reps: unused (calls per sample are calibrated per variant); kept for callers.
    batches: batch sizes timed.

  Returns:
    ``{"units_kept": hidden units left, "masked_b<batch>_us": ...,
    "condensed_b<batch>_us": ...}``.
  """
  del reps  # calibrated per variant
  e = exports.load_exported(export_path)
  tree = exports.exported_tree(e, "params")
  layers = sorted((n for n in tree if n.startswith("Dense_")), key=lambda n: int(n[6:]))
  params = {l: jax.tree.map(jnp.asarray, tree[l]) for l in layers}
  small = sparse_jax.condense_channels(params, exports.exported_tree(e, "masks"), layers)
  fwd = jax.jit(mlp_forward)
  table = {}
  for b in batches:
    x = jax.random.normal(jax.random.PRNGKey(b), (b, params[layers[0]]["kernel"].shape[0]))
    np.testing.assert_allclose(np.asarray(fwd(small.params, x)), np.asarray(fwd(params, x)),
                               rtol=1e-3, atol=1e-3)
    table[("masked", b)] = (fwd, (params, x))
    table[("condensed", b)] = (fwd, (small.params, x))
  med = median_latencies(table, rounds)
  return {"units_kept": int(sum(small.features[:-1])),
          **{f"{fmt}_b{b}_us": 1e6 * med[(fmt, b)] for fmt, b in table}}
