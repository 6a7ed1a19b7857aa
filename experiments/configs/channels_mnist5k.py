r"""Channel-sparse training on the bundled MNIST subset, masked or condensed (issue 32).

  python -m experiments.main --config=experiments/configs/channels_mnist5k.py:method=granet,sparsity=0.75,condense=1 \
      --workdir=workdirs/channels_granet75_condensed

Family argument (defaults shown): ``model=mlp`` (784-``width``-``width``-10, ReLU) or
``lenet5``; ``width=1024``; ``method=granet`` (or gmp, rigl, set; ``dense`` for the
reference; ``chase``: RigL on weights at ``sparsity`` whose lowest-UMM units go,
``channel_sparsity=0.75`` of them by epoch 5, condensed: experiments/trainer/chase.py); ``structure=channels`` (or ``unstructured``: the same method on
weights); ``sparsity=0.75`` (of the hidden units with channels, of the weights
unstructured); ``condense=0`` (1: remove dead units at the events and train the
smaller model, experiments/trainer/condensing.py); ``seed=0``.

The LeNet-300-100 recipe (30 epochs of 31 steps, batch 128, SGD Nesterov 0.9, lr
0.1 x0.1 at 50% and 75%, weight decay 5e-4, ΔT = 100) with pruning from epoch 0
to 10, layer-wise for channels (every hidden layer keeps its share of units; a
global ranking of units by RMS favours the wider-fan-in first layer's units) and
global for weights; the classifier stays dense.
"""

from experiments.configs import default

ARGS = {"model": "mlp", "width": 1024, "method": "granet", "structure": "channels",
        "sparsity": 0.75, "condense": 0, "channel_sparsity": 0.75, "seed": 0}
CHOICES = {"model": ("mlp", "lenet5"),
           "method": ("dense", "granet", "gmp", "rigl", "set", "chase"),
           "structure": ("channels", "unstructured")}


def get_config(arg: str | None = None):
  args = default.parse_args(arg, ARGS, choices=CHOICES)
  chase = args["method"] == "chase"
  if not chase and args["channel_sparsity"] != ARGS["channel_sparsity"]:
    raise ValueError(f"channels_mnist5k.py: channel_sparsity={args['channel_sparsity']} "
                     "is Chase's (the fraction of units it removes): use it with "
                     "method=chase, or drop it.")
  if chase:  # RigL on weights, its sparsest units removed and the model condensed
    args.update(method="rigl", structure="unstructured", condense=1)
  channels = args["structure"] == "channels"
  config = default.lenet300_recipe(args["method"], args)
  config.model = args["model"]
  config.model_kwargs = ({"features": (args["width"], args["width"])}
                         if args["model"] == "mlp" else {})
  config.sparsity.end_epoch = 5.0
  config.sparsity.update_every = 50
  config.sparsity.keep_last_dense = True
  config.sparsity.structure = args["structure"]
  config.sparsity.scope = "layerwise" if channels else "global"
  config.sparsity.condense = bool(args["condense"])
  config.sparsity.channel_sparsity = float(args["channel_sparsity"]) if chase else 0.0
  if args["method"] in ("rigl", "set"):
    config.sparsity.regrowth_rate = 0.3
    config.sparsity.distribution = "uniform" if channels else "erk"
  return config
