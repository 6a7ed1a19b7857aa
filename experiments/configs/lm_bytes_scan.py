r"""A byte-level GPT written as TPU-pod transformers are: scanned layers, remat, bfloat16.

  python -m experiments.main \
      --config=experiments/configs/lm_bytes_scan.py:method=rigl,sparsity=0.9,mesh=4x2 \
      --workdir=workdirs/lm_scan_rigl_s0.9

Family argument: ``method`` dense | granet (default) | gmp | rigl | set | static,
``sparsity`` (default 0.9), ``structure`` unstructured (default) | N:M (e.g.
``structure=2:4``, which fixes the sparsity at 1 - N/M: ``sparsity`` may then be
left out) | block:RxC | channels, ``seed`` (default 0) and ``mesh``: ``none``
(default; one data axis over every device) or ``DATAxMODEL``, e.g. ``mesh=4x2``
for 8 devices: the batch split 4 ways, each attention's heads and MLP's units 2
ways (tensor parallel), and the params, masks and Adam moments FSDP-split over
the data axis (``param_sharding="fsdp"``; experiments/trainer/sharding.py). On
one CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulates 8 devices.

Data: ``bytes_pydoc`` as experiments/configs/gpt_bytes.py (64-byte windows of the
Python documentation, the next byte predicted at every position). Model: causal,
width 128, 4 pre-LN blocks of 4-head attention and a 512-wide GELU MLP, a 256-way
head; the blocks are one ``nn.scan`` (``scan_layers``) with ``nn.remat``
(``remat``), computing in bfloat16 (``config.dtype``; params and optimizer state
stay float32). Every block leaf is stacked on a leading layer axis
(``blocks/attn/query/kernel`` [4, 128, 4, 32], ``blocks/mlp_in/kernel``
[4, 128, 512], ...), and ``sparsity.layer_axes = {"blocks/.*": 1}`` tells the sparse
method that axis indexes layers: ERK densities, layer-wise counts and N:M groups
are per block, so the 4 slices get the masks the unscanned GPT's 4 blocks would.
Masks are stored 1 bit per weight on one device (``sparsity.packed_masks``) and as bool
arrays on a mesh (see ``get_config``): a one-device run resumed on a mesh keeps its packed masks
with ``--config.sparsity.packed_masks=True``.
Recipe: gpt_bytes's (4 epochs of 202 steps at batch 32, AdamW lr 2e-3 with 0.25
epoch of linear warm-up then cosine decay, weight decay 0.05; ΔT = 50 steps,
GraNet/GMP prune from epoch 0 to 2.5, RigL/SET drop fraction 0.3, ERK).
Expected: close to gpt_bytes.py with depth 4 (bfloat16 compute costs little at
this size); not measured yet.
"""

import sparse_jax
from experiments.configs import default
from experiments.configs import gpt_bytes
from experiments.trainer import methods


def get_config(arg: str | None = None):
  args = default.parse_args(
      arg, {"method": "granet", "sparsity": 0.9, "structure": "unstructured", "seed": 0,
            "mesh": "none"},
      choices={"method": default.TRANSFORMER_METHODS})
  # gpt_bytes's data and recipe; the model and its compute here.
  config = gpt_bytes.get_config(
      f"method={args['method']},sparsity={args['sparsity']},seed={args['seed']}")
  structure = methods.parse_structure(args["structure"])  # raises on a bad form
  config.sparsity.structure = args["structure"]
  if isinstance(structure, sparse_jax.NM):  # N:M fixes the sparsity
    if args["sparsity"] not in (0.9, structure.sparsity):
      raise ValueError(f"Config argument structure={args['structure']} fixes the "
                       f"sparsity at {structure.sparsity:g}; leave sparsity out or give "
                       f"sparsity={structure.sparsity:g} (got {args['sparsity']}).")
    config.sparsity.final = structure.sparsity
  if args["mesh"] != "none":
    config.mesh_shape = args["mesh"]  # checked at trainer start (config_checks)
    config.param_sharding = "fsdp"
  config.model_kwargs = dict(width=128, depth=4, num_heads=4, mlp_dim=512,
                             dropout_rate=0.0, scan_layers=True, remat=True)
  config.dtype = "bfloat16"  # compute; params stay float32 (state.create_model)
  # The scanned blocks' leaves are [depth, ...]: depth layers each.
  config.sparsity.layer_axes = {"blocks/.*": 1}
  # On one device the masks are stored 1 bit per weight (the same masks and updates
  # as bool masks): the ordinary step's XLA peak is 1.006x dense instead of 1.051x at
  # 126M parameters (experiments/benchmarks/README.md, the scanned language model's
  # memory). Not on a mesh: a PackedMask packs rows, i.e. merges the sharded leading
  # axes, and the event all-gathers the attention masks (tests/test_lm_mesh.py); there
  # bool masks are 1.038-1.046x per device.
  config.sparsity.packed_masks = args["mesh"] == "none"
  return config
