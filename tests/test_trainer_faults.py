"""The trainer under faults: kills, corrupted checkpoints, a second process, reruns.

Each test reproduces a fault the way it happens (a real SIGKILL, real file
corruption, a real second process) and checks that the run's results (summary,
export.npz, metrics.jsonl, TensorBoard) are what an uninterrupted run writes.
"""

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from experiments.trainer import train
from experiments.trainer import workdir as workdir_lib
from experiments.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALL_CLOCK = ("wall_time_s", "steps_per_s")

CONFIG = """
def small_config(steps=80):
  config = default.lenet300_mnist5k("granet", "sparsity=0.9,seed=3")
  config.num_train_steps = steps
  config.sparsity.update_every = 10
  config.sparsity.end_epoch = 1.0  # 39 steps/epoch: events at 10, 20, 30 prune
  config.log_every_steps = 10
  config.checkpoint_every_steps = 20
  return config
"""
exec(CONFIG)  # small_config, shared with the subprocesses below


def env():
  return dict(os.environ, PYTHONPATH=REPO)


def summary_without_clock(summary):
  summary = json.loads(json.dumps(summary, default=str))  # as summary.json holds it
  return {k: v for k, v in summary.items() if k not in ("wall_time_s", "timings")}


def metrics_without_clock(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in WALL_CLOCK} for l in f]


def read_export(workdir):
  with np.load(os.path.join(workdir, "export.npz")) as f:
    return dict(f)


def tensorboard_scalars(workdir):
  """{(tag, step): value} as TensorBoard shows it, applying purge (SessionLog.START).

  Raises if a (tag, step) is shown twice.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  shown = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:  # START
        shown = {k: v for k, v in shown.items() if k[1] < event.step}
      for value in event.summary.value:
        key = (value.tag, event.step)
        assert key not in shown, f"TensorBoard shows {key} twice"
        shown[key] = value.simple_value
  return shown


def assert_same_run(workdir, reference, summary):
  assert summary_without_clock(summary) == summary_without_clock(reference["summary"])
  with open(os.path.join(workdir, "summary.json")) as f:
    assert summary_without_clock(json.load(f)) == summary_without_clock(reference["summary"])
  assert metrics_without_clock(workdir) == reference["metrics"]
  a, b = read_export(workdir), reference["export"]
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  tb = tensorboard_scalars(workdir)
  assert {k: v for k, v in tb.items() if k[0] not in WALL_CLOCK} == reference["tensorboard"]


def reference_run(config, workdir: str) -> dict:
  """An uninterrupted run's results, as ``assert_same_run`` compares them."""
  summary = train.train_and_evaluate(config, workdir)
  tb = tensorboard_scalars(workdir)
  return {"summary": summary, "metrics": metrics_without_clock(workdir),
          "export": read_export(workdir),
          "tensorboard": {k: v for k, v in tb.items() if k[0] not in WALL_CLOCK}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 80-step run."""
  return reference_run(small_config(), str(tmp_path_factory.mktemp("reference")))


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from experiments.trainer import checkpoints, reporting, train
    from experiments.configs import default
""") + CONFIG + textwrap.dedent("""
    workdir, when = sys.argv[1], sys.argv[2]
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if when == "during_checkpoint":  # the step-40 save started, its files being written
      save = checkpoints.save_checkpoint
      def save_then_kill(mngr, state, step, *args):
        save(mngr, state, step, *args)
        if step == 40:
          kill()
      checkpoints.save_checkpoint = save_then_kill
    elif when == "after_checkpoint":  # past the step-40 checkpoint, step 50 logged
      write = reporting.MetricWriter.write
      def write_then_kill(self, record):
        write(self, record)
        if record["step"] == 50:
          kill()
      reporting.MetricWriter.write = write_then_kill
    elif when == "before_summary":  # every checkpoint written, no export or summary yet
      train.export_model = lambda *args: kill()
    train.train_and_evaluate(small_config(), workdir)
""")


@pytest.mark.parametrize("when", ["during_checkpoint", "after_checkpoint", "before_summary"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, when):
  workdir = str(tmp_path / "run")
  out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, workdir, when], env=env(),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  t = time.time()
  summary = train.train_and_evaluate(small_config(), workdir)
  # The wall time of the killed segment (up to its checkpoint) counts too.
  assert summary["wall_time_s"] > time.time() - t
  assert_same_run(workdir, reference, summary)


@pytest.fixture(scope="module")
def halted_at_40(tmp_path_factory):
  """A run killed (halted) right after its step-40 checkpoint: checkpoints 20 and 40."""
  workdir = str(tmp_path_factory.mktemp("halted"))
  config = small_config()
  config.halt_after_step = 40
  assert train.train_and_evaluate(config, workdir) == {"halted_at_step": 40}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  return workdir


def _largest_array_file(ckpt):
  files = glob.glob(os.path.join(ckpt, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _truncate(ckpt):
  path = _largest_array_file(ckpt)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(ckpt):
  path = _largest_array_file(ckpt)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _bad_meta(ckpt):
  with open(os.path.join(ckpt, "meta", "metadata"), "w") as f:
    f.write('{"step": 40, "best_test')


def _bad_state_metadata(ckpt):
  with open(os.path.join(ckpt, "state", "_METADATA"), "wb") as f:
    f.write(b"\x80\x81\xfe not json")


@pytest.mark.parametrize("corrupt", [_truncate, _flip_bytes, _bad_meta, _bad_state_metadata],
                         ids=["truncated", "flipped_bytes", "bad_meta", "bad_METADATA"])
def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(
    tmp_path, reference, halted_at_40, caplog, corrupt):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted_at_40, workdir)
  ckpt = os.path.join(workdir, "checkpoints", "40")
  corrupt(ckpt)
  with caplog.at_level(logging.WARNING, logger="sparse_jax.train"):
    summary = train.train_and_evaluate(small_config(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(ckpt in w and "cannot be read" in w for w in warnings), warnings
  # Kept, out of orbax's way (not garbage-collected, not overwritten by the new 40).
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "40"))
  assert_same_run(workdir, reference, summary)


def test_every_checkpoint_unreadable_is_an_error_that_changes_nothing(tmp_path, halted_at_40):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted_at_40, workdir)
  for step in ("20", "40"):
    _bad_state_metadata(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(RuntimeError, match="No checkpoint .* can be read"):
    train.train_and_evaluate(small_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]


def test_a_resume_that_changes_how_masks_are_stored_is_refused(tmp_path, halted_at_40):
  # The checkpoints hold bool masks; packed ones (PackedMask leaves) could not be
  # restored from them, so the change is refused, allow_changed or not, before any
  # compiling, and the workdir stays as it was.
  workdir = str(tmp_path / "run")
  shutil.copytree(halted_at_40, workdir)
  before = _snapshot(workdir)
  config = small_config()
  config.sparsity.packed_masks = True
  config.allow_changed = "sparsity.packed_masks"
  with pytest.raises(ValueError, match=r"sparsity.packed_masks=False.*resume with "
                                       r"--config.sparsity.packed_masks=False"):
    train.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before


def _snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = (hashlib.sha256(f.read()).hexdigest(),
                                               os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def finished_40(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  summary = train.train_and_evaluate(small_config(40), workdir)
  return workdir, summary


def test_rerun_of_a_finished_workdir_reports_it_and_touches_nothing(finished_40):
  workdir, summary = finished_40
  before = _snapshot(workdir)
  again = train.train_and_evaluate(small_config(40), workdir)
  assert again == json.loads(json.dumps(summary, default=str))
  assert _snapshot(workdir) == before


def test_restart_moves_the_finished_run_aside(tmp_path, finished_40):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_40[0], workdir)
  before = _snapshot(workdir)
  config = small_config(40)
  config.if_finished = "restart"
  summary = train.train_and_evaluate(config, workdir)
  same = lambda s: {k: v for k, v in summary_without_clock(s).items() if k != "config"}
  assert same(summary) == same(finished_40[1])
  (previous,) = os.listdir(os.path.join(workdir, "previous"))
  kept = _snapshot(os.path.join(workdir, "previous", previous))
  assert {k: v[0] for k, v in kept.items()} == {k: v[0] for k, v in before.items()}


def test_extend_trains_a_finished_run_further(tmp_path, finished_40):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_40[0], workdir)
  config = small_config(60)
  config.if_finished = "extend"
  summary = train.train_and_evaluate(config, workdir)
  assert summary["steps"] == 60
  steps = [r["step"] for r in metrics_without_clock(workdir)]
  assert steps == sorted(set(steps)) and steps[-1] == 60
  (previous,) = os.listdir(os.path.join(workdir, "previous"))
  with open(os.path.join(workdir, "previous", previous, "summary.json")) as f:
    assert json.load(f)["steps"] == 40
  bad = small_config(60)
  bad.if_finished = "extend"
  bad.sparsity.final = 0.5
  shutil.copytree(finished_40[0], str(tmp_path / "run3"))
  with pytest.raises(ValueError, match=r"sparsity.final: 0.9 -> 0.5"):
    train.train_and_evaluate(bad, str(tmp_path / "run3"))


def test_resume_with_a_different_config_stops_and_names_the_fields(tmp_path, halted_at_40):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted_at_40, workdir)
  before = _snapshot(workdir)
  config = small_config()
  config.sparsity.final = 0.5
  config.learning_rate = 0.05
  with pytest.raises(ValueError, match=r"learning_rate: 0.1 -> 0.05; sparsity.final: "
                                       r"0.9 -> 0.5"):
    train.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before
  # Logging and checkpoint frequencies may change.
  config = small_config()
  config.log_every_steps = 5
  config.checkpoint_every_steps = 40
  assert train.train_and_evaluate(config, workdir)["steps"] == 80


HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from experiments.trainer import checkpoints, train
    from experiments.configs import default
""") + CONFIG + textwrap.dedent("""
    save = checkpoints.save_checkpoint
    def save_and_wait(mngr, state, step, *args):
      save(mngr, state, step, *args)
      if step == 20:
        mngr.wait_until_finished()
        print("checkpointed", flush=True)
        time.sleep(600)  # a long run, still going
    checkpoints.save_checkpoint = save_and_wait
    train.train_and_evaluate(small_config(), sys.argv[1])
""")


def test_second_run_on_a_workdir_in_use_is_refused(tmp_path, reference, caplog):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, workdir], env=env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "checkpointed"
    before = _snapshot(workdir)
    with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {holder.pid} on"):
      train.train_and_evaluate(small_config(), workdir)
    assert _snapshot(workdir) == before
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder is gone: its lock is stale and the run resumes from its checkpoint.
  with caplog.at_level(logging.WARNING, logger="sparse_jax.train"):
    summary = train.train_and_evaluate(small_config(), workdir)
  assert any("stale lock" in r.getMessage() and str(holder.pid) in r.getMessage()
             for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, "lock"))
  assert_same_run(workdir, reference, summary)


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = small_config(40)
  config.lr_schedule = "multistep"
  config.lr_milestones = (0.5,)  # from step 20 on the learning rate is 1e29
  config.lr_decay_factor = 1e30
  with pytest.raises(FloatingPointError, match=r"Step (\d+): the loss or a gradient is NaN") \
      as err:
    train.train_and_evaluate(config, str(tmp_path))
  bad = int(err.value.args[0].split()[1].rstrip(":"))
  assert 20 < bad <= 30
  assert os.listdir(tmp_path / "checkpoints") == ["20"]
  assert not (tmp_path / "summary.json").exists()
  steps = [r["step"] for r in metrics_without_clock(str(tmp_path))]
  assert max(steps) < bad


def test_config_mistake_exits_2_with_one_line_and_no_workdir(tmp_path):
  workdir = tmp_path / "never"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/granet_lenet300_mnist5k.py",
       "--config.sparsity.method=grannet", f"--workdir={workdir}"],
      env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "error: Unknown sparse method 'grannet'" in out.stderr
  assert "Traceback" not in out.stderr
  assert not workdir.exists()


def test_schedule_that_never_prunes_is_an_error_before_data_or_workdir(tmp_path, monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("training data read before the schedule was checked")
  monkeypatch.setattr(train.input_pipeline, "load_arrays", must_not_run)
  config = default.lenet300_mnist5k("granet", None)
  config.num_epochs = 4
  config.sparsity.end_epoch = 3  # step 93 at 31 steps/epoch, before the first event (100)
  with pytest.raises(ValueError, match=r"end_epoch=3.0 step 93\).*lower update_every"):
    train.train_and_evaluate(config, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
