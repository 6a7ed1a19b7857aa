"""The README's usage examples run as written, each as a program of its own.

Every ```python block of "Use it in a Flax training step" and "Transformers" is
fed to a fresh ``python -`` (the venv's interpreter, the repository on
``PYTHONPATH``), as a reader would run it, and the test checks the numbers it
prints against counts worked out by hand.
"""

import ast
import os
import re
import subprocess
import sys

import jax
import pytest

import sparse_jax

from tests import multidevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TIMEOUT_S = 600  # cold compiles on a loaded 2-core machine; warm, each takes 5-10 s


def readme_blocks(heading: str) -> list[str]:
  """The ```python blocks of the README section under ``## heading``."""
  text = open(README).read()
  section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def run_program(source: str, devices: int = 1, **env) -> str:
  """Runs ``source`` as ``python -`` in the repository root; returns its stdout.

  The program sees ``devices`` host CPU devices; with several, also
  ``tests/multidevice.py``'s long rendezvous timeouts where XLA knows those flags
  (the oldest declared jaxlib, in ``make test-floors``, aborts on them as unknown:
  there it runs again with the device count alone).
  """
  count_flag = f"--xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, PYTHONPATH=REPO, **env,
             XLA_FLAGS=multidevice.xla_flags(devices) if devices > 1 else count_flag)
  # The programs do not turn on a compilation cache themselves: pass on this
  # process's (conftest's, or JAX_COMPILATION_CACHE_DIR's under `make test-floors`).
  if jax.config.jax_compilation_cache_dir:
    env.update(
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
            jax.config.jax_persistent_cache_min_compile_time_secs),
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(
            jax.config.jax_persistent_cache_min_entry_size_bytes))
  run = lambda: subprocess.run([sys.executable, "-"], input=source, env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
  proc = run()
  if proc.returncode != 0 and "Unknown flag in XLA_FLAGS" in proc.stderr:
    env["XLA_FLAGS"] = count_flag
    proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def printed(stdout: str, label: str) -> list[str]:
  """Every word printed after ``label: ``."""
  return re.findall(rf"\b{label}: (\S+)", stdout)


def test_flax_section_has_the_three_programs():
  # linen TrainState, NNX, data-parallel (pmap + jit over a mesh).
  assert len(readme_blocks("Use it in a Flax training step")) == 3


def test_readme_linen_example_runs():
  out = run_program(readme_blocks("Use it in a Flax training step")[0])
  # GraNet starts dense and has not reached an event after 3 steps.
  assert printed(out, "active") == [str(784 * 300 + 300 * 100 + 100 * 10)]
  assert printed(out, "density") == ["1.0"]


def test_readme_nnx_example_runs():
  out = run_program(readme_blocks("Use it in a Flax training step")[1])
  # RigL 90%: 10% of 784*300 + 300*10 = 238,200 kernel weights, exactly 23,820 active
  # from the first step.
  assert printed(out, "active") == ["23820"]
  assert float(printed(out, "density")[0]) == pytest.approx(0.1)


def check_data_parallel(out: str, devices: int):
  # Two RigL events (after steps 2 and 4) under pmap, the same count under jit.
  assert printed(out, "pmap devices") == [str(devices)]
  assert printed(out, "masks identical") == ["True"]
  assert printed(out, "jit devices") == [str(devices)]
  assert printed(out, "active") == ["23820", "23820"]
  assert float(printed(out, "density")[0]) == pytest.approx(0.1)


def test_readme_data_parallel_example_runs_on_one_device():
  out = run_program(readme_blocks("Use it in a Flax training step")[2], JAX_PLATFORMS="cpu")
  check_data_parallel(out, 1)


@pytest.mark.multidevice
def test_readme_data_parallel_example_runs_on_four_devices():
  out = run_program(readme_blocks("Use it in a Flax training step")[2], devices=4,
                    JAX_PLATFORMS="cpu")
  check_data_parallel(out, 4)


def test_readme_transformer_example_runs():
  blocks = readme_blocks("Transformers")
  assert len(blocks) == 2  # the NNX miniGPT, the scanned linen GPT
  out = run_program(blocks[0])
  sizes_line = next(line for line in out.splitlines() if line.startswith("{"))
  # Kernels only: q/k/v [64, 4, 16], out [4, 16, 64], MLP 64x256 twice, head 64x256.
  sizes = {"attn/query/kernel": 4096, "attn/key/kernel": 4096, "attn/value/kernel": 4096,
           "attn/out/kernel": 4096, "mlp_in/kernel": 16384, "mlp_out/kernel": 16384,
           "head/kernel": 16384}
  assert ast.literal_eval(sizes_line) == sizes
  # GraNet's cubic schedule reaches 80% at end_step=20: round(0.2 * n) weights kept.
  assert printed(out, "active") == [str(round(0.2 * sum(sizes.values())))]


def test_readme_scanned_transformer_example_runs():
  out = run_program(readme_blocks("Transformers")[1]).splitlines()
  assert ast.literal_eval(out[0]) == {"bias": (4, 256), "kernel": (4, 64, 256)}
  # Each of the 4 stacked mlp_in layers has the ERK density of a 64x256 Dense in a
  # block of q/k/v [64, 4, 16], out [4, 16, 64], mlp_in 64x256, mlp_out 256x64 (x4),
  # and a 64x256 head: what the unscanned model's layers get.
  block = [("query", (64, 4, 16)), ("key", (64, 4, 16)), ("value", (64, 4, 16)),
           ("out", (4, 16, 64)), ("mlp_in", (64, 256)), ("mlp_out", (256, 64))]
  names = [f"blocks{i}/{n}/kernel" for i in range(4) for n, _ in block] + ["head/kernel"]
  shapes = [s for _ in range(4) for _, s in block] + [(64, 256)]
  expected = sparse_jax.erk_densities(shapes, 0.1, names=names)[4]
  densities = ast.literal_eval(out[1])
  assert list(densities) == [f"blocks/mlp_in/kernel[{i}]" for i in range(4)]
  for d in densities.values():
    assert abs(d - expected) < 1.5e-4  # exact counts; printed to 4 decimals
  # 10% of 4 * (3 * 4096 + 4096 + 2 * 16384) + 16384 kernel weights.
  assert printed("\n".join(out[2:]), "active") == [str(round(0.1 * (4 * 49152 + 16384)))]
