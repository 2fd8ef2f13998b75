"""Turning a stream of token ids into text: incremental, stop-sequence aware, stream-consistent.

The text streamed in deltas always concatenates to exactly the non-streamed text: a delta holds
back a trailing partial character (U+FFFD from a cut multi-byte sequence) and any suffix that
could still grow into a stop sequence, and releases them once they are settled.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class IncrementalText:

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stop = [s for s in stop if s]
    self.ids: list[int] = []
    self.sent = ""
    self.stopped = False  # a stop sequence was found; the text ends before it

  def _full(self) -> str:
    return self.tokenizer.decode(self.ids)

  def add(self, token: int) -> str:
    """Appends a token; returns the text that is now settled and not yet sent."""
    if self.stopped:
      return ""
    self.ids.append(token)
    text = self._full()
    cut = self._stop_at(text)
    if cut is not None:
      self.stopped = True
      return self._send(text[:cut])
    return self._send(text[:len(text) - self._held_back(text)])

  def finish(self) -> str:
    """Everything not yet sent (the request is over)."""
    if self.stopped:
      return ""
    return self._send(self._full())

  @property
  def text(self) -> str:
    return self.sent

  def _send(self, settled: str) -> str:
    if not settled.startswith(self.sent) or len(settled) <= len(self.sent):
      return ""
    delta = settled[len(self.sent):]
    self.sent = settled
    return delta

  def _stop_at(self, text: str) -> int | None:
    # Only the unsent tail (plus overlap) can hold a new stop sequence.
    start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
    hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
    return min(hits) if hits else None

  def _held_back(self, text: str) -> int:
    hold = len(text) - len(text.rstrip(REPLACEMENT))
    for stop in self.stop:
      for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
          hold = max(hold, k)
          break
    return hold
