"""``scheduled_jit``: a drop-in for ``jax.jit`` on a training step that runs the fast path.

A sparse_jax method changes its masks only at known steps, so a step that is not
an event can run compiled without the mask-update branch (``mask_update=False``,
as fast as static sparse training) and an event step with it unconditionally
(``mask_update=True``). ``scheduled_jit`` does that for a step function written
as usual (``state.apply_gradients(...)`` or ``nnx.Optimizer.update``): it traces
the function twice, once with each value set for every sparse_jax update inside
it, and picks the program on the host from a step count it keeps itself, with no
device-to-host transfer on ordinary steps.

  @sparse_jax.scheduled_jit(tx)           # instead of @jax.jit
  def train_step(state, x, y): ...

The host count follows the optimizer state. At the first call and at the call
after each event program it reads the state's own update count
(``SparseState.count``, one small device-to-host transfer per event) and takes it.
So a resumed state needs no ``count=``, and calls that do not advance the count
(``optax.apply_if_finite`` skipping a non-finite step, a client's own skip,
``optax.MultiSteps`` accumulating) only run the event program early, which is
correct at any step (the masks still follow the schedule in the graph) and is
repeated until the state has taken its event. A count found off the prediction
is warned about once; events skipped anyway (``SparseState.skipped_events``, e.g.
updates made outside this step) are warned about every time.

With ``jit=jax.jit`` or ``jax.pmap`` (and no static arguments) the event program
compiles in a background thread from the first ordinary call's shapes and
shardings, while ordinary steps run, so the first event does not stall training
for a compile; other ``jit`` functions compile it at the first event, with a log
line. On a CPU the event program compiles at XLA's LLVM optimisation level 1
(``event_compiler_options``: up to 15% less compile time, the same results).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
import optax

from sparse_jax import _state
from sparse_jax import _transform

_LOG = logging.getLogger("sparse_jax")
_PROGRAM_NAMES = {False: "ordinary", True: "mask-update"}


def _traced_with(fn: Callable, mask_update: bool) -> Callable:
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    token = _transform.MASK_UPDATE.set(mask_update)
    try:
      return fn(*args, **kwargs)
    finally:
      _transform.MASK_UPDATE.reset(token)
  return traced


def read_counts(args, kwargs) -> tuple[int, int] | None:
  """``(count, skipped_events)`` of the one ``SparseState`` in a step's arguments.

  One device-to-host transfer; None when the arguments hold no sparse_jax state
  (or more than one). Under ``pmap`` the state has a copy per device: the first.
  """
  for x in (*args, *kwargs.values()):
    try:
      sparse = _state.get_sparse_state(x)
    except (ValueError, TypeError):
      continue
    skipped = 0 if sparse.skipped_events is None else sparse.skipped_events
    count, skipped = (int(_first_copy(v)) for v in jax.device_get((sparse.count, skipped)))
    return count, skipped
  return None


def _first_copy(x):
  return np.asarray(x).reshape(-1)[0]


def _abstract(tree, shardings: bool):
  """``ShapeDtypeStruct``s of ``tree``'s arrays; other leaves as they are.

  A program lowers from these in another thread while the buffers they describe
  are donated to (or consumed by) the steps running meanwhile. ``shardings``:
  keep the arrays' shardings (jit); pmap places its inputs itself, and its first
  inputs (host-stacked arrays) are placed unlike its later ones (its outputs).
  """
  def leaf(x):
    if not isinstance(x, jax.Array):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.aval.weak_type,
                                sharding=x.sharding if shardings else None)
  return jax.tree.map(leaf, tree)


def event_compiler_options() -> dict[str, Any]:
  """XLA compiler options for a program that runs the mask update (an event step).

  On a CPU: LLVM optimisation level 1, which compiles the GraNet event program of
  LeNet-300-100 ~15% faster than the default level and a 30M-weight MLP's ~7%
  (ResNet-50's no faster; experiments/benchmarks/README.md), with the same results
  bit for bit and the same run time: its kernels are scatters and reductions that
  the default level's extra LLVM passes do not speed up. Elsewhere none (unmeasured).

  ``scheduled_jit`` and the trainer compile their event programs with these; pass
  them to ``jax.jit(..., compiler_options=...)`` or ``lowered.compile(...)`` to
  compile an event program of your own the same way.
  """
  return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}


def _compile(program, args, kwargs, options=None):
  t = time.time()
  compiled = program.lower(*args, **kwargs).compile(options or None)
  _LOG.debug("scheduled_jit: compiled a program in the background in %.1f s.",
             time.time() - t)
  return compiled


class ScheduledStep:
  """A training step compiled twice: ordinary steps and mask-update (event) steps.

  Attributes:
    count: optimizer steps done so far (the next call runs update ``count + 1``),
      re-read from the optimizer state at the first call and after each event.
    ordinary: the program of ordinary steps (a ``jit`` function).
    event: the program of event steps (a ``jit`` function), compiled ahead in the
      background after the first call (``jax.jit``, ``jax.pmap``) or at the
      first event.
  """

  def __init__(self, fn: Callable, tx: optax.GradientTransformation, *, count: int = 0,
               jit: Callable = jax.jit, **jit_kwargs: Any) -> None:
    if hasattr(fn, "lower"):  # already jitted: its trace cache would serve both programs
      raise TypeError("scheduled_jit takes the plain step function and jits it itself: "
                      "remove the @jax.jit (or @nnx.jit) decorator, or pass jit=nnx.jit.")
    self._is_event = _transform.event_schedule(tx)
    self.count = int(count)
    self.ordinary = jit(_traced_with(fn, False), **jit_kwargs)
    # The event program's compiler options: in the jit for jax.jit (so also when it
    # compiles the program itself: first event, new shapes; the user's win), at the
    # ahead compile for pmap (it takes none); nnx.jit takes none at all.
    options, event_kwargs = event_compiler_options(), jit_kwargs
    if jit is jax.jit:
      event_kwargs = {**jit_kwargs, "compiler_options": {
          **options, **(jit_kwargs.get("compiler_options") or {})}}
      options = {}
    self._ahead_options = options
    self.event = jit(_traced_with(fn, True), **event_kwargs)
    # Compiled ahead only where the arguments are plain pytrees of arrays and the
    # compiled program takes the same call (NNX objects are mutated by the step
    # running meanwhile; static arguments change the compiled call).
    self._ahead = jit in (jax.jit, jax.pmap) and not any(
        k.startswith("static") for k in jit_kwargs)
    self._shardings = jit is jax.jit
    self._compiled: dict[bool, concurrent.futures.Future] = {}
    self._event_started = False  # the event program compiled, compiling or run
    self._check_next = True  # read the state's count at the next call
    self._called = False
    self._warned_drift = False
    self._skipped = 0
    functools.update_wrapper(self, fn)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if self._check_next:
      self._follow_state(args, kwargs)
    is_event = bool(self._is_event(self.count + 1))
    # The event program compiles ahead from an ordinary call's shapes (taken before
    # the call may donate the buffers); the ordinary one, the hot path, stays a jit.
    ahead = None
    if self._ahead and not is_event and not self._event_started:
      ahead = _abstract((args, kwargs), self._shardings)
    out = self._run(is_event, args, kwargs)
    if ahead is not None:
      self._compile_ahead(*ahead)
    self.count += 1
    self._called = True
    # After an event program, check that the state took its event: a skipped
    # (non-finite) or accumulating (MultiSteps) call leaves it for the next one.
    self._check_next = is_event
    return out

  def _run(self, is_event: bool, args, kwargs):
    program = self.event if is_event else self.ordinary
    future = self._compiled.get(is_event)
    if future is not None:
      if not future.done():
        _LOG.info("scheduled_jit: waiting for the %s program to finish compiling...",
                  _PROGRAM_NAMES[is_event])
      try:
        compiled = future.result()
      except Exception as e:  # pylint: disable=broad-except
        # The ahead-of-time compile is only a head start: the jit compiles it anyway.
        _LOG.info("scheduled_jit: compiling ahead failed (%s); compiling now.", e)
        self._compiled.pop(is_event)
      else:
        try:
          return compiled(*args, **kwargs)
        except (TypeError, ValueError) as e:
          # Other shapes, types or placements than the first call's (checked before
          # anything runs): from now on the jit, which compiles for these.
          _LOG.info("scheduled_jit: compiling the %s program for other arguments "
                    "(%s)...", _PROGRAM_NAMES[is_event], str(e).splitlines()[0])
          self._compiled.pop(is_event)
    elif is_event and not self._event_started:
      _LOG.info("scheduled_jit: compiling the mask-update program (first event)...")
    self._event_started |= is_event
    return program(*args, **kwargs)

  def _compile_ahead(self, args, kwargs):
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scheduled_jit")
    self._compiled[True] = executor.submit(_compile, self.event, args, kwargs,
                                           self._ahead_options)
    executor.shutdown(wait=False)  # the thread ends with the compile
    self._event_started = True

  def _follow_state(self, args, kwargs):
    """Takes the optimizer state's count (one transfer), warning where it drifted."""
    self._check_next = False
    counts = read_counts(args, kwargs)
    if counts is None:
      return
    count, skipped = counts
    if count != self.count:
      if not self._called:
        _LOG.info("scheduled_jit: the optimizer state has done %d updates; counting "
                  "from there (not from count=%d).", count, self.count)
      elif not self._warned_drift:
        self._warned_drift = True
        warnings.warn(_drift_message(count, self.count), RuntimeWarning, stacklevel=3)
      self.count = count
    if skipped > self._skipped and self._called:
      warnings.warn(
          f"scheduled_jit: {skipped - self._skipped} mask-update event(s) were run "
          "without the mask update (SparseState.skipped_events = "
          f"{skipped}): the optimizer state was updated outside this step, or a later "
          "state was passed in. Pass every update through this step, or start a new "
          "scheduled_jit from the state.", RuntimeWarning, stacklevel=3)
    self._skipped = skipped


def _drift_message(count: int, predicted: int) -> str:
  if count < predicted:
    return (
        f"scheduled_jit: the optimizer state is at update {count}, not {predicted}: "
        "some calls did not apply an update (optax.apply_if_finite skipping a "
        "non-finite step, a step's own skip, optax.MultiSteps accumulating). "
        "Following the state's count: the mask-update program runs until the state "
        "takes each event, so no event is lost; nothing to fix.")
  return (
      f"scheduled_jit: the optimizer state is at update {count}, ahead of "
      f"{predicted}: updates were made outside this step or a later state was "
      "passed in, and an event in between may have run without the mask update. "
      "Following the state's count from now on; pass every update through this step.")


def scheduled_jit(tx: optax.GradientTransformation, *, count: int = 0,
                  jit: Callable = jax.jit,
                  **jit_kwargs: Any) -> Callable[[Callable[..., Any]], ScheduledStep]:
  """Decorator: ``jit`` a training step as two programs chosen by ``tx``'s schedule.

  Args:
    tx: the sparse_jax transformation the step updates with (as a factory returned
      it, not a chain around it; the chain, ``optax.apply_if_finite`` or
      ``optax.MultiSteps`` around it goes in the step's optimizer as usual).
    count: optimizer steps already done, used only when the step's arguments hold
      no sparse_jax state to read it from (with one, it is read at the first call).
    jit: ``jax.jit`` (default), ``jax.pmap`` (with ``axis_name=...``) or
      ``flax.nnx.jit`` for NNX steps.
    **jit_kwargs: passed to ``jit`` (``donate_argnums``, ``static_argnames``,
      ``axis_name``, ...); the event program's ``compiler_options`` are
      ``event_compiler_options()`` updated with any given here.

  Returns:
    A decorator giving a ``ScheduledStep``.

  Example:
    >>> @sparse_jax.scheduled_jit(tx)
    ... def train_step(state, x, y):
    ...   grads = jax.grad(loss_fn)(state.params, x, y)
    ...   return state.apply_gradients(grads=grads)
  """
  return lambda fn: ScheduledStep(fn, tx, count=count, jit=jit, **jit_kwargs)
