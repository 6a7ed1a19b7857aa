"""Small synthetic cifar10, cifar100 and imagenet2012, prepared by TFDS's own builders.

For tests and device checks without the network: each set is written to a TFDS
``data_dir`` in exactly the format ``tfds build`` leaves there (same builder, name,
version, features and splits), so ``experiments.data.input_pipeline`` reads it like the real
one, in this process or any other.

* ``cifar10`` / ``cifar100``: TFDS's ``Cifar10`` / ``Cifar100`` builders run on fake
  files in the CIFAR binary format (a label byte, or coarse and fine label bytes, then
  3072 pixel bytes per image); only their download is replaced by a local directory.
* ``imagenet2012``: TFDS's registered builder, unchanged, prepared from a fake manual
  download (``ILSVRC2012_img_train.tar`` of per-synset tars of JPEGs, and
  ``ILSVRC2012_img_val.tar``, whose labels TFDS takes from its own validation list) of
  variable-sized images.

Images are learnable: each class has its own colour, plus noise (crops and flips keep
the colour, so the augmented path can learn it too). Labels are balanced.

``smoke_data_dir`` keeps one such set per size under the local data directory, for
the paper configs' smoke settings (``cifar_vgg19.py:smoke=True``, ...).

Example:
  synthetic.prepare("cifar10", "/tmp/tfds", num_train=256, num_eval=64)
  input_pipeline.dataset_info("cifar10", "/tmp/tfds").num_train_examples  # 256
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sys
import tarfile

import numpy as np

from experiments.data import builders
from experiments.data import tf_import

NAMES = ("cifar10", "cifar100", "imagenet2012")

_CIFAR_SIDE = 32
# The CIFAR binary files of each builder: (label bytes, train files, test file, prefix).
_CIFAR_FILES = {
    "cifar10": (1, [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin",
                "cifar-10-batches-bin"),
    "cifar100": (2, ["train.bin"], "test.bin", "cifar-100-binary"),
}


def prepare(name: str, data_dir: str, *, num_train: int, num_eval: int, seed: int = 0):
  """Writes a synthetic ``name`` into ``data_dir`` (no network) and returns its builder.

  Args:
    name: one of ``NAMES``.
    data_dir: the TFDS data directory (``--config.data_dir``).
    num_train: examples in ``train``.
    num_eval: examples in the evaluation split (``test``; ``validation`` for ImageNet).
    seed: seed of the images and labels.

  Returns:
    The prepared ``tfds.core.DatasetBuilder``.
  """
  # TFDS through the input pipeline's import: TF then sees no GPU (it would take GPU
  # memory JAX needs when a device check prepares a set).
  tfds = tf_import.tensorflow_datasets()
  if name not in NAMES:
    raise ValueError(f"No synthetic {name!r}; known: {NAMES}.")
  source = os.path.join(data_dir, "downloads", f"synthetic_{name}")
  config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=source)
  if name == "imagenet2012":
    _write_imagenet_tars(source, num_train, num_eval, seed)
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
  else:
    _write_cifar_files(name, source, num_train, num_eval, seed)
    builder = _offline_cifar_builder(name, source)(data_dir=data_dir)
  builder.download_and_prepare(download_config=config)
  return builder


def smoke_data_dir(name: str, *, num_train: int, num_eval: int) -> str:
  """A data directory holding a synthetic ``name`` of these sizes, prepared on first use.

  ``<local data dir>/synthetic/<num_train>-<num_eval>`` (experiments/data/builders.py
  ``local_data_dir``): apart from any real set, so a real ``cifar10`` is never
  shadowed. Preparing takes ~10 s, TensorFlow's import mostly (said on stderr: it
  happens while a config loads, before logging is set up); later calls only look
  for the marker file written after it. Processes preparing at once wait for each
  other (a file lock).
  """
  data_dir = os.path.join(builders.local_data_dir(), "synthetic", f"{num_train}-{num_eval}")
  marker = os.path.join(data_dir, f"{name}.prepared")
  if os.path.exists(marker):
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(marker):
      print(f"Preparing a synthetic {name} ({num_train} training, {num_eval} evaluation "
            f"examples) in {data_dir} (once, ~10 s)...", file=sys.stderr, flush=True)
      with builders.tfds_quiet(), contextlib.redirect_stderr(io.StringIO()):
        prepare(name, data_dir, num_train=num_train, num_eval=num_eval)
      open(marker, "w").close()
  return data_dir


def _colours(num_classes: int, seed: int) -> np.ndarray:
  """A colour per class (float [num_classes, 3] in 40..215)."""
  return np.random.default_rng([seed, 1]).uniform(40, 215, (num_classes, 3))


def _images(labels: np.ndarray, shapes, colours: np.ndarray, rng) -> list[np.ndarray]:
  """uint8 [h, w, 3] images: the label's colour plus noise."""
  out = []
  for label, (h, w) in zip(labels, shapes):
    noise = rng.normal(0.0, 30.0, (h, w, 3))
    out.append(np.clip(colours[label] + noise, 0, 255).astype(np.uint8))
  return out


def _balanced_labels(n: int, num_classes: int, rng) -> np.ndarray:
  return rng.permutation(np.arange(n) % num_classes)


# CIFAR: the real builders on local binary files.


def _write_cifar_files(name: str, source: str, num_train: int, num_eval: int, seed: int):
  label_bytes, train_files, test_file, prefix = _CIFAR_FILES[name]
  num_classes = 10 if name == "cifar10" else 100
  rng = np.random.default_rng([seed, 0])
  colours = _colours(num_classes, seed)
  folder = os.path.join(source, prefix)
  os.makedirs(folder, exist_ok=True)

  def write(path, n):
    labels = _balanced_labels(n, num_classes, rng)
    images = _images(labels, [(_CIFAR_SIDE, _CIFAR_SIDE)] * n, colours, rng)
    with open(path, "wb") as f:
      for label, image in zip(labels, images):
        # CIFAR-100 records start with the coarse label (20 superclasses), then the fine.
        f.write(bytes([label // 5, label][-label_bytes:]))
        f.write(image.transpose(2, 0, 1).tobytes())  # channel-major, as CIFAR stores it

  # The training examples spread over the builder's files, as in the real download.
  for i, file in enumerate(train_files):
    write(os.path.join(folder, file), len(range(i, num_train, len(train_files))))
  write(os.path.join(folder, test_file), num_eval)
  label_files = {"cifar10": {"batches.meta.txt": 10},
                 "cifar100": {"coarse_label_names.txt": 20, "fine_label_names.txt": 100}}
  for file, count in label_files[name].items():
    with open(os.path.join(folder, file), "w") as f:
      f.write("\n".join(f"class_{i}" for i in range(count)) + "\n")


class _LocalDownloads:
  """The one download manager call the CIFAR builders make, answered from disk."""

  def __init__(self, folder: str):
    self.folder = folder

  def download_and_extract(self, url):
    del url
    return self.folder


def _offline_cifar_builder(name: str, source: str):
  """TFDS's builder of ``name`` (same name, version, features) reading ``source``."""
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top
  base = {"cifar10": cifar.Cifar10, "cifar100": cifar.Cifar100}[name]

  class OfflineCifar(base, skip_registration=True):
    """``base`` whose download is the local ``source`` directory."""

    def _split_generators(self, dl_manager):
      del dl_manager
      return super()._split_generators(_LocalDownloads(source))

  OfflineCifar.name = base.name
  return OfflineCifar


# ImageNet: the real builder on a fake manual download.


def _jpeg(image: np.ndarray) -> bytes:
  tf = tf_import.tensorflow()
  return tf.io.encode_jpeg(image, quality=90).numpy()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_imagenet_tars(source: str, num_train: int, num_eval: int, seed: int):
  tfds = tf_import.tensorflow_datasets()
  os.makedirs(source, exist_ok=True)
  synsets = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
  val_synsets = tfds.core.tfds_path(
      "datasets/imagenet2012/validation_labels.txt").read_text().split()[:num_eval]
  # Train on the classes of the validation images that TFDS labels from its own list,
  # so the synthetic set is learnable end to end.
  classes = sorted({synsets.index(s) for s in val_synsets})
  colours = _colours(len(synsets), seed)
  rng = np.random.default_rng([seed, 0])
  shape = lambda: tuple(rng.integers(48, 97, 2))  # variable-sized, like the real photos
  train_labels = np.asarray(classes)[_balanced_labels(num_train, len(classes), rng)]
  with tarfile.open(os.path.join(source, "ILSVRC2012_img_train.tar"), "w") as outer:
    for c in classes:
      members = np.flatnonzero(train_labels == c)
      images = _images([c] * len(members), [shape() for _ in members], colours, rng)
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i, image in zip(members, images):
          _add_bytes(tar, f"{synsets[c]}_{i}.JPEG", _jpeg(image))
      _add_bytes(outer, f"{synsets[c]}.tar", inner.getvalue())
  labels = [synsets.index(s) for s in val_synsets]
  images = _images(labels, [shape() for _ in labels], colours, rng)
  with tarfile.open(os.path.join(source, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i, image in enumerate(images):
      _add_bytes(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(image))
