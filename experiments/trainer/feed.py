"""What the trainer feeds its programs: each dispatch's batches and the eval set.

Small data sets without augmentation stay on the devices (``DeviceData``: only
example indices cross per dispatch); others stream from ``tf.data``
(experiments/data/input_pipeline.py). Batches are shaped for ``jax.jit`` over a mesh
(global arrays, per-process shards on several hosts) or for ``jax.pmap``
(a leading axis of local devices).
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.data import input_pipeline
from experiments.trainer.state import replicate


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training examples in ``epoch`` (the same on every host)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


class DeviceData:
  """A small training set kept on the devices; batches are gathered there.

  Only indices cross from host to device each dispatch, so the trainer does not
  wait on host-side input work (measured on LeNet-300-100, where a step is ~2 ms).
  """

  def __init__(self, arrays, put, seed: int, batch_size: int):
    self.images = put(arrays["image"])
    self.labels = put(arrays["label"].astype(np.int32))
    self.n = len(arrays["label"])
    self.seed, self.batch_size = seed, batch_size
    self.steps_per_epoch = self.n // batch_size
    self._perm_epoch, self._perm = -1, None

  def indices(self, first_step: int, num_steps: int) -> np.ndarray:
    """Example indices [num_steps, batch] for steps ``first_step ..`` (0-based)."""
    out = []
    for s in range(first_step, first_step + num_steps):
      epoch, pos = divmod(s, self.steps_per_epoch)
      if epoch != self._perm_epoch:
        self._perm_epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.n)
      out.append(self._perm[pos * self.batch_size:(pos + 1) * self.batch_size])
    return np.stack(out).astype(np.int32)


def pad_steps(x: np.ndarray, length: int) -> np.ndarray:
  """``x`` [n, ...] padded with zeros to [length, ...]: the steps a dispatch skips."""
  if len(x) == length:
    return x
  return np.concatenate([x, np.zeros((length - len(x), *x.shape[1:]), x.dtype)])


def uses_device_data(config) -> bool:
  """Whether the training set is kept on the devices (``config.data_on_device``)."""
  return config.data_on_device and input_pipeline.augmentation(config.dataset) == "none"


class Feed:
  """The inputs of every dispatch and the evaluation batches of one run.

  ``mesh=None`` shapes them for ``jax.pmap`` over the local devices.
  """

  def __init__(self, config, mesh, start_step: int):
    self.config, self.mesh = config, mesh
    self.s_per = config.steps_per_dispatch
    self.n_local = jax.local_device_count()
    self.on_device = uses_device_data(config)
    self._eval, self._num_eval = [], None
    self.validation = None  # the held-out part of the training set, if any
    if self.on_device:
      arrays = input_pipeline.load_arrays(config.dataset, "train", config.data_dir)
      if config.get("validation_fraction", 0.0):
        arrays, self.validation = input_pipeline.split_for_validation(
            arrays, config.validation_fraction)
        self.train_arrays = arrays  # on the host: the gradient-flow batch is read here
      put = (lambda x: replicate(x, jax.local_devices())) if mesh is None else (
          lambda x: jax.device_put(x, NamedSharding(mesh, P())))
      self.data = DeviceData(arrays, put, config.seed, config.batch_size)
    else:
      self.train_iter = input_pipeline.train_batches(
          config.dataset, batch_size=config.batch_size, data_dir=config.data_dir,
          seed=config.seed, start_step=start_step)

  def per_device(self, x):
    """``x`` as pmap takes it (one copy per local device); unchanged on a mesh."""
    return x if self.mesh is not None else np.full(self.n_local, x)

  def dispatch(self, step: int, n: int):
    """The data and step count of a dispatch of ``n`` steps from ``step``, padded."""
    s_per, num = self.s_per, self.per_device(np.int32(n))
    if self.on_device:
      idx = pad_steps(self.data.indices(step, n), s_per)
      if self.mesh is None:
        idx = np.stack([idx.reshape(s_per, self.n_local, -1)[:, d]
                        for d in range(self.n_local)])
      return (self.data.images, self.data.labels, idx), num
    local = [next(self.train_iter) for _ in range(n)]
    batches = jax.tree.map(lambda *xs: pad_steps(np.stack(xs), s_per), *local)
    if self.mesh is None:
      batches = jax.tree.map(
          lambda x: np.moveaxis(x.reshape(s_per, self.n_local, -1, *x.shape[2:]), 1, 0),
          batches)
    elif jax.process_count() > 1:
      sharding = NamedSharding(self.mesh, P(None, "data"))
      batches = jax.make_array_from_process_local_data(sharding, batches)
    return batches, num

  def eval_batches(self):
    """The test set in batches: a list kept after the first call when data is on
    device, else an ``EvalBatches`` read as it is iterated.

    With ``config.validation_fraction`` > 0 the held-out part of the training set
    instead (the trainer's "test" metrics are then validation metrics).
    """
    if self._eval:
      return self._eval
    if self.on_device:
      self._eval = list(self._read_eval())
      return self._eval
    if self._num_eval is None:  # the set's metadata, read once
      info = input_pipeline.dataset_info(self.config.dataset, self.config.data_dir)
      self._num_eval = input_pipeline.num_eval_batches(
          info.num_eval_examples, self._eval_batch_size(), jax.process_count())
    return EvalBatches(self._read_eval, self._num_eval)

  def _eval_batch_size(self) -> int:
    # Rounded up to a multiple of the devices; the padding is masked out.
    n_dev = jax.device_count()
    return -(-self.config.eval_batch_size // n_dev) * n_dev

  def _read_eval(self):
    """Yields the evaluation batches, shaped for the programs."""
    config = self.config
    source = (input_pipeline.padded_batches(self.validation, self._eval_batch_size())
              if self.validation is not None else
              input_pipeline.eval_batches(config.dataset, batch_size=self._eval_batch_size(),
                                          data_dir=config.data_dir))
    for b in source:
      if self.mesh is None:
        b = jax.tree.map(lambda x: x.reshape(self.n_local, -1, *x.shape[1:]), b)
      elif jax.process_count() > 1:
        b = jax.make_array_from_process_local_data(NamedSharding(self.mesh, P("data")), b)
      yield b


class EvalBatches:
  """Evaluation batches read from the input pipeline as they are iterated.

  Streamed, not kept: an evaluation set need not fit in host memory (ImageNet's
  validation set is ~30 GB as float32), the first batch (whose shapes the eval
  program is compiled for) is read without the others, and an evaluation shows
  its progress while it reads. ``len`` is the number of batches.
  """

  def __init__(self, read, count: int):
    self._read, self._count = read, count

  def __len__(self) -> int:
    return self._count

  def __iter__(self):
    return iter(self._read())

  def __getitem__(self, index: int):
    if not 0 <= index < self._count:
      raise IndexError(f"evaluation batch {index} of {self._count}")
    return next(itertools.islice(self._read(), index, None))
