"""SIGTERM and SIGINT: the trainer stops at the end of its dispatch, checkpointed.

Each test sends a real signal to a real trainer process (``experiments.main``),
either from the test (at whatever step the run has reached) or from the process
itself at a chosen dispatch (so that it stops at a step that is neither a log
step nor a multiple of the dispatch length), and checks the exit status, the
log line, the checkpoint, the released lock, and that the resumed run equals an
uninterrupted one bit for bit (summary, export.npz, metrics.jsonl, TensorBoard).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.trainer import imp
from experiments.trainer import preemption
from experiments.trainer import train
from tests.test_trainer_faults import CONFIG
from tests.test_trainer_faults import REPO
from tests.test_trainer_faults import assert_same_run
from tests.test_trainer_faults import env
from tests.test_trainer_faults import metrics_without_clock
from tests.test_trainer_faults import read_export
from tests.test_trainer_faults import reference_run
from tests.test_trainer_faults import small_config  # pylint: disable=unused-import

from experiments.configs import default  # pylint: disable=g-bad-import-order,unused-import


def preemption_config():
  """80 steps as the main job dispatches them (10 per dispatch), logged every 25.

  31 steps/epoch, mask updates every 10 steps: dispatches end at 9, 10, 19, 20, 25,
  29, 30, 31, 39, 40, 49, 50, ...; checkpoints at 60 and 80 only. Step 49 ends a
  dispatch that logs nothing (the record at 50 averages steps 41-50).
  """
  config = small_config()
  config.log_every_steps = 25
  config.checkpoint_every_steps = 60
  assert config.steps_per_dispatch == 10
  return config


# ``python -m experiments.main`` with the config above; SIGNAL_AT=<step>:<SIGNAME>
# makes the process send itself that signal as the dispatch starting at <step> is
# fed (it stops when that dispatch ends); SECOND_SIGNAL_IN_SAVE sends it again
# while the checkpoint is being written; SLOW_DISPATCH_S slows each dispatch down
# (for a signal sent from outside).
MAIN_SCRIPT = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from experiments.trainer import checkpoints, feed
    from experiments.configs import default
""") + CONFIG + textwrap.dedent("""
    at = os.environ.get("SIGNAL_AT")
    slow = float(os.environ.get("SLOW_DISPATCH_S", "0"))
    dispatch = feed.Feed.dispatch
    def dispatch_and_signal(self, step, n):
      if at and step == int(at.split(":")[0]):
        os.kill(os.getpid(), getattr(signal, at.split(":")[1]))
      time.sleep(slow)
      return dispatch(self, step, n)
    feed.Feed.dispatch = dispatch_and_signal
    if os.environ.get("SECOND_SIGNAL_IN_SAVE"):
      save = checkpoints.save_checkpoint
      def save_and_signal(mngr, state, step, *args):
        save(mngr, state, step, *args)  # asynchronous: its files are being written
        os.kill(os.getpid(), signal.SIGTERM)
      checkpoints.save_checkpoint = save_and_signal
    sys.argv = ["main", "--config=" + os.environ["CONFIG_FILE"],
                "--workdir=" + os.environ["WORKDIR"]]
    runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
""")

CONFIG_FILE = textwrap.dedent("""
    from experiments.configs import default
""") + CONFIG + textwrap.dedent("""
    def get_config():
      config = small_config()
      config.log_every_steps = 25
      config.checkpoint_every_steps = 60
      return config
""")


def start_main(tmp_path, workdir, **extra_env):
  config_file = tmp_path / "preemption_config.py"
  config_file.write_text(CONFIG_FILE)
  return subprocess.Popen(
      [sys.executable, "-c", MAIN_SCRIPT],
      env=dict(env(), CONFIG_FILE=str(config_file), WORKDIR=workdir, **extra_env),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 80-step run of ``preemption_config``."""
  return reference_run(preemption_config(), str(tmp_path_factory.mktemp("reference")))


def checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit())


def assert_preempted(proc, workdir, step=None, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == preemption.EXIT_CODE, out[-3000:] + err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in (out + err).splitlines() if "Preempted at step" in l]
  assert len(lines) == 1, out[-3000:] + err[-3000:]
  stopped = int(lines[0].split("Preempted at step ")[1].split()[0])
  assert step is None or stopped == step
  assert stopped in checkpoint_steps(workdir)  # a checkpoint at the preemption step
  assert not os.path.exists(os.path.join(workdir, "lock"))  # released
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  return stopped, out, err


@pytest.mark.parametrize("signame,at,stops", [("SIGTERM", 40, 49), ("SIGINT", 62, 69)])
def test_signal_mid_dispatch_checkpoints_that_step_and_resumes_bit_for_bit(
    tmp_path, reference, signame, at, stops):
  workdir = str(tmp_path / "run")
  proc = start_main(tmp_path, workdir, SIGNAL_AT=f"{at}:{signame}")
  # The dispatch from `at` finishes (10 steps, to the step before a mask update).
  assert_preempted(proc, workdir, step=stops)
  assert checkpoint_steps(workdir) == ([stops] if stops < 60 else [60, stops])
  # The records before the preemption, as the uninterrupted run wrote them: none at
  # the preemption step (the uninterrupted run logs none there).
  before = [r for r in reference["metrics"] if r["step"] <= stops]
  assert metrics_without_clock(workdir) == before
  # The lock is gone: the resume starts at once, without a stale-lock warning.
  summary = train.train_and_evaluate(preemption_config(), workdir)
  assert_same_run(workdir, reference, summary)


def test_sigterm_from_outside_and_a_second_one_while_saving(tmp_path, reference):
  workdir = str(tmp_path / "run")
  proc = start_main(tmp_path, workdir, SLOW_DISPATCH_S="0.3", SECOND_SIGNAL_IN_SAVE="1")
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(json.loads(l)["step"] >= 25 for l in open(metrics)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stopped, _, err = assert_preempted(proc, workdir)
  assert 25 <= stopped < 80
  assert "SIGTERM again: already stopping" in err
  summary = train.train_and_evaluate(preemption_config(), workdir)
  assert_same_run(workdir, reference, summary)


def test_signal_handlers_are_restored_after_the_trainer(tmp_path):
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  config = preemption_config()
  config.halt_after_step = 10
  assert train.train_and_evaluate(config, str(tmp_path)) == {"halted_at_step": 10}
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
  config.sparsity.final = 0.5  # raises inside, at the config check of the resume
  with pytest.raises(ValueError, match="sparsity.final"):
    train.train_and_evaluate(config, str(tmp_path))
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


IMP_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from experiments.trainer import feed, imp
    from tests.test_imp import tiny_imp_config
    calls = []
    dispatch = feed.Feed.dispatch
    def dispatch_and_signal(self, step, n):
      calls.append(step)
      if calls.count(4) == 2:  # round 1's dispatch from step 4 (round 0 had one too)
        os.kill(os.getpid(), signal.SIGTERM)
      return dispatch(self, step, n)
    feed.Feed.dispatch = dispatch_and_signal
    config = tiny_imp_config()
    config.imp.num_rounds = 2
    try:
      imp.run_imp(config, sys.argv[1])
    except Exception as e:
      print(type(e).__name__, e.step, flush=True)
      sys.exit(75)
""")


def _without_clock(summary):
  summary = {k: v for k, v in summary.items() if k not in ("wall_time_s", "timings")}
  summary["rounds"] = [{k: v for k, v in r.items() if k != "wall_time_s"}
                       for r in summary["rounds"]]
  return summary


def test_imp_stops_in_a_round_on_sigterm_and_resumes_to_the_same_rounds(tmp_path):
  from tests.test_imp import tiny_imp_config  # pylint: disable=g-import-not-at-top
  config = tiny_imp_config()
  config.imp.num_rounds = 2
  reference = imp.run_imp(config, str(tmp_path / "reference"))
  workdir = str(tmp_path / "run")
  out = subprocess.run([sys.executable, "-c", IMP_SCRIPT, workdir], env=env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.stdout.strip().splitlines()[-1] == "Preempted 8", out.stderr[-3000:]
  round_1 = os.path.join(workdir, "round_1")
  assert checkpoint_steps(round_1)[-1] == 8 and not os.path.exists(
      os.path.join(round_1, "lock"))
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  summary = imp.run_imp(config, workdir)
  assert _without_clock(summary) == _without_clock(reference)
  a = read_export(round_1)
  b = read_export(str(tmp_path / "reference" / "round_1"))
  assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


MULTIHOST_WORKER = textwrap.dedent(r"""
    import json, os, signal, sys
    import numpy as np
    from experiments.trainer import feed, preemption, train
    from experiments.configs import default
    workdir, process_id, port, signal_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    dispatch = feed.Feed.dispatch
    def dispatch_and_signal(self, step, n):
      if process_id == 1 and step == signal_at:  # only process 1 is told
        os.kill(os.getpid(), signal.SIGTERM)
      return dispatch(self, step, n)
    feed.Feed.dispatch = dispatch_and_signal
    config = default.lenet300_mnist5k("granet", "sparsity=0.9,seed=5")
    config.num_train_steps = 20
    config.sparsity.update_every = 10
    config.sparsity.end_epoch = 0.5  # dispatches end at 9, 10 (the event alone), 20
    config.log_every_steps = 10
    config.checkpoint_every_steps = 20
    config.distributed = True
    config.coordinator_address = f"127.0.0.1:{port}"
    config.num_processes, config.process_id = 2, process_id
    try:
      summary = train.train_and_evaluate(config, workdir)
      print(json.dumps({"steps": summary["steps"]}), flush=True)
    except preemption.Preempted as e:
      print(json.dumps({"preempted": e.step}), flush=True)
""")


def _two_processes(workdir, signal_at):
  from tests import multidevice  # pylint: disable=g-import-not-at-top
  from tests.test_multihost import TIMEOUT_S, _free_port, _wait  # pylint: disable=g-import-not-at-top
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", MULTIHOST_WORKER, workdir, str(i), str(port), str(signal_at)],
      env=multidevice.env(2, JAX_PLATFORMS="cpu"), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  return [records[-1] for records in _wait(procs, time.time() + TIMEOUT_S)]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_hosts_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
  reference = str(tmp_path / "reference")
  assert _two_processes(reference, signal_at=-1) == [{"steps": 20}] * 2
  workdir = str(tmp_path / "run")
  # Process 1 gets SIGTERM as the dispatch of steps 1-9 is fed; process 0 never does.
  assert _two_processes(workdir, signal_at=0) == [{"preempted": 9}] * 2
  assert checkpoint_steps(workdir) == [9]
  assert not os.path.exists(os.path.join(workdir, "lock"))
  assert _two_processes(workdir, signal_at=-1) == [{"steps": 20}] * 2
  assert metrics_without_clock(workdir) == metrics_without_clock(reference)
  a, b = read_export(workdir), read_export(reference)
  assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
  with open(os.path.join(workdir, "summary.json")) as f, \
      open(os.path.join(reference, "summary.json")) as g:
    a, b = json.load(f), json.load(g)
  for s in (a, b):  # what differs: the wall clock and the coordinator's free port
    del s["wall_time_s"], s["timings"], s["config"]["coordinator_address"]
  assert a == b
