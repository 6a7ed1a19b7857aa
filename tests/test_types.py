"""The package type-checks, and its public API is annotated throughout.

mypy runs over ``sparse_jax/`` with pyproject's ``[tool.mypy]``; it comes from
requirements-test.txt (``make test`` installs it). Its cache is ``.cache/mypy`` in
the checkout, so a run after a first one (~20 s on 2 cores) takes about a second.
Not one of the floors tests (``make test-floors``): the floors environment holds
the library's dependencies only.
"""

import importlib.util
import inspect
import pathlib
import subprocess
import sys

import pytest

import sparse_jax

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error_in_the_package():
  if importlib.util.find_spec("mypy") is None:
    pytest.fail(f"mypy is not installed in {sys.prefix}: `make test` installs "
                "requirements-test.txt (or pip install -r requirements-test.txt).")
  result = subprocess.run(
      [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
  assert result.stdout.startswith("Success: no issues found"), result.stdout


def _unannotated(fn, skip_first: bool = False) -> list[str]:
  """The parameters of ``fn`` without an annotation, and "return" if it has none."""
  signature = inspect.signature(fn)
  params = list(signature.parameters.values())[1 if skip_first else 0:]
  missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
  if signature.return_annotation is inspect.Signature.empty:
    missing.append("return")
  return missing


def _public_callables():
  """``(name, function, is_method)`` of every public function, and of the public
  methods (``__init__`` and ``__call__`` too) each public class defines itself."""
  for name in sparse_jax.__all__:
    obj = getattr(sparse_jax, name)
    if inspect.isfunction(obj):
      yield name, obj, False
    elif inspect.isclass(obj):
      for attr, value in vars(obj).items():
        if attr.startswith("_") and attr not in ("__init__", "__call__"):
          continue
        if isinstance(value, property):
          value = value.fget
        is_static = isinstance(value, staticmethod)
        if isinstance(value, (staticmethod, classmethod)):
          value = value.__func__
        # Generated methods (NamedTuple's _make, dataclass __init__) are typed
        # from the fields.
        if inspect.isfunction(value) and value.__qualname__.startswith(f"{obj.__name__}."):
          yield f"{name}.{attr}", value, not is_static


def test_public_api_is_annotated():
  missing = {name: m for name, fn, is_method in _public_callables()
             if (m := _unannotated(fn, skip_first=is_method))}
  assert not missing, f"public functions with unannotated parameters or return: {missing}"
