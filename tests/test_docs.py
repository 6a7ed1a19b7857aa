"""The docs site builds (warnings are errors) and reads right in a real browser.

The site is built incrementally into docs/_build/html, as ``make docs`` does (so after
``make docs`` this only checks it is current), then headless Chromium opens two of
its pages inside a probe page and reports what it rendered: the API entry of
``sparse_jax.granet`` with its signature and docstring, the formulas of the
algorithm specification typeset, and a notebook's figure outputs as images that
the browser loaded and decoded.

Needs requirements-docs.txt (``make docs`` installs it) and Chromium (Debian's
``chromium-headless-shell`` package; ``.ci/run`` installs it). Without them the
test is skipped, or fails when ``CI`` is set.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SITE = REPO / "docs" / "_build" / "html"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def _missing(reason: str):
  if os.environ.get("CI"):
    pytest.fail(reason)
  pytest.skip(reason)


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
  if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_nb") is None:
    _missing("the docs tools are not installed: make docs (pip install -r requirements-docs.txt)")
  build = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       str(REPO / "docs"), str(SITE)], cwd=REPO, capture_output=True, text=True,
      timeout=600, check=False)
  if build.returncode:
    # Sphinx does not re-read a page whose warnings failed a build: start over next time.
    shutil.rmtree(SITE / ".doctrees", ignore_errors=True)
  assert build.returncode == 0, build.stdout + build.stderr
  return SITE


@pytest.fixture(scope="module")
def browser() -> str:
  for name in BROWSERS:
    if path := shutil.which(name):
      return path
  _missing("no Chromium: apt-get install chromium-headless-shell")


def probe(browser: str, page: pathlib.Path, script: str, tmp_path: pathlib.Path):
  """Opens ``page`` in headless Chromium; returns ``script``'s value (JSON) on it.

  ``script`` is a JavaScript expression of ``doc``, the page's document once it and
  its images have loaded. The probe page holds the site page in an iframe and
  writes the value into its own DOM, which ``--dump-dom`` prints.
  """
  assert page.exists(), page
  probe_page = tmp_path / "probe.html"
  probe_page.write_text(f"""<html><body>
<iframe id="site" src="{page.as_uri()}" width="1200" height="900"></iframe>
<pre id="result">not loaded</pre>
<script>
document.getElementById("site").addEventListener("load", () => {{
  const doc = document.getElementById("site").contentDocument;
  document.getElementById("result").textContent = JSON.stringify({script});
}});
</script></body></html>""")
  run = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu",
       f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
       "--virtual-time-budget=20000", "--dump-dom", probe_page.as_uri()],
      capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  start = run.stdout.index('<pre id="result">') + len('<pre id="result">')
  text = run.stdout[start:run.stdout.index("</pre>", start)]
  assert text != "not loaded", run.stdout[-2000:]
  return json.loads(text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def test_api_page_shows_granet(site, browser, tmp_path):
  entry = probe(browser, site / "_generated" / "api" / "methods.html", """(() => {
    const dt = doc.getElementById("sparse_jax.granet");
    return dt && {signature: dt.textContent, docstring: dt.nextElementSibling.textContent,
                  title: doc.title};
  })()""", tmp_path)
  assert entry, "no element with id sparse_jax.granet on the API page"
  signature = " ".join(entry["signature"].split())
  assert "sparse_jax.granet(" in signature
  for argument in ("inner", "sparsity", "total_steps", "end_step", "update_every"):
    assert argument in signature, (argument, signature)
  docstring = " ".join(entry["docstring"].split())
  assert "gradual magnitude pruning with zero-cost neuroregeneration" in docstring
  assert "regrowth_rate" in docstring  # the Args section, rendered
  assert entry["title"].startswith("Methods")


def test_formulas_render_without_a_network(site, browser, tmp_path):
  # MathJax is copied into the site (sphinx-mathjax-offline), not fetched from a CDN.
  rendered = probe(browser, site / "algorithms.html",
                   'doc.querySelectorAll("mjx-container").length', tmp_path)
  assert rendered > 10, rendered


def test_notebook_page_shows_its_figures(site, browser, tmp_path):
  images = probe(browser, site / "_generated" / "notebooks" / "mask_dynamics.html", """
    [...doc.querySelectorAll(".cell_output img")].map(
        img => [img.getAttribute("src"), img.complete, img.naturalWidth])""", tmp_path)
  assert images, "no figure among the notebook's rendered outputs"
  for src, complete, width in images:
    assert src.endswith(".png") and complete and width > 100, (src, complete, width)
