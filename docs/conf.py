"""Sphinx configuration of the sparse_jax docs (``make docs``).

The pages reuse the repository's own text: README sections, the result reports
under experiments/results/ and the benchmarks README are included, not copied;
the API pages are generated from ``sparse_jax.__all__`` and the docstrings; the
notebooks are rendered with the outputs they are stored with (nothing is
executed); each method's schedule figure is drawn at build time by running the
method (docs/_ext/method_schedules.py).
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
sys.path[:0] = [REPO, os.path.join(DOCS, "_ext")]
# The schedule figures run jax on the host; keep it off any accelerator and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "sparse_jax"
author = "the sparse_jax authors"
copyright = "the sparse_jax authors, Apache License 2.0"  # pylint: disable=redefined-builtin

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # MathJax copied into the site, so formulas render without a network (and in
    # tests/test_docs.py's browser).
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
    "sparse_jax_docs",
]

# Generated sources (the API pages, the notebooks' copies) live in _generated,
# ignored by git; _build is the output.
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# Markdown everywhere (MyST); the notebooks are rendered as stored, never run here:
# tests/test_notebooks.py runs them, and a docs build must not take minutes.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]

html_theme = "sphinx_book_theme"
html_title = "sparse_jax"
html_theme_options = {
    "show_toc_level": 2,
    "repository_url": "",
    "navigation_with_keys": False,
}
# Wider pages: the "coming from" tables have five columns.
html_static_path = ["_static"]
html_css_files = ["wide.css"]
