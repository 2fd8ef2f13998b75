"""What every engine thread shares: a condition variable to sleep on, wake-ups, and stopping."""

from __future__ import annotations

import collections
import threading


class Worker:
  """Base of the scheduler threads. `queue` holds the worker's pending items; `run` sleeps on
  `cv` until there is work, a wake-up (an abort somewhere) or `stop`."""

  def __init__(self):
    self.queue: collections.deque = collections.deque()
    self.cv = threading.Condition()
    self.stopped = False
    # Work done so far, for the elastic controller's signals (read from other threads; each
    # value is written by this worker's thread only): tokens computed and seconds spent busy.
    self.tokens_done = 0
    self.busy_s = 0.0
    self.steps_done = 0
    self.tokens_sq = 0  # sums of tokens^2 and tokens x seconds over the steps: a step-time fit
    self.tokens_busy = 0.0

  def record_work(self, tokens: int, seconds: float) -> None:
    """One step's work: `tokens` computed in `seconds`."""
    self.tokens_done += tokens
    self.busy_s += seconds
    self.steps_done += 1
    self.tokens_sq += tokens * tokens
    self.tokens_busy += tokens * seconds

  name = "worker"  # the worker's name in traces
  trace = None  # a sched.trace.Trace: enqueues (and the subclass's decisions) are recorded

  def put(self, item, front: bool = False) -> None:
    with self.cv:
      if self.trace is not None:
        self.trace.add(self.name, "enqueue", (item.request_id, front))
      if front:
        self.queue.appendleft(item)
      else:
        self.queue.append(item)
      self.cv.notify()

  def wake(self) -> None:
    with self.cv:
      self.cv.notify()

  def stop(self) -> None:
    with self.cv:
      self.stopped = True
      self.cv.notify()

  def run(self) -> None:
    raise NotImplementedError
