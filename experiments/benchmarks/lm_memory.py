r"""XLA's peak memory of the scanned LM's train steps, compiled and not run (issue 30 item 4).

For each of ``--lm_models`` (``_harness.LM_BENCHMARKS``: ``lm_bytes_scan.py``'s recipe,
scanned blocks, remat, bfloat16 compute, AdamW; windows of 256 bytes), the trainer's
train step for dense, GraNet and RigL, ordinary (compiled without the mask-update
branch) and event (with it), is compiled on one device (``--mesh=none``) or
partitioned over the config's ``DATAxMODEL`` mesh (``--mesh=4x2``: the batch, params,
masks and Adam moments FSDP-split 4 ways, attention heads and MLP units 2 ways), and
XLA's peak of each program is printed and written to ``--out`` as JSON (arguments +
outputs + temporaries - donated, and each term). On a mesh the bytes are per device:
XLA's memory analysis of a partitioned program is one device's program. Each row also
counts the program's collectives and the state leaves it takes split (none on one
device): that the program is partitioned.

  python -m experiments.benchmarks.lm_memory --lm_models=lm_bytes_32m,lm_bytes_126m \
      --lm_batch=8 --mesh=4x2 --out=experiments/benchmarks/lm_memory_mesh.json

With ``--mesh=DxM`` and fewer than D*M devices, XLA is asked for D*M host (CPU)
devices (``--xla_force_host_platform_device_count``); that must happen before JAX
starts its backend, so run this as a script, not from a process that has used JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax

from experiments.benchmarks import _harness
from experiments.trainer import sharding

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(-start)?\(")


def mesh_devices(mesh: str) -> int:
  """The devices ``mesh`` (``"none"`` or ``"DxM"``) spans: 1 for ``"none"``."""
  if mesh == "none":
    return 1
  data, model = sharding.parse_mesh_shape(mesh)
  return data * model


def ensure_devices(mesh: str):
  """At least ``mesh_devices(mesh)`` devices: simulated on the host when fewer exist.

  Sets ``--xla_force_host_platform_device_count`` unless ``XLA_FLAGS`` already has it
  (on a GPU or TPU machine it only adds host devices); then checks JAX's devices.

  Raises:
    SystemExit: JAX's default backend has fewer devices (it started before the flag
      was set, or a single accelerator: ``JAX_PLATFORMS=cpu`` uses the host's).
  """
  needed = mesh_devices(mesh)
  flags = os.environ.get("XLA_FLAGS", "")
  if needed > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()
  if jax.device_count() < needed:
    raise SystemExit(f"--mesh={mesh} needs {needed} devices, JAX has {jax.device_count()} "
                     f"({jax.default_backend()}); with JAX_PLATFORMS=cpu the host simulates "
                     "them.")


def collectives(hlo_text: str) -> dict:
  """``kind -> count`` of the collectives in a compiled program's HLO text."""
  counts = {}
  for m in COLLECTIVE.finditer(hlo_text):
    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  return counts


def program_row(compiled) -> dict:
  """XLA's peak of ``compiled`` and its terms, its collectives and split state leaves."""
  m = compiled.memory_analysis()
  state_shardings = jax.tree.leaves(compiled.input_shardings[0][0])
  return {"xla_peak_bytes": _harness.xla_peak_bytes(m),
          "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "collectives": collectives(compiled.as_text()),
          "state_leaves": len(state_shardings),
          "split_state_leaves": sum(not s.is_fully_replicated for s in state_shardings)}


def memory_rows(name: str, bench: _harness.Bench, batch: int, mesh: str = "none") -> list:
  """A row per entry of ``_harness.VARIANTS``: ``program_row`` and the peak's ratio to
  dense's, each program compiled on its own (nothing run)."""
  built = _harness.build_variants(bench, batch, mesh)
  rows = {}
  for v, (step, state, data, _) in built.items():
    program = _harness.compile_variant(step, state, data)
    rows[v] = {"model": name, "batch": batch, "variant": v, "mesh": mesh,
               "devices": mesh_devices(mesh), "bytes": "per device",
               "compile_s": program["compile_s"], **program_row(program["compiled"])}
    del program
  dense = rows["dense"]["xla_peak_bytes"]
  return [dict(rows[v], peak_vs_dense=rows[v]["xla_peak_bytes"] / dense)
          for v in _harness.VARIANTS]


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lm_models", default="lm_bytes_32m",
                      help=f"comma-separated, of {', '.join(_harness.LM_BENCHMARKS)}")
  parser.add_argument("--lm_batch", type=int, default=8, help="sequences per batch")
  parser.add_argument("--mesh", default="none",
                      help="none (one device) or the config's DATAxMODEL mesh, e.g. 4x2")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  return parser.parse_args()


def main():
  args = parse_args()
  ensure_devices(args.mesh)
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "device_count": jax.device_count(), "jax": jax.__version__, "mesh": args.mesh,
            "bytes": "per device (XLA's memory analysis of the partitioned program)",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "lm_memory_rows": []}
  for name in args.lm_models.split(","):
    rows = memory_rows(name, _harness.LM_BENCHMARKS[name], args.lm_batch, args.mesh)
    result["lm_memory_rows"] += rows
    where = " per device" if args.mesh != "none" else ""
    for r in rows:
      print(f"{name} batch {args.lm_batch} mesh {args.mesh} {r['variant']:16s} peak "
            f"{r['xla_peak_bytes'] / 2**20:8.1f} MiB{where}  {r['peak_vs_dense']:.3f}x "
            f"dense  collectives {sum(r['collectives'].values())}, split state leaves "
            f"{r['split_state_leaves']}/{r['state_leaves']}", flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
