r"""Device check: the accelerator road measured on one GPU or TPU chip, in under 8 minutes.

Prints the device, then times the exact selection's methods (issue 31 item 4: radix
select on scatter histograms, bisection by comparisons and sums, ``selection_rows``;
``--selection_only``: this part alone, on a CPU too), then for a byte-level GPT
language model (``lm_bytes_scan.py``'s recipe: scanned blocks, remat, bfloat16
compute, AdamW; 31.9M weights, windows of 256 bytes, batch 64), ResNet-50 (ImageNet
shapes, 224x224, 1000 classes) and VGG-19 (CIFAR shapes, 32x32, 10 classes), each on
synthetic data with its config's recipe (``imagenet_resnet50.py``,
``cifar_vgg19.py``): steps/s of the trainer's train step for dense, GraNet and RigL,
ordinary steps (compiled without the mask-update branch) and event steps (with it,
each call a mask update inside the pruning window), their ratios to dense and each
event's to its ordinary step (the mask update's cost), each program's XLA peak memory
(arguments + outputs + temporaries - donated) and compile seconds (the event programs'
too); tokens/s for the language model. Then one short run of the real recipe
(``cifar_vgg19.py``, the whole trainer: tf.data, evaluation, checkpoints, export) on a
synthetic CIFAR-10 prepared by TFDS's builder (experiments/data/synthetic.py).
Everything goes to ``--out`` as JSON (the language model's rows under ``lm_rows``),
written after each part so a cut-off run keeps what it measured; a part not started
within ``--budget_s`` is skipped.

  python -m experiments.benchmarks.device_check --out=device_check.json

On a machine without a GPU or TPU it prints why it skips and exits 0. ``--smoke`` runs
every part anyway, on tiny models and shapes (a test of the script on CPU; its numbers
mean nothing). The persistent compilation cache is left off so compile times are real.
XLA's peaks of the language model's programs alone, compiled and not run (one device or
a mesh, on a CPU too): ``experiments/benchmarks/lm_memory.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import sparse_jax
from experiments.benchmarks import _harness
from experiments.configs import cifar_vgg19
from experiments.configs import imagenet_resnet50

Bench = _harness.Bench  # a model of the check, on synthetic data with its config's recipe
BENCHMARKS = {
    "resnet50_imagenet": Bench(imagenet_resnet50, (224, 224, 3), 1000, 1_281_167, {}),
    "vgg19_cifar10": Bench(cifar_vgg19, (32, 32, 3), 10, 50_000, {}),
}
# The language models: _harness.LM_BENCHMARKS (lm_memory.py compiles them too).
# --smoke: the same code on models a 2-core CPU runs in seconds.
SMOKE = {
    "resnet50_imagenet": Bench(imagenet_resnet50, (16, 16, 3), 1000, 1_281_167,
                               {"model": "small_cnn", "width": 4}),
    "vgg19_cifar10": Bench(cifar_vgg19, (16, 16, 3), 10, 50_000,
                           {"model": "small_cnn", "width": 4}),
}
LM_SMOKE = {
    "lm_bytes_32m": Bench(_harness.LM_CONFIG, (16,), 256, 64_000,
                          dict(width=32, depth=2, num_heads=2, mlp_dim=64), "int32"),
}
# The exact selection's two methods (issue 31 item 4) as SPARSE_JAX_SELECTION and
# SPARSE_JAX_BISECTION_BITS name them, the chunk size (None: the default; 2**30:
# every leaf in one piece, no chunk loop) and SPARSE_JAX_TIE_SPLIT (the ties split
# from packed bits, or by the method's own index passes); the first is the others'
# reference.
SELECTION_PATHS = {"radix": ("radix", "4", None, "auto"),
                   "bisection1": ("bisection", "1", None, "auto"),
                   "bisection1_index_passes": ("bisection", "1", None, "passes"),
                   "bisection4": ("bisection", "4", None, "auto"),
                   "bisection8": ("bisection", "8", None, "auto"),
                   "bisection4_whole": ("bisection", "4", 2**30, "auto")}
SELECTION_SIZES, SELECTION_SMOKE = {"1M": 1_000_000, "30M": 30_000_000}, {"20k": 20_000}


def time_variants(built: dict, programs: dict, rounds: int, reps: int) -> dict:
  """Median seconds per step of each variant, rounds interleaved over the variants."""
  states = {v: b[1] for v, b in built.items()}

  def step_once(v):
    _, _, data, count = built[v]
    state = states[v]
    if count is not None:
      state = state.replace(opt_state=_harness.with_count(state.opt_state, count))
    states[v], metrics = programs[v]["compiled"](state, data)
    return metrics["train_loss"]

  table = {v: (step_once, (v,)) for v in built}
  for fn, args in table.values():  # warm up
    _harness.time_call(fn, *args, reps=reps)
  times = _harness.interleaved_samples(table, rounds, reps)
  return {v: statistics.median(ts) for v, ts in times.items()}


def bench_model(name: str, bench: Bench, batch: int, rounds: int, reps: int) -> list[dict]:
  """A row per entry of ``_harness.VARIANTS``: steps/s, XLA peak and compile seconds.

  Each also against dense; an event row's ``time_vs_ordinary`` (None on the others) is
  the mask update's cost. A language model's rows also give tokens/s.
  """
  built = _harness.build_variants(bench, batch)
  # Compiled side by side, as the trainer compiles its programs (each program's compile
  # seconds are then its wall time alongside the others).
  with concurrent.futures.ThreadPoolExecutor(len(built)) as pool:
    futures = {v: pool.submit(_harness.compile_variant, b[0], b[1], b[2])
               for v, b in built.items()}
    programs = {v: f.result() for v, f in futures.items()}
  seconds = time_variants(built, programs, rounds, reps)
  dense, rows = programs["dense"], []
  for v in _harness.VARIANTS:
    p = programs[v]
    rows.append({
        "model": name, "batch": batch, "variant": v, "steps_per_s": 1 / seconds[v],
        "ms_per_step": 1e3 * seconds[v], "time_vs_dense": seconds[v] / seconds["dense"],
        "xla_peak_bytes": p["xla_peak_bytes"],
        "peak_vs_dense": (None if p["xla_peak_bytes"] is None
                          else p["xla_peak_bytes"] / dense["xla_peak_bytes"]),
        "compile_s": p["compile_s"], "compile_vs_dense": p["compile_s"] / dense["compile_s"],
        "time_vs_ordinary": (seconds[v] / seconds[v.replace("/event", "/ordinary")]
                             if v.endswith("/event") else None)})
    if bench.input_dtype == "int32":
      rows[-1]["tokens_per_s"] = batch * bench.input_shape[0] / seconds[v]
  return rows


def _prune_inputs(n: int, dtype):
  """Kernels of a 784-w-w-w-10 MLP of about ``n`` weights in ``dtype``, half active."""
  sizes = (784, *[int((-794 + (794**2 + 8 * n) ** 0.5) / 4)] * 3, 10)  # 784w + 2w² + 10w = n
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * (len(sizes) - 1))
  params = [jax.random.normal(keys[2 * i], (a, b), jnp.float32).astype(dtype)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
  masks = [jax.random.bernoulli(keys[2 * i + 1], 0.5, p.shape) for i, p in enumerate(params)]
  return params, masks


def selection_rows(sizes: dict, paths: list, rounds: int, reps: int) -> list[dict]:
  """A global magnitude prune (50% active -> 10%: one exact top-k over all kernels) per
  entry of ``paths`` (``SELECTION_PATHS``), on float32 and bfloat16 weights (bfloat16:
  many ties, the tie passes run), at each size: median seconds over interleaved rounds,
  compile seconds, and whether its masks equal the first path's.
  """
  rows, saved, chunk = [], dict(os.environ), sparse_jax.get_chunk_elements()
  for size, n in sizes.items():
    for dtype in ("float32", "bfloat16"):
      params, masks = _prune_inputs(n, jnp.dtype(dtype))
      total, programs, compile_s = sum(p.size for p in params), {}, {}
      for path in paths:
        method, bits, path_chunk, ties = SELECTION_PATHS[path]
        os.environ["SPARSE_JAX_SELECTION"], os.environ["SPARSE_JAX_BISECTION_BITS"] = method, bits
        os.environ["SPARSE_JAX_TIE_SPLIT"] = ties
        sparse_jax.set_chunk_elements(path_chunk or chunk)
        prune = jax.jit(lambda p, m: sparse_jax.global_magnitude_prune(p, m, total // 10))
        t = time.perf_counter()
        programs[path] = prune.lower(params, masks).compile()  # traced with this path
        compile_s[path] = time.perf_counter() - t
      outs = jax.block_until_ready({path: fn(params, masks) for path, fn in programs.items()})
      # One timed call each; a path slower than 2 s keeps that sample only.
      first = {p: _harness.time_call(fn, params, masks) for p, fn in programs.items()}
      timed = {p: (fn, (params, masks)) for p, fn in programs.items() if first[p] < 2}
      times = _harness.interleaved_samples(
          timed, rounds, {p: reps if first[p] < 0.05 else 1 for p in timed})
      for path in programs:
        ts = times.get(path, [first[path]])
        rows.append({"size": size, "weights": total, "dtype": dtype, "path": path,
                     "s": statistics.median(ts), "samples_s": ts, "compile_s": compile_s[path],
                     "masks_equal": all(bool(jnp.array_equal(a, b))
                                        for a, b in zip(outs[path], outs[paths[0]]))})
      del params, masks, outs, programs
  os.environ.clear()
  os.environ.update(saved)
  sparse_jax.set_chunk_elements(chunk)
  return rows


def print_selection(rows: list[dict]):
  print("\nselection (global magnitude prune, 50% -> 10% active)\n"
        f"{'size':5s} {'dtype':9s} {'path':23s} {'ms':>9s} {'x first':>8s} "
        f"{'compile s':>9s} masks equal", flush=True)
  first = {}
  for r in rows:
    base = first.setdefault((r["size"], r["dtype"]), r["s"])
    print(f"{r['size']:5s} {r['dtype']:9s} {r['path']:23s} {1e3 * r['s']:9.2f} "
          f"{r['s'] / base:8.2f} {r['compile_s']:9.1f} {r['masks_equal']}", flush=True)


def selection_part(args, result: dict, write):
  """``selection_rows`` at ``--selection_sizes`` (tiny with ``--smoke``), printed and written."""
  sizes = SELECTION_SMOKE if args.smoke else {
      s: SELECTION_SIZES[s] for s in args.selection_sizes.split(",") if s}
  reps = 1 if jax.default_backend() == "cpu" else 5
  result["selection_rows"] = selection_rows(sizes, args.selection_paths.split(","),
                                            2 if args.smoke else args.rounds, reps)
  print_selection(result["selection_rows"])
  write()


def print_rows(name: str, batch: int, seconds: float, rows: list[dict]):
  """``bench_model``'s rows as a table; ``seconds``: the part's wall time."""
  print(f"\n{name}, batch {batch} ({seconds:.0f} s)\n"
        f"{'variant':16s} {'steps/s':>8s} {'x dense':>8s} {'x ordin.':>8s} "
        f"{'XLA peak MB':>12s} {'x dense':>8s} {'compile s':>10s} {'x dense':>8s}")
  for r in rows:
    peak = "n/a" if r["xla_peak_bytes"] is None else f"{r['xla_peak_bytes'] / 2**20:.0f}"
    ratio = "n/a" if r["peak_vs_dense"] is None else f"{r['peak_vs_dense']:.2f}"
    event = "" if r["time_vs_ordinary"] is None else f"{r['time_vs_ordinary']:.2f}"
    print(f"{r['variant']:16s} {r['steps_per_s']:8.2f} {r['time_vs_dense']:8.2f} "
          f"{event:>8s} {peak:>12s} {ratio:>8s} {r['compile_s']:10.1f} "
          f"{r['compile_vs_dense']:8.2f}", flush=True)


def real_recipe_run(smoke: bool) -> dict:
  """``cifar_vgg19.py`` (GraNet, 95%) through the whole trainer on a synthetic CIFAR-10."""
  from experiments.trainer import train  # pylint: disable=g-import-not-at-top
  from experiments.data import synthetic  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix="device_check_")
  num_train, num_eval, batch = (64, 32, 16) if smoke else (5120, 1000, 128)
  synthetic.prepare("cifar10", os.path.join(root, "tfds"), num_train=num_train,
                    num_eval=num_eval)
  config = cifar_vgg19.get_config("dataset=cifar10,sparsity=0.95")
  config.data_dir = os.path.join(root, "tfds")
  config.batch_size, config.eval_batch_size = batch, 500 if not smoke else 32
  # 5 epochs (40 steps each; 4 with --smoke); GraNet's events at 1.25, 2.5 and 3.75
  # epochs, the last reaching 95%; evaluations after every epoch.
  spe = num_train // batch
  config.num_train_steps = 5 * spe
  config.sparsity.update_every = spe + spe // 4
  config.sparsity.end_epoch = 3 * config.sparsity.update_every / spe
  config.log_every_steps, config.checkpoint_every_steps = spe, 2 * spe
  config.compilation_cache_dir = "off"
  if smoke:
    config.model, config.model_kwargs.width = "small_cnn", 4
  t = time.perf_counter()
  summary = train.train_and_evaluate(config, os.path.join(root, "workdir"))
  records = [json.loads(line) for line in open(os.path.join(root, "workdir", "metrics.jsonl"))]
  return {"config": "cifar_vgg19.py:dataset=cifar10,sparsity=0.95", "model": config.model,
          "batch": batch, "train_examples": num_train, "steps": summary["steps"],
          "wall_s": time.perf_counter() - t,
          "steps_per_s": [r["steps_per_s"] for r in records if "steps_per_s" in r],
          "mask_updates": [r["step"] for r in records if r.get("mask_update")],
          "final_test_accuracy": summary["final_test_accuracy"],
          "mask_sparsity": summary["mask_sparsity"], "timings": summary["timings"],
          "workdir": os.path.join(root, "workdir")}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128, help="64-256 on a GPU or TPU")
  parser.add_argument("--models", default=",".join(BENCHMARKS))
  parser.add_argument("--lm_models", default="lm_bytes_32m",
                      help="language models, measured first ('' for none)")
  parser.add_argument("--lm_batch", type=int, default=64, help="sequences per batch")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--reps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--skip_run", action="store_true", help="no real-recipe run")
  parser.add_argument("--budget_s", type=float, default=300.0,
                      help="parts not started by then are skipped (and said so); the "
                           "default leaves the last part 3 minutes of the 8")
  parser.add_argument("--selection_sizes", default="1M,30M",
                      help="sizes of the selection part ('' for none), measured first")
  parser.add_argument("--selection_paths", default=",".join(SELECTION_PATHS))
  parser.add_argument("--selection_only", action="store_true",
                      help="only the selection part (radix vs bisection; on a CPU too)")
  parser.add_argument("--smoke", action="store_true",
                      help="run on any backend with tiny models (tests the script)")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  return parser.parse_args()


def main():
  args = parse_args()
  backend = jax.default_backend()
  device = jax.devices()[0]
  result = {"backend": backend, "device": str(device),
            "device_kind": getattr(device, "device_kind", None),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "smoke": args.smoke}

  def write():
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

  if args.selection_only:
    selection_part(args, result, write)
    return
  if backend == "cpu" and not args.smoke:
    result["skipped"] = "no GPU or TPU: jax.default_backend() is 'cpu'"
    print(f"Device check skipped: {result['skipped']} (--smoke runs it on CPU anyway).")
    write()
    return
  benches, lm_benches = (SMOKE, LM_SMOKE) if args.smoke else (BENCHMARKS, _harness.LM_BENCHMARKS)
  batch, rounds, reps = (8, 2, 2) if args.smoke else (args.batch, args.rounds, args.reps)
  lm_batch = 8 if args.smoke else args.lm_batch
  print(f"Device: {device} ({result['device_kind']}, backend {backend}, "
        f"{jax.device_count()} devices); jax {jax.__version__}", flush=True)
  result["lm_rows"], result["rows"], result["skipped_parts"] = [], [], []
  t_start = time.perf_counter()

  def over_budget(part: str) -> bool:
    if time.perf_counter() - t_start < args.budget_s:
      return False
    result["skipped_parts"].append(part)
    print(f"\n{part}: skipped, {args.budget_s:.0f} s budget spent.", flush=True)
    write()
    return True

  if args.selection_sizes and not over_budget("selection"):
    selection_part(args, result, write)
  # Then the language models (issue 30), their rows apart ("lm_rows": tokens/s too).
  parts = [(name, lm_benches[name], lm_batch, "lm_rows")
           for name in args.lm_models.split(",") if name]
  parts += [(name, benches[name], batch, "rows") for name in args.models.split(",") if name]
  for name, bench, part_batch, key in parts:
    if over_budget(name):
      continue
    t = time.perf_counter()
    rows = bench_model(name, bench, part_batch, rounds, reps)
    result[key] += rows
    print_rows(name, part_batch, time.perf_counter() - t, rows)
    write()
  if not args.skip_run and not over_budget("real_recipe_run"):
    run = real_recipe_run(args.smoke)
    result["real_recipe_run"] = run
    print(f"\nReal recipe ({run['config']}, {run['model']}, synthetic CIFAR-10): "
          f"{run['steps']} steps in {run['wall_s']:.0f} s, steps/s per log "
          f"{[round(s, 1) for s in run['steps_per_s']]}, mask updates at "
          f"{run['mask_updates']}, test accuracy {run['final_test_accuracy']:.3f}, "
          f"sparsity {run['mask_sparsity']:.4f}", flush=True)
    write()
  print(f"\nDevice check done in {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
  main()
