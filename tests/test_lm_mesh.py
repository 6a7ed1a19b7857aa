"""The scanned byte-level LM (experiments/configs/lm_bytes_scan.py) on a 2-D mesh.

Eight CPU devices as a ``("data", "model")`` mesh: FSDP over "data", the attention
heads and MLP units over "model" (experiments/trainer/sharding.py), the blocks one
``nn.scan`` with ``nn.remat`` (stacked kernels [depth, ...]) and
``sparsity.layer_axes={"blocks/.*": 1}``. Tiny sizes (width 32, depth 2, 4 heads,
MLP 64, batch 16, 6 steps, a mask update every 2 steps), float32 compute so that the
numbers can be compared exactly (bfloat16 reorders sums differently per mesh: on
this model ~20 of ~4,900 active weights then differ from the one-device run).

* (a) GraNet and RigL masks on the 4x2 mesh equal the one-device run's, bit for bit
  (the event's intermediate masks bit-packed, as in large models: ``_PACK_FROM``; the
  one-device run stores its masks packed, the config's default there, the mesh runs
  as bool arrays);
* (b) the compiled mask-update step (the trainer's own program) adds no collective
  whose result is a whole masked weight (its full shape, or flattened) to those of
  the ordinary step, while a ``jnp.sort`` of a flattened kernel, compiled on the
  same mesh, has one;
* (c) GraNet trained 3 steps on 4x2 (an event at step 2), checkpointed, resumed on
  2x4 (a model axis of 4) to step 6 (events at 4 and 6) ends with the masks and
  losses of the uninterrupted run, its state sharded for the new mesh.

The 8-device and one-device runs are two subprocesses started together; the
sharding rule and the config's errors are checked by hand in this process.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sparse_jax
from experiments.configs import lm_bytes_scan
from experiments.trainer import config_checks
from experiments.trainer import sharding
from tests import multidevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = textwrap.dedent(r"""
    import json, os, re, sys
    import jax, jax.numpy as jnp, numpy as np
    import sparse_jax
    from experiments.configs import lm_bytes_scan
    from experiments.trainer import checkpoints, programs as programs_lib, state as state_lib
    from experiments.trainer import train
    from sparse_jax import _mask_update

    # The event's pruned and dropped masks bit-packed, as in models of >= 2**25 weights.
    _mask_update._PACK_FROM = 1
    OUT = sys.argv[1]
    KEEP = ("blocks/attn/query/kernel", "blocks/attn/out/kernel", "blocks/mlp_in/kernel",
            "head/kernel")

    def config(method, mesh, halt=None):
      c = lm_bytes_scan.get_config(f"method={method},sparsity=0.8,seed=1,mesh={mesh}")
      c.model_kwargs = dict(width=32, depth=2, num_heads=4, mlp_dim=64, dropout_rate=0.0,
                            scan_layers=True, remat=True)
      c.dtype = "float32"
      c.batch_size, c.eval_batch_size = 16, 704
      c.num_train_steps, c.warmup_epochs = 6, 0.0
      c.sparsity.update_every = 2  # events at 2, 4, 6 (GraNet), 2, 4 (RigL: 75%)
      c.sparsity.end_epoch = 0.015  # 404 steps/epoch: GraNet prunes until step 6
      c.log_every_steps, c.checkpoint_every_steps, c.steps_per_dispatch = 1, 3, 3
      c.halt_after_step = halt
      return c

    # Each checkpointed state: its masks (npz) and the specs of some leaves (json).
    save_checkpoint = checkpoints.save_checkpoint
    def keep_and_save(mngr, state, step, *args):
      masks = sparse_jax.get_masks(state.opt_state)
      names = sparse_jax.leaf_names(masks)
      leaves = jax.tree.leaves(masks)
      host = state_lib.to_host(leaves)
      tag = os.path.basename(os.path.dirname(os.fspath(mngr.directory)))
      np.savez(os.path.join(OUT, f"{tag}_masks_{step}.npz"), **dict(zip(names, host)))
      # How the run stores its masks: PackedMask leaves, or bool arrays.
      stored = jax.tree.leaves(state.opt_state,
                               is_leaf=lambda x: isinstance(x, sparse_jax.PackedMask))
      specs = {"packed": any(isinstance(x, sparse_jax.PackedMask) for x in stored)}
      tree = {"params": state.params, "opt_state": state.opt_state}
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = sparse_jax.path_to_name(path)
        if name.endswith(KEEP):
          specs[name] = list(x.sharding.spec)
      json.dump(specs, open(os.path.join(OUT, f"{tag}_specs_{step}.json"), "w"))
      save_checkpoint(mngr, state, step, *args)
    checkpoints.save_checkpoint = keep_and_save

    def run(tag, cfg):
      summary = train.train_and_evaluate(cfg, os.path.join(OUT, tag))
      losses = [json.loads(l) for l in open(os.path.join(OUT, tag, "metrics.jsonl"))]
      return {"summary": {k: summary.get(k) for k in ("final_test_loss", "steps",
                                                      "halted_at_step")},
              "train_loss": {r["step"]: r["train_loss"] for r in losses if "train_loss" in r},
              "layer_density": {r["step"]: r["layer_density"] for r in losses
                                if "layer_density" in r}}
""")

ONE_DEVICE = COMMON + textwrap.dedent(r"""
    assert jax.device_count() == 1
    print(json.dumps({f"{m}_one": run(f"{m}_one", config(m, "none"))
                      for m in ("granet", "rigl")}))
""")

EIGHT_DEVICES = COMMON + textwrap.dedent(r"""
    from jax.sharding import NamedSharding
    from experiments.trainer import sharding

    assert jax.device_count() == 8
    compiled = {}
    compile_logged = programs_lib.compile_logged
    def keep_compiled(fn, args, what, *a, **k):
      compiled[what] = out = compile_logged(fn, args, what, *a, **k)
      return out
    programs_lib.compile_logged = keep_compiled

    COLLECTIVE = re.compile(r"(all-gather|all-reduce|all-to-all|collective-permute|"
                            r"reduce-scatter)(-start)?\(")
    def collectives(text):
      # [kind, result shape] of each collective of a compiled program (every array
      # of a tuple result).
      out = []
      for line in text.splitlines():
        m = COLLECTIVE.search(line)
        if m and " = " in line[:m.start()]:
          result = line[line.index(" = ") + 3:m.start()]
          for dims in re.findall(r"\w+\[([\d,]*)\]", result):
            out.append([m.group(1), [int(d) for d in dims.split(",") if d]])
      return out

    result = {}
    for method in ("granet", "rigl"):
      compiled.clear()
      halt = 3 if method == "granet" else None  # GraNet resumes on 2x4 below
      result[f"{method}_4x2"] = run(f"{method}_4x2", config(method, "4x2", halt))
      result[f"{method}_4x2"]["event"] = collectives(
          compiled["the mask-update step"].as_text())
      result[f"{method}_4x2"]["ordinary"] = collectives(
          compiled["the ordinary dispatch (3 steps)"].as_text())
    cfg = config("granet", "2x4")  # mesh_shape may change on resume (RESUMABLE_FIELDS)
    os.rename(os.path.join(OUT, "granet_4x2"), os.path.join(OUT, "granet_2x4"))
    result["granet_2x4"] = run("granet_2x4", cfg)

    # The detector's positive control: sorting a flattened kernel, split as the
    # trainer splits it on the 4x2 mesh, gathers it whole.
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    w = jax.ShapeDtypeStruct((2, 32, 4, 8), jnp.float32)
    spec = sharding.mesh_spec("blocks/attn/query/kernel", w.shape, mesh.shape, fsdp=True,
                              layer_axes={"blocks/.*": 1})
    result["control"] = {"spec": list(spec), "collectives": collectives(jax.jit(
        lambda w: jnp.sort(w.reshape(-1)), in_shardings=NamedSharding(mesh, spec)).lower(
            w).compile().as_text())}
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{run: findings} of both subprocesses, and the directory of their files."""
  out = {n: tmp_path_factory.mktemp(n) for n in ("one", "eight")}
  procs = {n: subprocess.Popen([sys.executable, "-c", script, str(out[n])],
                               env=multidevice.env(devices), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for n, script, devices in (("one", ONE_DEVICE, 1), ("eight", EIGHT_DEVICES, 8))}
  done = {n: proc.communicate(timeout=900) for n, proc in procs.items()}
  found = {}
  for n, (stdout, stderr) in done.items():
    assert procs[n].returncode == 0, (n, stderr[-4000:])
    found.update(json.loads(stdout.strip().splitlines()[-1]))
  return found, out


def masks(directory, tag, step):
  with np.load(os.path.join(directory, f"{tag}_masks_{step}.npz")) as f:
    return dict(f)


def spec_file(directory, tag, step):
  with open(os.path.join(directory, f"{tag}_specs_{step}.json")) as f:
    return json.load(f)


def assert_same_masks(a, b):
  assert a.keys() == b.keys() and len(a) == 7, sorted(a)
  for name in a:
    assert a[name].shape == b[name].shape, name
    assert np.array_equal(a[name], b[name]), (name, int(np.sum(a[name] != b[name])))


@pytest.mark.multidevice
@pytest.mark.parametrize("method", ["granet", "rigl"])
def test_masks_on_the_4x2_mesh_equal_one_device(runs, method):
  found, out = runs
  one = masks(out["one"], f"{method}_one", 6)
  # GraNet's 4x2 run halts at 3 (test (c) resumes it); RigL's runs to 6.
  step = 3 if method == "granet" else 6
  assert_same_masks(masks(out["eight"], f"{method}_4x2", step),
                    masks(out["one"], f"{method}_one", step))
  # The one-device run stored its masks packed (the config's default there), the
  # 4x2 run as bool arrays: the masks above are equal across the two storages.
  assert spec_file(out["one"], f"{method}_one", step)["packed"]
  assert not spec_file(out["eight"], f"{method}_4x2", step)["packed"]
  # Stacked kernels, pruned to 80% (GraNet by its last event, at step 6).
  assert one["blocks/attn/query/kernel"].shape == (2, 32, 4, 8)
  assert one["blocks/mlp_in/kernel"].shape == (2, 32, 64)
  density = sum(int(m.sum()) for m in one.values()) / sum(m.size for m in one.values())
  assert density == pytest.approx(0.2, abs=0.01), density
  losses, ref = found[f"{method}_4x2"]["train_loss"], found[f"{method}_one"]["train_loss"]
  for s, loss in losses.items():
    assert loss == pytest.approx(ref[s], rel=1e-6), s
  # The metrics' layer densities: one per layer of each stacked leaf (layer_axes).
  events = found[f"{method}_one"]["layer_density"]  # at each event; masks fixed after it
  logged = events[max(events, key=int)]
  assert sorted(logged) == sorted([f"{n}[{i}]" for n in one if n.startswith("blocks/")
                                   for i in range(2)] + ["head/kernel"])
  for name, m in one.items():
    for i in range(2 if name.startswith("blocks/") else 1):
      key, layer = (f"{name}[{i}]", m[i]) if name.startswith("blocks/") else (name, m)
      assert logged[key] == pytest.approx(layer.mean(), abs=1e-6), key


def _whole_weight(shape, weights):
  """The masked weight ``shape`` is, whole or flattened; else None."""
  size = int(np.prod(shape))
  for name, full in weights.items():
    if list(shape) == list(full) or (len(shape) == 1 and size == int(np.prod(full))):
      return name
  return None


WEIGHTS = {"blocks/attn/query/kernel": [2, 32, 4, 8], "blocks/attn/key/kernel": [2, 32, 4, 8],
           "blocks/attn/value/kernel": [2, 32, 4, 8], "blocks/attn/out/kernel": [2, 4, 8, 32],
           "blocks/mlp_in/kernel": [2, 32, 64], "blocks/mlp_out/kernel": [2, 64, 32],
           "head/kernel": [32, 256]}


@pytest.mark.multidevice
def test_detector_sees_the_gather_of_a_sorted_kernel(runs):
  control = runs[0]["control"]
  assert control["spec"] == [None, "data", "model", None]
  whole = [c for c in control["collectives"] if c[0] == "all-gather"
           and _whole_weight(c[1], WEIGHTS)]
  assert whole, control


@pytest.mark.multidevice
@pytest.mark.parametrize("method", ["granet", "rigl"])
def test_mask_update_gathers_no_whole_weight(runs, method):
  r = runs[0][f"{method}_4x2"]
  # The collectives the mask update adds: those the event program has beyond the
  # ordinary one's. (Both gather head/kernel, split over "data" alone, for the
  # forward and backward of their batch share: FSDP's gather of a weight, not the
  # mask update's.)
  extra = [c for c in r["event"] if c not in r["ordinary"] or
           r["event"].count(c) > r["ordinary"].count(c)]
  whole = [c for c in extra if _whole_weight(c[1], WEIGHTS)]
  assert not whole, whole
  # The mask update does communicate (per-shard histograms and counts summed): the
  # event program has collectives the ordinary one does not, so the absence above is
  # not that of an unsharded program.
  assert any(kind == "all-reduce" for kind, _ in extra), extra


@pytest.mark.multidevice
def test_resume_on_2x4_equals_the_uninterrupted_run(runs):
  found, out = runs
  resumed, one = found["granet_2x4"], found["granet_one"]
  assert found["granet_4x2"]["summary"]["halted_at_step"] == 3
  assert resumed["summary"]["steps"] == 6
  assert_same_masks(masks(out["eight"], "granet_2x4", 6), masks(out["one"], "granet_one", 6))
  assert resumed["summary"]["final_test_loss"] == pytest.approx(
      one["summary"]["final_test_loss"], rel=1e-6)
  for s in ("4", "5", "6"):  # the steps run on the 2x4 mesh
    assert resumed["train_loss"][s] == pytest.approx(one["train_loss"][s], rel=1e-6), s
  # The resumed state lives on the 2x4 mesh: heads and MLP units split 4 ways over
  # "model", the width 2 ways over "data", the layer axis whole; masks and Adam's
  # moments as their parameter.
  specs = spec_file(out["eight"], "granet_2x4", 6)
  expected = {"blocks/attn/query/kernel": [None, "data", "model", None],
              "blocks/attn/out/kernel": [None, "model", None, "data"],
              "blocks/mlp_in/kernel": [None, "data", "model"],
              "head/kernel": [None, "data"]}
  for suffix, spec in expected.items():
    leaves = {n: s for n, s in specs.items() if n.endswith(suffix)}
    assert len(leaves) >= 4, (suffix, sorted(specs))  # params, mask, mu, nu
    assert all(s == spec for s in leaves.values()), (suffix, leaves)


MESH_4X2 = {"data": 4, "model": 2}
STACKED = {"blocks/.*": 1}


def test_mesh_spec_hand_values():
  spec = lambda name, shape, **kw: sharding.mesh_spec(name, shape, MESH_4X2, **kw)
  # q/k/v [depth, width, heads, head_dim]: heads over model; fsdp: the width (128 >
  # 32), never the layer axis.
  assert spec("blocks/attn/query/kernel", (4, 128, 4, 32), fsdp=True,
              layer_axes=STACKED) == P(None, "data", "model", None)
  # out [depth, heads, head_dim, width]; mlp_in [.., width, mlp]; mlp_out [.., mlp, width].
  assert spec("blocks/attn/out/kernel", (4, 4, 32, 128), fsdp=True,
              layer_axes=STACKED) == P(None, "model", None, "data")
  assert spec("blocks/mlp_in/kernel", (4, 128, 512), fsdp=True,
              layer_axes=STACKED) == P(None, "data", "model")
  assert spec("blocks/mlp_out/kernel", (4, 512, 128), fsdp=True,
              layer_axes=STACKED) == P(None, "model", "data")
  # Unscanned names get the same rule; without fsdp only the model axis.
  assert spec("block0/mlp_in/kernel", (128, 512), fsdp=False) == P(None, "model")
  # A layer axis larger than the rest: fsdp_spec would take it; the rule does not.
  assert sharding.fsdp_spec((64, 8, 8), 4) == P("data", None, None)
  assert spec("blocks/ln1/scale", (64, 8), fsdp=True, layer_axes=STACKED) == P(None, "data")
  assert spec("blocks/ln1/scale", (64, 8), fsdp=True) == P("data", None)
  # Not divisible by the model axis (3 heads): not split over model; other leaves
  # as fsdp_spec over data; a scalar replicated.
  assert spec("attn/key/kernel", (32, 3, 8), fsdp=True) == P("data", None, None)
  assert spec("head/kernel", (128, 256), fsdp=True) == P(None, "data")
  assert spec("head/kernel", (128, 256), fsdp=False) == P()
  assert spec("count", (), fsdp=True) == P()


def test_optimizer_state_leaves_take_their_parameters_sharding():
  # A 1x1 ("data", "model") mesh: the specs are the rule's whatever the sizes.
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  params = {"blocks": {"mlp_in": {"kernel": np.zeros((2, 8, 16), np.float32),
                                  "bias": np.zeros((2, 16), np.float32)}},
            "head": {"kernel": np.zeros((8, 16), np.float32)}}
  state = {"mu": params, "count": np.zeros((), np.int32),
           "masks": {"blocks": {"mlp_in": {"kernel": np.ones((2, 8, 16), bool),
                                           "bias": None}},
                     "head": {"kernel": sparse_jax.PackedMask(
                         np.zeros((1, 16), np.uint8), (8, 16))}},
           "other": np.zeros((8, 16), np.float32)}
  out = sharding.mesh_shardings(state, mesh, params, fsdp=True, layer_axes=STACKED)
  kernel = P(None, "data", "model")
  assert out["mu"]["blocks"]["mlp_in"]["kernel"].spec == kernel
  assert out["masks"]["blocks"]["mlp_in"]["kernel"].spec == kernel
  assert out["masks"]["blocks"]["mlp_in"]["bias"] is None
  assert out["mu"]["blocks"]["mlp_in"]["bias"].spec == P(None, "data")  # never axis 0
  packed = out["masks"]["head"]["kernel"]
  assert isinstance(packed, sparse_jax.PackedMask) and packed.shape == (8, 16)
  assert packed.bits.spec == P(None, "data")  # head split on its last axis only
  assert out["count"].spec == P()
  # Not named like a parameter: fsdp_spec (no layer axis known).
  assert out["other"].spec == P(None, "data")


def test_mesh_config_errors():
  config = lm_bytes_scan.get_config("mesh=4x2")
  assert (config.mesh_shape, config.param_sharding) == ("4x2", "fsdp")
  config_checks.validate(config)
  info = dict(num_classes=256, input_shape=(64,), input_dtype="int32")
  config_checks.check_mesh(config, **info, device_count=8)
  with pytest.raises(ValueError, match=r"4 x 2 = 8 devices, but this run has 4.*'4x1'"):
    config_checks.check_mesh(config, **info, device_count=4)
  config.mesh_shape = "1x8"  # 4 heads
  with pytest.raises(ValueError, match=r"model axis \(8\) does not divide the 4 heads of "
                     r"blocks/attn/key/kernel"):
    config_checks.check_mesh(config, **info, device_count=8)
  config.mesh_shape = "4by2"
  with pytest.raises(ValueError, match="mesh_shape='4by2' is not DATAxMODEL"):
    config_checks.validate(config)
  config.mesh_shape, config.parallelism, config.param_sharding = "4x2", "pmap", "replicated"
  with pytest.raises(ValueError, match="mesh_shape='4x2' needs parallelism='mesh'"):
    config_checks.validate(config)
  lenet = lm_bytes_scan.get_config("mesh=4x2")
  lenet.model, lenet.model_kwargs = "lenet300_100", {}
  with pytest.raises(ValueError, match="has no attention or MLP kernel"):
    config_checks.check_mesh(lenet, 10, (28, 28, 1), device_count=8)
  with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
    lm_bytes_scan.get_config("structure=2:4,sparsity=0.7")
  assert lm_bytes_scan.get_config("structure=2:4").sparsity.final == 0.5
  bad = lm_bytes_scan.get_config()
  bad.sparsity.layer_axes = {"blocks/.*": 0}
  with pytest.raises(ValueError, match="sparsity.layer_axes=.*leading layer axes"):
    config_checks.validate(bad)


def test_the_default_mesh_is_one_data_axis():
  config = lm_bytes_scan.get_config()
  assert config.get("mesh_shape") is None
  # Packed masks on one device (the one-device runs above store them so and match
  # the 4x2 runs' bool masks); bool on a mesh, where row packing gathers.
  assert config.sparsity.packed_masks
  assert not lm_bytes_scan.get_config("mesh=4x2").sparsity.packed_masks
  mesh = sharding.data_mesh(config)
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
