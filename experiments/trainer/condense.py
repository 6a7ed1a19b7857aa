"""A ``Channels()``-trained model as a smaller dense model of its own family.

``condense_model`` names the chain of a registered model (its layers in forward
order and the batch norm after each), runs ``sparse_jax.condense_channels`` on it
and builds the same family at the condensed widths: ``mlp`` / ``lenet300_100``
(hidden ``features``), ``lenet5`` (its four widths) and ``vgg16`` / ``vgg19`` (the
``cfg`` widths, pools where they were). ``condense_export`` does the same from a
run's ``export.npz``. Residual models (the ResNets) raise: their skips add a
block's input to its output, which no chain export can shrink.

A dead VGG channel whose batch norm still outputs a positive constant into the
next conv is kept (exact; a zero-padded conv turns a constant into a border
pattern, not a bias). Training does not zero those biases: in an 18-step GMP
``Channels()`` run of VGG-19 at 1/16 width (50%, ERK), convs 8-14 kept 8-13 of 32
units alive but condensed only to 17-24 of 32.

Example:
  >>> small = condense.condense_export(config, os.path.join(workdir, "export.npz"))
  >>> small.model.apply(small.variables, x, train=False)  # the masked model's logits
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn

import sparse_jax
from experiments.trainer import exports
from experiments import models
from experiments.models import mlp
from experiments.models import vgg

PyTree = Any

RESIDUAL_MODELS = ("resnet20", "resnet32", "resnet50_cifar", "resnet50")


class CondensedModel(NamedTuple):
  """A smaller dense model of the trained one's family and its variables."""
  model: nn.Module
  variables: dict  # {"params": ...} and, for models with batch norm, "batch_stats"
  features: tuple[int, ...]  # output units of each layer of the chain, in order


def _indexed(params, prefix: str) -> list[str]:
  """The module names ``prefix_0, prefix_1, ...`` at the top of ``params``, in order."""
  names = [k for k in params if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit()]
  return sorted(names, key=lambda n: int(n[len(prefix) + 1:]))


def _mlp_chain(params, kwargs):
  dense = _indexed(params, "Dense")
  norms = ({d: f"BatchNorm_{i}" for i, d in enumerate(dense[:-1])}
           if kwargs.get("batch_norm") else {})
  return dense, norms


def _lenet5_chain(params, kwargs):
  del kwargs
  return [*_indexed(params, "Conv"), *_indexed(params, "Dense")], {}


def _vgg_chain(params, kwargs):
  del kwargs
  convs = _indexed(params, "Conv")
  return [*convs, "Dense_0"], {c: f"BatchNorm_{i}" for i, c in enumerate(convs)}


def _features_widths(name, kwargs, features):
  """MLP / LeNet-5 kwargs at the condensed widths: the chain's outputs but the logits."""
  del name
  kwargs = {k: v for k, v in kwargs.items() if k not in ("width", "depth")}
  return {**kwargs, "features": tuple(features[:-1])}


def _vgg_widths(name, kwargs, features):
  widths = iter(features)
  cfg = kwargs.get("cfg", vgg.CFGS[int(name[3:])])
  return {**kwargs, "cfg": tuple(v if v == "M" else next(widths) for v in cfg)}


# model name -> (its chain: (layers, {layer: norm}), the constructor kwargs at new widths,
# the registry name of the family's model that takes those widths).
FAMILIES = {
    "mlp": (_mlp_chain, _features_widths, "mlp"),
    "lenet300_100": (_mlp_chain, _features_widths, "mlp"),
    "lenet5": (_lenet5_chain, _features_widths, "lenet5"),
    "vgg16": (_vgg_chain, _vgg_widths, "vgg16"),
    "vgg19": (_vgg_chain, _vgg_widths, "vgg19"),
}


def _activation(name: str, kwargs):
  act = kwargs.get("activation", "relu") if name in ("mlp", "lenet300_100") else "relu"
  if act == "prelu":
    raise ValueError("model_kwargs.activation='prelu' has a learned slope per layer, "
                     "which a removed unit's output cannot be folded through; use a "
                     "stateless activation (e.g. 'leaky_relu')")
  return functools.partial(mlp.activate, act)  # stateless: callable outside a module


def check_condensable(model_name: str):
  """Raises a ``ValueError`` naming why ``model_name`` cannot be channel-condensed."""
  if model_name in RESIDUAL_MODELS:
    raise ValueError(
        f"condense_model: {model_name!r} has residual connections; a skip adds a block's "
        "input to its output, so a channel could only be removed where it is dead on both "
        "ends of every skip it joins. Only chain models are condensed: "
        f"{', '.join(sorted(FAMILIES))}.")
  if model_name not in FAMILIES:
    raise ValueError(f"condense_model: no channel condensation for {model_name!r}; "
                     f"supported: {', '.join(sorted(FAMILIES))}.")


def chain_of(model_name: str, params: PyTree, model_kwargs=None):
  """``(layers, {layer: norm})``: the chain of a registered model's params."""
  check_condensable(model_name)
  return FAMILIES[model_name][0](params, dict(model_kwargs or {}))


def activation_of(model_name: str, model_kwargs=None):
  """The stateless activation between the chain's layers."""
  return _activation(model_name, dict(model_kwargs or {}))


def model_at(model_name: str, num_classes: int, features, model_kwargs=None, **extra):
  """The model of ``model_name``'s family with the chain's output widths ``features``
  (the last being the logits); ``extra``: more constructor kwargs (e.g. dtype)."""
  check_condensable(model_name)
  kwargs = dict(model_kwargs or {})
  _, widths, family = FAMILIES[model_name]
  return models.get_model(family, num_classes, **widths(model_name, kwargs, features), **extra)


def condense_model(model_name: str, num_classes: int, params: PyTree, masks: PyTree, *,
                   batch_stats: PyTree = None, model_kwargs: dict | None = None,
                   keep_constant_channels: bool = True) -> CondensedModel:
  """The model of ``model_name``'s family at the condensed widths, and its variables.

  Args:
    model_name: the registry name (``config.model``).
    num_classes: the number of logits.
    params: the trained params, exactly masked (``sparse_jax.sparsify_params``).
    masks: their ``Channels()`` masks (``sparse_jax.get_masks``).
    batch_stats: the ``'batch_stats'`` collection, for models with batch norm.
    model_kwargs: the model's constructor kwargs (``config.model_kwargs``).
    keep_constant_channels: keep a dead channel that outputs a nonzero constant
      into a conv (``condense_channels``'s flag); trained VGGs have them (a dead
      channel's batch norm keeps its bias). False raises instead.

  Returns:
    A ``CondensedModel`` whose ``model.apply(variables, x, train=False)`` gives the
    masked model's logits (up to float rounding).

  Raises:
    ValueError: for a residual or unsupported model, or what
      ``sparse_jax.condense_channels`` cannot fold.
  """
  layers, norms = chain_of(model_name, params, model_kwargs)
  small = sparse_jax.condense_channels(
      params, masks, layers, activation=activation_of(model_name, model_kwargs),
      batch_stats=batch_stats if norms else None, norms=norms,
      keep_constant_channels=keep_constant_channels)
  model = model_at(model_name, num_classes, small.features, model_kwargs)
  variables = {"params": small.params}
  if batch_stats is not None:
    variables["batch_stats"] = small.batch_stats if norms else batch_stats
  return CondensedModel(model, variables, small.features)


def condense_export(config, export_path: str) -> CondensedModel:
  """``condense_model`` of a run's ``export.npz`` (or its directory) and its config.

  The number of classes is read from the export (the classifier's bias).
  """
  check_condensable(config.model)
  e = exports.load_exported(export_path)
  params = exports.exported_tree(e, "params")
  num_classes = int(params[_indexed(params, "Dense")[-1]]["bias"].shape[0])
  return condense_model(config.model, num_classes, params, exports.exported_tree(e, "masks"),
                        batch_stats=exports.exported_tree(e, "batch_stats") or None,
                        model_kwargs=dict(config.model_kwargs))
