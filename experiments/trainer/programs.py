"""The run's compiled programs: the dispatches, the mask-update step, the evaluation.

``jax.jit`` over a device mesh (state replicated or fsdp-sharded, batches split
over ``"data"``) or ``jax.pmap`` over the local devices. Each program compiles
once, ahead of time, from the first dispatch's argument shapes: the one needed
first in the foreground, the others meanwhile in a background thread, each with
a log line before and after (a first compile is the longest silent phase). An
evaluation logs its progress while it lasts (on a CPU a full-size evaluation set
takes minutes).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import time

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

import sparse_jax

from experiments.trainer import state as state_lib
from experiments.trainer import steps


def compile_logged(fn, args, what: str, verbose: bool = True, seconds=None, options=None):
  """``fn`` (a jit or pmap) compiled for ``args``, with a log line before and after.

  A persistent-cache hit (experiments/trainer/compilation_cache.py) takes well under a
  second; the line says so. ``seconds`` (a dict) receives the time under ``what``.
  ``options``: XLA compiler options (the mask-update step's, for instance).
  """
  log = logging.getLogger("sparse_jax.train")
  if verbose:
    log.info("Compiling %s...", what)
  t = time.time()
  compiled = fn.lower(*args).compile(options or None)
  if seconds is not None:  # summed: a condensed run compiles again at each shrink
    seconds[what] = seconds.get(what, 0.0) + time.time() - t
  if verbose:
    log.info("Compiled %s in %.1f s.", what, time.time() - t)
  return compiled


# Logical axis names of the models' activations (``nn.with_logical_constraint``,
# experiments/models/transformer.py) -> mesh axes: the batch split over "data".
LOGICAL_AXIS_RULES = (("batch", "data"),)


def with_logical_rules(fn, mesh):
  """``fn`` traced under ``mesh`` (abstract) and ``LOGICAL_AXIS_RULES``.

  A model's logical constraints then split each activation's batch over "data"
  (elsewhere, on one device, under pmap or at init, they are no-ops). Without them
  XLA may take the sharding of an FSDP-split weight instead (the embedding's) and
  gather the batch: each device would compute the whole of it. Entered when the
  program is traced, so a compile in a background thread has them too. The
  function keeps ``fn``'s name and signature (the program's name in JAX's logs, its
  arguments' names in the lowered program).
  """
  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
        nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      return fn(*args)
  traced.__name__ = traced.__qualname__ = getattr(fn, "__name__", None) or fn.func.__name__
  return traced


# Seconds between an evaluation's progress lines; and the batches from which the
# first evaluation of a run says how many it has before it starts.
PROGRESS_EVERY_S = 15.0
MANY_EVAL_BATCHES = 10


class _Progress:
  """The log lines of a long evaluation: every ``PROGRESS_EVERY_S``, and at its end."""

  def __init__(self, total: int, t_start: float, first: bool):
    self.total, self.t_start, self.t_last = total, t_start, t_start
    self.log = logging.getLogger("sparse_jax.train")
    self.spoke = first and total >= MANY_EVAL_BATCHES
    if self.spoke:
      self.log.info("Evaluating on %d batches (progress every %.0f s)...", total,
                    PROGRESS_EVERY_S)

  def done(self, batches: int):
    """Logs after ``batches`` batches if ``PROGRESS_EVERY_S`` passed since the last line."""
    now = time.time()
    if batches == self.total:
      if self.spoke:
        self.log.info("Evaluated %d batches in %.1f s.", self.total, now - self.t_start)
    elif now - self.t_last >= PROGRESS_EVERY_S:
      left = (now - self.t_start) / batches * (self.total - batches)
      self.log.info("Evaluating: batch %d/%d after %.0f s (~%.0f s left)...", batches,
                    self.total, now - self.t_start, left)
      self.t_last, self.spoke = now, True


class Programs:
  """Builds, compiles and places everything the training loop runs on devices.

  Keys: ``None`` (a dispatch deciding mask updates in the graph), ``False`` (an
  ordinary dispatch), ``True`` (the mask-update step) and ``"eval"``.
  """

  def __init__(self, config, mesh, state, *, step_kwargs, eval_kwargs, on_device: bool,
               verbose: bool, timings):
    self.mesh, self.verbose, self.timings = mesh, verbose, timings
    self.s_per = config.steps_per_dispatch
    self.step_kwargs = dict(step_kwargs, max_steps=self.s_per)
    self.names = {None: f"the train dispatch ({self.s_per} steps)",
                  False: f"the ordinary dispatch ({self.s_per} steps)",
                  True: "the mask-update step", "eval": "the evaluation"}
    self._futures = {}
    self._evaluated = False  # the first evaluation announces itself (``evaluate``)
    self._compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
    if mesh is None:
      self._fns = {"eval": jax.pmap(functools.partial(steps.eval_step, axis_name="batch",
                                                      **eval_kwargs), axis_name="batch")}
      return
    repl = NamedSharding(mesh, P())
    # One sharding for the whole state (replicated), or one per leaf (fsdp, or a
    # model axis: tensor parallel).
    param_sharding = config.get("param_sharding", "replicated")
    self.state_sharding = repl if (param_sharding == "replicated"
                                   and "model" not in mesh.shape) else (
        state_lib.state_shardings(state, mesh, param_sharding,
                                  config.sparsity.get("layer_axes")))
    self.data_sharding = (repl,) * 3 if on_device else NamedSharding(mesh, P(None, "data"))
    evaluate = with_logical_rules(functools.partial(steps.eval_step, **eval_kwargs), mesh)
    self._fns = {"eval": jax.jit(evaluate, in_shardings=(self.state_sharding,
                                                         NamedSharding(mesh, P("data"))),
                                 out_shardings=repl)}

  def place(self, state):
    """``state`` on the devices as the programs take it (and donate it)."""
    if self.mesh is None:
      return state_lib.replicate(state, jax.local_devices())
    return jax.device_put(state, self.state_sharding)

  def host(self, tree):
    """``tree`` as one global array per leaf (pmap keeps a copy per device).

    On a mesh the leaves may be sharded (fsdp): read them on the host with
    ``state.to_host``, on every process.
    """
    return tree if self.mesh is not None else jax.tree.map(lambda a: a[0], tree)

  def _dispatch_fn(self, mask_update):
    if self.mesh is None:
      return jax.pmap(functools.partial(steps.dispatch_steps, mask_update=mask_update,
                                        axis_name="batch", **self.step_kwargs),
                      axis_name="batch", donate_argnums=0)
    repl = NamedSharding(self.mesh, P())
    return jax.jit(
        with_logical_rules(functools.partial(
            steps.dispatch_steps, mask_update=mask_update,
            batch_sharding=NamedSharding(self.mesh, P("data")), **self.step_kwargs),
            self.mesh),
        in_shardings=(self.state_sharding, self.data_sharding, repl),
        out_shardings=(self.state_sharding, repl), donate_argnums=0)

  def compile_soon(self, key, args):
    """Starts compiling program ``key`` for ``args`` (arrays or abstract) unless started."""
    if key in self._futures:
      return
    fn = self._fns["eval"] if key == "eval" else self._dispatch_fn(key)
    # The mask-update step alone (key True): on a CPU it compiles up to 15% faster so.
    options = sparse_jax.event_compiler_options() if key is True else None
    self._futures[key] = self._compiler.submit(
        compile_logged, fn, state_lib.abstract(args), self.names[key], self.verbose,
        self.timings["compile_s"], options)

  def started(self) -> bool:
    return bool(self._futures)

  def __getitem__(self, key):
    """Compiled program ``key``, waiting (with a log line) if it is still compiling."""
    future = self._futures[key]
    if future.done():
      return future.result()
    if self.verbose:
      logging.getLogger("sparse_jax.train").info("Waiting for %s to compile...",
                                                 self.names[key])
    t = time.time()
    compiled = future.result()
    self.timings["compile_wait_s"] += time.time() - t
    return compiled

  def evaluate(self, state, feed, byte_level: bool = False) -> dict:
    """``test_loss`` and ``test_accuracy`` of ``state`` on ``feed.eval_batches()``.

    ``byte_level``: also ``test_bits_per_byte``, the per-token (byte) loss in bits.
    An evaluation logs its progress (``Evaluating: batch k/K ...``) every
    ``PROGRESS_EVERY_S`` while it lasts, and the first one of a run says before it
    starts how many batches it has when they are many: on a CPU a full-size
    evaluation set takes minutes. Each batch's metrics are read as they are
    (a host sync a batch, which the progress count relies on).
    """
    t = time.time()
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    batches = feed.eval_batches()
    progress = _Progress(len(batches), t, first=not self._evaluated) if self.verbose else None
    self._evaluated = True
    for i, b in enumerate(batches):
      self.compile_soon("eval", (state, b))
      out = jax.device_get(self.host(self["eval"](state, b)))
      for k in totals:
        totals[k] += float(out[k])
      if progress is not None:
        progress.done(i + 1)
    self.timings["eval_s"] += time.time() - t
    out = {"test_loss": totals["loss"] / totals["count"],
           "test_accuracy": totals["correct"] / totals["count"]}
    if byte_level:  # the loss is in nats
      out["test_bits_per_byte"] = out["test_loss"] / math.log(2)
    return out

  def shutdown(self):
    self._compiler.shutdown(wait=False, cancel_futures=True)
