r"""ResNet-50 on ImageNet with the GraNet paper's recipe (docs/algorithms.md §6).

  python -m experiments.main --config=experiments/configs/imagenet_resnet50.py:sparsity=0.9 \
      --workdir=gs://bucket/granet_rn50_s90 --config.data_dir=gs://bucket/tensorflow_datasets

Family argument: ``sparsity`` 0.8 | 0.9, ``method`` granet (default) | granet_st |
gmp | rigl | set | static | dense, ``seed``, ``smoke`` False (default) | True.
Recipe: 100 epochs, global batch 256 (scale ``learning_rate`` linearly with it),
lr 0.1 with 5 warm-up epochs, x0.1 at epochs 30/60/90, label smoothing 0.1, weight
decay 1e-4 not on batch-norm parameters or biases, SGD momentum 0.9, ΔT = 4000,
pruning from epoch 0 to 30.
Reference (docs/algorithms.md, top-1 at 80% | 90%): dense 76.8; RigL 75.1 | 73.0; GMP 75.6 | 73.9;
GraNet-ST at 80% with 2.5x training: 76.4.

Smoke setting (``smoke=True``): the whole road of a run (data, model, compilation,
training, mask updates, evaluation, checkpoints, summary and export) on a CPU in
under a minute, without the data set or the network; it checks the road, not the
accuracy:

  python -m experiments.main --config=experiments/configs/imagenet_resnet50.py:smoke=True \
      --workdir=/tmp/resnet50_imagenet_smoke

The data are a synthetic ImageNet (TFDS's own imagenet2012 builder on a fake manual
download of variable-sized JPEGs, a colour per class plus noise; 1000 classes,
inception crops to 224 x 224), written into ``<repo>/.data/tfds/synthetic/64-32``
on first use (``$SPARSE_JAX_DATA_DIR`` instead of ``<repo>/.data/tfds`` if set;
experiments/data/synthetic.py): 64 training, 32 evaluation examples. The model is
ResNet-50's ImageNet stem and bottleneck blocks at 4 filters with one block a stage
instead of 3, 4, 6, 3 (14 convs instead of 53: with all 53 the first run takes
~100 s here, the mask-update step alone compiling for ~65 s). Two epochs of 4 steps at batch 16: the
method, optimizer and schedule shape are the recipe's (warm-up, end of pruning and
learning-rate milestones at the same fractions of training), with a mask update
every 2 steps, an evaluation and a checkpoint after each epoch. Measured on the
2-core CPU: 48 s the first time (the synthetic set prepared, every program
compiled), 22 s once the compilation cache holds the programs.
"""

from experiments.configs import cifar_vgg19
from experiments.configs import cifar_resnet50
from experiments.configs import default


def get_config(arg: str | None = None):
  args = default.parse_args(arg, {"sparsity": 0.8, "method": "granet", "seed": 0,
                                  "smoke": "False"},
                            choices={"method": default.METHODS,
                                     "smoke": cifar_vgg19.SMOKE_CHOICES})
  config = default.get_base_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.data_on_device = False
  config.num_epochs = 100
  config.batch_size = 256
  config.eval_batch_size = 500
  config.learning_rate = 0.1
  config.warmup_epochs = 5.0
  config.lr_milestones = (0.3, 0.6, 0.9)
  config.label_smoothing = 0.1
  config.weight_decay = 1e-4
  config.weight_decay_on_norm_and_bias = False
  config.nesterov = False
  config.seed = args["seed"]
  method = args["method"]
  config.sparsity.method = "granet" if method == "granet_st" else method
  config.sparsity.initial = 0.5 if method == "granet_st" else 0.0
  config.sparsity.final = args["sparsity"]
  config.sparsity.update_every = 4000
  config.sparsity.end_epoch = 30.0
  config.log_every_steps = 500
  config.checkpoint_every_steps = 5000
  if args["smoke"] == "True":
    cifar_vgg19.smoke_setting(config, **cifar_resnet50.SMOKE_RESNET50)
  return config
