"""The README's usage examples run as written."""

import os
import re

import jax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_flax_examples_run():
  text = open(README).read()
  section = text.split("## Use it in a Flax training step", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2  # the linen TrainState example and the NNX example
  namespace = {}
  exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  sj = namespace["sparse_jax"]
  # `masks` ends as the NNX RigL example's: 10% of 784*300 + 300*10 = 238,200 kernel
  # weights, i.e. exactly 23,820 active from the first step.
  assert int(sj.count_active(namespace["masks"])) == 23_820
  # The linen GraNet example starts dense and has not reached an event after 3 steps.
  linen_masks = sj.get_masks(namespace["state"].opt_state)
  assert int(sj.count_active(linen_masks)) == 784 * 300 + 300 * 100 + 100 * 10


def test_readme_transformer_example_runs():
  text = open(README).read()
  section = text.split("## Transformers", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1  # the NNX miniGPT
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  sj = namespace["sparse_jax"]
  masks = namespace["gpt_masks"]
  # Kernels only: q/k/v [64, 4, 16], out [4, 16, 64], MLP 64x256 twice, head 64x256.
  sizes = {"attn/query/kernel": 4096, "attn/key/kernel": 4096, "attn/value/kernel": 4096,
           "attn/out/kernel": 4096, "mlp_in/kernel": 16384, "mlp_out/kernel": 16384,
           "head/kernel": 16384}
  assert dict(zip(sj.leaf_names(masks), (m.size for m in jax.tree.leaves(masks)))) == sizes
  # GraNet's cubic schedule reaches 80% at end_step=20: round(0.2 * n) weights kept.
  assert int(sj.count_active(masks)) == round(0.2 * sum(sizes.values()))
