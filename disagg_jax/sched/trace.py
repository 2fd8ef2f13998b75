"""Decision traces: what a scheduler decided, when, for comparing the engine with the simulator.

The engine's schedulers record each decision (and each hand-over between their queues) with the
time it was taken, under the lock of the queue it reads, so the order of a queue's puts and of
the decisions that read it is the order of their times. The simulator, replaying those times,
records the same kinds of entries from its own decisions (`tests/sim/test_policy_equivalence.py`).
"""

from __future__ import annotations

import collections
import time


class Trace:
  """Entries (t seconds since creation, worker, kind, payload). Appends are atomic in CPython, so
  threads may record without a lock."""

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self._t0 = clock()
    self.entries: list[tuple[float, str, str, tuple]] = []

  def now(self) -> float:
    return self._clock() - self._t0

  def add(self, worker: str, kind: str, payload: tuple = (), t: float | None = None) -> None:
    self.entries.append((self.now() if t is None else t, worker, kind, payload))

  def of(self, worker: str, kind: str | None = None) -> list[tuple[float, tuple]]:
    """(t, payload) of one worker's entries (of one kind), in recording order."""
    return [(t, p) for t, w, k, p in self.entries if w == worker and (kind is None or k == kind)]

  def decisions(self) -> dict[str, list[tuple]]:
    """Each worker's decisions (entries of kind "decide"), payloads only, in order."""
    out = collections.defaultdict(list)
    for _, worker, kind, payload in self.entries:
      if kind == "decide":
        out[worker].append(payload)
    return dict(out)
