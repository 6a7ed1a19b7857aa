r"""Time to result of the main job, as whole processes, against the JAX floor.

Each round runs, one after the other (interleaved, so drift and load hit all alike):

* ``main cold``: the README's main job, ``python -m experiments.main`` with the
  GraNet LeNet-300-100 / mnist5k config, on an empty persistent compilation cache;
* ``main warm``: the same command again on the cache the cold run filled;
* ``floor cold`` / ``floor warm``: a plain dense Flax + Optax loop of the same
  recipe (model, data, batch 128, 930 steps, SGD-Nesterov with the same learning
  rate and weight decay, an evaluation per epoch), written as a user would write
  it (``floor_main`` below): the JAX floor;
* ``imports``: ``python -c "import experiments.trainer.train"``.

A main-job run is split with its own records: the trainer's ``timings`` in
``summary.json`` (set-up, data, training dispatches, evaluation, checkpoints,
and each compiled program with its compile seconds, which is also what the
"Compiled ... in ... s" log lines say) and the process's start-up before the trainer.

  python -m experiments.benchmarks.time_to_result --rounds=3 \
      --out=experiments/benchmarks/time_to_result.json

Targets (issue 12): main cold <= 1.2x floor cold; main warm <= 5 s. For the
compile time of the optimizer update alone see ``event_compile.py``.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/configs/granet_lenet300_mnist5k.py"


def run_process(argv, cache_dir):
  """Wall seconds and stdout of ``argv`` run from the repository root."""
  env = dict(os.environ, PYTHONPATH=REPO,
             SPARSE_JAX_COMPILATION_CACHE=cache_dir or "off")
  start = time.perf_counter()
  out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if out.returncode != 0:
    raise RuntimeError(f"{argv} failed:\n{out.stderr[-3000:]}")
  return wall, out.stdout


def main_job(cache_dir, workdir):
  """One run of the main job: wall seconds, compiled programs, trainer timings."""
  wall, _ = run_process([sys.executable, "-m", "experiments.main", f"--config={CONFIG}",
                         f"--workdir={workdir}"], cache_dir)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  programs = list(summary["timings"]["compile_s"].items())
  return {"wall_s": wall, "trainer_s": summary["wall_time_s"],
          "before_trainer_s": wall - summary["wall_time_s"],
          "timings": summary["timings"],
          "programs": programs, "compile_s": sum(s for _, s in programs),
          "final_test_accuracy": summary["final_test_accuracy"],
          "final_sparsity": summary["final_sparsity"]}


def floor_job(cache_dir):
  wall, stdout = run_process([sys.executable, "-m", "experiments.benchmarks.time_to_result",
                              "--floor"], cache_dir)
  return {"wall_s": wall, "result": json.loads(stdout.strip().splitlines()[-1])}


def imports_job():
  wall, _ = run_process([sys.executable, "-c", "import experiments.trainer.train"], None)
  return {"wall_s": wall}


def floor_main():
  """The plain dense Flax + Optax loop of the main job's recipe (the JAX floor)."""
  start = time.perf_counter()
  from experiments.trainer import compilation_cache
  compilation_cache.enable()  # SPARSE_JAX_COMPILATION_CACHE decides (off when cold)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from experiments.data import input_pipeline
  from experiments import models

  train = input_pipeline.load_arrays("mnist5k", "train", None)
  test = input_pipeline.load_arrays("mnist5k", "test", None)
  batch, epochs = 128, 30
  steps_per_epoch = len(train["label"]) // batch
  total = epochs * steps_per_epoch
  lr = optax.piecewise_constant_schedule(0.1, {int(0.5 * total): 0.1, int(0.75 * total): 0.1})
  tx = optax.chain(optax.add_decayed_weights(5e-4),
                   optax.sgd(lr, momentum=0.9, nesterov=True))
  model = models.get_model("lenet300_100", num_classes=10)
  x_train, y_train = jnp.asarray(train["image"]), jnp.asarray(train["label"], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x_train[:1], train=False)["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, idx):
    x, y = x_train[idx], y_train[idx]
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x, train=False), -1) == y)

  x_test, y_test = jnp.asarray(test["image"]), jnp.asarray(test["label"], jnp.int32)
  rng = np.random.default_rng(0)
  for epoch in range(epochs):
    perm = rng.permutation(len(y_train))
    for s in range(steps_per_epoch):
      params, opt_state = step(params, opt_state, perm[s * batch:(s + 1) * batch])
    acc = float(accuracy(params, x_test, y_test))
  print(json.dumps({"final_test_accuracy": acc, "steps": total,
                    "in_process_s": time.perf_counter() - start}))


def median(rows, key):
  return statistics.median(r[key] for r in rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None, help="write the runs and medians as JSON here")
  parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.floor:
    return floor_main()
  runs = {k: [] for k in ("main_cold", "main_warm", "floor_cold", "floor_warm", "imports")}
  scratch = tempfile.mkdtemp(prefix="time_to_result_")
  try:
    for r in range(args.rounds):
      cache = os.path.join(scratch, f"cache{r}")  # empty: a cold start
      runs["main_cold"].append(main_job(cache, os.path.join(scratch, f"cold{r}")))
      runs["floor_cold"].append(floor_job(None))
      runs["main_warm"].append(main_job(cache, os.path.join(scratch, f"warm{r}")))
      floor_cache = os.path.join(scratch, f"floor_cache{r}")
      floor_job(floor_cache)  # fills it
      runs["floor_warm"].append(floor_job(floor_cache))
      runs["imports"].append(imports_job())
      print(f"round {r}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f} s" for k, v in runs.items()),
            flush=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  medians = {k: median(v, "wall_s") for k, v in runs.items()}
  ratios = {"main_cold/floor_cold": medians["main_cold"] / medians["floor_cold"],
            "main_warm/floor_warm": medians["main_warm"] / medians["floor_warm"]}
  print("\nwhole-process wall seconds, medians of", args.rounds, "rounds:")
  for k, v in medians.items():
    print(f"  {k:11s} {v:6.1f}")
  for k, v in ratios.items():
    print(f"  {k:21s} {v:5.2f}x")
  for kind in ("main_cold", "main_warm"):
    rows = runs[kind]
    print(f"\n{kind}: before the trainer {median(rows, 'before_trainer_s'):.1f} s, "
          f"trainer {median(rows, 'trainer_s'):.1f} s, compile (sum of programs) "
          f"{median(rows, 'compile_s'):.1f} s")
    for name, s in rows[len(rows) // 2]["programs"]:
      print(f"  compiled {name}: {s:.2f} s")
    timings = rows[len(rows) // 2]["timings"]
    print("  trainer timings: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in timings.items() if isinstance(v, (int, float))))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "medians_s": medians, "ratios": ratios, "runs": runs},
                f, indent=1)


if __name__ == "__main__":
  main()
