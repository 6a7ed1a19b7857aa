"""The project's venv holds the checkout editable (``make venv``), so a script run
from any directory imports this checkout's ``sparse_jax``, as a user's would.

Not one of the floors tests (``make test-floors``): that environment installs the
dependencies only.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import pathlib
    import sparse_jax
    print(pathlib.Path(sparse_jax.__file__).resolve().parent)
    """)


def test_a_script_outside_the_checkout_imports_its_sparse_jax(tmp_path):
  script = tmp_path / "uses_sparse_jax.py"
  script.write_text(_SCRIPT)
  # Neither the working directory nor PYTHONPATH (pytest's pythonpath is this
  # process's sys.path only) leads to the checkout: only the venv's install does.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, (
      f"{sys.executable} cannot import sparse_jax outside the checkout; `make venv` "
      f"installs it editable (pip install --no-deps -e .):\n{result.stderr[-2000:]}")
  assert pathlib.Path(result.stdout.strip()) == REPO / "sparse_jax"
