"""TensorFlow and tensorflow_datasets, imported on first use.

Importing TensorFlow takes ~10 s, and only reads through TFDS need it (the
locally built data sets are read from .npz files with numpy alone), so nothing
in `experiments.data` imports it at module level. Code that needs it calls
these functions; modules that only name its types in annotations import it
under `typing.TYPE_CHECKING`.

Example:
  tf = tf_import.tensorflow()
  image = tf.cast(image, tf.float32)
"""

import functools
import os


@functools.cache
def tensorflow():
  """TensorFlow, imported on first use and kept off the accelerators."""
  # Read by TF's C++ runtime when it loads: without it, importing TF prints lines
  # about CPU instructions, oneDNN and missing CUDA/TensorRT that concern TF's own
  # kernels, which only feed data here. Level 2 keeps errors; a value already
  # set (TF_CPP_MIN_LOG_LEVEL=0 to debug TF) is kept.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
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
def tensorflow_datasets():
  """tensorflow_datasets, imported on first use (after `tensorflow` has configured TF)."""
  tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
