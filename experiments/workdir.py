"""A run's workdir: one run at a time, the config it belongs to, a finished result kept.

``<workdir>/``
  ``lock``         held by the running process (``WorkdirLock``): pid, host, start time;
  ``config.json``  the config the run was started with, written once at its start;
                   a resume whose config differs in a field that changes results
                   stops with the differing fields (``check_config``);
  ``summary.json`` the finished run's result: a rerun reports it and touches nothing,
                   unless ``config.if_finished`` is ``"extend"`` (train on to a larger
                   ``num_epochs``/``num_train_steps``) or ``"restart"``;
  ``previous/``    what an extend or restart moved aside (never deleted);
  ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``export.npz``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

FINISHED_MODES = ("report", "extend", "restart")
# Fields a resumed run may change: how often it logs, evaluates, checkpoints or
# dispatches, where the data and compile cache live, how processes connect and
# how the state is laid out on devices (the results stay the same).
RESUMABLE_FIELDS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
    "eval_batch_size", "gradient_flow_every_steps", "halt_after_step",
    "compilation_cache_dir", "steps_per_dispatch", "host_mask_updates", "data_dir",
    "distributed", "coordinator_address", "num_processes", "process_id", "parallelism",
    "param_sharding", "if_finished", "nonfinite"})
EXTEND_FIELDS = frozenset({"num_epochs", "num_train_steps"})

log = logging.getLogger("sparse_jax.train")


class WorkdirLocked(RuntimeError):
  """Another live process is running in this workdir."""


def _write_atomic(path: str, text: str):
  # Host and pid: slices on several machines may share one filesystem.
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj):
  """Writes ``obj`` to ``path`` through a temporary file: never a partial file."""
  _write_atomic(path, json.dumps(obj, indent=1, default=str))


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
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
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


def finished_summary(workdir: str) -> dict | None:
  """The summary of a finished run in ``workdir``, or None if it has not finished."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise RuntimeError(f"{path} cannot be read ({e}); the run's other files are "
                       "untouched. Move it away to finish the run again.") from None


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
  with open(os.path.join(workdir, "config.json")) as f, \
      open(os.path.join(moved, "config.json"), "w") as g:
    g.write(f.read())
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


def config_differences(saved: dict, config_dict: dict, allowed=RESUMABLE_FIELDS) -> list:
  """``(field, saved value, new value)`` of every field outside ``allowed`` that differs."""
  a = _flat(saved)
  b = _flat(json.loads(json.dumps(config_dict, default=str)))
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted({*a, *b})
          if k not in allowed and a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_config(workdir: str, config, write: bool, extend: bool = False) -> None:
  """Writes ``config.json`` at a run's start; on a resume, stops on a changed field."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if write:
      write_json(path, config.to_dict())
    return
  with open(path) as f:
    saved = json.load(f)
  allowed = RESUMABLE_FIELDS | (EXTEND_FIELDS if extend else frozenset())
  diffs = config_differences(saved, config.to_dict(), allowed)
  if diffs:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
    raise ValueError(
        f"The workdir {workdir} holds a run started with another config ({path}); "
        f"resuming would mix the two. Differing fields: {listed}. Resume with the "
        "original values, or use a new --workdir.")
