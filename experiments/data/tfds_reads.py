"""Reads through TFDS: the `tf.data` pipelines behind the input pipeline's iterators.

Each function takes a prepared `tfds.core.DatasetBuilder` (see
`builders.prepare_dataset`) and returns a `tf.data.Dataset`, or a split as numpy
arrays. Images are read encoded (`SkipDecoding`) and preprocessed by `ops`.
Reads are deterministic: parallel maps keep their input order.

Under `tfds.testing.mock_data` (`mock_data_active`) the builders make random
examples of their features, without files; `num_examples` then counts those.

Example:
  ds = tfds_reads.train_epoch(builder, 'train', specs.spec('cifar10'), 128,
                              epoch_seed=1234, skip_batches=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from experiments.data import ops
from experiments.data import specs
from experiments.data import tf_import

if TYPE_CHECKING:
  import tensorflow as tf  # Annotations only: TF is imported on first use.


# The module of `tfds.testing.mock_data`, whose own functions replace
# `DatasetBuilder`'s methods while it is active.
_TFDS_MOCKING_MODULE = 'tensorflow_datasets.testing.mocking'


def mock_data_active() -> bool:
  """Whether `tfds.testing.mock_data` is active: builders then make random examples.

  TFDS has no public flag for it; `mock_data` replaces
  `DatasetBuilder.download_and_prepare` by a no-op of its own module for as long
  as it lasts (TFDS 4.9 does; an implementation detail), and that is checked.
  """
  tfds = tf_import.tensorflow_datasets()
  patched = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(patched, '__module__', None) == _TFDS_MOCKING_MODULE


def num_examples(builder, split) -> int:
  """The number of examples `builder` reads from `split` (a name, slice or subsplit).

  Under `tfds.testing.mock_data` the mocked builder's count (its `num_examples`,
  whatever the split): without metadata files it knows no splits, and with them
  their sizes are the real data set's, not what it yields.
  """
  if not mock_data_active():
    return builder.info.splits[split].num_examples
  tfds = tf_import.tensorflow_datasets()
  ds = as_dataset(builder, split, shuffle_files=False, read_config=tfds.ReadConfig())
  count = int(ds.cardinality())
  if count < 0:  # A custom `as_dataset_fn` of unknown length: counted (mocks are small).
    count = int(ds.reduce(0, lambda n, _: n + 1))
  return count


def as_dataset(builder, split, *, shuffle_files: bool, read_config,
               decoders=None) -> tf.data.Dataset:
  """`builder.as_dataset(...)` of `split`, its examples unbatched.

  Under `tfds.testing.mock_data` the mocked reader is called directly: the
  mocked `as_dataset` around it redirects every file access of the process
  into a temporary directory while it runs (TFDS's `MockFs`), so that a
  checkpoint written by another thread at that moment fails. The reader itself
  needs no files.
  """
  kwargs = dict(split=split, shuffle_files=shuffle_files, read_config=read_config,
                decoders=decoders)
  if mock_data_active():
    # The hook mock_data replaces (`FileReaderBuilder._as_dataset`).
    return builder._as_dataset(**kwargs)  # pylint: disable=protected-access
  return builder.as_dataset(**kwargs)


def deterministic_options() -> tf.data.Options:
  """`tf.data` options under which parallel reads keep their input order."""
  tf = tf_import.tensorflow()
  options = tf.data.Options()
  # Parallel map/interleave must keep input order for reproducible batches.
  options.deterministic = True
  return options


def train_epoch(builder, split: str, spec: specs.Spec, local_batch: int,
                epoch_seed: int, skip_batches: int) -> tf.data.Dataset:
  """One epoch of augmented training batches of `split`, shuffled with `epoch_seed`.

  Args:
    builder: the prepared data set.
    split: this process's TFDS split of 'train'.
    spec: how to preprocess the data set.
    local_batch: examples per batch (partial batches are dropped).
    epoch_seed: seed of the file order, the shuffle and the augmentation.
    skip_batches: batches to skip at the start (a resumed run), before decoding.

  Returns:
    A dataset of {'image', 'label'} batches.
  """
  tf, tfds = tf_import.tensorflow(), tf_import.tensorflow_datasets()
  count = num_examples(builder, split)
  preprocess = ops.preprocess_fn(spec, train=True)
  ds = as_dataset(
      builder, split,
      # File order is shuffled too (it matters for multi-file data sets),
      # deterministically thanks to the explicit shuffle_seed. TFDS forbids
      # it for ordered data sets (mnist5k: a single file anyway).
      shuffle_files=not builder.info.disable_shuffling,
      read_config=tfds.ReadConfig(shuffle_seed=epoch_seed,
                                  options=deterministic_options()),
      decoders={'image': tfds.decode.SkipDecoding()})
  # tf.data mixes this op seed with TF's global seed, which should thus be
  # left unset (or set identically) for runs to be reproducible.
  ds = ds.shuffle(min(count, spec.shuffle_buffer), seed=epoch_seed)
  # Position in the epoch, counted before skipping so that a resumed run
  # gets the same augmentation seeds as an uninterrupted one.
  ds = ds.enumerate()
  ds = ds.skip(skip_batches * local_batch)
  ds = ds.map(
      lambda i, ex: preprocess(ex, tf.stack([tf.constant(epoch_seed,
                                                         tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(builder, split: str, spec: specs.Spec, local_batch: int,
                 num_batches: int, process_index: int,
                 process_count: int) -> tf.data.Dataset:
  """This process's even share of `split` in `num_batches` padded, masked batches.

  Zero images with label 0 and mask 0 fill the batches after the last example.
  """
  tf, tfds = tf_import.tensorflow(), tf_import.tensorflow_datasets()
  process_split = tfds.even_splits(split, n=process_count)[process_index]
  ds = as_dataset(
      builder, process_split, shuffle_files=False,
      read_config=tfds.ReadConfig(options=deterministic_options()),
      decoders={'image': tfds.decode.SkipDecoding()})
  preprocess = ops.preprocess_fn(spec, train=False)
  ds = ds.map(lambda ex: dict(preprocess(ex, None), mask=tf.constant(1.0)),
              num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(spec.input_shape, tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
  }).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def read_split(builder, spec: specs.Spec, split: str) -> specs.Batch:
  """A whole split through TFDS, preprocessed without augmentation, in file order."""
  tf, tfds = tf_import.tensorflow(), tf_import.tensorflow_datasets()
  count = num_examples(builder, split)
  ds = as_dataset(
      builder, split, shuffle_files=False,
      read_config=tfds.ReadConfig(options=deterministic_options()),
      decoders={'image': tfds.decode.SkipDecoding()})
  preprocess = ops.preprocess_fn(spec, train=False)
  ds = ds.map(lambda ex: preprocess(ex, None),
              num_parallel_calls=tf.data.AUTOTUNE)
  # One batch holding the whole split.
  return next(ds.batch(count).as_numpy_iterator())
