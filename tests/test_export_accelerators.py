"""The language model's train programs lower for TPU and CUDA from this CPU (issue 30).

Each case builds the trainer's programs as ``experiments/trainer/train.py`` does
(model, optimizer and ``Programs`` over the run's mesh, from a tiny ``LM_CONFIG``)
and exports the ordinary dispatch (compiled without the mask-update branch), the
mask-update step (with it) and, for sparse methods, the dispatch that decides in the
graph (``host_mask_updates=False``), with ``jax.export`` for ``platforms=("tpu",
"cuda")``. Lowering for a platform uses that platform's rules, so a construct that
only the CPU has fails here, on this CPU: a host callback (``jax.pure_callback``,
``io_callback``), a custom call without a stable target, a primitive with a CPU-only
lowering (``test_export_refuses_cpu_only_constructs``). ``jax.debug.print`` fails too,
with a ``TypeError`` from inside jax 0.10.2's multi-platform lowering (not asserted).
Only the shapes are used: nothing is initialised or compiled.
"""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import io_callback
from jax.extend import core
from jax.interpreters import mlir

from experiments.configs import lm_bytes_scan
from experiments.data import input_pipeline
from experiments.trainer import feed as feed_lib
from experiments.trainer import methods
from experiments.trainer import programs as programs_lib
from experiments.trainer import sharding
from experiments.trainer import state as state_lib
from tests import multidevice

LM_CONFIG = lm_bytes_scan  # the language model's config, as experiments/benchmarks/device_check.py
PLATFORMS = ("tpu", "cuda")
SEQ, BATCH = 16, 8  # the batch splits over 8 devices (test_lm_exports_sharded_over_8_devices)
# Only the schedules read it: ~1600 steps an epoch, so GraNet's pruning window holds
# the first event (ΔT = 50).
N_TRAIN = 6464
# The custom-call targets an exported program may hold: XLA's sharding markers
# (jax.export refuses any target without a compatibility guarantee by itself; this
# list is narrower: no linear algebra, no Pallas kernel, no lax.empty).
ALLOWED_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
# case -> (method, structure, config overrides, the trainer's programs exported):
# False the ordinary dispatch, True the mask-update step, None the dispatch that
# decides in the graph (a dense run's only one).
CASES = {
    "dense": ("dense", "unstructured", {}, (None,)),
    "granet": ("granet", "unstructured", {}, (False, True, None)),
    "rigl": ("rigl", "unstructured", {}, (False, True, None)),
    "granet_2:4": ("granet", "2:4", {}, (False, True)),
    "rigl_2:4": ("rigl", "2:4", {}, (False, True)),
    # The trainer's other branches: fsdp state, batches streamed per dispatch.
    "granet_fsdp_streamed": ("granet", "unstructured",
                             {"param_sharding": "fsdp", "data_on_device": False},
                             (False, True)),
}
# On 8 devices only (test_lm_exports_sharded_over_8_devices), with granet_fsdp_streamed:
# the config's "mesh=4x2", FSDP over "data" and attention heads and MLP units over "model".
SHARDED_CASES = {
    "rigl_mesh_4x2": ("rigl", "unstructured", {"mesh_shape": "4x2", "param_sharding": "fsdp"},
                      (False, True)),
}


def lm_config(method: str, structure: str, overrides: dict):
  """A tiny ``LM_CONFIG`` (2 blocks of width 32) with ``method`` and ``structure``."""
  config = LM_CONFIG.get_config(f"method={method},structure={structure}")
  config.batch_size = BATCH
  config.model_kwargs.update(width=32, depth=2, num_heads=2, mlp_dim=64)
  for k, v in overrides.items():
    config[k] = v
  return config


def trainer_programs(config):
  """``Programs`` and the abstract state and dispatch inputs, as ``train._setup`` makes them."""
  info = input_pipeline.DatasetInfo(num_train_examples=N_TRAIN, num_eval_examples=0,
                                    num_classes=256, input_shape=(SEQ,), eval_split="test",
                                    input_dtype="int32", byte_level=True)
  spe = N_TRAIN // BATCH
  model = state_lib.create_model(config, info.num_classes)
  tx_fn = methods.create_tx_fn(config, model, info, spe)
  state = jax.eval_shape(
      lambda key: state_lib.create_train_state(config, model, tx_fn, info.input_shape, key,
                                               info.input_dtype), jax.random.PRNGKey(0))
  on_device = feed_lib.uses_device_data(config)
  programs = programs_lib.Programs(
      config, sharding.data_mesh(config), state, on_device=on_device, verbose=False,
      timings=None,
      step_kwargs=dict(model=model, tx=tx_fn(None), config=config,
                       num_classes=info.num_classes,
                       lr_fn=methods.learning_rate_schedule(config, spe),
                       sparse=config.sparsity.method != "dense"),
      eval_kwargs=dict(model=model, num_classes=info.num_classes))
  tokens = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  s_per = config.steps_per_dispatch
  if on_device:  # the training set on the device, example indices per step
    data = (tokens(N_TRAIN, SEQ), tokens(N_TRAIN, SEQ), tokens(s_per, BATCH))
  else:  # the dispatch's batches, stacked
    data = {"image": tokens(s_per, BATCH, SEQ), "label": tokens(s_per, BATCH, SEQ)}
  return programs, (state, data, tokens())


def custom_call_targets(module_text: str) -> set[str]:
  return set(re.findall(r"stablehlo\.custom_call @([\w.$]+)", module_text))


def export_case(method: str, structure: str, overrides: dict, keys):
  """Exports the trainer's programs ``keys`` of a tiny LM for TPU and CUDA, and checks them."""
  config = lm_config(method, structure, overrides)
  programs, args = trainer_programs(config)
  assert "blocks" in args[0].params  # LM_CONFIG's blocks: one scanned stack
  sizes = {}
  for key in keys:
    # The trainer's own jit of the program (shardings, donation), as it compiles it.
    jitted = programs._dispatch_fn(key)  # pylint: disable=protected-access
    exported = export.export(jitted, platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    assert exported.nr_devices == jax.device_count()
    assert not exported.ordered_effects and not exported.unordered_effects
    text = exported.mlir_module()
    assert custom_call_targets(text) <= ALLOWED_CUSTOM_CALLS, key
    # The StableHLO bytecode a TPU or GPU would compile. (``exported.serialize()``
    # would also need the state's pytree nodes registered: optax's NamedTuples.)
    assert exported.mlir_module_serialized
    sizes[key] = len(text)
    assert "tf.aliasing_output" in text  # the state's buffers stay donated
    if config.param_sharding == "fsdp" and jax.device_count() > 1:  # split, not copied
      # (exported.in_shardings_hlo is all None under Shardy: read the signature.)
      assert re.search(r'"data"[^\]]*\]>[^}]*\} loc\("state\.params', text)
    if config.get("mesh_shape"):  # tensor parallel
      assert '{"model"}' in text
  programs.shutdown()
  if method != "dense":  # the event program holds the mask update: a larger module
    assert sizes[True] > sizes[False]


@pytest.mark.parametrize("case", list(CASES))
def test_lm_train_programs_export_for_tpu_and_cuda(case):
  export_case(*CASES[case])


@pytest.mark.multidevice
def test_lm_exports_sharded_over_8_devices():
  # The programs lowered for a slice of 8 chips, on 8 host devices.
  script = ("from tests import test_export_accelerators as t\n"
            "for case in ('granet_fsdp_streamed', *t.SHARDED_CASES):\n"
            "  t.export_case(*{**t.CASES, **t.SHARDED_CASES}[case])\n")
  out = subprocess.run([sys.executable, "-c", script], env=multidevice.env(8),
                       cwd=multidevice.REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]


# A primitive lowered for the CPU alone, as a CPU-only kernel would be.
CPU_ONLY_KERNEL = core.Primitive("cpu_only_kernel")
CPU_ONLY_KERNEL.def_abstract_eval(lambda x: x)
CPU_ONLY_KERNEL.def_impl(np.sin)
mlir.register_lowering(CPU_ONLY_KERNEL, mlir.lower_fun(jnp.sin, multiple_results=False),
                       platform="cpu")
_SHAPE = jax.ShapeDtypeStruct((4,), jnp.float32)
CPU_ONLY = {
    "pure_callback": (lambda x: jax.pure_callback(np.sin, _SHAPE, x),
                      NotImplementedError, "python_callback"),
    "io_callback": (lambda x: io_callback(np.sin, _SHAPE, x),
                    NotImplementedError, "python_callback"),
    "unstable_custom_call": (lambda x: jax.ffi.ffi_call("cpu_kernel", _SHAPE)(x),
                             ValueError, "custom calls whose targets have no"),
    "cpu_only_lowering": (CPU_ONLY_KERNEL.bind, NotImplementedError,
                          "not found for platforms"),
}


@pytest.mark.parametrize("construct", list(CPU_ONLY))
def test_export_refuses_cpu_only_constructs(construct):
  fn, error, match = CPU_ONLY[construct]
  jax.jit(fn).lower(_SHAPE)  # lowers for this CPU
  with pytest.raises(error, match=match):
    export.export(jax.jit(fn), platforms=PLATFORMS)(_SHAPE)


def test_custom_call_check_sees_stable_targets():
  # What the allow-list adds to jax.export's own check: eigh exports (its targets are
  # stable), but a train program holding it would fail above.
  exported = export.export(jax.jit(lambda a: jnp.linalg.eigh(a)[0]), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((4, 4), jnp.float32))
  targets = custom_call_targets(exported.mlir_module())
  assert {"Eigh", "cusolver_syevd_ffi"} <= targets
  assert not targets <= ALLOWED_CUSTOM_CALLS
