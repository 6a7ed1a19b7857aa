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
  sj = namespace["sparse_jax"]
  # `masks` ends as the NNX RigL example's: 10% of 784*300 + 300*10 = 238,200 kernel
  # weights, i.e. exactly 23,820 active from the first step.
  assert int(sj.count_active(namespace["masks"])) == 23_820
  # The linen GraNet example starts dense and has not reached an event after 3 steps.
  linen_masks = sj.get_masks(namespace["state"].opt_state)
  assert int(sj.count_active(linen_masks)) == 784 * 300 + 300 * 100 + 100 * 10
