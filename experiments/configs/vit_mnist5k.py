r"""A small ViT on the bundled MNIST subset, dense or with any sparse method.

  python -m experiments.main --config=experiments/configs/vit_mnist5k.py:method=rigl,sparsity=0.9 \
      --workdir=workdirs/vit_rigl_s0.9

Family argument: ``method`` dense | granet (default) | gmp | rigl | set | static,
``sparsity`` (default 0.9) and ``seed`` (default 0), e.g.
``vit_mnist5k.py:method=gmp,sparsity=0.75,seed=1``.
Model: patch 4 (49 patches + a class token), width 64, 4 pre-LN blocks of 4-head
attention and a 128-wide GELU MLP; masks on every kernel (attention q/k/v/out, MLP,
patch projection, head), the position embedding, class token, biases and LayerNorms
dense. Recipe: 20 epochs of 31 steps (batch 128), AdamW lr 3e-3 with 2 epochs of
warm-up then cosine decay, weight decay 0.05, no augmentation or dropout; ΔT = 30
steps, GraNet/GMP prune from epoch 0 to 12, RigL/SET drop fraction 0.3, ERK.
Expected: see experiments/results/transformers.md (``python -m
experiments.studies.transformers``).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  config = default.transformer_family(arg)
  config.model = "vit"
  config.model_kwargs = dict(patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128,
                             dropout_rate=0.0)
  config.num_epochs = 20
  config.learning_rate = 3e-3
  config.warmup_epochs = 2.0
  config.sparsity.update_every = 30
  config.sparsity.end_epoch = 12.0
  config.log_every_steps = 31
  config.steps_per_dispatch = 5
  return config
