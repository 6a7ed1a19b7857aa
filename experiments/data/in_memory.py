"""Whole splits already in memory: a held-out validation part, padded evaluation batches.

For data sets small enough to live on the accelerator, the trainer loads a split
once (`input_pipeline.load_arrays`) and works on the arrays from there.

Example:
  train, val = in_memory.split_for_validation(input_pipeline.load_arrays('mnist5k'), 0.1)
  for batch in in_memory.padded_batches(val, 256):
    ...  # {'image', 'label', 'mask'}, as eval_batches yields them
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np

from experiments.data.specs import Batch

# The permutation that picks the held-out examples: fixed, so every run with the
# same validation_fraction (whatever its seed) holds out the same examples.
VALIDATION_SEED = 0


def validation_count(num_examples: int, fraction: float) -> int:
  """Examples held out of a training set of ``num_examples`` (``round(fraction * n)``)."""
  return int(round(fraction * num_examples)) if fraction else 0


def split_for_validation(arrays: Batch, fraction: float) -> tuple[Batch, Batch]:
  """``(train, validation)`` parts of a training set's arrays (``fraction`` held out).

  The held-out examples are the first ``validation_count`` of a permutation drawn
  with ``VALIDATION_SEED``; both parts keep file order. The test set is never used.

  Example:
    >>> train, val = split_for_validation({'image': x, 'label': y}, 0.1)
  """
  n = len(arrays['label'])
  k = validation_count(n, fraction)
  if not 0 < k < n:
    raise ValueError(f'validation_fraction={fraction} holds out {k} of {n} training '
                     'examples; use a fraction that leaves both parts non-empty.')
  held_out = np.zeros(n, bool)
  held_out[np.random.default_rng(VALIDATION_SEED).permutation(n)[:k]] = True
  return ({key: v[~held_out] for key, v in arrays.items()},
          {key: v[held_out] for key, v in arrays.items()})


def padded_batches(arrays: Batch, batch_size: int,
                   num_batches: Optional[int] = None) -> Iterator[Batch]:
  """In-memory arrays as `eval_batches` yields them: zero images, label 0 and mask 0 pad the last.

  `num_batches` (at least enough for the arrays) pads with whole masked batches;
  `None` means just enough for the arrays.
  """
  n = len(arrays['label'])
  if num_batches is None:
    num_batches = math.ceil(n / batch_size)
  for start in range(0, num_batches * batch_size, batch_size):
    start = min(start, n)
    take = min(batch_size, n - start)
    batch = {'mask': np.zeros(batch_size, np.float32)}
    batch['mask'][:take] = 1.0
    for key in ('image', 'label'):
      value = arrays[key][start:start + take]
      pad = np.zeros((batch_size - take, *value.shape[1:]), value.dtype)
      batch[key] = np.concatenate([value, pad]) if take < batch_size else value
    yield batch
