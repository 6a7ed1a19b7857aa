"""Training and inference FLOPs of a run, relative to dense (docs/algorithms.md §10).

The trainer calls ``run_flops`` at the end of every run; ``posthoc_run_flops``
recomputes the same numbers for an earlier run from its workdir (the config in
``summary.json``, the per-layer densities of ``metrics.jsonl``), with the same
library functions.

Counts, per example: a step costs forward + input gradient + weight gradient at
the densities of the masks in force (piecewise constant between mask-update
events, read from the ``layer_density`` the trainer logs at each event); RigL and
GraNet with gradient growth pay a dense weight gradient at their mask-update
steps, momentum growth at every step (it keeps a momentum of the dense
gradient). The one-off cost of scoring for pruning at initialisation (a few
forward/backward passes, or 100 data-free ones for SynFlow) is left out: it is
below 0.1% of a run of thousands of steps.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

import sparse_jax
from experiments.trainer import baselines
from experiments.trainer import exports
from experiments.data import input_pipeline
from experiments.trainer import methods
from experiments.trainer import state as state_lib
from experiments.trainer import workdir as workdir_lib

# Methods that rank the dense gradient at their mask-update steps.
_DENSE_GRADIENT_AT_EVENTS = ("granet", "rigl")


def event_densities(workdir: str) -> list[tuple[int, dict[str, float]]]:
  """``(step, layer densities)`` of the mask-update records in ``metrics.jsonl``.

  A resumed run may log a step twice; the last record wins.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        try:
          r = json.loads(line)
        except ValueError:
          r = None
        if not isinstance(r, dict):  # never a FLOPs figure from a damaged file
          raise workdir_lib.WorkdirDamaged(
              f"{path} line {number} is not a step's record ({line[:80]!r}): each line "
              "holds one JSON object. Delete or repair that line.")
        if r.get("mask_update") and "layer_density" in r:
          out[int(r["step"])] = r["layer_density"]
  return sorted(out.items())


def dense_gradient_steps(config, steps_per_epoch: int, mask_update_steps) -> set[int]:
  """The updates that compute a dense weight gradient for ``config``'s method."""
  sp = config.sparsity
  total = methods.num_train_steps(config, steps_per_epoch)
  if sp.method in methods.STRAIGHT_THROUGH:
    return set(range(1, total + 1))  # every update's weight gradient is dense
  if sp.method in _DENSE_GRADIENT_AT_EVENTS and sp.growth == "momentum":
    return set(range(1, total + 1))
  if sp.method in _DENSE_GRADIENT_AT_EVENTS and sp.growth == "gradient":
    return set(mask_update_steps)
  return set()


def run_flops(config, model, variables, input_shape, steps_per_epoch: int, total_steps: int,
              initial_masks, events, final_masks, mask_update_steps,
              input_dtype="float32") -> dict[str, float]:
  """``train_flops_vs_dense`` and ``inference_flops_vs_dense`` of a run.

  Args:
    config: the run's config.
    model: the Flax model.
    variables: its variables (shapes only).
    input_shape: one example's shape (no batch dimension).
    steps_per_epoch: updates per epoch.
    total_steps: updates of the run.
    initial_masks: the start mask tree or its layer densities (None: dense run).
    events: ``(step, layer densities)`` after each mask-update event.
    final_masks: the final mask tree or its layer densities.
    mask_update_steps: the method's mask-update steps (``methods.mask_update_steps``).
    input_dtype: the input's dtype (``"int32"`` for token ids).

  Returns:
    A dict of the two ratios and the dense per-example FLOPs they are relative to.
  """
  flops = sparse_jax.model_flops(model, variables, (1, *input_shape), train=False,
                                 input_dtype=input_dtype)
  dense_inf = sparse_jax.inference_flops(flops, {})
  if initial_masks is None:
    return {"train_flops_vs_dense": 1.0, "inference_flops_vs_dense": 1.0,
            "dense_inference_flops": dense_inf}
  start = [(0, _kernel_densities(initial_masks, flops))]
  changes = start + [(t, _kernel_densities(d, flops)) for t, d in events if t < total_steps]
  train = sparse_jax.training_flops(
      flops, changes, total_steps,
      dense_gradient_steps(config, steps_per_epoch, mask_update_steps))
  return {
      "train_flops_vs_dense": train / sparse_jax.dense_training_flops(flops, total_steps),
      "inference_flops_vs_dense": sparse_jax.inference_flops(
          flops, _kernel_densities(final_masks, flops)) / dense_inf,
      "dense_inference_flops": dense_inf,
  }


def _kernel_densities(masks, flops) -> dict[str, float]:
  """Densities of the model's kernels from a mask tree or a ``{name: density}`` dict.

  A scanned kernel's layers are ``name[i]`` in ``flops``; its density may be given
  per layer or for the whole stacked leaf ``name``.
  """
  kernels = set(flops.layers) | {k.split("[", 1)[0] for k in flops.layers}
  return {k: v for k, v in sparse_jax.as_layer_densities(masks).items() if k in kernels}


def posthoc_run_flops(workdir: str) -> dict[str, float]:
  """``run_flops`` of a finished run, from its ``summary.json`` and ``metrics.jsonl``.

  The start masks are rebuilt from the config (same seed, same code path as the
  trainer); the final masks are read from ``export.npz``.
  """
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  # Dotted keys: sparsity.layer_axes maps leaf-name regexes ("blocks/.*").
  config = ml_collections.ConfigDict(summary["config"], allow_dotted_keys=True)
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  steps_per_epoch = info.num_train_examples // config.batch_size
  total = methods.num_train_steps(config, steps_per_epoch)
  model = state_lib.create_model(config, info.num_classes)
  inner = methods.create_optimizer(config, steps_per_epoch)
  if config.sparsity.method in baselines.PRUNING_AT_INIT:
    raise ValueError("posthoc_run_flops rebuilds start masks from the config; pruning-at-"
                     "init runs write their FLOPs in summary.json already.")
  state = state_lib.create_train_state(
      config, model, lambda m: methods.create_sparse_tx(config, inner, steps_per_epoch, m),
      info.input_shape, jax.random.PRNGKey(config.seed), info.input_dtype)
  sparse = config.sparsity.method != "dense"
  masks0 = sparse_jax.get_masks(state.opt_state) if sparse else None
  final = None
  if sparse:
    exported = exports.load_exported(workdir)
    names = sparse_jax.leaf_names(state.params)
    final = jax.tree.unflatten(jax.tree.structure(state.params), [
        jnp.asarray(exported[f"masks/{n}"]) if f"masks/{n}" in exported else None
        for n in names])
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return run_flops(config, model, variables, info.input_shape, steps_per_epoch, total,
                   masks0, event_densities(workdir), final,
                   methods.mask_update_steps(config, steps_per_epoch),
                   input_dtype=info.input_dtype)
