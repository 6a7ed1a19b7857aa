"""Leaf names and the model's own order of a params tree.

``jax.tree`` flattens dicts by sorted key and names leaves by key paths; these
helpers turn a path into the ``"layer/sub/kernel"`` names every selector and
report uses, and rank leaves in the order the model created its layers.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def path_to_name(path: jax.tree_util.KeyPath) -> str:
  """Joins a ``jax.tree_util`` key path into ``"layer/sub/kernel"``.

  NNX paths end in a ``value`` attribute of the ``Variable``; it is dropped so the
  same selector matches linen and NNX parameter trees.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  if parts and parts[-1] in ("value", "raw_value"):
    parts = parts[:-1]
  return "/".join(parts)


def flatten_up_to(treedef: Any, tree: PyTree) -> list[Any]:
  """``treedef.flatten_up_to(tree)``: the subtrees of ``tree`` at ``treedef``'s leaves.

  Typed ``Any`` because jaxlib ships no type stub for ``PyTreeDef``, so a type
  checker does not know the method; every call in the package goes through here.
  """
  return treedef.flatten_up_to(tree)


def leaf_names(tree: PyTree) -> list[str]:
  """Names (``path_to_name``) of the leaves of ``tree`` in flattening order."""
  return [path_to_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def model_order(tree: PyTree) -> list[int]:
  """Each leaf's position (in flattening order) in the tree's own order.

  ``jax.tree`` flattens dicts by sorted key; this walks mappings in insertion order
  (for linen and NNX params: the order the layers were created in) and sequences
  by index, so ``model_order(tree)[i]`` ranks flattened leaf ``i`` in model order.

  Example:
    >>> model_order({"conv_init": {"kernel": w1}, "head": {"kernel": w2},
    ...              "block": {"kernel": w3}})   # flattened: block, conv_init, head
    [2, 0, 1]
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  index = {path_to_name(p): i for i, (p, _) in enumerate(flat)}
  walked: list[str] = []

  def walk(node, prefix):
    if isinstance(node, dict) or (hasattr(node, "items") and hasattr(node, "keys")):
      for k, v in node.items():
        walk(v, f"{prefix}{k}/")
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      for k, v in enumerate(node):
        walk(v, f"{prefix}{k}/")
    else:
      walked.append(prefix[:-1])

  walk(tree, "")
  ranks = [index[n] for n in walked if n in index]
  if sorted(ranks) != list(range(len(flat))):  # other containers: flattening order
    return list(range(len(flat)))
  out = [0] * len(flat)
  for rank, i in enumerate(ranks):
    out[i] = rank
  return out
