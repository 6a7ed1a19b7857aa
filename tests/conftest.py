"""Test-suite settings: Hypothesis profiles and JAX's persistent compilation cache.

Hypothesis: with ``CI`` set (``CI=true``, as ``.ci/run`` runs), the ``ci`` profile
is loaded: derandomized (the examples are a fixed function of each test) and
without the example database, so a CI run is reproducible and independent of
earlier runs. Locally the ``dev`` profile keeps random exploration and the
database. ``HYPOTHESIS_PROFILE=ci`` (or ``dev``) picks one explicitly.

Data: the bundled mnist5k set is prepared once, in the controlling process, before
any test (or xdist worker) starts, so no two processes build it at once.

Compilation cache: every test process (and the subprocesses it starts, through the
environment) reads and writes ``experiments.trainer.compilation_cache``'s directory;
``make test`` points it into the checkout (``.cache/``, ignored by git).
"""

import os
import socket

import pytest
from hypothesis import HealthCheck, settings

from experiments.trainer import compilation_cache

# too_slow is a wall-clock check of example generation, which a loaded 2-core
# machine can trip by itself; every other health check stays on.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev")
_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _ci else "dev"))

compilation_cache.enable()


@pytest.fixture
def no_network(monkeypatch):
  """Makes any connection attempt fail loudly instead of hanging (data tests)."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"Network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def pytest_configure(config):
  if hasattr(config, "workerinput"):  # an xdist worker: the controller prepared it
    return
  from experiments.data import input_pipeline
  input_pipeline.dataset_info("mnist5k", None)
