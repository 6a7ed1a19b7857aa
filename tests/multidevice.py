"""The environment of a subprocess that simulates several CPU devices.

XLA:CPU runs each simulated device's program on its own thread, and a collective
(all-reduce, all-gather) waits for every device's thread at a rendezvous. On a
2-core machine, under load, some threads do not get a core for a long time, and
by default XLA aborts the whole process after 40 s ("Termination timeout ...
only N of them arrived on time"). That is starvation, not a wrong result, so the
tests raise XLA's rendezvous timeouts far above any test's run time instead of
retrying. Reproduced by hand (not a test: whether a thread starves depends on the
scheduler): a pmap of ``psum(sum(tanh(x @ x.T)))`` over 8 devices of 3000x3000
ones, pinned to one core with ``taskset -c 0`` and both timeouts at 1 s, aborts
with "only 1 of them arrived on time"; with ``RENDEZVOUS_TIMEOUT_S`` it finishes.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Well above the slowest multi-device test (~3 min on a loaded 2-core machine);
# a real deadlock still ends, at the subprocess's own timeout.
RENDEZVOUS_TIMEOUT_S = 1800


def xla_flags(devices: int, rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S) -> str:
  """``XLA_FLAGS`` for ``devices`` simulated CPU devices with long rendezvous timeouts."""
  return " ".join([
      f"--xla_force_host_platform_device_count={devices}",
      f"--xla_cpu_collective_timeout_seconds={rendezvous_timeout_s}",
      f"--xla_cpu_collective_call_terminate_timeout_seconds={rendezvous_timeout_s}",
  ])


def env(devices: int, rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S, **extra) -> dict:
  """``os.environ`` plus the repository on ``PYTHONPATH`` and ``xla_flags(devices)``."""
  out = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS=xla_flags(devices, rendezvous_timeout_s))
  out.update(extra)
  return out


def run_json(script: str, devices: int = 8, timeout: float = 600):
  """Runs ``python -c script`` with ``devices`` simulated devices; its last stdout line,
  parsed as JSON (the script prints its findings there). Fails with its stderr."""
  import json
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", script], env=env(devices), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
