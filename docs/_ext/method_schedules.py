"""The schedule figure of each method page, measured by running the method.

``plot_schedules({label: tx})`` trains a small two-layer tree with random gradients
through each transformation (jitted, with ``mask_update`` decided on the host by
``sparse_jax.event_schedule``) and draws what its masks did: the sparsity after
every update and, at each mask-update event, the fraction of the active weights
that were regrown. Nothing is re-derived from the schedule formulas: the figure
shows the library's own behaviour (docs/algorithms.md §3 and §5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sparse_jax

# Two Dense layers, 64 -> 32 -> 10: 2,368 prunable kernel weights, biases dense.
SHAPES = {"Dense_0": {"kernel": (64, 32), "bias": (32,)},
          "Dense_1": {"kernel": (32, 10), "bias": (10,)}}


def measure(tx, total_steps: int, seed: int = 0):
  """``(steps, sparsity after each, events, regrown fraction at each event)``."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                        is_leaf=lambda s: isinstance(s, tuple))
  opt_state = tx.init(params)
  params = sparse_jax.sparsify_params(params, opt_state)
  is_event = sparse_jax.event_schedule(tx)

  @functools.partial(jax.jit, static_argnames="mask_update")
  def step(params, opt_state, grads, mask_update):
    updates, opt_state = tx.update(grads, opt_state, params, mask_update=mask_update)
    return optax.apply_updates(params, updates), opt_state

  masks = sparse_jax.get_masks(opt_state)
  current = float(sparse_jax.sparsity(masks))
  sparsity, events, regrown = [current], [], []
  for t in range(1, total_steps + 1):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    event = bool(is_event(t))
    params, opt_state = step(params, opt_state, grads, event)
    if event:
      new = sparse_jax.get_masks(opt_state)
      grown = sum(int((n & ~o).sum()) for n, o in zip(jax.tree.leaves(new),
                                                       jax.tree.leaves(masks)))
      events.append(t)
      regrown.append(grown / max(int(sparse_jax.count_active(new)), 1))
      masks = new
      current = float(sparse_jax.sparsity(masks))
    sparsity.append(current)
  return np.arange(total_steps + 1), np.array(sparsity), np.array(events), np.array(regrown)


def plot_schedules(transformations: dict, total_steps: int) -> None:
  """Draws sparsity (lines) and regrown fraction per event (bars) of each ``tx``."""
  fig, ax = plt.subplots(figsize=(7, 3.2))
  bars = ax.twinx()
  width = total_steps / 60
  for i, (label, tx) in enumerate(transformations.items()):
    steps, sparsity, events, regrown = measure(tx, total_steps)
    line, = ax.step(steps, sparsity, where="post", label=f"{label}: sparsity")
    if len(events):
      ax.plot(events, sparsity[events], "o", color=line.get_color(), ms=3)
    if regrown.any():
      bars.bar(events + (i - 0.5 * (len(transformations) - 1)) * width, regrown,
               width=width, alpha=0.35, color=line.get_color(),
               label=f"{label}: regrown / active")
  ax.set(xlabel="update t", ylabel="sparsity", ylim=(-0.02, 1.02), xlim=(0, total_steps))
  bars.set(ylabel="regrown fraction at the event", ylim=(0, 1))
  handles = ax.get_legend_handles_labels()
  more = bars.get_legend_handles_labels()
  ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="center right")
  fig.tight_layout()


def plot_mask_flips(transformations: dict, total_steps: int, seed: int = 0) -> None:
  """Draws, for straight-through ``tx``s, the fraction of the mask changed per update.

  The loss sees ``masked_params``; its gradient here is random, as above, so the
  figure shows how often the recomputed mask moves, e.g. less with SR-STE's decay.
  """
  fig, ax = plt.subplots(figsize=(7, 3.2))
  for label, tx in transformations.items():
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                          is_leaf=lambda s: isinstance(s, tuple))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, grads, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    masks, flips = sparse_jax.get_masks(opt_state), []
    for _ in range(total_steps):
      grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
      params, opt_state = step(params, opt_state, grads)
      new = sparse_jax.get_masks(opt_state)
      changed = sum(int((n != o).sum()) for n, o in zip(jax.tree.leaves(new),
                                                         jax.tree.leaves(masks)))
      flips.append(changed / sum(m.size for m in jax.tree.leaves(new)))
      masks = new
    ax.plot(np.arange(1, total_steps + 1), flips, label=label)
  ax.set(xlabel="update t", ylabel="fraction of the mask changed", yscale="log")
  ax.legend(fontsize=7)
  fig.tight_layout()
