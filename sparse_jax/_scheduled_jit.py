"""``scheduled_jit``: a drop-in for ``jax.jit`` on a training step that runs the fast path.

A sparse_jax method changes its masks only at known steps, so a step that is not
an event can run compiled without the mask-update branch (``mask_update=False``,
as fast as static sparse training) and an event step with it unconditionally
(``mask_update=True``). ``scheduled_jit`` does that for a step function written
as usual (``state.apply_gradients(...)`` or ``nnx.Optimizer.update``): it traces
the function twice, once with each value set for every sparse_jax update inside
it, and picks the program on the host from a step count it keeps itself, with no
device-to-host transfer per step.

  @sparse_jax.scheduled_jit(tx)           # instead of @jax.jit
  def train_step(state, x, y): ...

Each call must make exactly one ``tx.update`` (one optimizer step). A run that
resumes from a checkpoint sets ``train_step.count`` to the steps already done.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from sparse_jax import _transform


def _traced_with(fn: Callable, mask_update: bool) -> Callable:
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    token = _transform.MASK_UPDATE.set(mask_update)
    try:
      return fn(*args, **kwargs)
    finally:
      _transform.MASK_UPDATE.reset(token)
  return traced


class ScheduledStep:
  """A training step compiled twice: ordinary steps and mask-update (event) steps.

  Attributes:
    count: optimizer steps done so far (the next call runs update ``count + 1``).
    ordinary: the program of ordinary steps (a ``jax.jit`` function).
    event: the program of event steps, compiled at the first event (or earlier
      with ``event.lower(...).compile()``).
  """

  def __init__(self, fn: Callable, tx, *, count: int = 0, jit: Callable = jax.jit,
               **jit_kwargs):
    if hasattr(fn, "lower"):  # already jitted: its trace cache would serve both programs
      raise TypeError("scheduled_jit takes the plain step function and jits it itself: "
                      "remove the @jax.jit (or @nnx.jit) decorator, or pass jit=nnx.jit.")
    self._is_event = _transform.event_schedule(tx)
    self.count = int(count)
    self.ordinary = jit(_traced_with(fn, False), **jit_kwargs)
    self.event = jit(_traced_with(fn, True), **jit_kwargs)
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs) -> Any:
    program = self.event if self._is_event(self.count + 1) else self.ordinary
    out = program(*args, **kwargs)
    self.count += 1
    return out


def scheduled_jit(tx, *, count: int = 0, jit: Callable = jax.jit, **jit_kwargs):
  """Decorator: ``jit`` a training step as two programs chosen by ``tx``'s schedule.

  Args:
    tx: the sparse_jax transformation the step updates with (as a factory returned
      it, not a chain around it).
    count: optimizer steps already done (e.g. ``int(state.step)`` on a resume).
    jit: ``jax.jit`` (default) or ``flax.nnx.jit`` for NNX steps.
    **jit_kwargs: passed to ``jit`` (``donate_argnums``, ``static_argnames``, ...).

  Returns:
    A decorator giving a ``ScheduledStep``.

  Example:
    >>> @sparse_jax.scheduled_jit(tx)
    ... def train_step(state, x, y):
    ...   grads = jax.grad(loss_fn)(state.params, x, y)
    ...   return state.apply_gradients(grads=grads)
  """
  return lambda fn: ScheduledStep(fn, tx, count=count, jit=jit, **jit_kwargs)
