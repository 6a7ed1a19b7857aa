r"""Trains a (sparse) network from an ml_collections config.

  python -m experiments.main \
      --config=experiments/configs/granet_lenet300_mnist5k.py \
      --workdir=workdirs/granet --config.sparsity.final=0.95

A workdir that already holds a checkpoint is resumed.
"""

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import imp
from experiments import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if FLAGS.config.sparsity.method == "imp":  # rounds of training (experiments/imp.py)
    summary = imp.run_imp(FLAGS.config, FLAGS.workdir)
  else:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if "final_test_accuracy" in summary:
    print(f"final_test_accuracy={summary['final_test_accuracy']:.4f} "
          f"final_sparsity={summary['final_sparsity']:.4f} "
          f"wall_time_s={summary['wall_time_s']:.1f} workdir={FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main)
