"""Small pre-LN transformers: a ViT for 28x28 images and a causal byte-level GPT.

Both are linen modules built from ``nn.MultiHeadDotProductAttention``,
``nn.LayerNorm`` and ``nn.Dense`` with explicit names, so every leaf's role
(``sparse_jax.leaf_role``) is plain from its name:

* kernels (prunable): ``patch_embed/kernel`` (ViT, a conv),
  ``block{i}/attn/{query,key,value}/kernel`` [width, heads, head_dim],
  ``block{i}/attn/out/kernel`` [heads, head_dim, width],
  ``block{i}/mlp_in/kernel``, ``block{i}/mlp_out/kernel``, ``head/kernel``;
* dense: every ``bias`` (the attention's [heads, head_dim] ones too), the
  LayerNorms' ``scale``/``bias`` (``block{i}/ln1``, ``ln2``, ``ln_final``),
  ``pos_embedding``, the ViT's ``cls`` token and the GPT's ``token_embed/embedding``.

With ``scan_layers=True`` the blocks are one ``nn.scan`` named ``blocks``, as
TPU-pod transformers are written (one compiled block, whatever the depth): every
block leaf gets a leading layer axis, e.g. ``blocks/attn/query/kernel``
[depth, width, heads, head_dim] and ``blocks/mlp_in/kernel`` [depth, width, mlp]
(``sparse_jax``'s ``layer_axes={"blocks/.*": 1}`` then prunes it as ``depth``
layers). ``remat=True`` recomputes each block's activations in the backward pass
(``nn.remat``).

The position embedding has one row per position of the input the model is
initialised with (as Flax's ViT example does), so the context length is the
data set's.

Activations [B, L, width] and the logits carry logical axis names
(``nn.with_logical_constraint``: ``"batch"``, ``"length"``, ``"embed"``,
``"vocab"``), at every block's input (the embedding's output, the scan carry),
the last block's output and the logits. They are no-ops unless logical axis
rules are set: on a device mesh the trainer maps ``"batch"`` to ``"data"``
(experiments/trainer/programs.py), so each device computes its share of the
batch, whatever the params' FSDP split.

Example:
  model = get_model('gpt', num_classes=256)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32), train=False)
  logits = model.apply(variables, tokens, train=False)  # float32 [B, 64, 256]
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

# GPT-2's init: N(0, 0.02) for kernels and embeddings, zero biases.
_normal = nn.initializers.normal(0.02)
# The logical axes of a token activation [B, L, width] (``nn.with_logical_constraint``).
TOKENS = ("batch", "length", "embed")


def _constrain(x, axes=TOKENS):
  """``x`` constrained to its logical ``axes`` (a no-op without logical axis rules)."""
  return nn.with_logical_constraint(x, axes)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).

  Attributes:
    num_heads: attention heads (``width`` is divisible by it).
    mlp_dim: hidden width of the MLP (GELU).
    dropout_rate: dropout after the attention and the MLP (and on the attention
      weights); 0 disables it.
    causal: mask attention to earlier positions (GPT).
    kernel_init: initializer of every kernel.
    dtype: computation dtype; params stay float32.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  causal: bool = False
  kernel_init: Any = nn.initializers.xavier_uniform()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _constrain(x)
    width = x.shape[-1]
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    h = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=self.kernel_init,
        dropout_rate=self.dropout_rate, deterministic=not train, name='attn')(h, mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=self.kernel_init,
                 name='mlp_in')(h)
    h = nn.Dense(width, dtype=self.dtype, kernel_init=self.kernel_init,
                 name='mlp_out')(nn.gelu(h))
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class _ScanBlock(Block):
  """``Block`` as the body of ``nn.scan``: ``(x, None) -> (x, None)``.

  ``train`` is a field, not an argument: scan's arguments are carried or scanned
  arrays, and dropout needs a Python bool.
  """

  train: bool = False

  def __call__(self, x, _):
    return super().__call__(x, self.train), None


class _Transformer(nn.Module):
  """The fields both transformers share, and their stack of blocks.

  Attributes:
    num_classes: number of output logits.
    width: token width.
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP; None: the model's default multiple
      of ``width``.
    dropout_rate: dropout in the blocks.
    dtype: computation dtype; params stay float32.
    scan_layers: the blocks as one ``nn.scan`` named ``blocks`` (params stacked on
      a leading layer axis) instead of ``block0`` .. ``block{depth-1}``.
    remat: recompute each block's activations in the backward pass (less memory,
      one more forward per block).
  """

  num_classes: int
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def _blocks(self, x, train: bool, mlp_ratio: int, **block_kwargs):
    """``depth`` blocks over ``x`` [B, L, width]: ``block{i}``, or one scanned ``blocks``.

    Called inside the subclass's compact ``__call__``, so the blocks are its
    children.
    """
    args = (self.num_heads, self.mlp_dim or mlp_ratio * self.width, self.dropout_rate)
    if self.scan_layers:
      # prevent_cse=False: inside a scan, CSE cannot merge the recomputation away.
      body = nn.remat(_ScanBlock, prevent_cse=False) if self.remat else _ScanBlock
      blocks = nn.scan(body, variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True}, length=self.depth,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = blocks(*args, dtype=self.dtype, train=train, name='blocks',
                    **block_kwargs)(x, None)
      return x
    # static_argnums counts the module: (self, x, train).
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.depth):
      x = block(*args, dtype=self.dtype, name=f'block{i}', **block_kwargs)(x, train)
    return x


class ViT(_Transformer):
  """Vision transformer: patches -> [cls] + position embedding -> blocks -> head.

  The fields are ``_Transformer``'s (width 64, depth 4; ``mlp_dim`` None:
  2 * width) and ``patch_size``: the side of the square patches (4 on 28x28
  MNIST: 49 patches).
  """

  patch_size: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, self.dtype)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='patch_embed')(x)
    x = x.reshape((x.shape[0], -1, self.width))  # [B, patches, width]
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype),
                         x], axis=1)
    x = x + self.param('pos_embedding', _normal, (1, *x.shape[1:])).astype(x.dtype)
    x = self._blocks(x, train, mlp_ratio=2)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(x[:, 0])
    # Not zero-initialised as in Flax's and big_vision's ViT: global magnitude pruning
    # (GraNet, GMP) at the first events would then remove almost all of the head,
    # whose weights are still near 0 (measured: 98% of it at step 30, 28% accuracy).
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


class GPT(_Transformer):
  """Causal decoder over tokens: embed + position embedding -> blocks -> head.

  ``num_classes`` is the vocabulary (256 for bytes), of the inputs and of the
  next-token logits. The other fields are ``_Transformer``'s, with width 128,
  depth 2 and ``mlp_dim`` None: 4 * width.
  """

  width: int = 128
  depth: int = 2

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    x = nn.Embed(self.num_classes, self.width, embedding_init=_normal, dtype=self.dtype,
                 name='token_embed')(tokens)  # int [B, L] -> [B, L, width]
    x = x + self.param('pos_embedding', _normal, x.shape[1:]).astype(x.dtype)
    x = self._blocks(x, train, mlp_ratio=4, causal=True, kernel_init=_normal)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(_constrain(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_normal, name='head')(x)
    # [B, L, num_classes]
    return _constrain(jnp.asarray(x, jnp.float32), ("batch", "length", "vocab"))
