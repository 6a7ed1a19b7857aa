"""Fields shared by every experiment config, with their defaults.

Each experiment file calls ``get_base_config()`` and changes what differs.
Any field can be overridden on the command line, e.g.
``--config.sparsity.final=0.95 --config.num_epochs=10``. A file may also take a
family argument after a colon (``granet_lenet300_mnist5k.py:sparsity=0.95,seed=1``),
parsed by ``parse_args`` against the names it declares.
"""

from collections.abc import Mapping, Sequence
import difflib
from typing import Any

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  """The default: GraNet at 98% on LeNet-300-100 with the bundled MNIST subset."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data (experiments/data/input_pipeline.py).
  config.dataset = "mnist5k"
  config.data_dir = config_dict.placeholder(str)
  config.batch_size = 128  # global, over all devices and hosts
  config.eval_batch_size = 500
  # Keep a small, unaugmented training set on the device and gather batches there
  # (no host->device copy per step). Only for data sets without augmentation.
  config.data_on_device = True

  # Model (experiments/models).
  config.model = "lenet300_100"
  config.model_kwargs = ml_collections.ConfigDict()
  config.dtype = "float32"

  # Training recipe (docs/algorithms.md §6: the GraNet code's CIFAR recipe).
  config.num_epochs = 30
  config.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs if set
  config.optimizer = "sgd"  # sgd | adam | adamw | rmsprop | adagrad
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.lr_schedule = "multistep"  # multistep | cosine | constant
  config.lr_milestones = (0.5, 0.75)  # fractions of training (multistep)
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0.0
  config.weight_decay = 5e-4
  config.weight_decay_on_norm_and_bias = True  # the GraNet code decays everything
  config.label_smoothing = 0.0

  # Sparse training (sparse_jax): the method and its schedule.
  config.sparsity = ml_collections.ConfigDict()
  config.sparsity.method = "granet"  # dense | granet | gmp | rigl | set | static | ste | srste
  config.sparsity.final = 0.98
  config.sparsity.initial = 0.0  # > 0 with granet gives GraNet-ST
  config.sparsity.distribution = "erk"  # uniform | er | erk
  config.sparsity.update_every = 100  # ΔT in optimizer steps
  config.sparsity.start_epoch = 0.0
  config.sparsity.end_epoch = 20.0  # end of the pruning schedule (granet, gmp)
  config.sparsity.regrowth_rate = 0.5
  config.sparsity.min_regrowth_rate = 0.005
  config.sparsity.growth = "gradient"  # gradient | momentum | random
  config.sparsity.scope = "global"  # global | layerwise
  config.sparsity.sampling = "exact"  # exact | bernoulli (the authors')
  config.sparsity.include = config_dict.placeholder(str)  # regex over param names
  config.sparsity.exclude = config_dict.placeholder(str)
  config.sparsity.keep_first_dense = False
  config.sparsity.keep_last_dense = False
  config.sparsity.mask_end_epoch = config_dict.placeholder(float)  # rigl/set: stop updates
  # Structure of the masks (sparse_jax.NM/Block/Channels): "unstructured", "N:M"
  # (e.g. "2:4"; sparsity.final must then be 1 - N/M), "block:RxC" (e.g. "block:4x4")
  # or "channels" (whole output units; with keep_last_dense=True).
  config.sparsity.structure = "unstructured"
  # srste: SR-STE's lambda_w (Zhou et al. 2021), the decay of the pruned dense weights.
  config.sparsity.srste_decay = 2e-4
  # Store the masks 1 bit per weight in the optimizer state (very large models);
  # results are identical to the bool (1 byte) masks.
  config.sparsity.packed_masks = False
  # Leading layer axes of stacked leaves: {leaf-name regex: count}, e.g.
  # {"blocks/.*": 1} for a model whose blocks are one nn.scan (params
  # [depth, ...]): each of the depth slices is pruned and counted as its own layer.
  # None: every leaf is one layer. Passed to the sparse_jax factory as layer_axes.
  config.sparsity.layer_axes = config_dict.placeholder(dict)
  # granet/rigl/set: updates over which a regrown weight's learning rate warms up
  # from 0 (at most update_every; 0: full steps at once, as the papers).
  config.sparsity.regrowth_warmup = 0
  # structure="channels" (granet/gmp/rigl/set, chain models): remove the units dead
  # for condense_patience events in a row and train on the smaller dense model
  # (experiments/trainer/condensing.py); a removed unit never comes back.
  # Each shrink recompiles (seconds): it waits until condense_min_fraction of the
  # current units can go (the last event removes whatever is dead).
  config.sparsity.condense = False
  config.sparsity.condense_patience = 1
  config.sparsity.condense_min_fraction = 0.1
  # granet/gmp: during the pruning schedule a shrink waits for the schedule's last
  # event if that comes within this many steps (a shrink's 3 compiles take seconds and
  # the next pruning event would shrink again; ΔT = 50 to epoch 5 on the MNIST
  # subset: one shrink at step 150 instead of three).
  config.sparsity.condense_wait_steps = 200
  # Chase (rigl/set on weights with condense=True; experiments/trainer/chase.py):
  # remove this fraction of the hidden units by sparsity.end_epoch, lowest unmasked
  # mean magnitude first (0: off); a layer keeps int(C (1 - channel_sparsity) *
  # channel_floor) units at least. The weight budget stays 1 - sparsity.final.
  config.sparsity.channel_sparsity = 0.0
  config.sparsity.channel_floor = 0.2
  # Keep the masks after every event (bit-packed, <workdir>/mask_history.npz) and the
  # union of all masks on the device (ITOP); see experiments/trainer/mask_history.py.
  config.record_mask_history = False

  # Parallelism and infrastructure.
  config.parallelism = "mesh"  # mesh (jax.jit over a device mesh) | pmap
  # How the train state (params, batch stats, optimizer state with the sparse masks
  # and momentum) lives on the mesh: "replicated" (a full copy on every device) or
  # "fsdp" (each leaf split along its largest axis divisible by the device count,
  # else replicated; experiments/trainer/sharding.py). fsdp needs parallelism="mesh".
  config.param_sharding = "replicated"
  # A 2-D (data, model) mesh, "DxM" (e.g. "4x2": D * M must be the device count):
  # the batch split over "data", the attention and MLP kernels split over "model"
  # by name (tensor parallel: heads, MLP units; experiments/trainer/sharding.py), and
  # with param_sharding="fsdp" every leaf also split over "data". None: one "data"
  # axis over every device. Needs parallelism="mesh".
  config.mesh_shape = config_dict.placeholder(str)
  config.distributed = False  # call jax.distributed.initialize() (multi-host)
  # Passed to jax.distributed.initialize when set (CPU/GPU clusters without
  # auto-detection); on TPU pods leave them unset.
  config.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0
  config.num_processes = config_dict.placeholder(int)
  config.process_id = config_dict.placeholder(int)
  # >1 runs up to this many steps in one lax.scan (dispatches still end at every
  # evaluation, log, checkpoint and mask update: train.next_stop).
  config.steps_per_dispatch = 1
  # The trainer knows the mask-update steps: ordinary steps run compiled without the
  # optimizer's mask-update branch (faster; sparse_jax mask_update=False), events
  # alone with it. False: one program that decides in the graph (lax.cond).
  config.host_mask_updates = True
  config.log_every_steps = 50
  # Log the gradient-flow measures (docs/algorithms.md §8) every this many steps and at step 0.
  config.gradient_flow_every_steps = config_dict.placeholder(int)  # None: off
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.init_from = config_dict.placeholder(str)  # an export dir or .npz to start from
  config.halt_after_step = config_dict.placeholder(int)  # simulate preemption (tests)
  # A rerun on a workdir whose run has finished (experiments/trainer/workdir.py): "report"
  # its summary and change nothing; "extend" it to a larger num_epochs /
  # num_train_steps; "restart" (the old files move to <workdir>/previous/).
  config.if_finished = "report"
  # Resume a workdir with these fields changed (comma-separated names, e.g.
  # "learning_rate,weight_decay" after a divergence); any other changed field is
  # still refused. Each change is recorded in <workdir>/config_changes.jsonl and
  # config.json takes the new values (experiments/trainer/workdir.py check_config).
  config.allow_changed = ""
  # JAX's persistent compilation cache (experiments/trainer/compilation_cache.py): None is
  # $SPARSE_JAX_COMPILATION_CACHE or ~/.cache/sparse_jax/jax_compilation_cache;
  # "off" disables it. A second run of a config then compiles nothing.
  config.compilation_cache_dir = config_dict.placeholder(str)
  return config


# Every method the trainer runs (experiments/trainer/config_checks.py checks the same set),
# and "granet_st" (GraNet with sparsity.initial=0.5) for the families that take one.
METHODS = ("dense", "granet", "granet_st", "gmp", "rigl", "set", "static", "one_shot",
           "snip", "grasp", "synflow", "ste", "srste")


def parse_args(arg: str | None, known: Mapping[str, Any], *,
               choices: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
  """Parses a config file's family argument, ``file.py:k=v,k2=v2``.

  Every config file parses its argument here, so the same mistake gets the same
  one-line error from each: an unknown name (with "did you mean"), an item that
  is not ``name=value``, a name given twice, a value that is not of its
  default's type or not one of ``choices[name]``.

  Example:
    >>> parse_args("sparsity=0.95", {"sparsity": 0.98, "seed": 0})
    {'sparsity': 0.95, 'seed': 0}

  Args:
    arg: the text after the config file's ``:`` (None or "": no argument).
    known: each argument the config takes and its default; a value given is
      converted to the default's type (int, float or str). Empty: the config
      takes no argument.
    choices: for some arguments, the values allowed.

  Returns:
    Every argument in ``known``, given or default.

  Raises:
    ValueError: naming the argument, the value and the fix.
  """
  choices = choices or {}
  takes = (f"This config takes {', '.join(f'{k}={v}' for k, v in known.items())} "
           "(the defaults shown)." if known else
           "This config takes no argument: set fields with --config.FIELD=VALUE.")
  out, given = dict(known), set()
  for item in arg.split(",") if arg else ():
    name, sep, text = (part.strip() for part in item.partition("="))
    if not sep or not name:
      raise ValueError(f"Config argument {item!r} in {arg!r} is not name=value. {takes}")
    if name not in known:
      raise ValueError(f"Unknown config argument {name!r} in {arg!r}"
                       f"{did_you_mean(name, known)} {takes}")
    if name in given:
      raise ValueError(f"Config argument {name!r} is given twice in {arg!r}: give it once.")
    given.add(name)
    out[name] = _convert_arg(name, text, known[name], choices.get(name))
  return out


def did_you_mean(name: str, candidates, form: str = "{!r}") -> str:
  """"; did you mean 'x'?" (x shown by ``form``) for the closest candidate, else "."."""
  close = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
  return f"; did you mean {form.format(close[0])}?" if close else "."


def _convert_arg(name: str, text: str, default_value, allowed):
  kind = type(default_value)
  try:
    value = kind(text)
  except ValueError:
    noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
    raise ValueError(f"Config argument {name}={text!r} is not {noun}: give e.g. "
                     f"{name}={default_value}.") from None
  if allowed is not None and value not in allowed:
    raise ValueError(f"Config argument {name}={text!r} is not one of "
                     f"{', '.join(allowed)}{did_you_mean(text, allowed)}")
  return value


LENET_ARGS = {"sparsity": 0.98, "seed": 0}


def lenet300_mnist5k(method: str, arg: str | None, **sparsity_overrides):
  """The CPU default recipe with ``method``; ``arg`` may set sparsity and seed."""
  return lenet300_recipe(method, parse_args(arg, LENET_ARGS), **sparsity_overrides)


def lenet300_recipe(method: str, args: Mapping[str, Any], **sparsity_overrides):
  """The CPU default recipe with ``method`` at ``args["sparsity"]`` and ``args["seed"]``."""
  config = get_base_config()
  config.sparsity.method = method
  config.sparsity.final = float(args["sparsity"])
  config.seed = int(args["seed"])
  # ~3 ms steps: several per dispatch (the trainer still stops exactly at every
  # evaluation, log line, checkpoint and mask update).
  config.steps_per_dispatch = 10
  for k, v in sparsity_overrides.items():
    setattr(config.sparsity, k, v)
  return config


TRANSFORMER_METHODS = ("dense", "granet", "gmp", "rigl", "set", "static")


def transformer_family(arg: str | None, *, method: str = "granet", sparsity: float = 0.9):
  """The base of the transformer recipes: adamw with a cosine schedule, a method.

  ``arg`` sets ``method`` (one of ``TRANSFORMER_METHODS``), ``sparsity`` and
  ``seed``. Decoupled weight decay is on the trainer's ``ndim >= 2`` leaves: the
  kernels, the embeddings and (being 2-d) the attention's [heads, head_dim] q/k/v
  biases; not on the other biases and the LayerNorms. The model, data and
  schedule lengths are the caller's.
  """
  args = parse_args(arg, {"method": method, "sparsity": float(sparsity), "seed": 0},
                    choices={"method": TRANSFORMER_METHODS})
  config = get_base_config()
  config.seed = args["seed"]
  config.sparsity.method = args["method"]
  config.sparsity.final = args["sparsity"]
  config.optimizer = "adamw"
  config.lr_schedule = "cosine"
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.weight_decay_on_norm_and_bias = False
  # The drop fraction of RigL's and SET's papers (GraNet's default 0.5 is its own).
  config.sparsity.regrowth_rate = 0.3 if config.sparsity.method in ("rigl", "set") else 0.5
  return config
