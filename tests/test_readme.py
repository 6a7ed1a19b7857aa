"""The README's usage examples run as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_flax_examples_run():
  text = open(README).read()
  section = text.split("## Use it in a Flax training step", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2  # the linen TrainState example and the NNX example
  namespace = {}
  exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  # The linen example's masks: 98% target, ~0 sparsity after 3 of 930 steps (dense start).
  assert float(namespace["sparse_jax"].density(namespace["masks"])) > 0.9
