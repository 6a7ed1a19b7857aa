r"""A byte-level GPT on the Python documentation (``bytes_pydoc``), dense or sparse.

  python -m experiments.main --config=experiments/configs/gpt_bytes.py:method=rigl,sparsity=0.9 \
      --workdir=workdirs/gpt_rigl_s0.9

Family argument: ``method`` dense | granet (default) | gmp | rigl | set | static,
``sparsity`` (default 0.9) and ``seed`` (default 0), e.g.
``gpt_bytes.py:method=gmp,sparsity=0.75,seed=1``.
Data: windows of 64 bytes of ``pydoc_data/topics.py`` (experiments/data/
bytes_pydoc.py), the next byte predicted at every position; validation is every
10th group of 16 windows. Model: causal, width 128, 2 pre-LN blocks of 4-head
attention and a 512-wide GELU MLP, a 256-way head; masks on the attention q/k/v/out,
MLP and head kernels, the token and position embeddings, biases and LayerNorms
dense. Recipe: 4 epochs of 202 steps (batch 32), AdamW lr 2e-3 with 0.25 epoch of
warm-up then cosine decay, weight decay 0.05, no dropout; ΔT = 50 steps, GraNet/GMP
prune from epoch 0 to 2.5, RigL/SET drop fraction 0.3, ERK. Reported per token (byte): the
validation loss (``final_test_loss``, nats), ``final_test_bits_per_byte`` and the
next-byte accuracy.
Expected: see experiments/results/transformers.md (``python -m
experiments.studies.transformers``).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  config = default.transformer_family(arg)
  config.dataset = "bytes_pydoc"
  config.model = "gpt"
  config.model_kwargs = dict(width=128, depth=2, num_heads=4, mlp_dim=512,
                             dropout_rate=0.0)
  config.batch_size = 32
  config.eval_batch_size = 704  # the validation split in one batch
  config.num_epochs = 4
  config.learning_rate = 2e-3
  config.warmup_epochs = 0.25
  config.sparsity.update_every = 50
  config.sparsity.end_epoch = 2.5
  config.log_every_steps = 101
  config.steps_per_dispatch = 5
  return config
