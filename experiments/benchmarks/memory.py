r"""Peak memory of dense vs sparse training of the 30M-parameter MLP.

Primary measure: XLA's own memory analysis of the compiled train step
(``compiled.memory_analysis()``, which works on CPU): arguments + outputs +
temporaries - donated (aliased) bytes. The sparse step contains the mask-update
branch, so its figure covers the update step too. Second measure: the peak RSS of
a separate process that builds the state and runs a few steps (ordinary and one
mask update) of each method.

  python -m experiments.benchmarks.memory --out=memory.json

Target: sparse training peak within 1.15x of dense.
"""

import argparse
import json
import resource
import subprocess
import sys

import jax

from experiments.trainer import compilation_cache
from experiments.benchmarks import _harness

MODEL = _harness.MODELS["mlp_30m"]


def parse(method: str):
  """``(make_methods name, packed, host)`` of a method name with optional suffixes:
  ``_packed`` (bit-packed masks) and ``_host`` (event steps decided on the host: an
  ordinary step compiled with ``mask_update=False`` and an event step with
  ``True``; training's peak is the larger of the two)."""
  host = method.endswith("_host")
  method = method[:-len("_host")] if host else method
  packed = method.endswith("_packed")
  return (method[:-len("_packed")] if packed else method), packed, host


def make_tx(method: str):
  """The optimizer of a method name (``parse``'s suffixes allowed)."""
  name, packed, _ = parse(method)
  if name == "dense":
    return _harness.inner_optimizer()
  return _harness.make_methods(packed_masks=packed)[name]


def setup(method: str, batch: int):
  """``(tx, params, opt_state, x, y)`` of the 30M MLP."""
  params = _harness.init_mlp(jax.random.PRNGKey(0), MODEL)
  tx = make_tx(method)
  state = tx.init(params)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, MODEL[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, MODEL[-1])
  return tx, params, state, x, y


def _compiled_peak(method, batch, mask_update):
  tx, params, state, x, y = setup(method, batch)
  step = _harness.make_step(tx, donate=True, mask_update=mask_update)
  m = step.lower(params, state, x, y).compile().memory_analysis()
  peak = _harness.xla_peak_bytes(m)
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "peak_bytes": peak}


def xla_peak(method: str, batch: int) -> dict:
  if not parse(method)[2]:
    return _compiled_peak(method, batch, None)
  ordinary = _compiled_peak(method, batch, False)
  update = _compiled_peak(method, batch, True)
  row = max((ordinary, update), key=lambda r: r["peak_bytes"])
  return {**row, "ordinary_peak_bytes": ordinary["peak_bytes"],
          "update_peak_bytes": update["peak_bytes"]}


def rss_child(method: str, batch: int):
  """Runs in a child process: a few steps including one mask update; prints max RSS."""
  host = parse(method)[2]
  tx, params, state, x, y = setup(method, batch)
  steps = {mu: _harness.make_step(tx, donate=True, mask_update=mu)
           for mu in ((False, True) if host else (None,))}
  for i in range(3):
    event = method != "dense" and i == 1
    if event:
      state = _harness.with_count(state, 99)  # the next update is an event
    params, state = steps[event if host else None](params, state, x, y)
  jax.block_until_ready(params)
  print(json.dumps({"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="dense,granet,rigl,static",
                      help="comma-separated; a _packed suffix (granet_packed) packs "
                      "the masks 1 bit per weight")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  if args.child:
    rss_child(args.child, args.batch)
    return
  rows = []
  for method in args.methods.split(","):
    row = {"method": method, **xla_peak(method, args.batch)}
    out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.memory",
                          f"--child={method}", f"--batch={args.batch}"],
                         capture_output=True, text=True, check=True)
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    rows.append(row)
  dense = rows[0]
  print(f"{'method':14s} {'XLA peak MB':>12s} {'x dense':>8s} {'temp MB':>8s} "
        f"{'RSS MB':>8s} {'x dense':>8s}")
  for r in rows:
    r["xla_peak_vs_dense"] = r["peak_bytes"] / dense["peak_bytes"]
    r["rss_vs_dense"] = r["max_rss_bytes"] / dense["max_rss_bytes"]
    print(f"{r['method']:14s} {r['peak_bytes'] / 2**20:12.1f} {r['xla_peak_vs_dense']:8.3f} "
          f"{r['temp_bytes'] / 2**20:8.1f} {r['max_rss_bytes'] / 2**20:8.1f} "
          f"{r['rss_vs_dense']:8.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"model": list(MODEL), "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
