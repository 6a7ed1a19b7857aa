"""What the benchmark scripts share: timing, the MLPs and their train steps, XLA peaks.

The scripts import this module, never each other. Timing is the trainer's
(``experiments/trainer/inference.py``: ``time_call``, ``interleaved_samples``,
``median_latencies``), so that a study timing an exported model and a benchmark
timing a variant measure alike.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import inference

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


def make_step(tx, donate=False, mask_update=None):
  """The jitted train step; ``mask_update`` is the wrapper's static extra argument."""
  extra = {} if mask_update is None else {"mask_update": mask_update}

  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state
  # Donated, as a training loop runs it: without donation every call allocates
  # (and page-faults) fresh output buffers, which swamps the comparison at 30M.
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


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
