"""JAX's persistent compilation cache, on by default for the trainer, sweeps,
benchmarks and tests.

Compiled XLA programs are written to a directory and read back by any later
process that compiles the same program (same HLO, backend, flags and JAX
version), so a second run of a config compiles nothing. The thresholds are
lowered so that small programs (an evaluation step, a density read-out) are
cached too: on a 2-core CPU they cost 0.1-0.5 s each to compile.

Where the cache lives, first match wins:

1. the ``directory`` argument (the trainer passes ``--config.compilation_cache_dir``);
2. the ``SPARSE_JAX_COMPILATION_CACHE`` environment variable;
3. ``$XDG_CACHE_HOME/sparse_jax/jax_compilation_cache`` (default
   ``~/.cache/sparse_jax/jax_compilation_cache``).

The value ``"off"`` (in either place) disables the cache.
"""

from __future__ import annotations

import logging
import os

import jax

ENV_VAR = "SPARSE_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "")


def default_directory() -> str:
  """The per-user cache directory (see the module docstring)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sparse_jax", "jax_compilation_cache")


def resolve(directory: str | None = None) -> str | None:
  """The cache directory to use, or ``None`` when the cache is switched off."""
  value = directory if directory is not None else os.environ.get(ENV_VAR)
  if value is None:
    return default_directory()
  if value.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(directory: str | None = None) -> str | None:
  """Turns the persistent compilation cache on (idempotent); returns its directory.

  Safe to call before or after the XLA backend starts; programs compiled before
  the call are not cached. Returns ``None`` (and leaves JAX's settings alone)
  when the cache is switched off.
  """
  path = resolve(directory)
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program, however small or quick to compile.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.getLogger("sparse_jax.compilation_cache").debug(
      "JAX persistent compilation cache in %s", path)
  return path
