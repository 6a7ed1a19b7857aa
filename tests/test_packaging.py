"""What a user installs: one version, the license, the typing marker, the wheel.

The fast tests read files (``pyproject.toml``, ``CHANGELOG.md``, ``LICENSE``); the
slow one builds the wheel from a copy of the checkout, installs it alone into a
folder and uses it from a process in which the checkout is not importable.
"""

import ast
import hashlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

import sparse_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
# The md5 of https://www.apache.org/licenses/LICENSE-2.0.txt (202 lines, the
# appendix's copyright line left as the template), the file jax and optax ship too.
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
# PEP 639's `license = "Apache-2.0"` and `license-files`, which older setuptools reject.
MIN_SETUPTOOLS = (77,)
# Not copied into the build folder: environments, data, caches, runs and their outputs.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", ".data", ".cache", "workdirs", "runs", "build", "dist",
    "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis")


def _pyproject() -> dict:
  with open(REPO / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _changelog_releases() -> list[tuple[str, str]]:
  """``(version, date)`` of each ``## [x.y.z] - YYYY-MM-DD`` heading, newest first."""
  text = (REPO / "CHANGELOG.md").read_text()
  return re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d\d-\d\d)$", text, re.M)


def _pyproject_version() -> str:
  """The version pyproject declares, or the one its dynamic ``attr`` names.

  setuptools reads ``sparse_jax.__version__`` without importing the package when
  ``__init__.py`` assigns it a string literal, as read here.
  """
  project = _pyproject()["project"]
  if "version" in project:
    return project["version"]
  assert "version" in project.get("dynamic", [])
  attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "sparse_jax.__version__", attr
  tree = ast.parse((REPO / "sparse_jax" / "__init__.py").read_text())
  (version,) = [
      node.value.value for node in tree.body
      if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
      and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
  return version


def test_one_version_in_pyproject_package_and_changelog():
  releases = _changelog_releases()
  assert releases, "CHANGELOG.md has no '## [x.y.z] - YYYY-MM-DD' release heading"
  assert _pyproject_version() == sparse_jax.__version__ == releases[0][0]


def test_changelog_keeps_a_changelog():
  text = (REPO / "CHANGELOG.md").read_text()
  headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
  assert headings[0] == "Unreleased"
  versions = [tuple(map(int, v.split("."))) for v, _ in _changelog_releases()]
  assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
  # Every heading's link is defined at the bottom.
  for heading in headings:
    assert re.search(rf"^\[{re.escape(heading)}\]: \S+$", text, re.M), heading


def test_license_is_the_apache_2_text():
  assert hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_MD5
  project = _pyproject()["project"]
  assert project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"]


def test_py_typed_is_package_data():
  assert (REPO / "sparse_jax" / "py.typed").read_bytes() == b""
  package_data = _pyproject()["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["sparse_jax"]


# The installed wheel at work: GraNet on a dict of params, pruned to sparsity 0.5 of
# the 8*6 + 6*4 = 72 kernel weights at its final event (step 2), so 36 active after
# step 3's drop-and-regrow too; the bias has no mask.
_INSTALLED_CHECK = textwrap.dedent("""
    import importlib.resources, pathlib, sys
    import jax, jax.numpy as jnp, optax
    import sparse_jax

    site = pathlib.Path(sys.argv[1]).resolve()
    assert site in pathlib.Path(sparse_jax.__file__).resolve().parents, sparse_jax.__file__
    assert importlib.resources.files("sparse_jax").joinpath("py.typed").is_file()

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"hidden": {"kernel": jax.random.normal(keys[0], (8, 6)),
                         "bias": jnp.zeros(6)},
              "out": {"kernel": jax.random.normal(keys[1], (6, 4))}}
    tx = sparse_jax.granet(optax.sgd(0.1), sparsity=0.5, total_steps=4, end_step=2,
                           update_every=1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
      grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
      params, opt_state = step(params, opt_state)
    masks = sparse_jax.get_masks(opt_state)
    assert masks["hidden"]["bias"] is None
    assert int(sparse_jax.count_active(masks)) == 36
    for layer in ("hidden", "out"):  # exact zeros off the mask
      kernel, mask = params[layer]["kernel"], masks[layer]["kernel"]
      assert bool((jnp.where(mask, 0.0, kernel) == 0).all()), layer
    print("ok", sparse_jax.__version__, int(sparse_jax.count_active(masks)))
    """)


@pytest.mark.slow
def test_wheel_installs_and_trains(tmp_path):
  setuptools_version = importlib.metadata.version("setuptools")
  if tuple(int(x) for x in re.findall(r"\d+", setuptools_version)[:1]) < MIN_SETUPTOOLS:
    pytest.skip(f"building offline needs setuptools>={MIN_SETUPTOOLS[0]} "
                f"(pyproject's build-system), this environment has {setuptools_version}")
  # A copy, so that the build's egg-info and build/ stay out of the checkout.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=NOT_SOURCE)
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
       "-w", str(tmp_path / "dist"), str(source)],
      check=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("sparse_jax-*.whl")
  assert wheel.name == f"sparse_jax-{sparse_jax.__version__}-py3-none-any.whl"

  names = zipfile.ZipFile(wheel).namelist()
  dist_info = f"sparse_jax-{sparse_jax.__version__}.dist-info"
  modules = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("sparse_jax/*.py"))
  assert sorted(n for n in names if n.endswith(".py")) == modules
  assert "sparse_jax/py.typed" in names
  assert f"{dist_info}/licenses/LICENSE" in names
  assert not [n for n in names if n.startswith(("experiments/", "tests/"))]
  metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
  assert "License-Expression: Apache-2.0" in metadata.splitlines()

  site = tmp_path / "site"
  subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
       "--target", str(site), str(wheel)],
      check=True, timeout=300)
  # Run from tmp_path with only the installed copy on the path: the checkout's
  # sparse_jax (pytest's pythonpath) cannot be what is imported.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _INSTALLED_CHECK, str(site)], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["ok", sparse_jax.__version__, "36"]
