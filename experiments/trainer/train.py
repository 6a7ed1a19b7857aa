"""The trainer: data-parallel sparse training of a Flax model from a config.

``train_and_evaluate`` reads top to bottom: check the config, take the workdir,
build the run (``_setup``), then dispatch training steps, stopping exactly where
the host must look (evaluations, log lines, checkpoints, mask updates), and
write the summary. Each concern lives in its own module:

- experiments/trainer/config_checks.py  the config, checked before data or models;
- experiments/trainer/workdir.py        the lock, ``config.json``, a finished run's result;
- experiments/trainer/methods.py        the optimizer and sparse method from the config;
- experiments/trainer/state.py          the train state, its sharding and read-back;
- experiments/trainer/steps.py          the jitted train, dispatch and eval steps;
- experiments/trainer/programs.py       jit over a mesh or pmap, compiled ahead of time,
                                        and the evaluation;
- experiments/trainer/feed.py           each dispatch's batches and the eval set;
- experiments/trainer/checkpoints.py    orbax checkpoints, falling back past unreadable ones;
- experiments/trainer/reporting.py      metrics.jsonl and its records, TensorBoard, log
                                        lines, the summary.

A killed run resumes from its newest readable checkpoint and reports what the
uninterrupted run would have (best accuracy, wall time, each step's metrics
once); a rerun of a finished workdir reports its summary and changes nothing.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import optax

import sparse_jax
from experiments.trainer import checkpoints
from experiments.trainer import compilation_cache
from experiments.trainer import config_checks
from experiments.trainer import feed as feed_lib
from experiments.trainer import flops as run_flops_lib
from experiments.data import input_pipeline
from experiments.trainer import loss_spikes
from experiments.trainer import mask_history
from experiments.trainer import methods
from experiments.trainer import preemption
from experiments.trainer import programs as programs_lib
from experiments.trainer import reporting
from experiments.trainer import sharding
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import workdir as workdir_lib
from experiments.trainer.exports import export_model

log = logging.getLogger("sparse_jax.train")


def next_stop(step: int, total_steps: int, *, periods, events=(), halt=None) -> int:
  """The first step after ``step`` at which the host must look at the state.

  ``periods`` are step intervals (logging, checkpoints, evaluation, gradient
  flow), ``events`` the sorted mask-update steps, ``halt`` an optional last step.

  Example:
    >>> next_stop(25, 100, periods=(31, 50))
    31
  """
  stops = [total_steps] + [(step // p + 1) * p for p in periods]
  stops += events[bisect.bisect_right(events, step):][:1]
  if halt is not None and halt > step:
    stops.append(halt)
  return min(stops)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates; resumes from ``workdir`` if it holds a checkpoint.

  Returns the summary written to ``workdir/summary.json`` (or, for a run halted
  by ``halt_after_step``, ``{"halted_at_step": step}``).
  """
  t_start = time.time()
  # One path for every file, checkpoints included: "link/../run" is where the
  # kernel puts it, not where os.path.abspath says.
  workdir = os.path.realpath(workdir)
  config_checks.validate(config, workdir)  # before the workdir is made
  finished = workdir_lib.finished_summary(workdir)
  if finished is not None and config.get("if_finished", "report") == "report":
    log.info("%s holds a finished run (%s steps, final test accuracy %s): reporting it; "
             "nothing is run or written (--config.if_finished=extend or restart trains "
             "again).", workdir, finished.get("steps"), finished.get("final_test_accuracy"))
    return finished
  # Before anything compiles: a second run of the config compiles nothing.
  compilation_cache.enable(config.get("compilation_cache_dir"))
  _initialize_distributed(config)  # before any JAX call
  info, spe = _dataset_and_schedule(config)  # checks what needs the data set's size
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  # SIGTERM/SIGINT, from here on, end the run at a dispatch boundary, checkpointed
  # (_preempt); the previous handlers are back when the lock is released.
  with preemption.signals_caught() as signals, \
      workdir_lib.WorkdirLock(workdir, enabled=is_main):
    if finished is not None and is_main:
      workdir_lib.prepare_rerun(workdir, config, finished)
    changes = workdir_lib.check_config(workdir, config, write=is_main)
    with _setup(config, workdir, is_main, info, spe, t_start) as run:  # its exit waits for checkpoints
      if is_main:  # fields changed on this resume (config.allow_changed), from its step
        workdir_lib.record_config_changes(workdir, config, changes, run.start_step)
      step, pending, saved = run.start_step, [], run.start_step
      # Steps run since the last record, fetched before a preemption (checkpoint meta).
      carried, steps_at_log = reporting.carried_metrics(run.meta, step)
      t_log, waited_at_log = time.time(), run.timings["compile_wait_s"]
      t_loop = time.time()
      run.timings["before_loop_s"] = t_loop - run.t_segment
      while step < run.total_steps:
        if signals.should_stop():
          _preempt(run, step, saved, carried, pending, steps_at_log, signals.received)
        n, mask_update = _next_dispatch(run, step)
        inputs = run.feed.dispatch(step, n)
        if not run.programs.started():
          _compile_all(run, mask_update, inputs)
        run.state, metrics = run.programs[mask_update](run.state, *inputs)
        pending.append((metrics, n))
        step += n
        record = _event_record(run, step, metrics) if step in run.events else {}
        if _eval_due(run, step):
          run.last_eval = run.programs.evaluate(run.state, run.feed, run.info.byte_level)
          run.best_acc = max(run.best_acc, run.last_eval["test_accuracy"])
          record.update(run.last_eval)
        if run.gradient_flow is not None and (step % run.gf_every == 0
                                              or step == run.total_steps):
          record.update(run.gradient_flow(run.state))
        save = _checkpoint_due(run, step)
        if step % config.log_every_steps == 0 or record or save or step == run.total_steps:
          # Raises at a non-finite loss or gradient, before the state is checkpointed.
          fetched = carried + _fetch(run, pending)
          record.update(run.spikes.add(steps_at_log, fetched))
          record = reporting.train_record(
              step, steps_at_log, fetched, record,
              steps_per_epoch=run.steps_per_epoch, seconds=time.time() - t_log,
              t_start=run.t_start)
          carried, pending, t_log, steps_at_log = [], [], time.time(), step
          waited, waited_at_log = (run.timings["compile_wait_s"] - waited_at_log,
                                   run.timings["compile_wait_s"])
          run.writer.write(record)
          if is_main:
            reporting.log_line(record, run.total_steps, compile_wait_s=waited)
        if save:
          _save(run, step)
          saved = step
        if config.halt_after_step is not None and step >= config.halt_after_step:
          log.info("Halting after step %d (halt_after_step).", step)
          return {"halted_at_step": step}
      return _finish(run, t_loop)


@dataclasses.dataclass
class Run:
  """What the training loop of one run works with."""
  config: Any
  workdir: str
  is_main: bool
  info: Any
  steps_per_epoch: int
  total_steps: int
  model: Any
  state: Any
  programs: programs_lib.Programs
  feed: feed_lib.Feed
  mngr: Any
  writer: reporting.MetricWriter
  events: set
  sorted_events: list
  host_events: bool
  periods: list
  timings: Any
  t_start: float  # wall clock at the run's start (earlier segments included)
  t_segment: float  # wall clock at this process's start
  start_step: int = 0
  meta: dict = dataclasses.field(default_factory=dict)  # of the checkpoint resumed from
  best_acc: float = 0.0
  last_eval: dict = dataclasses.field(default_factory=dict)
  masks0: Any = None
  densities0: Any = None
  recorder: Any = None
  keep_history: bool = False
  gf_every: int | None = None
  gradient_flow: Callable | None = None
  spikes: Any = None  # loss_spikes.LossSpikes of the events

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    """Also on an error: pending checkpoints (of good states) are completed."""
    self.programs.shutdown()
    self.mngr.wait_until_finished()
    self.writer.close()


def _initialize_distributed(config):
  if config.distributed and not jax.distributed.is_initialized():
    # Unset fields are auto-detected (TPU pods, SLURM, ...). Initialised once per
    # process: a second run in the same process reuses the connection.
    jax.distributed.initialize(
        **{k: config.get(k) for k in ("coordinator_address", "num_processes", "process_id")
           if config.get(k) is not None})


def _dataset_and_schedule(config):
  """The data set's metadata and steps per epoch; the sparse method's arguments checked.

  Reads no data and compiles nothing: a mistake is reported before the workdir is
  touched.
  """
  info = input_pipeline.dataset_info(config.dataset, config.data_dir)
  # The examples trained on: the training set less the validation part, if any.
  num_train = info.num_train_examples - input_pipeline.validation_count(
      info.num_train_examples, config.get("validation_fraction", 0.0))
  spe = num_train // config.batch_size
  if spe < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the training set "
                     f"({num_train} examples): lower batch_size.")
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices: use a multiple of them.")
  config_checks.check_mesh(config, info.num_classes, info.input_shape, info.input_dtype)
  methods.create_sparse_tx(config, optax.identity(), spe)
  return info, spe


def _setup(config, workdir: str, is_main: bool, info, spe: int, t_segment: float) -> Run:
  """Builds the state (restored if checkpointed), programs, feed and writers."""
  total_steps = methods.num_train_steps(config, spe)
  model = state_lib.create_model(config, info.num_classes)
  tx_fn = methods.create_tx_fn(config, model, info, spe)
  # The method's arguments are checked here, before anything compiles.
  tx = tx_fn(None)  # initial masks only matter at init (in the state built below)
  param_sharding = config.get("param_sharding", "replicated")
  mesh = sharding.data_mesh(config)
  if is_main:
    log.info("Building %s and its %s train state...", config.model, config.sparsity.method)
  # Built in place on the mesh, each device holding its shards (see state_shardings).
  state = state_lib.create_sharded_train_state(config, model, tx_fn, info.input_shape,
                                               jax.random.PRNGKey(config.seed), mesh,
                                               param_sharding, info.input_dtype)
  sparse = config.sparsity.method != "dense"
  # On the host now (every process; gathered if sharded): the state's buffers are
  # donated to the first step.
  masks0 = state_lib.to_host(sparse_jax.get_masks(state.opt_state)) if sparse else None
  if is_main:
    log.info("Model %s on %s: %d steps (%d/epoch), %d devices, method %s, %s state.\n%s",
             config.model, config.dataset, total_steps, spe, jax.device_count(),
             config.sparsity.method, param_sharding,
             reporting.layer_table(state.params, masks0))
  mngr = checkpoints.checkpoint_manager(workdir, config)
  # Restored into the structure and shardings of ``state`` (sharded if fsdp).
  state, meta = checkpoints.restore(mngr, state)
  meta = meta or {"step": 0}
  start_step = int(meta["step"])
  if start_step and is_main:
    log.info("Resumed from the checkpoint at step %d.", start_step)
  timings = collections.defaultdict(float, compile_s={})
  on_device = feed_lib.uses_device_data(config)
  lr_fn = methods.learning_rate_schedule(config, spe)
  programs = programs_lib.Programs(
      config, mesh, state, on_device=on_device, verbose=is_main, timings=timings,
      step_kwargs=dict(model=model, tx=tx, config=config, num_classes=info.num_classes,
                       lr_fn=lr_fn, sparse=sparse),
      eval_kwargs=dict(model=model, num_classes=info.num_classes))
  state = programs.place(state)
  # Where a run's time goes (summary.json "timings"; experiments/benchmarks/
  # time_to_result.py): phases measured at host sync points, compiles by program.
  t_data = time.time()
  feed = feed_lib.Feed(config, mesh, start_step)
  timings["data_s"] += time.time() - t_data
  # Asked of the optimizer itself: it alone knows its schedule's defaults.
  events = methods.mask_update_steps(config, spe, tx)
  sorted_events = sorted(events)
  gf_every = config.get("gradient_flow_every_steps")
  run = Run(
      config=config, workdir=workdir, is_main=is_main, info=info, steps_per_epoch=spe,
      total_steps=total_steps, model=model, state=state, programs=programs, feed=feed,
      mngr=mngr, writer=reporting.MetricWriter(workdir, is_main, start_step, sorted_events),
      events=events, sorted_events=sorted_events,
      # With the mask-update steps known here, ordinary dispatches run a step compiled
      # without the optimizer's mask-update branch and each event step runs alone with
      # it (sparse_jax's mask_update=False/True); otherwise the optimizer decides in
      # the graph (None) on every step.
      host_events=bool(sorted_events) and config.get("host_mask_updates", True),
      periods=[config.log_every_steps, config.checkpoint_every_steps,
               spe * config.eval_every_epochs] + ([gf_every] if gf_every else []),
      timings=timings, t_start=t_segment - float(meta.get("wall_time_s", 0.0)),
      t_segment=t_segment, start_step=start_step, meta=meta,
      best_acc=float(meta.get("best_test_accuracy", 0.0)),
      last_eval=dict(meta.get("last_eval", {})), masks0=masks0,
      densities0=None if masks0 is None else reporting.host_layer_densities(masks0),
      keep_history=sparse and config.get("record_mask_history", False), gf_every=gf_every,
      spikes=loss_spikes.LossSpikes(events, state=meta.get("loss_spikes")))
  if run.keep_history and is_main:
    # Masks after every event, bit-packed on the host (experiments/trainer/mask_history.py).
    run.recorder = mask_history.Recorder.for_run(workdir, masks0, start_step=start_step,
                                                 final_sparsity=config.sparsity.final)
  if gf_every is not None:
    _setup_gradient_flow(run)
  return run


def _setup_gradient_flow(run: Run):
  """Gradient-flow measures on a fixed batch, off the hot path (docs/algorithms.md §8).

  One extra dispatch and host sync every ``gradient_flow_every_steps``, plus step 0.
  """
  config = run.config
  if run.feed.validation is not None:  # a batch of the examples trained on
    batch = {k: v[:config.batch_size] for k, v in run.feed.train_arrays.items()}
  else:
    batch = input_pipeline.load_arrays(config.dataset, f"train[:{config.batch_size}]",
                                       config.data_dir)
  fn = jax.jit(lambda s, b: steps_lib.gradient_flow_step(
      s, b, model=run.model, config=config, num_classes=run.info.num_classes))
  run.gradient_flow = lambda state: steps_lib.gradient_flow_record(
      fn(run.programs.host(state), batch))
  if run.start_step == 0:
    run.writer.write({"step": 0, "epoch": 0.0, **run.gradient_flow(run.state)})


def _next_dispatch(run: Run, step: int) -> tuple[int, bool | None]:
  """The steps of the next dispatch and its program (``mask_update``)."""
  stop = next_stop(step, run.total_steps, periods=run.periods, events=run.sorted_events,
                   halt=run.config.halt_after_step)
  mask_update = None
  if run.host_events:
    mask_update = stop in run.events and stop - step == 1
    if stop in run.events and not mask_update:
      stop -= 1  # run up to the step before the event, then the event alone
  return min(run.config.steps_per_dispatch, stop - step), mask_update


def _compile_all(run: Run, mask_update, inputs):
  """Compiles the first program needed now, the others in the background."""
  for key in [mask_update] + ([not mask_update] if run.host_events else []):
    run.programs.compile_soon(key, (run.state, *inputs))
  run.programs.compile_soon("eval", (run.state, run.feed.eval_batches()[0]))


def _event_record(run: Run, step: int, metrics) -> dict:
  """The log record of a mask update (every one ends a dispatch: ``next_stop``)."""
  host = run.programs.host
  dens, layers = jax.device_get(host((metrics["density"], metrics["layer_density"])))
  record = {"mask_update": True, "sparsity": 1.0 - float(dens),
            "layer_density": {k: float(v) for k, v in layers.items()}}
  if run.keep_history:
    # Gathered on every process (sharded masks), recorded by process 0.
    sparse_state = sparse_jax.get_sparse_state(host(run.state).opt_state)
    event_masks, union = state_lib.to_host((sparse_state.masks, sparse_state.union))
    if run.recorder is not None:
      record.update(run.recorder.record(step, event_masks, union))
  return record


def _eval_due(run: Run, step: int) -> bool:
  epoch, in_epoch = divmod(step, run.steps_per_epoch)
  return ((in_epoch == 0 and epoch % run.config.eval_every_epochs == 0)
          or step == run.total_steps)


def _checkpoint_due(run: Run, step: int) -> bool:
  halt = run.config.halt_after_step
  return (step % run.config.checkpoint_every_steps == 0 or step == run.total_steps
          or (halt is not None and step >= halt))


def _fetch(run: Run, pending) -> list:
  """The metrics of each dispatch's steps on the host (its buffers hold s_per), in order."""
  return [(jax.device_get(run.programs.host(m)), ran) for m, ran in pending]


def _preempt(run: Run, step: int, saved: int, carried, pending, first_step: int,
             signum: int):
  """Checkpoints ``step`` (unless it is), waits for it and raises ``Preempted``."""
  if step > saved:
    fetched, extra = carried + _fetch(run, pending), {}
    if fetched:  # not a step with a record; raises if a step was not finite
      extra["since_last_record"] = reporting.since_last_record(fetched, first_step)
    _save(run, step, **extra)
  run.mngr.wait_until_finished()
  if run.is_main:
    where = (f"its checkpoint is {run.mngr.directory}/{step}" if step else
             "no step was trained yet")
    log.info("Preempted at step %d (%s): %s; rerun the same command to resume (exit "
             "status %d).", step, signal.Signals(signum).name, where, preemption.EXIT_CODE)
  raise preemption.Preempted(step, signum, run.workdir)


def _save(run: Run, step: int, **extra_meta):
  t = time.time()
  meta = {"best_test_accuracy": run.best_acc, "last_eval": run.last_eval,
          "wall_time_s": time.time() - run.t_start, "loss_spikes": run.spikes.state(),
          **extra_meta}
  checkpoints.save_checkpoint(run.mngr, run.programs.host(run.state), step, meta)
  run.timings["checkpoint_s"] += time.time() - t
  if run.recorder is not None:
    run.recorder.save()


def _finish(run: Run, t_loop: float) -> dict:
  """Writes ``summary.json`` (and ``export.npz``) of the finished run."""
  config, timings = run.config, run.timings
  t = time.time()
  run.mngr.wait_until_finished()
  timings["checkpoint_s"] += time.time() - t
  timings["loop_s"] = time.time() - t_loop
  # Straight-through runs (ste, srste): the masked weights, as the model computes.
  final = steps_lib.with_forward_params(state_lib.to_host(run.programs.host(run.state)))
  sparse = config.sparsity.method != "dense"
  masks = sparse_jax.get_masks(final.opt_state) if sparse else None
  summary = reporting.final_summary(config, final, masks, run.best_acc, run.last_eval,
                                    time.time() - run.t_start)
  variables = {"params": final.params, **({"batch_stats": final.batch_stats}
                                          if final.batch_stats else {})}
  summary.update(run_flops_lib.run_flops(
      config, run.model, variables, run.info.input_shape, run.steps_per_epoch,
      run.total_steps, run.densities0, run_flops_lib.event_densities(run.workdir), masks,
      run.events, input_dtype=run.info.input_dtype))
  timings["after_loop_s"] = time.time() - t_loop - timings["loop_s"]
  summary["timings"] = dict(timings)
  if run.feed.validation is not None:  # the "test" metrics are of the held-out part
    summary["evaluated_on"] = "validation"
  if run.is_main:
    export_model(os.path.join(run.workdir, "export.npz"), final.params, final.batch_stats,
                 masks)
    workdir_lib.write_json(os.path.join(run.workdir, "summary.json"), summary)
    log.info("Done: final test accuracy %s, sparsity %.4f, %.1f s.",
             summary["final_test_accuracy"], summary["final_sparsity"],
             summary["wall_time_s"])
  return summary
