"""The trainer's side files under faults: failed writes, damaged files, planted links.

A run writes ``metrics.jsonl``, TensorBoard's event file, ``config.json``,
``summary.json``, ``export.npz``, ``mask_history.npz``, its lock and orbax
checkpoints. Each test makes the fault happen for real: a file-size limit
(``RLIMIT_FSIZE``, what ``ulimit -f`` sets: writes past it fail with EFBIG, as on
a full disk), a damaged file, a symbolic link. Whatever fails, the run stops
with one line naming the file, the cause and the fix, leaves no temporary file,
changes nothing already saved, and a rerun gives the uninterrupted run.
"""

import contextlib
import errno
import glob
import json
import os
import resource
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.trainer import exports
from experiments.trainer import flops as flops_lib
from experiments.trainer import mask_history
from experiments.trainer import reporting
from experiments.trainer import train
from experiments.trainer import workdir as workdir_lib
from tests.test_trainer_faults import REPO
from tests.test_trainer_faults import _snapshot
from tests.test_trainer_faults import assert_same_run
from tests.test_trainer_faults import env
from tests.test_trainer_faults import halted_at_40  # pylint: disable=unused-import
from tests.test_trainer_faults import reference  # pylint: disable=unused-import
from tests.test_trainer_faults import small_config

# small_config() as experiments.main arguments.
MAIN_ARGS = ["--config=experiments/configs/granet_lenet300_mnist5k.py:sparsity=0.9,seed=3",
             "--config.num_train_steps=80", "--config.sparsity.update_every=10",
             "--config.sparsity.end_epoch=1.0", "--config.log_every_steps=10",
             "--config.checkpoint_every_steps=20"]
EFBIG_LINE = "[Errno 27] File too large (file-size limit, see ulimit -f)"


@contextlib.contextmanager
def file_size_limit(nbytes):
  """A real file-size limit on this process (Python ignores SIGXFSZ: writes get EFBIG)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# Sets the limit, then becomes the command (no preexec_fn: a fork of this
# multithreaded process must not run Python before exec).
LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def run_main(workdir, limit=None):
  """``python -m experiments.main`` on ``small_config``, under a file-size limit."""
  prefix = [sys.executable] if limit is None else [sys.executable, "-c", LIMITED, str(limit)]
  return subprocess.run([*prefix, "-m", "experiments.main", *MAIN_ARGS,
                         f"--workdir={workdir}"], env=env(), cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def error_line(out, traceback_free=True):
  """The one line a failed run ends with, exit status 2, and no traceback.

  ``traceback_free=False``: orbax and tensorstore print their own (a failed
  save thread, a callback after their event loop closed), even after our line.
  """
  assert out.returncode == 2, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  if traceback_free:
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert lines[-1].startswith("error: "), out.stderr[-3000:]
  (line,) = [l for l in lines if l.startswith("error: ")]
  return line


def leftovers(workdir):
  """Temporary files or directories anywhere in ``workdir``."""
  return [p for p in glob.glob(os.path.join(workdir, "**"), recursive=True)
          if ".tmp" in os.path.basename(p) or p.endswith("orbax-checkpoint-tmp")]


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


# ---------------------------------------------------------------------------
# Item 2: failed writes.
# ---------------------------------------------------------------------------


def _masks_tree():
  return {"a": {"kernel": np.arange(4000).reshape(40, 100) % 3 == 0}}


WRITERS = {
    "config.json": lambda path: workdir_lib.write_json(path, {"x": list(range(5000))}),
    "export.npz": lambda path: exports.export_model(
        path, {"a": {"kernel": np.ones((40, 100), np.float32)}}, None, _masks_tree()),
    "mask_history.npz": lambda path: _history(np.random.default_rng(0)).save(path),
}


def _history(rng):
  h = mask_history.MaskHistory(names=["a/kernel"], shapes=[(400, 100)])
  for step in range(5):
    h.append(step, [rng.random((400, 100)) < 0.5])
  return h


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_atomic_writer_past_the_file_size_limit_keeps_the_old_file(tmp_path, name):
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(b"the previous version")
  with file_size_limit(1000), pytest.raises(workdir_lib.WriteFailed) as err:
    WRITERS[name](path)
  assert err.value.errno == errno.EFBIG and err.value.path == path
  assert str(err.value).startswith(f"cannot write {path}: {EFBIG_LINE}; free space")
  assert read_bytes(path) == b"the previous version"
  assert os.listdir(tmp_path) == [name]  # no temporary file left
  WRITERS[name](path)  # without the limit: written whole
  assert os.listdir(tmp_path) == [name] and os.path.getsize(path) > 1000


def test_failed_metrics_append_leaves_no_half_line(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path), True)
  writer.write({"step": 10, "train_loss": 1.0})
  before = read_bytes(writer.path)
  with file_size_limit(len(before) + 20), pytest.raises(workdir_lib.WriteFailed) as err:
    writer.write({"step": 20, "train_loss": 0.5, "note": "x" * 100})
  assert err.value.path == writer.path and err.value.errno == errno.EFBIG
  assert read_bytes(writer.path) == before
  writer.close()
  assert reporting.MetricWriter(str(tmp_path), True, start_step=10)._tb is not None
  assert read_bytes(writer.path) == before


def test_failed_metrics_rewrite_on_resume_keeps_the_file(tmp_path):
  lines = [json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (10, 20, 30)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(lines))
  with file_size_limit(10), pytest.raises(workdir_lib.WriteFailed) as err:
    reporting.MetricWriter(str(tmp_path), True, start_step=20)  # drops step 30
  assert err.value.path == str(path)
  assert path.read_text() == "".join(lines)
  assert not leftovers(str(tmp_path))


def test_failed_tensorboard_write_raises_in_the_trainer(tmp_path):
  """tensorboardX's writer thread would die with a traceback, then block the run."""
  writer = reporting.MetricWriter(str(tmp_path), True)
  (event_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.*"))
  size = os.path.getsize(event_file)
  with file_size_limit(size + 10), pytest.raises(workdir_lib.WriteFailed) as err:
    for step in range(1, 50):
      writer.write({"step": step, "train_loss": 1.0 / step})
  assert err.value.path == event_file and err.value.errno == errno.EFBIG
  writer.close()  # already reported: no second error


@pytest.fixture(scope="module")
def export_failed(tmp_path_factory, reference):  # pylint: disable=redefined-outer-name
  """A run whose export.npz (~1.3 MB) passes the limit; every other file is below 250 kB."""
  del reference  # computed first: the subprocess compiles nothing
  workdir = str(tmp_path_factory.mktemp("export_failed") / "run")
  return workdir, run_main(workdir, limit=600_000)


def test_failed_export_is_one_line_and_the_rerun_finishes_the_run(export_failed, reference):  # pylint: disable=redefined-outer-name
  workdir, out = export_failed
  line = error_line(out)
  assert line == (f"error: cannot write {workdir}/export.npz: {EFBIG_LINE}; free space or "
                  "raise the limit, then rerun: the run resumes from its last checkpoint")
  assert not leftovers(workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert "80" in os.listdir(os.path.join(workdir, "checkpoints"))
  summary = train.train_and_evaluate(small_config(), workdir)
  assert_same_run(workdir, reference, summary)


def test_failed_checkpoint_save_is_one_line_and_never_taken_as_a_checkpoint(
    tmp_path, reference):  # pylint: disable=redefined-outer-name
  workdir = str(tmp_path / "run")
  out = run_main(workdir, limit=50_000)  # the checkpoint's arrays (~200 kB) do not fit
  line = error_line(out, traceback_free=False)
  assert line.startswith(f"error: cannot write {workdir}/checkpoints/20: {EFBIG_LINE}; "), line
  assert not leftovers(workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert all(json.loads(l) for l in f)
  summary = train.train_and_evaluate(small_config(), workdir)
  assert_same_run(workdir, reference, summary)


# ---------------------------------------------------------------------------
# Item 7: metrics.jsonl faults on resume.
# ---------------------------------------------------------------------------


def _copy(halted, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted, workdir)
  return workdir, os.path.join(workdir, "metrics.jsonl")


def _lines(path):
  with open(path) as f:
    return f.read().splitlines(keepends=True)


def _write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines(lines)


@pytest.mark.parametrize("bad", ["null\n", "[1, 2]\n", "garbage\n", "\n", '{"loss": 1}\n'])
def test_a_line_that_is_not_a_record_is_named_on_resume(tmp_path, halted_at_40, bad):  # pylint: disable=redefined-outer-name
  workdir, path = _copy(halted_at_40, tmp_path)
  lines = _lines(path)
  _write_lines(path, lines[:2] + [bad] + lines[2:])
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirDamaged,
                     match=rf"{path} line 3 is not a step's record .*Delete or repair"):
    train.train_and_evaluate(small_config(), workdir)
  assert _snapshot(workdir) == before


def test_cut_record_of_a_step_up_to_the_checkpoint_is_an_error(tmp_path, halted_at_40):  # pylint: disable=redefined-outer-name
  workdir, path = _copy(halted_at_40, tmp_path)
  lines = _lines(path)
  assert json.loads(lines[-1])["step"] == 40
  _write_lines(path, lines[:-1] + [lines[-1][:30]])
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirDamaged,
                     match=rf"{path} line {len(lines)}, the record of step 40, is cut short"):
    train.train_and_evaluate(small_config(), workdir)
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("cut", [12, 3])  # '{"step": 50,' and '{"s' (its step unknown)
def test_cut_last_line_after_the_checkpoint_is_dropped(tmp_path, halted_at_40, reference, cut):  # pylint: disable=redefined-outer-name
  """What a kill while appending the record of step 50 leaves."""
  workdir, path = _copy(halted_at_40, tmp_path)
  record = json.dumps({"step": 50, "epoch": 1.28, "train_loss": 0.3}) + "\n"
  _write_lines(path, _lines(path) + [record[:cut]])
  summary = train.train_and_evaluate(small_config(), workdir)
  assert_same_run(workdir, reference, summary)


@pytest.mark.parametrize("damage", ["emptied", "event_line_deleted", "removed"])
def test_missing_event_records_stop_the_resume_before_a_wrong_summary(
    tmp_path, halted_at_40, damage):  # pylint: disable=redefined-outer-name
  """summary.json's train_flops_vs_dense is computed from the events' layer densities."""
  workdir, path = _copy(halted_at_40, tmp_path)
  lines = _lines(path)
  if damage == "emptied":
    _write_lines(path, [])
    missing = "steps 10, 20, 30, 40"
  elif damage == "event_line_deleted":
    _write_lines(path, [l for l in lines if json.loads(l)["step"] != 20])
    missing = "step 20"
  else:
    os.remove(path)
    missing = "steps 10, 20, 30, 40"
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirDamaged,
                     match=rf"{path} has no record of the mask-update {missing}, at or before "
                           r"the checkpoint at step 40: summary.json's FLOPs"):
    train.train_and_evaluate(small_config(), workdir)
  assert _snapshot(workdir) == before


def test_event_densities_refuses_a_damaged_file(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 10, "mask_update": true, '
                                          '"layer_density": {"a": 0.5}}\nnull\n')
  with pytest.raises(workdir_lib.WorkdirDamaged, match="metrics.jsonl line 2 is not"):
    flops_lib.event_densities(str(tmp_path))


# ---------------------------------------------------------------------------
# Item 8: damaged config.json, summary.json, mask_history.npz.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [("config.json", "garbage"), ("config.json", "null"),
                                          ("summary.json", "garbage"),
                                          ("summary.json", "[1]")])
def test_damaged_json_file_is_one_line_naming_it(tmp_path, name, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / name).write_text(content)
  out = run_main(str(workdir))
  line = error_line(out)
  assert line.startswith(f"error: {workdir / name} is not "), line
  assert ("delete it (the run writes it again)" in line if name == "config.json"
          else "move it away" in line), line
  assert os.listdir(workdir) == [name] and (workdir / name).read_text() == content


def _tree(fill):
  return {"l0": {"kernel": jnp.full((4, 6), fill)}}


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_resume_without_a_readable_mask_history_is_an_error(tmp_path, damage):
  rec = mask_history.Recorder.for_run(str(tmp_path), _tree(True), start_step=0,
                                      final_sparsity=0.5)
  rec.save()
  path = tmp_path / mask_history.FILENAME
  if damage == "garbage":
    path.write_bytes(b"PK\x03\x04 not a zip file")
  else:
    path.unlink()
  with pytest.raises(workdir_lib.WorkdirDamaged,
                     match=rf"{path} (cannot be read|is missing).*events up to step 10"):
    mask_history.Recorder.for_run(str(tmp_path), _tree(True), start_step=10,
                                  final_sparsity=0.5)


# ---------------------------------------------------------------------------
# Item 9: a symbolic link in the workdir's path, planted links in the workdir.
# ---------------------------------------------------------------------------


def test_workdir_through_a_symlink_keeps_every_file_in_one_place(tmp_path):
  (tmp_path / "real" / "sub").mkdir(parents=True)
  os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
  config = small_config(40)
  config.halt_after_step = 20
  workdir = str(tmp_path / "link" / ".." / "run")  # the kernel: real/run; abspath: run
  assert train.train_and_evaluate(config, workdir) == {"halted_at_step": 20}
  assert not (tmp_path / "run").exists()
  physical = tmp_path / "real" / "run"
  assert {"config.json", "checkpoints", "metrics.jsonl"} <= set(os.listdir(physical))
  assert os.listdir(physical / "checkpoints") == ["20"]


def _outside(tmp_path):
  target = tmp_path / "precious.txt"
  target.write_text("not the run's\n")
  return target


def test_planted_lock_link_is_refused_and_not_written_through(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  target = _outside(tmp_path)
  os.symlink(target, workdir / "lock")
  with pytest.raises(workdir_lib.WorkdirDamaged,
                     match=rf"{workdir / 'lock'} is a symbolic link \(to {target}\).*Remove"):
    with workdir_lib.WorkdirLock(str(workdir)):
      pass
  assert target.read_text() == "not the run's\n"
  assert os.path.islink(workdir / "lock")


def test_planted_metrics_link_is_refused_and_not_written_through(tmp_path):
  target = _outside(tmp_path)
  os.symlink(target, tmp_path / "metrics.jsonl")
  with pytest.raises(workdir_lib.WorkdirDamaged, match="metrics.jsonl is a symbolic link"):
    reporting.MetricWriter(str(tmp_path), True)
  os.remove(tmp_path / "metrics.jsonl")
  writer = reporting.MetricWriter(str(tmp_path), True)
  writer.write({"step": 1, "train_loss": 1.0})
  os.remove(tmp_path / "metrics.jsonl")
  os.symlink(target, tmp_path / "metrics.jsonl")  # planted while the run goes on
  with pytest.raises(workdir_lib.WriteFailed, match=r"metrics.jsonl: \[Errno 40\]"):
    writer.write({"step": 2, "train_loss": 0.5})
  writer.close()
  assert target.read_text() == "not the run's\n"


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_atomic_writers_replace_a_planted_link(tmp_path, name):
  target = _outside(tmp_path)
  os.symlink(target, tmp_path / name)
  WRITERS[name](str(tmp_path / name))
  assert not os.path.islink(tmp_path / name)
  assert target.read_text() == "not the run's\n"


@contextlib.contextmanager
def full_disk(directory, size="64k"):
  """A real full disk: a small tmpfs at ``directory``, filled; skips where it cannot mount."""
  os.makedirs(directory)
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    pytest.skip(f"cannot mount a tmpfs here (root only): {out.stderr.strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("name", sorted(WRITERS) + ["metrics.jsonl"])
def test_writers_on_a_full_disk_keep_the_old_file(tmp_path, name):
  disk = tmp_path / "disk"
  with full_disk(disk):
    path = str(disk / name)
    old = b'{"step": 1}\n' if name == "metrics.jsonl" else b"the previous version"
    with open(path, "wb") as f:
      f.write(old)
    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as full:  # fill what is left
      while True:
        os.write(fd, b"\0" * 4096)
    os.close(fd)
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(workdir_lib.WriteFailed) as err:
      if name == "metrics.jsonl":  # more than the page it has begun: a partial write
        workdir_lib.append_all(path, b'{"step": 2, "train_loss": 0.5}\n' * 200)
      else:
        WRITERS[name](path)
    assert str(err.value).startswith(
        f"cannot write {path}: [Errno 28] No space left on device (disk full); free space")
    assert read_bytes(path) == old
    assert sorted(os.listdir(disk)) == sorted([name, "ballast"])
