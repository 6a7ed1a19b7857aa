"""What the benchmark scripts share: timing, the MLPs and their train steps, XLA peaks,
and the trainer's train step of a config's model (``Bench``, ``build_variants``).

The scripts import this module, never each other. Timing is the trainer's
(``experiments/trainer/inference.py``: ``time_call``, ``interleaved_samples``,
``median_latencies``), so that a study timing an exported model and a benchmark
timing a variant measure alike.
"""

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparse_jax
from experiments.configs import lm_bytes_scan
from experiments.data import input_pipeline
from experiments.trainer import inference
from experiments.trainer import methods as methods_lib
from experiments.trainer import programs
from experiments.trainer import sharding
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib

# The timing, re-exported so that the scripts have one place to take it from.
time_call = inference.time_call
interleaved_samples = inference.interleaved_samples
median_latencies = inference.median_latencies

# The MLPs of the training-step benchmarks (step_overhead, readme_path, memory, ...).
MODELS = {
    "lenet300_100": (784, 300, 100, 10),
    "mlp_30m": (784, 4096, 4096, 2560, 10),
}


def init_mlp(key, sizes, bias_scale=None):
  """Random params ``{"Dense_<i>": {"kernel", "bias"}}`` of an MLP of layer ``sizes``.

  Kernels are normal / sqrt(fan-in).

  Args:
    key: a PRNG key.
    sizes: ``(inputs, hidden..., outputs)``.
    bias_scale: None for zero biases; else biases are normal times it (drawn from a
      third key per layer, so the kernels differ from the zero-bias ones).
  """
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    if bias_scale is None:
      key, k1 = jax.random.split(key)
      bias = jnp.zeros((b,), jnp.float32)
    else:
      key, k1, k2 = jax.random.split(key, 3)
      bias = bias_scale * jax.random.normal(k2, (b,), jnp.float32)
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(k1, (a, b), jnp.float32) / np.sqrt(a), "bias": bias}
  return params


def loss_fn(params, x, y):
  """Mean cross-entropy of the MLP ``params`` on integer labels ``y``."""
  logits = inference.mlp_forward(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def inner_optimizer():
  """The dense optimizer every method wraps: SGD, Nesterov momentum 0.9, lr 0.01."""
  return optax.sgd(0.01, momentum=0.9, nesterov=True)


def make_methods(total_steps=1000, every=100, **options):
  """Dense SGD and each sparse method at 90% sparsity, by name.

  Args:
    total_steps: the schedules' length (GraNet and GMP prune until half of it).
    every: steps between mask updates.
    **options: passed to every sparse factory (e.g. ``packed_masks=True``).
  """
  inner = inner_optimizer
  return {
      "dense": inner(),
      "granet": sparse_jax.granet(inner(), sparsity=0.9, total_steps=total_steps,
                                  end_step=total_steps // 2, update_every=every, **options),
      "granet_st": sparse_jax.granet(inner(), sparsity=0.9, initial_sparsity=0.5,
                                     total_steps=total_steps, end_step=total_steps // 2,
                                     update_every=every, **options),
      "gmp": sparse_jax.gmp(inner(), sparsity=0.9, end_step=total_steps // 2,
                            update_every=every, **options),
      "rigl": sparse_jax.rigl(inner(), sparsity=0.9, total_steps=total_steps,
                              update_every=every, **options),
      "set": sparse_jax.set(inner(), sparsity=0.9, total_steps=total_steps,
                            update_every=every, **options),
      "static": sparse_jax.static(inner(), sparsity=0.9, **options),
  }


def event_options(mask_update):
  """The compiler options of a step with ``mask_update``: an event step's
  (``sparse_jax.event_compiler_options``, as the trainer compiles it), else None."""
  return sparse_jax.event_compiler_options() if mask_update is True else None


def make_step(tx, donate=False, mask_update=None):
  """The jitted train step; ``mask_update`` is the wrapper's static extra argument
  (event steps compile with the event's compiler options, as the trainer's)."""
  extra = {} if mask_update is None else {"mask_update": mask_update}

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state
  # Donated, as a training loop runs it: without donation every call allocates
  # (and page-faults) fresh output buffers, which swamps the comparison at 30M.
  return jax.jit(step, donate_argnums=(0, 1) if donate else (),
                 compiler_options=event_options(mask_update))


def with_count(opt_state, count):
  """The same optimizer state with the wrapper's update count set to ``count``."""
  return jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(count, jnp.int32))
      if isinstance(s, sparse_jax.SparseState) else s,
      opt_state, is_leaf=lambda s: isinstance(s, sparse_jax.SparseState))


def xla_peak_bytes(memory_analysis):
  """Arguments + outputs + temporaries - donated (aliased) bytes; None without one.

  Args:
    memory_analysis: ``compiled.memory_analysis()`` (None on some backends).
  """
  m = memory_analysis
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


# The trainer's train step of a config's model on synthetic data (device_check.py,
# lm_memory.py).


class Bench(NamedTuple):
  """One model of a benchmark, trained on synthetic data with its config's recipe."""
  config: Any  # the config module (experiments/configs)
  input_shape: tuple[int, ...]
  classes: int  # the labels; the vocabulary of a language model
  n_train: int  # training examples: sets steps per epoch, so the sparse schedules
  model_kwargs: dict  # "model" replaces config.model, the rest update model_kwargs
  input_dtype: str = "float32"  # "int32": token windows, the next token at every position


# The language model's config: a byte-level GPT with scanned, rematerialised blocks,
# bfloat16 compute, AdamW (tests/test_export_accelerators.py lowers its programs for
# TPU and CUDA).
LM_CONFIG = lm_bytes_scan
# The language model (issue 30): LM_CONFIG's byte-level GPT at 31.9M weights (10 blocks
# of width 512, MLP 2048) and 126M weights (10 blocks of width 1024, MLP 4096) on
# windows of 256 bytes. The training set size only sets the schedules: 1000 steps an
# epoch at batch 64, so the first event (ΔT) lies inside GraNet's pruning window.
LM_BENCHMARKS = {
    "lm_bytes_32m": Bench(LM_CONFIG, (256,), 256, 64_000,
                          dict(width=512, depth=10, num_heads=8, mlp_dim=2048), "int32"),
    "lm_bytes_126m": Bench(LM_CONFIG, (256,), 256, 64_000,
                           dict(width=1024, depth=10, num_heads=16, mlp_dim=4096), "int32"),
}
VARIANTS = ("dense", "granet/ordinary", "granet/event", "rigl/ordinary", "rigl/event")


def _config(module, method: str, batch: int, model_kwargs: dict, mesh: str):
  config = module.get_config(f"method={method}" + ("" if mesh == "none" else f",mesh={mesh}"))
  config.batch_size = batch
  model_kwargs = dict(model_kwargs)
  config.model = model_kwargs.pop("model", config.model)
  config.model_kwargs.update(model_kwargs)
  return config


def build_method(bench: Bench, method: str, batch: int, mesh: str = "none"):
  """The trainer's train step of ``method`` as ``fn(mask_update)``, its state and a batch.

  ``mesh``: ``"none"`` (one device), or the config's ``mesh`` argument (``"4x2"``): the
  state built FSDP- and tensor-parallel-split as the trainer builds it
  (``state_shardings``), the batch split over ``"data"``, and the step compiled for
  those shardings (a partitioned program: XLA's figures are then per device).
  """
  config = _config(bench.config, method, batch, bench.model_kwargs, mesh)
  info = input_pipeline.DatasetInfo(num_train_examples=bench.n_train, num_eval_examples=0,
                                    num_classes=bench.classes, input_shape=bench.input_shape,
                                    eval_split="test", input_dtype=bench.input_dtype)
  model = state_lib.create_model(config, bench.classes)
  tx_fn = methods_lib.create_tx_fn(config, model, info, bench.n_train // batch)
  mesh_ = None if mesh == "none" else sharding.data_mesh(config)
  state = state_lib.create_sharded_train_state(
      config, model, tx_fn, bench.input_shape, jax.random.PRNGKey(0), mesh_,
      config.get("param_sharding", "replicated"), input_dtype=bench.input_dtype)
  shardings = {}
  if mesh_ is not None:  # the trainer's (programs.py): the state's own, the batch split
    state_sh = state_lib.state_shardings(state, mesh_, config.param_sharding,
                                         config.sparsity.get("layer_axes"))
    shardings = dict(in_shardings=(state_sh, NamedSharding(mesh_, P("data"))),
                     out_shardings=(state_sh, NamedSharding(mesh_, P())))
  def step(mask_update):
    fn = functools.partial(steps_lib.train_step, model=model, tx=tx_fn(None), config=config,
                           num_classes=bench.classes, mask_update=mask_update)
    if mesh_ is not None:  # the model's batch constraints, as the trainer traces them
      fn = programs.with_logical_rules(fn, mesh_)
    return jax.jit(fn, donate_argnums=0, compiler_options=event_options(mask_update),
                   **shardings)
  keys = jax.random.split(jax.random.PRNGKey(1))
  shape = (batch, *bench.input_shape)
  if bench.input_dtype == "int32":  # token ids, and the next token at every position
    data = {"image": jax.random.randint(keys[0], shape, 0, bench.classes),
            "label": jax.random.randint(keys[1], shape, 0, bench.classes)}
  else:
    data = {"image": jax.random.normal(keys[0], shape, jnp.float32),
            "label": jax.random.randint(keys[1], (batch,), 0, bench.classes)}
  if mesh_ is not None:
    data = jax.device_put(data, NamedSharding(mesh_, P("data")))
  return step, state, data, config


def build_variants(bench: Bench, batch: int, mesh: str = "none") -> dict:
  """``variant -> (jitted step, state, batch, count)`` of every entry of ``VARIANTS``.

  ``count`` is the sparse wrapper's step count set before each event call (so each is
  the first mask update, inside the pruning window), or None. A method's ordinary and
  event steps start from copies of one initial state. ``mesh``: as ``build_method``.
  """
  built = {}
  for method in ("dense", "granet", "rigl"):
    step, state, data, config = build_method(bench, method, batch, mesh)
    if method == "dense":
      built["dense"] = (step(None), state, data, None)
      continue
    built[f"{method}/ordinary"] = (step(False), state, data, None)
    built[f"{method}/event"] = (step(True), jax.tree.map(jnp.copy, state), data,
                                config.sparsity.update_every - 1)
  return built


def compile_variant(step, state, data) -> dict:
  """The compiled program, its compile seconds (lowering included) and XLA peak bytes."""
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  seconds = time.perf_counter() - t
  return {"compiled": compiled, "compile_s": seconds,
          "xla_peak_bytes": xla_peak_bytes(compiled.memory_analysis())}
