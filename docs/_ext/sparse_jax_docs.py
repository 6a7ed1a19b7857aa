"""Sphinx extension of the sparse_jax docs: generated sources and a completeness check.

At ``builder-inited`` it writes, under docs/_generated/ (ignored by git):

- ``api/<topic>.rst``: one API page per private module of ``sparse_jax``, with every
  name of ``sparse_jax.__all__`` that ``sparse_jax/__init__.py`` imports from it
  (read with ``ast``, so aliases such as ``layer_axes_of`` land with their module),
  documented by autodoc from its docstring;
- ``configs.rst``: the docstring of every experiment config (read with ``ast``);
- ``notebooks/*.ipynb``: copies of experiments/notebooks/, rendered by myst-nb as
  stored (Sphinx reads sources only from inside docs/).

A file is written only when its content changes, so an incremental build stays
incremental. At ``env-check-consistency`` every name of ``__all__`` must have been
documented: a warning otherwise, which ``-W`` makes an error.
"""

from __future__ import annotations

import ast
import filecmp
import importlib
import os
import re
import shutil

from sphinx import addnodes
from sphinx.util import logging
from sphinx.transforms.post_transforms import SphinxPostTransform

LOGGER = logging.getLogger(__name__)
DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(DOCS)
GENERATED = os.path.join(DOCS, "_generated")

# Page order and titles of the API reference; a module missing here still gets a
# page (titled by its name), after these.
TOPICS = {
    "_methods": "Methods",
    "_transform": "The wrapper and its events",
    "_state": "Optimizer state",
    "_scheduled_jit": "Compiled steps",
    "_masks": "Masks and prunable leaves",
    "_distributions": "Layer-wise densities",
    "_layers": "Stacked layers",
    "_schedules": "Schedules",
    "_prune": "Pruning",
    "_regrow": "Regrowth",
    "_select": "Top-k selection",
    "_lazy": "Chunked passes",
    "_structure": "Structured sparsity",
    "_straight_through": "Straight-through training",
    "_export": "Export",
    "_condense": "Condensed training",
    "_pruning_at_init": "Pruning at initialisation",
    "_gradient_flow": "Gradient flow",
    "_flops": "FLOPs",
    "__init__": "Package",
}


def _write_if_changed(path: str, text: str) -> None:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def public_names_by_module() -> dict[str, list[str]]:
  """``{module: [names of __all__ it defines, in __all__'s order]}``."""
  import sparse_jax  # pylint: disable=import-outside-toplevel
  with open(os.path.join(REPO, "sparse_jax", "__init__.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  origin = {}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparse_jax."):
      for alias in node.names:
        origin[alias.asname or alias.name] = node.module.rpartition(".")[2]
  groups: dict[str, list[str]] = {}
  for name in sparse_jax.__all__:
    groups.setdefault(origin.get(name, "__init__"), []).append(name)
  order = list(TOPICS)
  return dict(sorted(groups.items(),
                     key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                     kv[0])))


def _comment_above(module: str, name: str) -> list[str]:
  """The ``#`` comment lines right above ``name = ...`` in ``sparse_jax/<module>.py``."""
  with open(os.path.join(REPO, "sparse_jax", f"{module}.py"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if line.startswith(f"{name} = "):
      above = []
      while i > 0 and lines[i - 1].startswith("#"):
        i -= 1
        above.insert(0, lines[i].lstrip("# "))
      return above
  return []


def _entry(module: str, name: str) -> list[str]:
  """The reStructuredText of one name: autodoc for functions and classes.

  Constants (``ROLES``, ``METHODS``) have no docstring of their own (autodoc would
  show their type's), so they get their value and the comment above them.
  """
  import sparse_jax  # pylint: disable=import-outside-toplevel
  obj = getattr(sparse_jax, name)
  if isinstance(obj, type):
    return [f".. autoclass:: {name}", ""]
  if callable(obj):
    return [f".. autofunction:: {name}", ""]
  if isinstance(obj, dict):
    value = "{" + ", ".join(f"{k!r}: {getattr(v, '__name__', v)}" for k, v in obj.items()) + "}"
  else:
    value = repr(obj)
  return [f".. py:data:: {name}", f"   :value: {value}", ""] + [
      f"   {line}" for line in _comment_above(module, name)] + [""]


def api_page(module: str, names: list[str]) -> str:
  """The reStructuredText of one API page."""
  title = TOPICS.get(module, module.strip("_"))
  doc = importlib.import_module(
      "sparse_jax" if module == "__init__" else f"sparse_jax.{module}").__doc__ or ""
  summary = doc.strip().split("\n\n")[0]
  lines = [title, "=" * len(title), "", summary, "",
           f"Defined in ``sparse_jax/{module}.py``.", "",
           ".. currentmodule:: sparse_jax", ""]
  for n in names:
    lines += _entry(module, n)
  return "\n".join(lines)


def configs_page() -> str:
  """The reStructuredText of the configs page: each config file's docstring."""
  folder = os.path.join(REPO, "experiments", "configs")
  lines = ["Configs", "=======", "",
           "One file per experiment under ``experiments/configs/``; each docstring holds "
           "the command that runs it and the result it should reach. Fields are "
           "overridden with ``--config.field=value``.", ""]
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py") or name == "__init__.py":
      continue
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read()), clean=True) or ""
    lines += [f"``{name}``", "-" * (len(name) + 4), "", ".. code-block:: text", ""]
    lines += [f"   {line}" if line else "" for line in doc.splitlines()] + [""]
  return "\n".join(lines)


def generate(app) -> None:
  """Writes the API pages, the configs page and the notebooks' copies (``builder-inited``).

  Pages of modules or notebooks that no longer exist are removed (an orphan page
  would fail the build: it is in no toctree).
  """
  del app
  groups = public_names_by_module()
  pages = []
  for module, names in groups.items():
    page = module.strip("_") or "package"
    pages.append(page)
    _write_if_changed(os.path.join(GENERATED, "api", f"{page}.rst"),
                      api_page(module, names))
  for name in os.listdir(os.path.join(GENERATED, "api")):
    if name.endswith(".rst") and name[:-4] not in pages + ["index"]:
      os.remove(os.path.join(GENERATED, "api", name))
  index = ["API reference", "=============", "",
           "Every public name of ``sparse_jax`` (its ``__all__``), one page per module "
           "of the library.", "", ".. toctree::", "   :maxdepth: 1", ""]
  _write_if_changed(os.path.join(GENERATED, "api", "index.rst"),
                    "\n".join(index + [f"   {p}" for p in pages] + [""]))
  _write_if_changed(os.path.join(GENERATED, "configs.rst"), configs_page())
  source = os.path.join(REPO, "experiments", "notebooks")
  target = os.path.join(GENERATED, "notebooks")
  os.makedirs(target, exist_ok=True)
  for name in set(os.listdir(target)) - set(os.listdir(source)):
    os.remove(os.path.join(target, name))
  for name in sorted(os.listdir(source)):
    if name.endswith(".ipynb"):
      src, dst = os.path.join(source, name), os.path.join(target, name)
      if not (os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False)):
        shutil.copyfile(src, dst)


# ``|x|`` is an absolute value in the docstrings (``|gradient|``, ``|w|``), which
# reStructuredText would read as a substitution reference.
_ABSOLUTE_VALUE = re.compile(r"(?<![\\`|])\|(\w[\w.^]*)\|(?![`|])")


# The docstrings cite the specification as "docs/algorithms.md §n" (plain text,
# readable in a terminal); here it becomes a link to its page.
_SPECIFICATION = re.compile(r"(?<![`\w/])docs/algorithms\.md((?: §\d+(?:-§\d+)?)?)(?![\w`])")


def prepare_docstring(app, what, name, obj, options, lines) -> None:
  """Escapes ``|x|`` and links the specification (``autodoc-process-docstring``)."""
  del app, what, name, obj, options
  lines[:] = [_SPECIFICATION.sub(r":doc:`docs/algorithms.md\1 </algorithms>`",
                                 _ABSOLUTE_VALUE.sub(r"\\|\1\\|", line))
              for line in lines]


class RepositoryFileLinks(SphinxPostTransform):
  """Points the README's links to ``CHANGELOG.md`` and ``LICENSE`` at their pages.

  Runs just before MyST resolves its links (priority 9), turning them into links to
  a document, which MyST then resolves as usual.
  """
  default_priority = 8
  PAGES = {"CHANGELOG.md": "changelog", "LICENSE": "license"}

  def run(self, **kwargs) -> None:
    del kwargs
    for node in self.document.findall(addnodes.pending_xref):
      page = self.PAGES.get(node.get("reftarget"))
      if node.get("reftype") == "myst" and page is not None:
        node["refdomain"], node["reftarget"], node["reftargetid"] = "doc", page, None


def check_api_complete(app, env) -> None:
  """Warns about every name of ``__all__`` that no page documents."""
  del app
  import sparse_jax  # pylint: disable=import-outside-toplevel
  documented = set(env.get_domain("py").objects)
  missing = [n for n in sparse_jax.__all__ if f"sparse_jax.{n}" not in documented]
  if missing:
    LOGGER.warning("sparse_jax.__all__ names without an API entry: %s", ", ".join(missing))


def setup(app):
  app.connect("builder-inited", generate)
  app.connect("env-check-consistency", check_api_complete)
  app.connect("autodoc-process-docstring", prepare_docstring)
  app.add_post_transform(RepositoryFileLinks)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
