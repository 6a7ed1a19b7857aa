r"""Trains a (sparse) network from an ml_collections config.

  python -m experiments.main \
      --config=experiments/configs/granet_lenet300_mnist5k.py \
      --workdir=workdirs/granet --config.sparsity.final=0.95

A workdir that already holds a checkpoint is resumed; one whose run has finished
is reported and left as it is (``--config.if_finished=extend|restart`` to train
again). A mistake in the config, a workdir in use or a non-finite loss ends the
run with one line naming the problem and the fix, and exit status 2.
"""

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import imp
from experiments import train
from experiments import workdir

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
  try:
    if FLAGS.config.sparsity.method == "imp":  # rounds of training (experiments/imp.py)
      summary = imp.run_imp(FLAGS.config, FLAGS.workdir)
    else:
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, workdir.WorkdirLocked) as e:
    logging.debug("Traceback:", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "final_sparsity" in summary:
    acc = summary["final_test_accuracy"]
    print(f"final_test_accuracy={'none' if acc is None else f'{acc:.4f}'} "
          f"final_sparsity={summary['final_sparsity']:.4f} "
          f"wall_time_s={summary['wall_time_s']:.1f} workdir={FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main)
