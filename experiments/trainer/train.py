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
import logging
import os
import signal
import time

import jax
import ml_collections
import optax

import sparse_jax
from experiments.trainer import chase as chase_lib
from experiments.trainer import checkpoints
from experiments.trainer import compilation_cache
from experiments.trainer import config_checks
from experiments.trainer import flops as run_flops_lib
from experiments.data import input_pipeline
from experiments.trainer import methods
from experiments.trainer import preemption
from experiments.trainer import reporting
from experiments.trainer import setup as setup_lib
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
    with setup_lib.setup(config, workdir, is_main, info, spe, t_start) as run:  # its exit waits for checkpoints
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
          _compile_all(run, step, mask_update, inputs)
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
          if run.condenser is not None:  # in units of the original widths
            run.condenser.reported(record, run.state.params)
          carried, pending, t_log, steps_at_log = [], [], time.time(), step
          waited, waited_at_log = (run.timings["compile_wait_s"] - waited_at_log,
                                   run.timings["compile_wait_s"])
          run.writer.write(record)
          if is_main:
            reporting.log_line(record, run.total_steps, compile_wait_s=waited)
        if run.condenser is not None and step in run.events:
          _condense(run, step)  # before the checkpoint: a resume continues from the smaller model
        if save:
          _save(run, step)
          saved = step
        if config.halt_after_step is not None and step >= config.halt_after_step:
          log.info("Halting after step %d (halt_after_step).", step)
          return {"halted_at_step": step}
      return _finish(run, t_loop)


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


def _next_dispatch(run: setup_lib.Run, step: int) -> tuple[int, bool | None]:
  """The steps of the next dispatch and its program (``mask_update``)."""
  stop = next_stop(step, run.total_steps, periods=run.periods, events=run.sorted_events,
                   halt=run.config.halt_after_step)
  mask_update = None
  if run.host_events:
    mask_update = stop in run.events and stop - step == 1
    if stop in run.events and not mask_update:
      stop -= 1  # run up to the step before the event, then the event alone
  return min(run.config.steps_per_dispatch, stop - step), mask_update


def _compile_all(run: setup_lib.Run, step: int, mask_update, inputs):
  """Compiles the first program needed now, the others (still needed after ``step``)
  in the background."""
  later = [not mask_update] if run.host_events else []
  if later == [True] and not run.sorted_events[bisect.bisect_right(run.sorted_events, step):]:
    later = []  # no event left (a condensed run recompiles after its last one)
  for key in [mask_update] + later:
    run.programs.compile_soon(key, (run.state, *inputs))
  run.programs.compile_soon("eval", (run.state, run.feed.eval_batches()[0]))


def _event_record(run: setup_lib.Run, step: int, metrics) -> dict:
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


def _condense(run: setup_lib.Run, step: int):
  """Zeroes the dead units' running means; removes the units dead long enough (Chase:
  the units its schedule cuts, then regrows their weights elsewhere) and rebuilds
  the programs for the smaller model (experiments/trainer/condensing.py, chase.py)."""
  later = run.sorted_events[bisect.bisect_right(run.sorted_events, step):]
  state, shrunk = run.condenser.at_event(state_lib.to_host(run.programs.host(run.state)),
                                         last=not later, step=step,
                                         until_next=later[0] - step if later else None)
  if shrunk:
    run.model, tx = setup_lib.model_and_tx(run.config, run.info, run.steps_per_epoch,
                                           run.condenser, state.params)
    if run.condenser.chase is not None:  # the removed units' weights regrow elsewhere
      state = run.condenser.refill(state, chase_lib.batch_grads(
          run.model, state, setup_lib.fixed_batch(run), run.info.num_classes,
          run.config.label_smoothing))
    mesh = run.programs.mesh
    run.programs.shutdown()
    run.programs = setup_lib.programs_for(run.config, mesh, state, run.model, tx, run.info,
                                          run.steps_per_epoch, run.is_main, run.timings)
  run.state = run.programs.place(state)


def _eval_due(run: setup_lib.Run, step: int) -> bool:
  epoch, in_epoch = divmod(step, run.steps_per_epoch)
  return ((in_epoch == 0 and epoch % run.config.eval_every_epochs == 0)
          or step == run.total_steps)


def _checkpoint_due(run: setup_lib.Run, step: int) -> bool:
  halt = run.config.halt_after_step
  return (step % run.config.checkpoint_every_steps == 0 or step == run.total_steps
          or (halt is not None and step >= halt))


def _fetch(run: setup_lib.Run, pending) -> list:
  """The metrics of each dispatch's steps on the host (its buffers hold s_per), in order."""
  return [(jax.device_get(run.programs.host(m)), ran) for m, ran in pending]


def _preempt(run: setup_lib.Run, step: int, saved: int, carried, pending, first_step: int,
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


def _save(run: setup_lib.Run, step: int, **extra_meta):
  t = time.time()
  meta = {"best_test_accuracy": run.best_acc, "last_eval": run.last_eval,
          "wall_time_s": time.time() - run.t_start, "loss_spikes": run.spikes.state(),
          **(run.condenser.meta() if run.condenser is not None else {}), **extra_meta}
  checkpoints.save_checkpoint(run.mngr, run.programs.host(run.state), step, meta)
  run.timings["checkpoint_s"] += time.time() - t
  if run.recorder is not None:
    run.recorder.save()


def _flops(run: setup_lib.Run, variables, masks) -> dict:
  """The run's FLOPs vs dense; a condensed run's counted on the full-width model."""
  model, final_masks = run.model, masks
  if run.condenser is not None:
    final_masks = run.condenser.original_densities(sparse_jax.as_layer_densities(masks),
                                                   variables["params"])
    model = state_lib.create_model(run.config, run.info.num_classes)
    variables = run.full_variables
  return run_flops_lib.run_flops(
      run.config, model, variables, run.info.input_shape, run.steps_per_epoch,
      run.total_steps, run.densities0, run_flops_lib.event_densities(run.workdir),
      final_masks, run.events, input_dtype=run.info.input_dtype)


def _finish(run: setup_lib.Run, t_loop: float) -> dict:
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
  if run.condenser is not None:
    run.condenser.reported(summary, final.params)
    summary["condensed_widths"] = list(run.condenser.features)
  variables = {"params": final.params, **({"batch_stats": final.batch_stats}
                                          if final.batch_stats else {})}
  summary.update(_flops(run, variables, masks))
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
