"""Checks of a run's config, made before any data is read or any model built.

``validate(config, workdir)`` is called first by ``train.train_and_evaluate`` and
``imp.run_imp``: a careless value ends the run with one line naming the field,
the value and the fix, before the workdir is created, the data set opened or
anything compiled. Numeric fields are checked from one table (``FIELD_RULES``),
named choices from another (``CHOICES``), with "did you mean" for a near miss.

``unknown_overrides`` and ``describe_fields`` serve the command line
(experiments/main.py): misspelled ``--config.FIELD`` names and ``--help``.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

import sparse_jax
from experiments.trainer import baselines
from experiments.data import input_pipeline
from experiments.trainer import condensing
from experiments.trainer import methods
from experiments.trainer import sharding
from experiments import models
from experiments.trainer import state as state_lib
from experiments.trainer import workdir as workdir_lib
from experiments.configs import default


class Rule(NamedTuple):
  """What a field's value must be: ``ok(value)``, said as ``text``."""
  ok: Callable[[Any], bool]
  text: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None) -> Rule:
  """An int in ``[low, high]``."""
  text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  return Rule(lambda v: _is_int(v) and v >= low and (high is None or v <= high), text)


def real(low: float, high: float | None = None, *, low_open: bool = False,
         high_open: bool = True) -> Rule:
  """A finite number in the interval from ``low`` to ``high`` (open ends as flagged)."""
  if high is None:
    return Rule(lambda v: _is_real(v) and (v > low if low_open else v >= low),
                f"a finite number {'>' if low_open else '>='} {low:g}")
  text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  return Rule(lambda v: _is_real(v) and (v > low if low_open else v >= low)
              and (v < high if high_open else v <= high), text)


def optional(rule: Rule) -> Rule:
  """``rule`` or None (the field unset)."""
  return Rule(lambda v: v is None or rule.ok(v), f"{rule.text} (or None: unset)")


def _compiles(pattern) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return True


REGEX = optional(Rule(lambda v: isinstance(v, str) and _compiles(v),
                      "a valid regular expression over parameter names"))
_LAYER_AXES = optional(Rule(lambda v: isinstance(v, Mapping) and all(
    isinstance(k, str) and _compiles(k) and _is_int(n) and n >= 1 for k, n in v.items()),
    "a mapping from leaf-name regex to its number of leading layer axes (an int >= 1), "
    "e.g. {'blocks/.*': 1}"))
_FRACTIONS = Rule(lambda v: isinstance(v, (tuple, list)) and all(
    _is_real(m) and 0.0 <= m <= 1.0 for m in v), "a tuple of fractions of training in [0, 1]")

# Field -> what it must be, and why (the fix names the field and a valid value).
# Fields absent from a config (the study's options, ``imp``) are skipped.
FIELD_RULES = {
    "seed": (integer(0, 2**32 - 1), "the PRNG seed"),
    "batch_size": (integer(1), "the global training batch, over all devices"),
    "eval_batch_size": (integer(1), "the evaluation batch"),
    "num_train_steps": (optional(integer(1)), "overrides num_epochs if set"),
    # 0 is allowed: a run that only evaluates (or fine-tunes nothing) from init_from.
    "learning_rate": (real(0.0), "the peak learning rate"),
    "momentum": (real(0.0, 1.0), "SGD's momentum; 0: none"),
    "lr_milestones": (_FRACTIONS, "where multistep decays the learning rate"),
    "lr_decay_factor": (real(0.0, low_open=True), "multistep's factor at each milestone"),
    "warmup_epochs": (real(0.0), "epochs of linear warm-up; 0: none"),
    "weight_decay": (real(0.0), "0: none"),
    "label_smoothing": (real(0.0, 1.0), "0: none"),
    "sparsity.initial": (real(0.0, 1.0), "GraNet's initial sparsity"),
    "sparsity.update_every": (integer(1), "optimizer steps between mask updates"),
    "sparsity.start_epoch": (real(0.0), "where pruning starts"),
    "sparsity.end_epoch": (real(0.0), "where pruning ends"),
    "sparsity.regrowth_rate": (real(0.0, 1.0, high_open=False), "a fraction of the active weights"),
    "sparsity.min_regrowth_rate": (real(0.0, 1.0, high_open=False),
                                   "a fraction of the active weights"),
    "sparsity.mask_end_epoch": (optional(real(0.0)), "rigl/set: where mask updates stop"),
    "sparsity.srste_decay": (real(0.0), "SR-STE's lambda_w"),
    "sparsity.include": (REGEX, "the parameters to sparsify"),
    "sparsity.exclude": (REGEX, "the parameters to keep dense"),
    "sparsity.layer_axes": (_LAYER_AXES, "stacked layers, e.g. a model's nn.scan blocks"),
    "num_processes": (optional(integer(1)), "processes of a multi-host run"),
    "process_id": (optional(integer(0)), "this process's index"),
    "steps_per_dispatch": (integer(1), "steps run in one lax.scan"),
    "log_every_steps": (integer(1), "steps between log lines"),
    "checkpoint_every_steps": (integer(1), "steps between checkpoints"),
    "gradient_flow_every_steps": (optional(integer(1)), "None: off"),
    "eval_every_epochs": (integer(1), "epochs between evaluations"),
    "keep_checkpoints": (integer(1), "checkpoints kept; a killed run resumes from the last"),
    "halt_after_step": (optional(integer(1)), "stop after this step (tests)"),
    "imp.num_rounds": (integer(1), "IMP's rounds, the dense one included"),
    "imp.prune_fraction": (real(0.0, 1.0, low_open=True), "of the remaining weights per round"),
    "imp.rewind_step": (integer(0), "the step the weights rewind to; 0: the lottery ticket"),
}

INIT_SCALINGS = ("dense_fan_in", "active_fan_in")
_METHODS = ("dense", *sparse_jax.METHODS, *methods.STRAIGHT_THROUGH, *baselines.PRUNING_AT_INIT)

# Field -> (its name in the error, the values allowed).
CHOICES = {
    "dataset": ("dataset", input_pipeline.KNOWN_DATASETS),
    "model": ("model", tuple(sorted(models.MODELS))),
    "dtype": ("dtype", tuple(state_lib.DTYPES)),
    "optimizer": ("optimizer", methods.OPTIMIZERS),
    "lr_schedule": ("lr_schedule", methods.LR_SCHEDULES),
    "sparsity.method": ("sparse method", _METHODS),
    "sparsity.distribution": ("distribution", ("uniform", "er", "erk")),
    "sparsity.growth": ("growth mode", ("gradient", "momentum", "random")),
    "sparsity.scope": ("pruning scope", ("global", "layerwise")),
    "sparsity.sampling": ("sampling", ("exact", "bernoulli")),
    "parallelism": ("parallelism", ("mesh", "pmap")),
    "param_sharding": ("param_sharding", state_lib.PARAM_SHARDINGS),
    "if_finished": ("if_finished", workdir_lib.FINISHED_MODES),
    "init_scaling": ("init_scaling", INIT_SCALINGS),
    "imp.rewind": ("imp.rewind", ("weights", "lr")),  # experiments/trainer/imp.py REWIND_MODES
    "imp.scope": ("imp.scope", ("global", "layerwise")),
}


def validate(config, workdir: str | None = None):
  """Rejects a bad config before any data is read, model built or workdir made.

  Args:
    config: the run's ``ml_collections.ConfigDict``.
    workdir: the run's workdir, if any: a path that is a file (or under one) is
      refused, as are ``init_from`` and ``data_dir`` paths that do not exist.

  Raises:
    ValueError (FileNotFoundError for a missing path): one line naming the
    field, the value and the fix.
  """
  for path, (rule, why) in FIELD_RULES.items():
    _check_rule(config, path, rule, why)
  for path, (what, allowed) in CHOICES.items():
    _check_choice(config, path, what, allowed)
  if config.get("num_train_steps") is None and not (_is_real(config.num_epochs)
                                                    and config.num_epochs > 0):
    raise ValueError(f"num_epochs={config.num_epochs!r} must be a finite number > 0 "
                     "(or set num_train_steps): nothing would be trained; e.g. "
                     "--config.num_epochs=30.")
  _check_study_options(config)
  _check_allow_changed(config)
  _check_sparsity(config)
  _check_parallelism(config)
  if workdir is not None:
    check_paths(config, workdir)


def _check_allow_changed(config):
  """Every name in ``allow_changed`` is a field (or a group of fields, ``sparsity``)."""
  for name in sorted(workdir_lib.allowed_changes(config)):
    if _lookup(config, name) is _ABSENT:
      fields = list(field_paths(config))
      raise ValueError(
          f"allow_changed={config.get('allow_changed')!r} names {name!r}, which is not a "
          f"config field{default.did_you_mean(name, fields)}")


def _check_sparsity(config):
  method = config.sparsity.method
  if method != "dense" and not 0.0 <= config.sparsity.final < 1.0:
    raise ValueError(f"sparsity.final={config.sparsity.final} must be in [0, 1).")
  structure = methods.parse_structure(config.sparsity.get("structure", "unstructured"))
  if structure is not None and method in baselines.PRUNING_AT_INIT:
    raise ValueError(f"config.sparsity.structure={config.sparsity.structure!r} does not "
                     f"apply to {method}, whose scored masks are unstructured; use "
                     "'unstructured'.")
  if isinstance(structure, sparse_jax.NM) and method != "dense":
    if abs(config.sparsity.final - structure.sparsity) > 1e-9:
      raise ValueError(f"config.sparsity.structure={config.sparsity.structure!r} fixes "
                       f"the sparsity at 1 - {structure.n}/{structure.m} = "
                       f"{structure.sparsity:g}; set sparsity.final={structure.sparsity:g} "
                       f"(got {config.sparsity.final}).")
    if config.sparsity.sampling != "exact":
      raise ValueError(f"config.sparsity.structure={config.sparsity.structure!r} needs "
                       f"sparsity.sampling='exact' (got {config.sparsity.sampling!r}).")
  if method in methods.STRAIGHT_THROUGH:
    methods.check_straight_through(config)
  condensing.check_config(config)


def _check_parallelism(config):
  if (config.get("param_sharding", "replicated") == "fsdp"
      and config.parallelism != "mesh"):
    raise ValueError(f"param_sharding='fsdp' needs parallelism='mesh' (got "
                     f"{config.parallelism!r}): pmap keeps a full copy of the state on "
                     "every device.")
  if config.get("mesh_shape") is not None:
    sharding.parse_mesh_shape(config.mesh_shape)  # raises on a malformed shape
    if config.parallelism != "mesh":
      raise ValueError(f"mesh_shape={config.mesh_shape!r} needs parallelism='mesh' (got "
                       f"{config.parallelism!r}); unset mesh_shape for pmap.")


def check_mesh(config, num_classes: int, input_shape, input_dtype="float32",
               device_count: int | None = None):
  """``config.mesh_shape`` fits this run's devices and its model's tensor-parallel leaves.

  Called at trainer start, once the devices are known (after
  ``jax.distributed.initialize``), before any data is read or anything compiled:
  the model's parameter shapes are traced (``jax.eval_shape``), not built.

  Raises:
    ValueError: data x model is not the device count, or the model axis does not
      divide a kernel's heads or MLP units (or the model has no such kernel).
  """
  if config.get("mesh_shape") is None:
    return
  data, model = sharding.parse_mesh_shape(config.mesh_shape)
  devices = jax.device_count() if device_count is None else device_count
  if data * model != devices:
    raise ValueError(f"mesh_shape={config.mesh_shape!r} is {data} x {model} = "
                     f"{data * model} devices, but this run has {devices}: give DATAxMODEL "
                     f"with DATA * MODEL = {devices} (e.g. '{devices}x1'), or unset "
                     "mesh_shape for one data axis.")
  if model == 1:
    return
  net = state_lib.create_model(config, num_classes)
  shapes = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *input_shape), input_dtype), train=False))
  split = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get("params", {}))[0]:
    name = sparse_jax.path_to_name(path)
    axis = sharding.tensor_parallel_axis(name, leaf.shape)
    if axis is not None and leaf.shape[axis] % model:
      what = "heads" if "/attn/" in f"/{name}" else "MLP units"
      raise ValueError(f"mesh_shape={config.mesh_shape!r}: the model axis ({model}) does "
                       f"not divide the {leaf.shape[axis]} {what} of {name} (shape "
                       f"{tuple(leaf.shape)}); use a model size that divides num_heads and "
                       "mlp_dim (model_kwargs), or a smaller one.")
    split += axis is not None
  if not split:
    raise ValueError(f"mesh_shape={config.mesh_shape!r}: model {config.model!r} has no "
                     "attention or MLP kernel the model axis splits (tensor parallel: "
                     "attn/{query,key,value,out}/kernel, mlp_in/kernel, mlp_out/kernel); "
                     f"use mesh_shape='{devices}x1' or leave it unset.")


def _lookup(config, path: str):
  """The value at dotted ``path``, or ``_ABSENT`` where a part is missing."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _ABSENT
    node = node[part]
  return node


_ABSENT = object()


def _check_rule(config, path: str, rule: Rule, why: str):
  value = _lookup(config, path)
  if value is _ABSENT or rule.ok(value):
    return
  example = _lookup(_BASE, path)
  fix = (f"; e.g. --config.{path}={example!r}"
         if example is not _ABSENT and example is not None and rule.ok(example) else "")
  raise ValueError(f"{path}={value!r} must be {rule.text} ({why}){fix}.")


def _check_choice(config, path: str, what: str, allowed):
  value = _lookup(config, path)
  if value is _ABSENT or value in allowed:
    return
  field = "" if what == path else f" ({path})"
  hint = default.did_you_mean(str(value), allowed)
  raise ValueError(f"Unknown {what} {value!r}{field}{hint} Use one of: {', '.join(allowed)}.")


_BASE = default.get_base_config()


def _check_study_options(config):
  """The gradient-flow study's trainer options (absent: off, as every other run)."""
  fraction = config.get("validation_fraction", 0.0)
  if not (_is_real(fraction) and 0.0 <= fraction < 1.0):
    raise ValueError(f"validation_fraction={fraction} must be in [0, 1): the part of the "
                     "training set held out for evaluation (0: evaluate on the test set).")
  if fraction and not (config.data_on_device
                       and input_pipeline.augmentation(config.dataset) == "none"):
    raise ValueError(f"validation_fraction={fraction} needs the training set on the device "
                     f"(data_on_device=True and a data set without tf.data augmentation; "
                     f"{config.dataset!r}, data_on_device={config.data_on_device}); set "
                     "validation_fraction=0.")
  shift = config.get("augment_shift", 0)
  if not _is_int(shift) or shift < 0:
    raise ValueError(f"augment_shift={shift!r} must be an integer >= 0 (pixels of the "
                     "random shift of each training image; 0: off).")


def _is_remote(path: str) -> bool:
  return "://" in str(path)  # gs://, s3://, ...: not checked from here


def check_paths(config, workdir: str):
  """Refuses a workdir that is (or is under) a file, and missing input paths."""
  if not _is_remote(workdir):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"--workdir={workdir} is a file, not a directory: give a new "
                       "directory or the workdir of a run of this experiment.")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise ValueError(f"--workdir={workdir} cannot be made: {parent} is a file; give a "
                       "path under a directory.")
  init_from = config.get("init_from")
  if init_from is not None and not _is_remote(init_from) and not os.path.exists(init_from):
    raise FileNotFoundError(f"init_from={init_from!r} does not exist: give an export "
                            "directory or .npz file (a finished run's <workdir>/export), "
                            "or leave init_from unset.")
  data_dir = config.get("data_dir")
  if data_dir is not None and not _is_remote(data_dir) and not os.path.isdir(data_dir):
    state = "is not a directory" if os.path.exists(data_dir) else "does not exist"
    raise FileNotFoundError(f"data_dir={data_dir!r} {state} (data set {config.dataset}): "
                            "give the directory the data set is prepared in, or leave "
                            "data_dir unset for the default.")


def load_config_file(spec: str):
  """``get_config()`` of ``FILE`` or ``get_config(ARG)`` of ``FILE:ARG``, as config_flags.

  Loaded here before absl parses the flags, so that a mistake in the family
  argument is one line rather than a traceback inside the flag parser.
  """
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec}: no config file {path!r} (e.g. "
                            "--config=experiments/configs/granet_lenet300_mnist5k.py).")
  module_spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if colon and not inspect.signature(module.get_config).parameters:
    raise ValueError(f"--config={spec}: {path} takes no family argument (after the "
                     "':'); set fields with --config.FIELD=VALUE.")
  return module.get_config(arg) if colon else module.get_config()


def bad_override_value(config, message: str) -> str:
  """absl's error for ``--config.FIELD=VALUE`` said in the config's terms."""
  m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message, re.S)
  if m is None or _lookup(config, m.group(1)) is _ABSENT:
    return message
  path, text, reason = m.groups()
  value = _lookup(config, path)
  kind = _field_type(config, path).__name__
  return (f"--config.{path}={text} is not a valid {kind} ({reason}); e.g. "
          f"--config.{path}={value}.")


def unknown_overrides(config, names) -> str | None:
  """The error for the first of ``names`` (``--config.NAME``) that is not a field."""
  fields = list(field_paths(config))
  for name in names:
    if _lookup(config, re.sub(r"\[[^]]*\]", "", name)) is _ABSENT:
      hint = default.did_you_mean(name, fields, form="--config.{}")
      return (f"Unknown config field --config.{name}{hint} (--help with --config=FILE "
              "lists the fields.)")
  return None


def field_paths(config, prefix: str = ""):
  """Yields the dotted path of every field (groups too), nested ones as ``a.b``."""
  for key in config.keys():
    value = config[key]
    yield f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from field_paths(value, f"{prefix}{key}.")


def describe_fields(config) -> str:
  """One line per field: ``--config.PATH=DEFAULT`` (the type where it is unset)."""
  lines = []
  for path in field_paths(config):
    value = _lookup(config, path)
    if isinstance(value, ml_collections.ConfigDict):
      continue
    shown = value if isinstance(value, str) and value else repr(value)
    if value is None:
      shown = f"None ({_field_type(config, path).__name__})"
    lines.append(f"  --config.{path}={shown}")
  return "\n".join(lines)


def _field_type(config, path: str):
  section, _, name = path.rpartition(".")
  node = _lookup(config, section) if section else config
  return node.get_type(name)
