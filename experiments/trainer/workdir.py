"""A run's workdir: one run at a time, the config it belongs to, a finished result kept.

``<workdir>/``
  ``lock``         held by the running process (``WorkdirLock``): pid, host, start time;
  ``config.json``  the config the run was started with, written once at its start;
                   a resume whose config differs in a field that changes results
                   stops with the differing fields (``check_config``), unless they
                   are named in ``config.allow_changed``: then the new values are
                   written here and each change is appended, with the step it
                   applies from, to ``config_changes.jsonl``;
  ``summary.json`` the finished run's result: a rerun reports it and touches nothing,
                   unless ``config.if_finished`` is ``"extend"`` (train on to a larger
                   ``num_epochs``/``num_train_steps``) or ``"restart"``;
  ``previous/``    what an extend or restart moved aside (never deleted);
  ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``export.npz``.

Files are written whole or not at all (``write_atomic``: a temporary file renamed
over the old one, which also replaces a planted link rather than writing through
it); a write that fails (a full disk, a file-size limit) raises ``WriteFailed``
naming the file and the cause, with the temporary file removed and the old file
as it was. A file that is not what a run writes there (damaged, or a symbolic
link where the lock or ``metrics.jsonl`` should be) raises ``WorkdirDamaged``
naming it and the fix. The trainer takes the workdir by its physical path
(``os.path.realpath``), so a path through a symbolic link names one directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import socket
import time
from typing import BinaryIO, Callable

FINISHED_MODES = ("report", "extend", "restart")
# Fields a resumed run may change: how often it logs, evaluates, checkpoints or
# dispatches, where the data and compile cache live, how processes connect and
# how the state is laid out on devices (the results stay the same).
RESUMABLE_FIELDS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
    "eval_batch_size", "gradient_flow_every_steps", "halt_after_step",
    "compilation_cache_dir", "steps_per_dispatch", "host_mask_updates", "data_dir",
    "distributed", "coordinator_address", "num_processes", "process_id", "parallelism",
    "param_sharding", "mesh_shape", "if_finished", "nonfinite", "allow_changed"})
EXTEND_FIELDS = frozenset({"num_epochs", "num_train_steps"})
# Fields that set how the checkpointed state is stored: its checkpoints could not be
# restored into a state stored otherwise, so a resume keeps them (allow_changed or not).
STORAGE_FIELDS = frozenset({"sparsity.packed_masks"})

log = logging.getLogger("sparse_jax.train")


class WorkdirLocked(RuntimeError):
  """Another live process is running in this workdir."""


class WriteFailed(OSError):
  """A file of the run could not be written (a full disk, a file-size limit, ...).

  ``path`` names the file, ``cause`` the error behind it. Whatever raises it has
  removed its temporary files and left the file's previous version as it was;
  ``experiments.main`` reports it in one line (exit status 2).
  """

  ADVICE = ("free space or raise the limit, then rerun: the run resumes from its last "
            "checkpoint")

  def __init__(self, path: str, cause: BaseException, advice: str = ADVICE):
    super().__init__(getattr(cause, "errno", None), describe_error(cause), path)
    self.path, self.cause, self.advice = path, cause, advice

  def __str__(self):
    return f"cannot write {self.path}: {describe_error(self.cause)}; {self.advice}"


class WorkdirDamaged(ValueError):
  """A file in the workdir is not what a run writes there (damaged, or a planted link)."""


# What an errno most likely means for a run (the kernel's words say "File too large").
_ERRNO_HINTS = {errno.EFBIG: "file-size limit, see ulimit -f", errno.ENOSPC: "disk full",
                errno.EDQUOT: "disk quota exceeded"}


def describe_error(e: BaseException) -> str:
  """``[Errno 27] File too large (file-size limit, see ulimit -f)``; else ``str(e)``."""
  code = getattr(e, "errno", None)
  if code is None:  # tensorstore (orbax) puts the errno in its message
    m = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(m.group(1)) if m else None
  if code is None:
    return f"{type(e).__name__}: {e}"
  hint = f" ({_ERRNO_HINTS[code]})" if code in _ERRNO_HINTS else ""
  return f"[Errno {code}] {os.strerror(code)}{hint}"


def remove_quietly(path: str):
  """Removes a temporary file if it is there; a failure to is not the error to report."""
  try:
    os.remove(path)
  except OSError:
    pass


@contextlib.contextmanager
def writing(path: str, tmp: str | None = None):
  """Turns an ``OSError`` while writing ``path`` into ``WriteFailed``.

  On any exception (an interrupt too) the temporary file ``tmp`` is removed.
  """
  try:
    yield
  except BaseException as e:
    if tmp is not None:
      remove_quietly(tmp)
    if isinstance(e, OSError) and not isinstance(e, WriteFailed):
      raise WriteFailed(path, e) from e
    raise


def append_all(path: str, data: bytes):
  """Appends ``data`` to ``path``, all of it or nothing (``WriteFailed``); never via a link."""
  with writing(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        view = memoryview(data)
        while view:  # os.write may write part of it (up to a file-size limit)
          view = view[os.write(fd, view):]
      except OSError:
        try:  # no partial line: a resume would drop it, and the record with it
          os.ftruncate(fd, size)
        except OSError:
          pass
        raise
    finally:
      os.close(fd)


def write_atomic(path: str, write: Callable[[BinaryIO], None]):
  """Writes ``path`` with ``write(file)`` through a temporary file: all or nothing.

  The temporary file (beside ``path``, named by host and pid: slices on several
  machines may share one file system) is synced, then renamed over ``path``; a
  link planted at ``path`` is replaced, never written through. A failure raises
  ``WriteFailed`` with the temporary file removed and ``path`` as it was.
  """
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  with writing(path, tmp):
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj):
  """Writes ``obj`` to ``path`` through a temporary file: never a partial file."""
  text = json.dumps(obj, indent=1, default=str).encode()
  write_atomic(path, lambda f: f.write(text))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``<workdir>/lock``, held (``fcntl.flock``) for the life of a run.

  The kernel releases a flock when its process dies, even by SIGKILL, so a lock
  left by a killed run is stale by construction: the next run takes it over with
  a warning naming the dead holder. Where the file system has no flock, the
  holder's host and pid decide (a dead pid on this host is stale; another host's
  lock is trusted). A second live run gets ``WorkdirLocked``.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "lock")
    self.enabled = enabled
    self._fd = None

  def __enter__(self):
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self):
    while True:
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        has_flock = True
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLocked(self._busy_message(holder)) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          os.close(fd)
          raise
        has_flock = False
      try:  # a releasing holder may have removed the file after we opened it
        same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = _read_holder(fd)
    if holder and not has_flock and (holder.get("host") != socket.gethostname()
                                     or _pid_alive(int(holder.get("pid", -1)))):
      os.close(fd)
      raise WorkdirLocked(self._busy_message(holder))
    if holder:
      log.warning("Taking over the stale lock %s of pid %s on %s (started %s): that "
                  "process is gone.", self.path, holder.get("pid"), holder.get("host"),
                  holder.get("started"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _open(self) -> int:
    """The lock file, never through a link: a planted one would be written through."""
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno != errno.ELOOP or not os.path.islink(self.path):
        raise
      raise WorkdirDamaged(
          f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not the lock "
          "file a run keeps in its workdir; a run would write through it. Remove the "
          "link and rerun.") from None

  def release(self):
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while holding it: a waiting opener sees a new inode
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def _busy_message(self, holder) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started "
           f"{holder.get('started')}" if holder else "another process")
    return (f"The workdir {os.path.dirname(self.path)} is in use by {who} ({self.path}). "
            "Wait for that run to end, or use another --workdir. If you are sure no run "
            "is using it (e.g. its host is gone), delete the lock file.")


def _read_holder(fd) -> dict | None:
  try:
    text = os.pread(fd, 4096, 0).decode()
    return json.loads(text) if text.strip() else None
  except (ValueError, UnicodeDecodeError):
    return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}


def read_json_if_present(path: str):
  """The JSON value in ``path``, or None where there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_json_object(path: str, what: str, fix: str) -> dict:
  """The JSON object in ``path``; ``WorkdirDamaged`` naming the file and ``fix`` if not.

  ``what`` says what the file should hold, e.g. "the config the run was started with".
  """
  try:
    with open(path, "rb") as f:
      obj = json.loads(f.read())
    why = None if isinstance(obj, dict) else f"it holds a JSON {type(obj).__name__}"
  except (ValueError, UnicodeDecodeError) as e:
    why = f"{type(e).__name__}: {e}"
  if why is not None:
    raise WorkdirDamaged(f"{path} is not {what} ({why}). {fix}")
  return obj


def finished_summary(workdir: str) -> dict | None:
  """The summary of a finished run in ``workdir``, or None if it has not finished."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  return read_json_object(
      path, "the summary.json a finished run writes",
      "The run's other files are untouched: move it away (or restore it from a copy) "
      "and rerun to finish the run again from its last checkpoint.")


def move_to_previous(workdir: str, names) -> str:
  """Moves ``names`` (those present) of ``workdir`` to ``previous/<time>/``; its path."""
  dst = os.path.join(workdir, "previous", time.strftime("%Y%m%d-%H%M%S"))
  base, n = dst, 1
  while os.path.exists(dst):
    dst, n = f"{base}.{n}", n + 1
  os.makedirs(dst)
  for name in names:
    if os.path.exists(os.path.join(workdir, name)):
      os.rename(os.path.join(workdir, name), os.path.join(dst, name))
  return dst


def prepare_rerun(workdir: str, config, summary: dict) -> None:
  """``config.if_finished`` on a finished workdir: moves the old result aside."""
  mode = config.get("if_finished", "report")
  if mode == "restart":
    keep = {"lock", "previous"}
    moved = move_to_previous(workdir, [n for n in os.listdir(workdir) if n not in keep])
    log.info("Restarting: the finished run's files are in %s.", moved)
    return
  total = config.get("num_train_steps")
  if total is not None and total <= summary["steps"]:
    raise ValueError(f"if_finished='extend' needs more steps than the finished run's "
                     f"{summary['steps']} (num_train_steps={total}).")
  check_config(workdir, config, write=False, extend=True)
  moved = move_to_previous(workdir, ["summary.json", "export.npz"])
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    text = f.read()
  write_atomic(os.path.join(moved, "config.json"), lambda g: g.write(text))
  os.remove(os.path.join(workdir, "config.json"))  # rewritten by check_config
  log.info("Extending the finished run (%d steps); its summary and export are in %s.",
           summary["steps"], moved)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _same(a, b) -> bool:
  """``a == b``, with NaN equal to NaN (a workdir of a NaN field can be resumed)."""
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def config_differences(saved: dict, config_dict: dict, allowed=RESUMABLE_FIELDS) -> list:
  """``(field, saved value, new value)`` of every field outside ``allowed`` that differs.

  ``allowed`` holds field names; a name also covers the fields under it
  (``sparsity`` covers ``sparsity.final``).
  """
  a = _flat(saved)
  b = _flat(json.loads(json.dumps(config_dict, default=str)))
  covered = lambda k: any(k == n or k.startswith(n + ".") for n in allowed)
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted({*a, *b})
          if not covered(k) and not _same(a.get(k, "<absent>"), b.get(k, "<absent>"))]


def allowed_changes(config) -> frozenset:
  """The field names of ``config.allow_changed`` (``"learning_rate,weight_decay"``).

  Each is checked to be a field by ``config_checks.validate``.
  """
  return frozenset(n.strip() for n in str(config.get("allow_changed") or "").split(",")
                   if n.strip())


def check_config(workdir: str, config, write: bool, extend: bool = False) -> list:
  """Writes ``config.json`` at a run's start; on a resume, stops on a changed field.

  Fields named in ``config.allow_changed`` may change: returns their
  ``(field, saved value, new value)`` for ``record_config_changes``.
  """
  permitted = allowed_changes(config)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if write:
      write_json(path, config.to_dict())
    return []
  saved = read_json_object(
      path, "the JSON config a run writes at its start",
      "Restore it from a copy; or, if the run in this workdir was started with this very "
      "config, delete it (the run writes it again); or use a new --workdir.")
  allowed = RESUMABLE_FIELDS | (EXTEND_FIELDS if extend else frozenset())
  changed = config_differences(saved, config.to_dict(), allowed)
  stored = [d for d in changed if d[0] in STORAGE_FIELDS]
  if stored:
    k, a, b = stored[0]
    raise ValueError(
        f"The workdir {workdir} holds checkpoints written with {k}={a!r} ({path}); this "
        f"run has {k}={b!r}, whose state cannot be restored from them (the same masks "
        f"and results either way): resume with --config.{k}={a!r}, or use a new "
        "--workdir.")
  diffs = config_differences(saved, config.to_dict(), allowed | permitted)
  if diffs:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
    names = ",".join(sorted(permitted | {k for k, _, _ in diffs}))
    raise ValueError(
        f"The workdir {workdir} holds a run started with another config ({path}); "
        f"resuming would mix the two. Differing fields: {listed}. Resume with the "
        "original values, use a new --workdir, or, to resume with these values from its "
        f"last checkpoint (e.g. after a divergence), add --config.allow_changed={names}.")
  return changed


def record_config_changes(workdir: str, config, changes, step: int) -> None:
  """Appends ``changes`` at ``step`` to ``config_changes.jsonl``; rewrites ``config.json``.

  A later resume is compared with the new values.
  """
  if not changes:
    return
  path = os.path.join(workdir, "config_changes.jsonl")
  now = time.strftime("%Y-%m-%d %H:%M:%S")
  append_all(path, "".join(
      json.dumps({"step": step, "field": field, "old": old, "new": new, "time": now},
                 default=str) + "\n" for field, old, new in changes).encode())
  write_json(os.path.join(workdir, "config.json"), config.to_dict())
  for field, old, new in changes:
    log.info("Resuming at step %d with %s changed: %r -> %r (allow_changed; recorded in "
             "%s).", step, field, old, new, path)
