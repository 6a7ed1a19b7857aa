"""Checks of a run's config, made before any data is read or any model built."""

from __future__ import annotations

import sparse_jax
from experiments import baselines
from experiments import input_pipeline
from experiments import methods
from experiments import models
from experiments import state as state_lib
from experiments import workdir as workdir_lib


def validate(config):
  """Rejects a bad config before any data is read or any model built."""
  if config.steps_per_dispatch < 1:
    raise ValueError(f"steps_per_dispatch={config.steps_per_dispatch} must be >= 1.")
  for name in ("log_every_steps", "checkpoint_every_steps"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name}={getattr(config, name)} must be >= 1.")
  if config.parallelism not in ("mesh", "pmap"):
    raise ValueError(f"Unknown parallelism {config.parallelism!r}; use mesh or pmap.")
  param_sharding = config.get("param_sharding", "replicated")
  if param_sharding not in state_lib.PARAM_SHARDINGS:
    raise ValueError(f"Unknown param_sharding {param_sharding!r}; use one of "
                     f"{state_lib.PARAM_SHARDINGS}.")
  if param_sharding == "fsdp" and config.parallelism != "mesh":
    raise ValueError(f"param_sharding='fsdp' needs parallelism='mesh' (got "
                     f"{config.parallelism!r}): pmap keeps a full copy of the state on "
                     "every device.")
  gf_every = config.get("gradient_flow_every_steps")
  if gf_every is not None and gf_every < 1:
    raise ValueError(f"gradient_flow_every_steps={gf_every} must be >= 1 (or None: off).")
  input_pipeline.augmentation(config.dataset)  # raises on an unknown data set
  _check_study_options(config)
  if config.model not in models.MODELS:
    raise ValueError(f"Unknown model {config.model!r}; known models: "
                     f"{', '.join(sorted(models.MODELS))}.")
  method = config.sparsity.method
  known = (*sparse_jax.METHODS, *methods.STRAIGHT_THROUGH, *baselines.PRUNING_AT_INIT)
  if method != "dense" and method not in known:
    raise ValueError(f"Unknown sparse method {method!r}; use dense or one of "
                     f"{sorted(known)} (imp "
                     "runs through experiments.main or experiments.imp.run_imp).")
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
  if config.optimizer not in methods.OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; use one of {methods.OPTIMIZERS}.")
  if config.lr_schedule not in methods.LR_SCHEDULES:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; use one of "
                     f"{methods.LR_SCHEDULES}.")
  if config.dtype not in state_lib.DTYPES:
    raise ValueError(f"Unknown dtype {config.dtype!r}; use one of {tuple(state_lib.DTYPES)}.")
  if config.get("if_finished", "report") not in workdir_lib.FINISHED_MODES:
    raise ValueError(f"Unknown if_finished {config.if_finished!r}; use one of "
                     f"{workdir_lib.FINISHED_MODES}.")


INIT_SCALINGS = ("dense_fan_in", "active_fan_in")


def _check_study_options(config):
  """The gradient-flow study's trainer options (absent: off, as every other run)."""
  fraction = config.get("validation_fraction", 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction={fraction} must be in [0, 1): the part of the "
                     "training set held out for evaluation (0: evaluate on the test set).")
  if fraction and not (config.data_on_device
                       and input_pipeline.augmentation(config.dataset) == "none"):
    raise ValueError(f"validation_fraction={fraction} needs the training set on the device "
                     f"(data_on_device=True and a data set without tf.data augmentation; "
                     f"{config.dataset!r}, data_on_device={config.data_on_device}); set "
                     "validation_fraction=0.")
  shift = config.get("augment_shift", 0)
  if not isinstance(shift, int) or shift < 0:
    raise ValueError(f"augment_shift={shift!r} must be an integer >= 0 (pixels of the "
                     "random shift of each training image; 0: off).")
  scaling = config.get("init_scaling", "dense_fan_in")
  if scaling not in INIT_SCALINGS:
    raise ValueError(f"Unknown init_scaling {scaling!r}; use one of {INIT_SCALINGS}.")
