"""Pruning-at-initialisation baselines in the trainer: SNIP, GraSP and SynFlow.

``config.sparsity.method`` = ``snip`` | ``grasp`` | ``synflow`` scores the
freshly initialised params (SNIP and GraSP on the first
``config.sparsity.score_batches`` training batches the run itself will see;
SynFlow on the all-ones input, data-free), keeps the top ``1 - sparsity.final``
globally (or under ``sparsity.score_distribution``), then trains with
``sparse_jax.static`` on that fixed mask. The scoring runs inside the
optimizer's ``init``, so ``create_train_state`` and checkpoint resumption work
unchanged.

Optional config fields (absent = the default shown):
  sparsity.score_batches = 1          # SNIP/GraSP batches
  sparsity.score_distribution = "global"
  sparsity.grasp_temperature = 200.0  # the GraSP code divides the logits by T
  sparsity.synflow_iterations = 100
  sparsity.synflow_precision = "float64"  # or "rescaled"
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax
from experiments.trainer import feed as feed_lib
from experiments.data import input_pipeline
from experiments import models

PRUNING_AT_INIT = ("snip", "grasp", "synflow")


def first_batches(config, num_batches: int) -> list[dict]:
  """The first ``num_batches`` training batches, in the order the trainer feeds them."""
  if feed_lib.uses_device_data(config):
    arrays = input_pipeline.load_arrays(config.dataset, "train", config.data_dir)
    perm = feed_lib.epoch_permutation(config.seed, 0, len(arrays["label"]))
    bs = config.batch_size
    return [{"image": jnp.asarray(arrays["image"][perm[i * bs:(i + 1) * bs]]),
             "label": jnp.asarray(arrays["label"][perm[i * bs:(i + 1) * bs]].astype(np.int32))}
            for i in range(num_batches)]
  it = input_pipeline.train_batches(config.dataset, batch_size=config.batch_size,
                                    data_dir=config.data_dir, seed=config.seed, start_step=0)
  return [jax.tree.map(jnp.asarray, next(it)) for _ in range(num_batches)]


def pruning_at_init_masks(config, model, variables, num_classes: int, input_shape):
  """The mask tree of the configured PaI method for ``variables`` at init."""
  sp = config.sparsity
  params = variables["params"]
  batch_stats = variables.get("batch_stats") or {}
  selector = dict(include=sp.include, exclude=sp.exclude,
                  keep_first_dense=sp.keep_first_dense, keep_last_dense=sp.keep_last_dense)
  distribution = sp.get("score_distribution", "global")
  if sp.method == "synflow":
    precision = sp.get("synflow_precision", "float64")
    # Flax layers cast to their compute dtype: score a float64 copy of the model.
    net = (models.get_model(config.model, num_classes, dtype=jnp.float64,
                            **config.model_kwargs) if precision == "float64" else model)

    def apply_fn(p, x):
      v = {"params": p}
      if batch_stats:
        v["batch_stats"] = jax.tree.map(lambda s: jnp.abs(s).astype(x.dtype), batch_stats)
      return net.apply(v, x, train=False)

    return sparse_jax.synflow_masks(
        params, apply_fn, (1, *input_shape), sp.final, distribution=distribution,
        num_iterations=int(sp.get("synflow_iterations", 100)), precision=precision,
        **selector)

  temperature = float(sp.get("grasp_temperature", 200.0)) if sp.method == "grasp" else 1.0

  def loss_fn(p, batch):
    v = {"params": p}
    if batch_stats:
      v["batch_stats"] = batch_stats
    logits, _ = model.apply(v, batch["image"], train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(0)})
    onehot = jax.nn.one_hot(batch["label"], num_classes)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32) / temperature, onehot).mean()

  batches = first_batches(config, int(sp.get("score_batches", 1)))
  fn = sparse_jax.snip_masks if sp.method == "snip" else sparse_jax.grasp_masks
  return fn(params, loss_fn, batches, sp.final, distribution=distribution, **selector)


def pruning_at_init_tx_fn(config, model, num_classes: int, input_shape, tx_fn):
  """Wraps the trainer's ``tx_fn(initial_masks)`` so ``init`` scores the params.

  ``tx_fn`` builds ``sparse_jax.static``; given masks (``init_from``) it is used
  as is.
  """
  def make(initial_masks):
    if initial_masks is not None:
      return tx_fn(initial_masks)
    base = tx_fn(None)

    def init_fn(params):
      variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                             jnp.zeros((1, *input_shape), jnp.float32), train=False)
      variables = {**variables, "params": params}
      masks = pruning_at_init_masks(config, model, variables, num_classes, input_shape)
      return tx_fn(masks).init(params)

    return optax.GradientTransformationExtraArgs(init_fn, base.update)

  return make
