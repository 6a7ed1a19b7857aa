"""experiments/benchmarks/lm_memory.py: the scanned LM's train step partitioned on 4x2.

One subprocess started without a device count in ``XLA_FLAGS``: ``ensure_devices("4x2")``
must give it 8 host devices. A tiny ``lm_bytes_scan`` model (width 64, 2 blocks, 4
heads, MLP 256, windows of 16, batch 8) has its dense train step compiled twice, as
``_harness.build_method`` builds it: on one device (``mesh="none"``) and partitioned
over the config's 4x2 mesh. Checked against values worked out from the state itself:

* XLA's argument bytes are, on one device, the sum of the state's and batch's bytes,
  and on the mesh the sum of each leaf's shard (``sharding.shard_shape``): per device;
* the mesh program holds collectives and takes the kernels split, one device's none;
* so its per-device peak is below the one-device peak.
"""

import json
import os
import subprocess
import sys
import textwrap

from tests import multidevice

SCRIPT = textwrap.dedent(r"""
    import json, math
    import jax
    from experiments.benchmarks import _harness, lm_memory

    lm_memory.ensure_devices("4x2")
    bench = _harness.Bench(_harness.LM_CONFIG, (16,), 256, 64_000,
                           dict(width=64, depth=2, num_heads=4, mlp_dim=256), "int32")
    out = {"device_count": jax.device_count()}
    for mesh in ("none", "4x2"):
      step, state, data, _ = _harness.build_method(bench, "dense", 8, mesh)
      compiled = _harness.compile_variant(step(None), state, data)["compiled"]
      leaves = jax.tree.leaves((state, data))
      out[mesh] = dict(lm_memory.program_row(compiled), by_hand=sum(
          math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves),
          whole=sum(x.nbytes for x in leaves))
    print(json.dumps(out))
""")


def test_dense_step_is_partitioned_and_measured_per_device():
  flags = [f for f in multidevice.xla_flags(8).split()
           if "force_host_platform_device_count" not in f]
  env = dict(multidevice.env(8), XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=multidevice.REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one, mesh = out["none"], out["4x2"]
  assert out["device_count"] == 8
  # One device: the whole state and batch are its arguments, nothing split or exchanged.
  assert one["argument_bytes"] == one["by_hand"] == one["whole"]
  assert one["collectives"] == {} and one["split_state_leaves"] == 0
  # 4x2: each device's arguments are its shards, a fraction of the whole.
  assert mesh["whole"] == one["whole"]
  assert mesh["argument_bytes"] == mesh["by_hand"] < one["whole"] / 4
  assert mesh["split_state_leaves"] > mesh["state_leaves"] / 2
  assert mesh["collectives"].get("all-reduce", 0) + mesh["collectives"].get("all-gather", 0) > 0
  assert mesh["xla_peak_bytes"] < one["xla_peak_bytes"]
