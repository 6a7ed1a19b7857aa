"""End-to-end tests of the trainer on the bundled MNIST subset (a few steps each)."""

import collections
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from experiments.trainer import methods
from experiments.trainer import programs as programs_lib
from experiments import models
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import train
from experiments.configs import default
from experiments.trainer.sharding import fsdp_spec
from tests import multidevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(method="granet", steps=40, **sparsity):
  config = default.lenet300_mnist5k(method, "sparsity=0.9,seed=3", **sparsity)
  config.num_train_steps = steps
  config.sparsity.update_every = 10
  config.sparsity.end_epoch = 1.0  # 31 steps: events at 10, 20, 30 prune
  config.log_every_steps = 10
  config.checkpoint_every_steps = 20
  return config


def read_export(workdir):
  with np.load(os.path.join(workdir, "export.npz")) as f:
    return dict(f)


def test_main_job_writes_summary_metrics_and_export(tmp_path):
  config = small_config()
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 40
  # 90% of the 266,200 prunable weights pruned by the event at step 30 (end_step=31).
  assert summary["mask_sparsity"] == pytest.approx(1 - round(0.1 * 266_200) / 266_200, abs=1e-12)
  assert summary["final_sparsity"] >= summary["mask_sparsity"]
  assert summary["final_test_accuracy"] > 0.5
  saved = json.load(open(tmp_path / "summary.json"))
  for key in ("final_test_accuracy", "best_test_accuracy", "final_sparsity", "steps",
              "wall_time_s", "method", "config"):
    assert key in saved
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if r.get("mask_update")] == [10, 20, 30]
  event = next(r for r in records if r.get("mask_update"))
  assert set(event["layer_density"]) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
  for r in records:
    for key in ("step", "train_loss", "sparsity", "learning_rate", "wall_time_s"):
      assert key in r
  assert any("test_accuracy" in r for r in records)
  assert os.listdir(tmp_path / "tensorboard")
  exported = read_export(tmp_path)
  for name in ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"):
    assert not np.any(exported[f"params/{name}"][~exported[f"masks/{name}"]])


def test_resume_equals_uninterrupted(tmp_path):
  full = tmp_path / "full"
  train.train_and_evaluate(small_config(), str(full))
  parts = tmp_path / "parts"
  halted = small_config()
  halted.halt_after_step = 20
  assert train.train_and_evaluate(halted, str(parts)) == {"halted_at_step": 20}
  assert not (parts / "summary.json").exists()
  summary = train.train_and_evaluate(small_config(), str(parts))  # resumes at 20
  assert summary["steps"] == 40
  a, b = read_export(full), read_export(parts)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_init_from_export_starts_from_its_params_and_masks(tmp_path):
  train.train_and_evaluate(small_config(), str(tmp_path / "first"))
  config = small_config("static", steps=1)
  config.init_from = str(tmp_path / "first")
  config.optimizer = "sgd"
  config.learning_rate = 0.0
  config.weight_decay = 0.0
  train.train_and_evaluate(config, str(tmp_path / "second"))
  a, b = read_export(tmp_path / "first"), read_export(tmp_path / "second")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = small_config()
  config.dataset = "cifar10"
  config.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="cifar10"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))


def test_unknown_method_is_a_clear_error(tmp_path):
  config = small_config()
  config.sparsity.method = "magic"
  with pytest.raises(ValueError, match="Unknown sparse method"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("method,extra", [("dense", {}), ("gmp", {}), ("rigl", {}),
                                          ("set", {}), ("static", {}),
                                          ("granet", {"initial": 0.5})])
def test_every_method_trains_from_a_config(tmp_path, method, extra):
  summary = train.train_and_evaluate(small_config(method, steps=31, **extra), str(tmp_path))
  assert summary["steps"] == 31
  if method in ("rigl", "set", "static", "granet"):
    assert summary["mask_sparsity"] == pytest.approx(0.9, abs=1e-5)


def test_lenet5_and_batchnorm_mlp_train_a_few_steps(tmp_path):
  for model, kwargs in (("lenet5", {}), ("mlp", {"batch_norm": True, "dropout_rate": 0.1})):
    config = small_config("static", steps=2)
    config.model = model
    config.model_kwargs = kwargs
    summary = train.train_and_evaluate(config, str(tmp_path / model))
    assert summary["steps"] == 2 and np.isfinite(summary["final_test_loss"])


@pytest.mark.parametrize("name,shape,classes", [("vgg19", (32, 32, 3), 100),
                                                ("resnet20", (32, 32, 3), 10),
                                                ("resnet50_cifar", (32, 32, 3), 10),
                                                ("resnet50", (224, 224, 3), 1000)])
def test_big_models_build_and_step_shapes(name, shape, classes):
  """Shape-checks state creation and a sparse train step (no real compute)."""
  config = small_config()
  config.num_train_steps = None  # 30 epochs of the 100 steps used below
  config.model = name
  model = models.get_model(name, classes)
  tx_fn = lambda masks: methods.create_sparse_tx(
      config, methods.create_optimizer(config, 100), 100, masks)
  state = jax.eval_shape(lambda: state_lib.create_train_state(
      config, model, tx_fn, shape, jax.random.PRNGKey(0)))
  batch = {"image": jax.ShapeDtypeStruct((2, *shape), jnp.float32),
           "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
  new_state, metrics = jax.eval_shape(
      lambda s, b: steps_lib.train_step(s, b, model=model, tx=tx_fn(None), config=config,
                                    num_classes=classes), state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics["train_loss"].shape == ()
  masks = sparse_jax.get_masks(state.opt_state)
  names = [n for n, m in zip(sparse_jax.leaf_names(state.params),
                             jax.tree.structure(state.params).flatten_up_to(masks))
           if m is not None]
  assert names and all(n.endswith("kernel") for n in names)


# Script lines (for a subprocess that imported ``checkpoints``) that keep the state
# of each checkpoint the trainer saves in ``saved["state"]``, as the trainer holds it.
KEEP_SAVED_STATE = textwrap.dedent("""\
    saved = {}
    save_checkpoint = checkpoints.save_checkpoint
    def keep_and_save(mngr, state, step, *args):
      saved["state"] = state
      save_checkpoint(mngr, state, step, *args)
    checkpoints.save_checkpoint = keep_and_save
""")

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    from experiments.trainer import checkpoints
    from experiments.trainer import train
    from experiments.configs import default

    # The state of the last checkpoint (step 40, the end), as the trainer holds it.
""") + KEEP_SAVED_STATE + textwrap.dedent("""
    def specs(state):
      # Shape and PartitionSpec of the params and optimizer state (masks, momentum).
      tree = {"params": state.params, "opt_state": state.opt_state}
      return {jax.tree_util.keystr(p): [list(x.shape), list(getattr(x.sharding, "spec", "?"))]
              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if x.ndim}

    for run in sys.argv[2].split(","):  # parallelism[:param_sharding]
      parallelism, _, param_sharding = run.partition(":")
      config = default.lenet300_mnist5k("granet", "sparsity=0.9,seed=5")
      config.num_train_steps = 40
      config.sparsity.update_every = 10
      config.sparsity.end_epoch = 1.0
      config.log_every_steps = 10
      config.checkpoint_every_steps = 40
      config.parallelism = parallelism
      config.param_sharding = param_sharding or "replicated"
      workdir = os.path.join(sys.argv[1], run.replace(":", "_"))
      train.train_and_evaluate(config, workdir)
      state = saved.pop("state")
      report = {"run": run, "devices": jax.device_count(), "specs": specs(state)}
      if param_sharding:
        # The checkpoint restored as a resumed run does it: into the state's shardings.
        restored, step = checkpoints.restore_checkpoint(
            checkpoints.checkpoint_manager(workdir, config), state)
        equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
        report["restored"] = {"step": step, "equal": equal, "specs": specs(restored)}
      print(json.dumps(report), flush=True)
""")


def _run_in_subprocess(workdir, runs, devices):
  """Runs ``runs`` (see MULTI_DEVICE_SCRIPT) in one process: {run: export}, {run: report}."""
  # Long rendezvous timeouts: a starved device thread waits instead of aborting the
  # run (tests/multidevice.py), so there is nothing to retry.
  out = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(workdir),
                        ",".join(runs)], env=multidevice.env(devices), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  exports, reports = {}, {}
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      report = json.loads(line)
      reports[report["run"]] = report
      exports[report["run"]] = read_export(
          os.path.join(workdir, report["run"].replace(":", "_")))
  assert sorted(reports) == sorted(runs)
  assert all(r["devices"] == devices for r in reports.values())
  return exports, reports


@pytest.fixture(scope="module")
def multi_device_runs(tmp_path_factory):
  """GraNet, 40 steps: 1 device; 8 devices replicated (mesh, pmap) and fsdp (mesh).

  The 8-device runs share one process (one JAX start-up).
  """
  one, _ = _run_in_subprocess(tmp_path_factory.mktemp("one"), ["mesh"], 1)
  many, reports = _run_in_subprocess(tmp_path_factory.mktemp("eight"),
                                     ["mesh", "pmap", "mesh:fsdp"], 8)
  return {"one": one["mesh"], **many}, reports


@pytest.mark.multidevice
def test_mesh_and_pmap_on_8_devices_match_one_device(multi_device_runs):
  runs, _ = multi_device_runs
  one = runs["one"]
  for parallelism in ("mesh", "pmap"):
    many = runs[parallelism]
    for k in one:
      if k.startswith("masks/"):
        differ = np.mean(one[k] != many[k])
        # Equal except where float reordering of the gradient mean flips a weight
        # sitting on the pruning threshold.
        assert differ <= 1e-3, (parallelism, k, differ)
      else:
        both = one[k.replace("params/", "masks/")] & many[k.replace("params/", "masks/")] \
            if k.replace("params/", "masks/") in one else np.ones(one[k].shape, bool)
        np.testing.assert_allclose(one[k][both], many[k][both], rtol=2e-3, atol=2e-5,
                                   err_msg=(parallelism, k))


@pytest.mark.multidevice
def test_fsdp_state_is_sharded_and_matches_replicated_on_8_devices(multi_device_runs):
  runs, reports = multi_device_runs
  # Every leaf of the params and optimizer state (masks, momentum) has the fsdp spec of
  # its shape, at the end of training and restored from the checkpoint; on 8 devices
  # that splits the 784 rows of Dense_0/kernel (235,200 of the 266,200 weights), its
  # mask and its momentum.
  restored = reports["mesh:fsdp"]["restored"]
  assert restored["step"] == 40 and restored["equal"]
  for specs in (reports["mesh:fsdp"]["specs"], restored["specs"]):
    for key, (shape, spec) in specs.items():
      assert spec == list(fsdp_spec(shape, 8)), (key, shape, spec)
    sharded = {k for k, (_, spec) in specs.items() if spec == ["data", None]}
    assert sum(k.endswith("['Dense_0']['kernel']") for k in sharded) == 3, sorted(specs)
  assert all(spec == [] for _, spec in reports["mesh"]["specs"].values())
  fsdp, repl = runs["mesh:fsdp"], runs["mesh"]
  assert fsdp.keys() == repl.keys()
  for k in repl:
    if k.startswith("masks/"):
      np.testing.assert_array_equal(fsdp[k], repl[k], err_msg=k)
    else:
      np.testing.assert_allclose(fsdp[k], repl[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_next_stop_hand_values():
  # Periods 31 (epochs) and 50 (logs), 200 steps: after 25 the epoch end at 31, after
  # 31 the log at 50, after 190 the end of training.
  assert train.next_stop(25, 200, periods=(31, 50)) == 31
  assert train.next_stop(31, 200, periods=(31, 50)) == 50
  assert train.next_stop(190, 200, periods=(31, 50)) == 200
  # A mask update at 40 comes first; one already passed (20) does not count.
  assert train.next_stop(31, 200, periods=(31, 50), events=[20, 40, 60]) == 40
  # halt_after_step, only if still ahead.
  assert train.next_stop(31, 200, periods=(31, 50), halt=35) == 35
  assert train.next_stop(36, 200, periods=(31, 50), halt=35) == 50


def test_dispatches_end_at_every_stop(tmp_path):
  # 10 steps per dispatch with epochs of 31 steps, logs every 50 and mask updates
  # every 25 (granet): every evaluation, log and event is recorded at its own step.
  config = default.lenet300_mnist5k("granet", None)
  config.num_epochs = 3
  config.log_every_steps = 50
  config.sparsity.update_every = 25
  config.sparsity.end_epoch = 2.0
  assert config.steps_per_dispatch == 10
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  evals = [r["step"] for r in records if "test_accuracy" in r]
  assert evals == [31, 62, 93]
  logged = {r["step"] for r in records}
  assert {50} <= logged
  assert [r["step"] for r in records if r.get("mask_update")] == [25, 50, 75]


# 4 epochs of 31 steps (124 updates), an event due every 7, end_epoch=2 (step 62)
# unless overridden; worked out by hand from each method's documented schedule.
@pytest.mark.parametrize("method,overrides,expected", [
    ("granet", {}, range(7, 124, 7)),  # regrowth until total_steps - 1 = 123
    # The pruning's last event is the last step (regrowth stops before it).
    ("granet", {"end_epoch": 4.0, "update_every": 4}, range(4, 125, 4)),
    ("gmp", {}, range(7, 63, 7)),  # the pruning schedule, until step 62
    ("rigl", {"mask_end_epoch": 2.5}, range(7, 79, 7)),  # round(77.5) = step 78
    ("rigl", {}, range(7, 94, 7)),  # RigL's default end: int(0.75 * 124) = 93
    ("set", {"mask_end_epoch": 2.5}, range(7, 79, 7)),
    ("set", {}, range(7, 124, 7)),  # SET's default end: total_steps - 1
    ("one_shot", {}, [62]),  # the one prune, at end_epoch
])
def test_mask_update_steps_are_exactly_the_optimizer_events(method, overrides, expected):
  # The trainer compiles ordinary steps without the mask-update branch, so its
  # event steps (asked of the transformation, sparse_jax.event_schedule) must be
  # every event of the method (SparseState counts the ones skipped). Checked on a
  # tiny param tree over the whole schedule.
  config = default.lenet300_mnist5k(method, None)
  config.num_epochs = 4
  config.sparsity.update_every = 7
  config.sparsity.end_epoch = 2.0
  config.sparsity.mask_end_epoch = None
  for k, v in overrides.items():
    setattr(config.sparsity, k, v)
  spe = 31
  tx = methods.create_sparse_tx(config, optax.sgd(0.1), spe)
  events = methods.mask_update_steps(config, spe, tx)
  assert events == set(expected) == methods.mask_update_steps(config, spe)
  params = {"Dense_0": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)},
            "Dense_1": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
  steps = {mu: jax.jit(lambda s, mu=mu: tx.update(params, s, params, mask_update=mu)[1])
           for mu in (False, True)}
  for decide in (lambda t: t in events, lambda t: False):
    s = tx.init(params)
    for t in range(1, methods.num_train_steps(config, spe) + 1):
      s = steps[decide(t)](s)
    skipped = int(sparse_jax.get_sparse_state(s).skipped_events)
    assert skipped == (0 if decide(min(events)) else len(events)), (method, skipped)


@pytest.mark.parametrize("method", ["granet"])
def test_host_decided_mask_updates_match_the_in_graph_decision(tmp_path, method):
  # The trainer runs ordinary steps without the mask-update branch and each event
  # alone with it; that relies on mask_update_steps listing every event. The same
  # run with the decision inside the graph (one lax.cond program) must agree.
  results = []
  for host in (True, False):
    config = default.lenet300_mnist5k(method, None)
    config.num_epochs = 1
    config.sparsity.update_every = 5
    config.sparsity.end_epoch = 0.5
    config.host_mask_updates = host
    workdir = tmp_path / f"{method}_{host}"
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["skipped_mask_updates"] == 0
    results.append(np.load(workdir / "export.npz"))
  host, graph = results
  assert sorted(host.files) == sorted(graph.files)
  for k in host.files:
    if k.startswith("masks/"):
      np.testing.assert_array_equal(host[k], graph[k], err_msg=k)
    else:
      np.testing.assert_allclose(host[k], graph[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert any(k.startswith("masks/") for k in host.files)


def test_param_sharding_is_validated(tmp_path):
  config = small_config()
  config.param_sharding = "zero3"
  with pytest.raises(ValueError, match="param_sharding 'zero3'.*replicated.*fsdp"):
    train.train_and_evaluate(config, str(tmp_path))
  config.param_sharding = "fsdp"
  config.parallelism = "pmap"
  with pytest.raises(ValueError, match="param_sharding='fsdp' needs parallelism='mesh'"):
    train.train_and_evaluate(config, str(tmp_path))


def _lowered_programs(fn):
  """Runs ``fn()`` and returns the names of the programs JAX lowered meanwhile.

  Lowering precedes the persistent-cache lookup, so a cache hit counts too.
  """
  names = []

  class Lowerings(logging.Handler):
    def emit(self, record):
      message = record.getMessage()
      if message.startswith("Finished jaxpr to MLIR module conversion"):
        names.append(message.split("conversion ")[1].split(" in ")[0])

  handler, logger = Lowerings(), logging.getLogger("jax")
  logger.addHandler(handler)
  # Global, not jax.log_compiles(): the trainer compiles in a background thread too.
  jax.config.update("jax_log_compiles", True)
  try:
    fn()
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(handler)
  return names


def test_a_run_compiles_each_program_once(tmp_path, monkeypatch):
  # The mask-update step alone compiles with sparse_jax.event_compiler_options.
  options, compile_logged = {}, programs_lib.compile_logged

  def spy(fn, args, what, *rest):
    options[what] = rest[-1]
    return compile_logged(fn, args, what, *rest)
  monkeypatch.setattr(programs_lib, "compile_logged", spy)
  # 40 steps at 10 per dispatch, stopping at events (10, 20, 30), logs (10), epochs (31)
  # and checkpoints (20): dispatches of 9, 1, 10 and 8 steps. Every length runs in one
  # ordinary program; the events in one mask-update program.
  names = _lowered_programs(lambda: train.train_and_evaluate(small_config(), str(tmp_path)))
  counts = collections.Counter(names)
  assert counts.pop("jit(dispatch_steps)") == 2, names  # mask_update=False and True
  assert counts.pop("jit(eval_step)") == 1, names
  assert counts.pop("jit(init)") == 1, names
  # The rest are tiny, once each: the PRNG key and sparse_jax.model_flops' forward pass.
  assert all(c == 1 for c in counts.values()) and len(counts) <= 5, names
  assert options == {"the mask-update step": sparse_jax.event_compiler_options(),
                     "the ordinary dispatch (10 steps)": None, "the evaluation": None}


CACHE_RUN_SCRIPT = textwrap.dedent("""
    import sys
    from experiments.trainer import train
    from experiments.configs import default
    config = default.lenet300_mnist5k("static", "sparsity=0.9")
    config.num_train_steps = 12
    config.log_every_steps = 5
    train.train_and_evaluate(config, sys.argv[1])
""")


def test_second_run_compiles_nothing(tmp_path):
  # Two processes, one persistent compilation cache: the second finds every program.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1",
             SPARSE_JAX_COMPILATION_CACHE=str(tmp_path / "cache"))
  logs, entries = [], []
  for run in ("first", "second"):
    out = subprocess.run([sys.executable, "-c", CACHE_RUN_SCRIPT, str(tmp_path / run)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    logs.append(out.stdout + out.stderr)
    entries.append(sorted(os.listdir(tmp_path / "cache")))
  first, second = logs
  assert "PERSISTENT COMPILATION CACHE MISS" in first
  assert "PERSISTENT COMPILATION CACHE MISS" not in second, [
      l for l in second.splitlines() if "CACHE MISS" in l]
  assert second.count("Persistent compilation cache hit") >= 3  # init, dispatch, eval
  assert entries[0] == entries[1]


@pytest.mark.parametrize("field,value,match", [
    ("sparsity.method", "magic", "Unknown sparse method"),
    ("sparsity.final", 1.5, r"sparsity.final=1.5 must be in \[0, 1\)"),
    ("model", "transformer", "Unknown model 'transformer'"),
    ("dataset", "svhn", "Unknown dataset 'svhn'"),
    ("optimizer", "lion", "Unknown optimizer 'lion'"),
])
def test_bad_config_is_rejected_before_data_or_model(tmp_path, monkeypatch, field, value,
                                                     match):
  def must_not_run(*args, **kwargs):
    raise AssertionError("data read or model built before the config was checked")
  monkeypatch.setattr(train.input_pipeline, "dataset_info", must_not_run)
  monkeypatch.setattr(state_lib, "create_model", must_not_run)
  config = small_config()
  section, _, name = field.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))
