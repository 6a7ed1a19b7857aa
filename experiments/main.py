r"""Trains a (sparse) network from an ml_collections config.

  python -m experiments.main \
      --config=experiments/configs/granet_lenet300_mnist5k.py \
      --workdir=workdirs/granet --config.sparsity.final=0.95

A workdir that already holds a checkpoint is resumed; one whose run has finished
is reported and left as it is (``--config.if_finished=extend|restart`` to train
again). A mistake in the config, a workdir in use, a damaged file in it, a file
that cannot be written (a full disk) or a non-finite loss ends the run with one
line naming the problem and the fix, and exit status 2.

SIGTERM (sent by TPU VMs, GKE and SLURM before SIGKILL) or SIGINT (Ctrl-C) ends
the run at the end of its current dispatch: a checkpoint is saved at that step,
the workdir lock released, "Preempted at step N" logged, and the exit status is
75 (EX_TEMPFAIL: try again; experiments/trainer/preemption.py). Rerunning the same
command resumes there with the uninterrupted run's results. A second signal
while stopping is ignored (said on stderr); SIGKILL stops at once and keeps the
newest complete checkpoint.
"""

import logging
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.trainer import config_checks
from experiments.trainer import imp
from experiments.trainer import preemption
from experiments.trainer import train
from experiments.trainer import workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (FILE or FILE:family-argument); with --help, "
    "its fields and their defaults are listed.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # force: app.run has put absl's handler on the root logger (stderr, a thread id
  # and file:line on each line), which would make this call do nothing.
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(_LineFormatter())
  logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    if FLAGS.config.sparsity.method == "imp":  # rounds of training (experiments/trainer/imp.py)
      summary = imp.run_imp(FLAGS.config, FLAGS.workdir)
    else:
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, workdir.WorkdirLocked,
          workdir.WriteFailed) as e:
    logging.debug("Traceback:", exc_info=True)
    _quiet_from_now_on()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted:  # checkpointed, lock released: rerun to resume
    logging.debug("Traceback:", exc_info=True)
    sys.exit(preemption.EXIT_CODE)
  if "final_sparsity" in summary:
    acc = summary["final_test_accuracy"]
    print(f"final_test_accuracy={'none' if acc is None else f'{acc:.4f}'} "
          f"final_sparsity={summary['final_sparsity']:.4f} "
          f"wall_time_s={summary['wall_time_s']:.1f} workdir={FLAGS.workdir}")


class _LineFormatter(logging.Formatter):
  """``HH:MM:SS message``; a warning or an error is named: ``HH:MM:SS warning: message``."""

  def format(self, record):
    level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
    return f"{self.formatTime(record, '%H:%M:%S')} {level}{super().format(record)}"


def _quiet_from_now_on():
  """Keeps the error line the last word: background threads (orbax's after a failed
  save, tensorstore's event loop) would log their own tracebacks while exiting."""
  logging.disable(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None


HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
              "-h", "-?")


def parse_flags(argv):
  """absl's flag parsing, with a mistake in the config or its overrides as one line.

  The config file is loaded first (its family argument checked) and the
  ``--config.FIELD`` names checked against its fields; ``--help`` lists them.
  Any mistake: ``error: ...`` on stderr and exit status 2.
  """
  argv = FLAGS.read_flags_from_files(argv, force_gnu=False)
  config = None
  try:
    spec = _last_config_value(argv)
    config = None if spec is None else config_checks.load_config_file(spec)
    if config is not None and any(a in HELP_FLAGS for a in argv[1:]):
      print(f"{__doc__}\n{FLAGS.module_help(sys.modules[__name__])}\n\n"
            f"Fields of {spec} (--config.FIELD=VALUE), with their defaults:\n"
            f"{config_checks.describe_fields(config)}")
      sys.exit(0)
    if config is not None:
      error = config_checks.unknown_overrides(config, _override_names(argv))
      if error:
        raise ValueError(error)
    return FLAGS(argv)
  except (ValueError, FileNotFoundError, flags.Error) as e:
    message = str(e)
    if config is not None and isinstance(e, flags.Error):
      message = config_checks.bad_override_value(config, message)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _last_config_value(argv):
  """The value of the last ``--config=X`` / ``--config X`` before a ``--``."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    elif m := re.match(r"--?config=(.*)$", arg):
      value = m.group(1)
  return value


def _override_names(argv):
  """The FIELD of each ``--config.FIELD[=VALUE]`` (``--noconfig.FIELD``) before a ``--``."""
  names = []
  for arg in argv[1:]:
    if arg == "--":
      break
    if m := re.match(r"--?(?:no)?config\.([^=\s]+)", arg):
      names.append(m.group(1))
  return names


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
