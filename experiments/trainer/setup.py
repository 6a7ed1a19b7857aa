"""Building a run: its train state (restored if checkpointed), programs, feed and writers.

``setup`` returns the ``Run`` the training loop of experiments/trainer/train.py
works with; a condensed run (``config.sparsity.condense``) is built at the widths
of the checkpoint it resumes from (experiments/trainer/condensing.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Callable

import jax

import sparse_jax
from experiments.data import input_pipeline
from experiments.trainer import checkpoints
from experiments.trainer import condensing
from experiments.trainer import feed as feed_lib
from experiments.trainer import loss_spikes
from experiments.trainer import mask_history
from experiments.trainer import methods
from experiments.trainer import programs as programs_lib
from experiments.trainer import reporting
from experiments.trainer import sharding
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib

log = logging.getLogger("sparse_jax.train")


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
  condenser: Any = None  # condensing.Condenser of a condensed run (config.sparsity.condense)
  full_variables: Any = None  # the full-width model's variables (shapes), for its FLOPs

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    """Also on an error: pending checkpoints (of good states) are completed."""
    self.programs.shutdown()
    self.mngr.wait_until_finished()
    self.writer.close()


def setup(config, workdir: str, is_main: bool, info, spe: int, t_segment: float) -> Run:
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
  if isinstance(methods.parse_structure(config.sparsity.get("structure", "unstructured")),
                sparse_jax.Channels):
    # tx.init ran on another instance (inside tx_fn): this one reads the channels'
    # attached biases and norms from the params' order too (shapes only).
    jax.eval_shape(tx.init, state.params)
  if is_main:
    log.info("Model %s on %s: %d steps (%d/epoch), %d devices, method %s, %s state.\n%s",
             config.model, config.dataset, total_steps, spe, jax.device_count(),
             config.sparsity.method, param_sharding,
             reporting.layer_table(state.params, masks0))
  mngr = checkpoints.checkpoint_manager(workdir, config)
  full_variables = jax.eval_shape(lambda: {"params": state.params,
                                           "batch_stats": state.batch_stats})
  state, meta, condenser = _restore(config, info, spe, mesh, mngr, state, masks0)
  if condenser is not None:
    model, tx = model_and_tx(config, info, spe, condenser, state.params)
  start_step = int(meta["step"])
  if start_step and is_main:
    log.info("Resumed from the checkpoint at step %d.", start_step)
  timings = collections.defaultdict(float, compile_s={})
  programs = programs_for(config, mesh, state, model, tx, info, spe, is_main, timings)
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
      spikes=loss_spikes.LossSpikes(events, state=meta.get("loss_spikes")),
      condenser=condenser, full_variables=full_variables)
  if run.keep_history and is_main:
    # Masks after every event, bit-packed on the host (experiments/trainer/mask_history.py).
    run.recorder = mask_history.Recorder.for_run(workdir, masks0, start_step=start_step,
                                                 final_sparsity=config.sparsity.final)
  if gf_every is not None:
    setup_gradient_flow(run)
  return run


def _restore(config, info, spe: int, mesh, mngr, state, masks0):
  """``(state, meta, condenser)`` of the newest checkpoint (``state`` if none).

  Restored into the structure and shardings of ``state`` (sharded if fsdp), or of
  a fresh state at the widths a condensed run's checkpoint says.
  """
  condenser = None
  if config.sparsity.get("condense", False):
    condenser = condensing.Condenser.for_run(config, info.num_classes, state.params, masks0,
                                             spe)
  state, meta = checkpoints.restore(mngr, lambda meta: state if not condensing.shrunk(meta)
                                    else fresh_state(config, info, spe, mesh,
                                                     condenser.resumed(meta)))
  meta = meta or {"step": 0}
  return state, meta, condenser and condenser.resumed(meta)


def programs_for(config, mesh, state, model, tx, info, spe: int, verbose: bool, timings):
  """The ``Programs`` of a model and its optimizer (compiled when first needed)."""
  return programs_lib.Programs(
      config, mesh, state, on_device=feed_lib.uses_device_data(config), verbose=verbose,
      timings=timings,
      step_kwargs=dict(model=model, tx=tx, config=config, num_classes=info.num_classes,
                       lr_fn=methods.learning_rate_schedule(config, spe),
                       sparse=config.sparsity.method != "dense"),
      eval_kwargs=dict(model=model, num_classes=info.num_classes))


def model_and_tx(config, info, spe: int, condenser, params):
  """A condensed run's model and optimizer at the condenser's widths.

  The optimizer counts its schedule in the original widths (``Channels(units=)``);
  its ``init`` is traced once on ``params`` (shapes only): the sparse wrapper reads
  the channels' attached biases and norms from the params' order there.
  """
  model = condenser.model(dtype=state_lib.DTYPES[config.dtype])
  tx = methods.create_tx_fn(config, model, info, spe, units=condenser.units())(None)
  jax.eval_shape(tx.init, params)
  return model, tx


def fresh_state(config, info, spe: int, mesh, condenser):
  """A new state at the condenser's widths: the target a checkpoint is restored into."""
  model = condenser.model(dtype=state_lib.DTYPES[config.dtype])
  tx_fn = methods.create_tx_fn(config, model, info, spe, units=condenser.units())
  return state_lib.create_sharded_train_state(
      config, model, tx_fn, info.input_shape, jax.random.PRNGKey(config.seed), mesh,
      config.get("param_sharding", "replicated"), info.input_dtype)


def fixed_batch(run: Run) -> dict:
  """The first ``batch_size`` training examples (a fixed batch for measures)."""
  config = run.config
  if run.feed.validation is not None:  # a batch of the examples trained on
    return {k: v[:config.batch_size] for k, v in run.feed.train_arrays.items()}
  return input_pipeline.load_arrays(config.dataset, f"train[:{config.batch_size}]",
                                    config.data_dir)


def setup_gradient_flow(run: Run):
  """Gradient-flow measures on a fixed batch, off the hot path (docs/algorithms.md §8).

  One extra dispatch and host sync every ``gradient_flow_every_steps``, plus step 0.
  """
  config = run.config
  batch = fixed_batch(run)
  fn = jax.jit(lambda s, b: steps_lib.gradient_flow_step(
      s, b, model=run.model, config=config, num_classes=run.info.num_classes))
  run.gradient_flow = lambda state: steps_lib.gradient_flow_record(
      fn(run.programs.host(state), batch))
  if run.start_step == 0:
    run.writer.write({"step": 0, "epoch": 0.0, **run.gradient_flow(run.state)})
