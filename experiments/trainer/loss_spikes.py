"""How much each mask-update event kicks the training loss.

The spike of an event after update ``e`` is ``mean(loss of updates e+1 .. e+k) /
mean(loss of updates e-k+1 .. e)``, the train loss of each update being the one
computed before it: above 1, the loss jumped after the event (grown weights with
an empty optimizer state take large first steps; ``regrowth_warmup``,
docs/algorithms.md §5). The trainer feeds the per-step losses it fetches anyway;
the first record after an event's window closes gets ``loss_spike`` (the mean over
the events that closed) and ``loss_spike_events`` (how many). The losses still
needed go into each checkpoint's meta (``state``), so a resumed run writes the
records the uninterrupted run writes.
"""

from __future__ import annotations

import bisect

import numpy as np

WINDOW = 10  # updates on each side of an event


class LossSpikes:
  """Collects the losses around ``events`` and gives each event's spike once."""

  def __init__(self, events, window: int = WINDOW, state: dict | None = None):
    self.events = sorted(int(e) for e in events)
    self.window = int(window)
    self.losses: dict[int, float] = {}
    if state:  # a checkpoint's (``state``): the events still open, their losses
      self.events = [int(e) for e in state["events"]]
      self.losses = {int(k): float(v) for k, v in state["losses"].items()}

  def state(self) -> dict:
    """What a checkpoint's meta keeps (JSON; float32 losses round-trip exactly)."""
    return {"events": list(self.events),
            "losses": {str(k): v for k, v in sorted(self.losses.items())}}

  def _needed(self, step: int) -> bool:
    """Whether an open event ``e`` has ``e - window < step <= e + window`` (events sorted:
    one bisection, not a scan of every event at every step of a long run)."""
    i = bisect.bisect_left(self.events, step - self.window)
    return i < len(self.events) and self.events[i] < step + self.window

  def add(self, first_step: int, fetched) -> dict:
    """Feeds updates ``first_step + 1 ..`` of ``fetched`` (``[(metrics, steps run)]``).

    Returns the record entries of the events whose window closed (or ``{}``).
    """
    losses = np.concatenate([np.asarray(m["train_loss"])[:ran] for m, ran in fetched]) \
        if fetched else np.zeros((0,))
    for i, loss in enumerate(losses):
      step = first_step + 1 + i
      if self._needed(step):
        self.losses[step] = float(loss)
    last = first_step + len(losses)
    spikes = [self._spike(e) for e in self.events if e + self.window <= last]
    self.events = [e for e in self.events if e + self.window > last]
    spikes = [s for s in spikes if s is not None]
    keep = {s: v for s, v in self.losses.items() if self._needed(s)}
    self.losses = keep
    if not spikes:
      return {}
    return {"loss_spike": float(np.mean(spikes)), "loss_spike_events": len(spikes)}

  def _spike(self, e: int) -> float | None:
    before = [self.losses.get(s) for s in range(e - self.window + 1, e + 1)]
    after = [self.losses.get(s) for s in range(e + 1, e + self.window + 1)]
    if any(v is None for v in before + after) or e - self.window < 0:
      return None
    return float(np.mean(after) / np.mean(before))
