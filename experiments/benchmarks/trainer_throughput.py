r"""Steps per second of the full trainer vs the bare jitted step on the same batches.

The trainer (input pipeline, logging, evaluation and checkpoints included) runs
GraNet on LeNet-300-100 / MNIST subset; its steady-state rate is the median of the
``steps_per_s`` it logs between log points (the first interval, which holds the
compilation, and the last, which holds the evaluation, are dropped). The bare
steps are ``steps_lib.train_steps`` jitted alone and called back to back on batches
already on the device, dispatched as the trainer dispatches them (see
``bare_rate``: ordinary steps without the mask-update branch, the event alone).

  python -m experiments.benchmarks.trainer_throughput --steps_per_dispatch=1,10

Target: the trainer within 10% of the bare step.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from experiments.trainer import compilation_cache
from experiments.data import input_pipeline
from experiments.trainer import methods
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import train
from experiments.configs import default


def make_config(steps_per_dispatch: int, num_steps: int):
  config = default.lenet300_mnist5k("granet", None)
  config.num_train_steps = num_steps
  config.steps_per_dispatch = steps_per_dispatch
  config.log_every_steps = 100
  config.eval_every_epochs = 10**6  # evaluate at the end only
  config.checkpoint_every_steps = 10**6
  return config


def trainer_rate(config) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(l) for l in f]
  # Mask updates happen in both measurements (the bare step's count advances too).
  rates = [r["steps_per_s"] for r in records[1:] if "test_accuracy" not in r]
  return statistics.median(rates)


def bare_rate(config, repeats: int) -> float:
  """Steps/s of the bare jitted steps, dispatched as the trainer dispatches them.

  Each round is one mask-update period (``update_every`` steps): the ordinary
  steps compiled without the mask-update branch, ``steps_per_dispatch`` at a time
  and the remainder one by one, then the event step alone with it (the state's
  count lines up, so it is a real GraNet event). No logging, no data indexing.
  """
  info = input_pipeline.dataset_info(config.dataset)
  spe = info.num_train_examples // config.batch_size
  model = state_lib.create_model(config, info.num_classes)
  tx = methods.create_sparse_tx(config, methods.create_optimizer(config, spe), spe)
  state = state_lib.create_train_state(config, model, lambda m: tx, info.input_shape,
                                   jax.random.PRNGKey(0))
  arrays = input_pipeline.load_arrays(config.dataset, "train")

  def batches(n):
    idx = np.arange(n * config.batch_size) % len(arrays["label"])
    return jax.device_put({
        "image": arrays["image"][idx].reshape(n, config.batch_size, *arrays["image"].shape[1:]),
        "label": arrays["label"][idx].reshape(n, config.batch_size)})

  def compiled(mask_update):
    return jax.jit(lambda s, b: steps_lib.train_steps(
        s, b, model=model, tx=tx, config=config, num_classes=info.num_classes,
        mask_update=mask_update), donate_argnums=0)

  ordinary, event = compiled(False), compiled(True)
  n, period = config.steps_per_dispatch, config.sparsity.update_every
  many, one = batches(n), batches(1)

  def run_period(state):
    for _ in range((period - 1) // n):
      state, _ = ordinary(state, many)
    for _ in range((period - 1) % n):
      state, _ = ordinary(state, one)
    state, _ = event(state, one)
    return state

  state = run_period(state)  # compile
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = run_period(state)
    jax.block_until_ready(state)
    rates.append(period / (time.perf_counter() - start))
  return statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps_per_dispatch", default="1,10")
  parser.add_argument("--num_steps", type=int, default=3000)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  compilation_cache.enable()  # runs of the same shapes reuse compiled programs
  rows = []
  for s in (int(v) for v in args.steps_per_dispatch.split(",")):
    config = make_config(s, args.num_steps)
    t = trainer_rate(config)
    b = bare_rate(config, repeats=15)
    rows.append({"steps_per_dispatch": s, "trainer_steps_per_s": t, "bare_steps_per_s": b,
                 "trainer_over_bare": t / b})
    print(f"steps/dispatch {s:3d}: trainer {t:8.1f} steps/s, bare step {b:8.1f} steps/s, "
          f"ratio {t / b:.3f}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
