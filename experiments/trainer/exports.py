"""``export.npz``: a run's final params, batch statistics and masks, by leaf name.

Written at the end of every run (``export_model``), read back to start a run
from it (``config.init_from``) or to study it (``load_exported``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax
from experiments.trainer import workdir as workdir_lib


def load_exported(path: str) -> dict[str, np.ndarray]:
  """Reads an ``export.npz`` written by ``export_model`` (or its directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "export.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from={path!r} does not exist; point it at the "
                            "export.npz (or its directory) of an earlier run.")
  with np.load(path) as f:
    return dict(f)


def exported_tree(exported: dict[str, np.ndarray], prefix: str) -> dict:
  """The ``prefix/<a>/<b>`` arrays of an export as nested dicts ``{a: {b: ...}}``.

  Example:
    >>> params = exported_tree(load_exported(workdir), "params")
  """
  tree: dict = {}
  for key, value in exported.items():
    if key.startswith(prefix + "/"):
      *path, leaf = key[len(prefix) + 1:].split("/")
      node = tree
      for k in path:
        node = node.setdefault(k, {})
      node[leaf] = value
  return tree


def fill_from_export(tree, exported: dict[str, np.ndarray], prefix: str):
  """``tree`` with every leaf replaced by ``exported[prefix/<leaf name>]``, checked."""
  names = sparse_jax.leaf_names(tree)
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for name, leaf in zip(names, leaves):
    key = f"{prefix}/{name}"
    if key not in exported:
      raise ValueError(f"init_from has no {key!r}; the checkpoint does not match the model "
                       f"{tuple(n for n in exported if n.startswith(prefix))[:5]}...")
    value = exported[key]
    if value.shape != np.shape(leaf):
      raise ValueError(f"init_from: {key!r} has shape {value.shape}, the model "
                       f"{np.shape(leaf)}.")
    out.append(jnp.asarray(value, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def export_model(path: str, params, batch_stats, masks):
  """Writes ``export.npz``: ``params/<name>``, ``batch_stats/<name>``, ``masks/<name>``."""
  arrays = {}
  for prefix, tree in (("params", params), ("batch_stats", batch_stats), ("masks", masks)):
    if tree is None:
      continue
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for p, x in flat:
      arrays[f"{prefix}/{sparse_jax.path_to_name(p)}"] = np.asarray(x)
  # All or nothing: a failed write (full disk) raises workdir_lib.WriteFailed and
  # leaves an earlier export.npz as it was.
  workdir_lib.write_atomic(path, lambda f: np.savez(f, **arrays))
