"""The input pipeline and the trainer under `tfds.testing.mock_data`.

That is how TFDS users test a pipeline without the data: builders make random
examples of their features, without files. No test here touches the network or
writes in the data directory; outside `mock_data` an unprepared set is refused.
"""


import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import default
from experiments.data import builders
from experiments.data import input_pipeline
from experiments.data import tfds_reads
from experiments.trainer import train

NUM_EXAMPLES = 64


@pytest.fixture
def no_mock_fs(monkeypatch):
  """Fails a read through mock_data's `as_dataset`, which patches the process's files.

  While it runs, TFDS's `MockFs` redirects every file access (of other threads too,
  e.g. a checkpoint being written) into a temporary directory.
  """

  def refuse(self):
    raise AssertionError('TFDS MockFs entered: the mocked as_dataset was called.')

  monkeypatch.setattr(tfds.testing.MockFs, '__enter__', refuse)


@pytest.fixture
def empty_data_dir(tmp_path):
  """A data directory without any file, checked to stay empty."""
  path = tmp_path / 'tfds'
  path.mkdir()
  yield str(path)
  assert not any(path.iterdir())


def test_mock_data_is_detected():
  assert not tfds_reads.mock_data_active()
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    assert tfds_reads.mock_data_active()
  assert not tfds_reads.mock_data_active()


def test_data_functions_read_the_mocked_mnist(empty_data_dir, no_network, no_mock_fs):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    info = input_pipeline.dataset_info('mnist', empty_data_dir)
    assert (info.num_train_examples, info.num_eval_examples) == (NUM_EXAMPLES,) * 2
    assert (info.num_classes, info.input_shape) == (10, (28, 28, 1))
    train = input_pipeline.train_batches('mnist', batch_size=16,
                                         data_dir=empty_data_dir, seed=0)
    for _ in range(NUM_EXAMPLES // 16 + 1):  # into the second epoch
      batch = next(train)
      assert batch['image'].shape == (16, 28, 28, 1)
      assert batch['image'].dtype == np.float32
      assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
      assert ((0 <= batch['label']) & (batch['label'] < 10)).all()
    evaluated = list(input_pipeline.eval_batches('mnist', batch_size=48,
                                                 data_dir=empty_data_dir))
    assert [b['image'].shape for b in evaluated] == [(48, 28, 28, 1)] * 2
    assert sum(b['mask'].sum() for b in evaluated) == NUM_EXAMPLES
    arrays = input_pipeline.load_arrays('mnist', 'train', empty_data_dir)
    assert arrays['image'].shape == (NUM_EXAMPLES, 28, 28, 1)
    assert arrays['label'].dtype == np.int32


def test_augmented_reads_of_the_mocked_cifar10(empty_data_dir, no_network, no_mock_fs):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    batch = next(input_pipeline.train_batches('cifar10', batch_size=16,
                                              data_dir=empty_data_dir, seed=0))
  assert batch['image'].shape == (16, 32, 32, 3)
  assert batch['image'].dtype == np.float32


def test_trainer_runs_on_the_mocked_mnist(empty_data_dir, tmp_path, no_network,
                                          no_mock_fs):
  config = default.lenet300_mnist5k('dense', 'sparsity=0.9,seed=0')
  config.dataset, config.data_dir = 'mnist', empty_data_dir
  config.batch_size, config.eval_batch_size = 32, 64
  config.num_train_steps = 2
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    summary = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert summary['steps'] == 2
  assert np.isfinite(summary['final_test_accuracy'])


def test_unprepared_set_is_still_refused_outside_mock_data(empty_data_dir, no_network):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    input_pipeline.prepare_dataset('mnist', empty_data_dir)
  with pytest.raises(FileNotFoundError, match='not prepared in .* downloads are disabled'):
    input_pipeline.prepare_dataset('mnist', empty_data_dir)


def test_locally_built_arrays_are_not_made_from_mocked_reads(empty_data_dir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(RuntimeError, match='mock_data is active'):
      builders.prepared_arrays('mnist5k', empty_data_dir)
