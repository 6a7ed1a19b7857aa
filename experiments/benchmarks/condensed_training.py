r"""Condensed channel-sparse training vs dense, masked and unstructured (issue 32).

Whole trainer runs of ``experiments/configs/channels_mnist5k.py`` (MLP
784-2048-2048-10 by default, ``--width``, on the bundled MNIST subset, 930 steps,
GraNet pruning to the target by epoch 5, ΔT = 50, classifier dense, evaluation
every epoch), each as its own process:

* ``dense``;
* ``masked_<s>``: GraNet with ``structure=channels`` at ``s`` of the hidden units,
  the dead units kept as zeros;
* ``condensed_<s>``: the same with ``sparsity.condense=True``: the dead units are
  removed at the events and the smaller model trains on (recompiled per shrink);
* ``unstructured_0.9``: GraNet on weights at 90%.

Each variant runs twice per round with a fresh compilation cache: ``cold``
(every program compiled, as a first run) and ``warm`` (the same config again on
that cache: a rerun, or another seed of the same widths, compiles nothing).
Rounds are interleaved over the variants; medians are reported with the ratio to
dense of the same kind. Time to result is the run's own ``wall_time_s`` (data,
build, compiles, training, evaluations, checkpoints); train steps/s is the
median over the run's logged intervals (robust to the few that wait for a
compile; a condensed run's is mostly its smallest widths'); inference latency is
the final model's jitted forward (the exported params; the condensed model at
its own widths) at batch 1 and 128, warm, interleaved.

  python -m experiments.benchmarks.condensed_training --rounds=3 \
      --out=experiments/benchmarks/condensed_training.json

``--model=lenet5`` runs LeNet-5 (convs 6-16, dense 120-84) instead of the MLP
(``--width`` unused), e.g. ``--model=lenet5 --sparsities=0.75
--out=experiments/benchmarks/condensed_training_lenet5.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from experiments.benchmarks import _harness
from experiments.trainer import condense
from experiments.trainer import exports
from experiments.trainer import inference

CONFIG = "experiments/configs/channels_mnist5k.py"
SPARSITIES = (0.5, 0.75, 0.9)


def variants(sparsities, width: int, model: str = "mlp") -> dict[str, str]:
  """``{name: the config's family argument}``."""
  size = f"model={model},width={width}"
  base = f"{size},method=granet"
  out = {"dense": f"{size},method=dense"}
  for s in sparsities:
    out[f"masked_{s}"] = f"{base},sparsity={s}"
    out[f"condensed_{s}"] = f"{base},sparsity={s},condense=1"
  out["unstructured_0.9"] = f"{base},structure=unstructured,sparsity=0.9"
  return out


def run(arg: str, workdir: str, cache: str) -> dict:
  """One trainer process; its summary plus the process's wall time."""
  t = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:{arg}",
       f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}"],
      capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{arg} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  timings = summary["timings"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [r["steps_per_s"] for r in map(json.loads, f) if "steps_per_s" in r]
  return {"process_s": time.time() - t, "time_to_result_s": summary["wall_time_s"],
          "compile_s": sum(timings["compile_s"].values()), "eval_s": timings["eval_s"],
          "steps_per_s": statistics.median(rates),
          "accuracy": summary["final_test_accuracy"],
          "train_flops_vs_dense": summary["train_flops_vs_dense"],
          "widths": summary.get("condensed_widths")}


def latencies(workdirs: dict[str, str], rounds: int, model: str = "mlp") -> dict:
  """Median forward µs of each variant's final model at batch 1 and 128."""
  table = {}
  for name, workdir in workdirs.items():
    e = exports.load_exported(os.path.join(workdir, "export.npz"))
    params = jax.device_put(exports.exported_tree(e, "params"))
    forward = jax.jit(inference.mlp_forward)
    shape = (784,)
    if model != "mlp":  # the family at the exported widths
      widths = [int(params[n]["kernel"].shape[-1]) for n in condense.chain_of(
          model, params, {})[0]]
      net = condense.model_at(model, widths[-1], widths)
      forward = jax.jit(lambda p, x, net=net: net.apply({"params": p}, x, train=False))
      shape = (28, 28, 1)
    for batch in (1, 128):
      x = jax.random.normal(jax.random.PRNGKey(batch), (batch, *shape))
      table[(name, batch)] = (forward, (params, x))
  med = _harness.median_latencies(table, rounds)
  return {f"{n}@{b}": 1e6 * v for (n, b), v in med.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--model", default="mlp", choices=("mlp", "lenet5"))
  parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  table = variants([float(s) for s in args.sparsities.split(",")], args.width, args.model)
  samples = {(n, k): [] for n in table for k in ("cold", "warm")}
  load = [os.getloadavg()[0]]
  root = tempfile.mkdtemp(prefix="condensed_training_")
  last = {}
  for r in range(args.rounds):
    for name, arg in table.items():
      cache = os.path.join(root, f"cache_{r}_{name}")
      for kind in ("cold", "warm"):
        workdir = os.path.join(root, f"{r}_{name}_{kind}")
        samples[(name, kind)].append(run(arg, workdir, cache))
        last[name] = workdir
        print(f"round {r} {name} {kind}: {samples[(name, kind)][-1]}", flush=True)
  load.append(os.getloadavg()[0])
  out = {"config": CONFIG, "model": args.model, "width": args.width, "rounds": args.rounds,
         "load_before_after": load, "medians": {}, "vs_dense": {}}
  for (name, kind), runs in samples.items():
    out["medians"][f"{name}/{kind}"] = {
        k: statistics.median(r[k] for r in runs) for k in runs[0]
        if isinstance(runs[0][k], (int, float))} | {"widths": runs[0]["widths"]}
  for (name, kind) in samples:
    dense, me = out["medians"][f"dense/{kind}"], out["medians"][f"{name}/{kind}"]
    out["vs_dense"][f"{name}/{kind}"] = {
        "time_to_result_speedup": dense["time_to_result_s"] / me["time_to_result_s"],
        "train_steps_speedup": me["steps_per_s"] / dense["steps_per_s"],
        "accuracy_points": 100 * (me["accuracy"] - dense["accuracy"])}
  for (name, kind) in samples:
    if name.startswith("condensed_"):
      masked = out["medians"][f"masked_{name[len('condensed_'):]}/{kind}"]
      me = out["medians"][f"{name}/{kind}"]
      out["condensed_vs_masked"] = out.get("condensed_vs_masked", {})
      out["condensed_vs_masked"][f"{name}/{kind}"] = {
          "time_to_result_speedup": masked["time_to_result_s"] / me["time_to_result_s"],
          "accuracy_points": 100 * (me["accuracy"] - masked["accuracy"])}
  out["latency_us"] = latencies(last, rounds=15, model=args.model)
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
