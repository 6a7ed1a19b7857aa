"""The trainer's loss-spike measure around mask-update events, against hand values."""

import json

import numpy as np

from experiments.trainer import loss_spikes


def _fetched(losses, sizes):
  out, i = [], 0
  for n in sizes:
    chunk = np.zeros(8, np.float32)  # dispatches are padded to a fixed length
    chunk[:n] = losses[i:i + n]
    out.append(({"train_loss": chunk}, n))
    i += n
  return out


def test_spike_is_the_mean_after_over_the_mean_before():
  # Updates 1-20 have loss 1, 21-40 loss 3, 41-50 loss 2: the event after update 20
  # is followed by 3s (spike 3/1), the one after 40 by 2s (2/3).
  losses = np.array([1.0] * 20 + [3.0] * 20 + [2.0] * 10 + [1.0] * 10, np.float32)
  spikes = loss_spikes.LossSpikes([20, 40], window=5)
  records = []
  step = 0
  for sizes in ([7, 8], [5, 4], [6], [8, 8, 7], [3, 4]):  # records cut anywhere
    records.append(spikes.add(step, _fetched(losses[step:], sizes)))
    step += sum(sizes)
  assert step == 60
  got = [r for r in records if r]
  # Event 20 closes at update 25 (record 3 ends at 30); event 40 at 45 (record 4: 53).
  assert got == [{"loss_spike": 3.0, "loss_spike_events": 1},
                 {"loss_spike": 2.0 / 3.0, "loss_spike_events": 1}]
  assert records[2] == got[0] and records[3] == got[1]


def test_a_resumed_collector_gives_the_uninterrupted_records():
  losses = np.arange(1, 41, dtype=np.float32)
  whole = loss_spikes.LossSpikes([20], window=5)
  first = loss_spikes.LossSpikes([20], window=5)
  assert first.add(0, _fetched(losses, [8, 8, 2])) == {}
  saved = json.loads(json.dumps(first.state()))  # through a checkpoint's meta
  resumed = loss_spikes.LossSpikes([20], window=5, state=saved)
  expected = whole.add(0, _fetched(losses, [8, 8, 8, 6]))
  spike = np.mean(losses[20:25], dtype=float) / np.mean(losses[15:20], dtype=float)
  assert expected == {"loss_spike": spike, "loss_spike_events": 1}
  assert resumed.add(18, _fetched(losses[18:], [8, 4])) == expected


def test_an_event_without_its_earlier_losses_is_skipped():
  """A resume at update 18 has no losses of 16..18 for the event at 20."""
  spikes = loss_spikes.LossSpikes([20], window=5)
  assert spikes.add(18, _fetched(np.ones(10, np.float32), [8, 2])) == {}
  assert spikes.events == [] and spikes.losses == {}


def test_config_regrowth_warmup_reaches_regrowing_methods_only():
  import jax.numpy as jnp
  import optax
  import pytest
  from experiments.configs import default
  from experiments.trainer import methods
  params = {"Dense_0": {"kernel": jnp.ones((8, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
  config = default.get_base_config()
  config.sparsity.method, config.sparsity.regrowth_warmup = "rigl", 7
  state = methods.create_sparse_tx(config, optax.adam(1e-3), 100).init(params)
  assert state.regrown is not None
  config.sparsity.method = "gmp"
  with pytest.raises(ValueError, match="regrowth_warmup=7 warms up regrown weights, and gmp"):
    methods.create_sparse_tx(config, optax.adam(1e-3), 100)
