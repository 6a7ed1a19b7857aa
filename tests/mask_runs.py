"""A check shared by tests that run one training two ways (e.g. two selection paths)."""

import numpy as np


def assert_same_masks_that_change(got, want):
  """``got`` and ``want`` (per update, the mask leaves) equal, and the masks changed.

  The second check keeps a comparison of two runs whose events did nothing from
  passing: some leaf of ``want`` differs from the step before it.
  """
  changed = 0
  for a_step, b_step, before in zip(got, want, [want[0]] + want[:-1]):
    for a, b, c in zip(a_step, b_step, before):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      changed += int(np.any(np.asarray(b) != np.asarray(c)))
  assert changed > 0  # the events changed masks
