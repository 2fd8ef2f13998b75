"""When to move capacity between the prefill and the decode side: a pure controller.

`ElasticController.decide(signals)` reads one window's `Signals` (arrivals, prefill queue and
busy time, decode slot and page use, TTFT and TPOT attainment against the SLOs) and answers
"to_prefill", "to_decode" or None (`Decision.count`: how many workers). When the window had
arrivals it matches rates: from the arriving prompt tokens/s and requested output tokens/s and
what one worker of each side serves, the split whose busier side is the least busy, and it moves
workers toward it (up to `max_step` at once). Without arrival figures it moves one worker only
when one side is under pressure and the other is not and would keep up with one worker less (its
use scaled up stays under `page_pressure`). Either way only after `patience` windows in a row
asking for the same move (a reversal of the last move needs one more), and never sooner than
`cooldown_s` after the last one, which is at least twice the cost of a move: a move takes a
worker out of service for `switch_s` (after it drains), so flapping costs capacity. Every call is
logged with its signals and the reason (`ElasticController.log`).

The same object drives the simulator (`sim.simulator`, `elastic=`), so a policy change is
measured where it is decided.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

TO_PREFILL = "to_prefill"
TO_DECODE = "to_decode"


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
  ttft_slo_s: float
  tpot_slo_s: float
  window_s: float = 5.0  # how often the signals are read
  patience: int = 2  # windows in a row asking for the same move before it is made
  switch_s: float = 5.0  # a moving worker's time out of service (drain excluded)
  cooldown_s: float = 0.0  # after a move, none before this; 0: 2 x switch_s + a window
  target: float = 0.9  # SLO attainment below this is pressure
  page_pressure: float = 0.9  # decode page (or slot) use above this is pressure
  min_workers: int = 1  # each side keeps at least this many
  max_step: int = 4  # the most workers one decision moves (toward the rate-matched split)

  def __post_init__(self):
    for name in ("ttft_slo_s", "tpot_slo_s", "window_s", "switch_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"elastic {name}={getattr(self, name)} must be positive")
    if self.patience < 1 or self.min_workers < 1:
      raise ValueError("elastic patience and min_workers must be at least 1")

  @property
  def cooldown(self) -> float:
    return self.cooldown_s or 2 * self.switch_s + self.window_s


@dataclasses.dataclass(frozen=True)
class Signals:
  """One window of measurements. Attainments are None when no request gave one."""
  time: float
  prefill_workers: int
  decode_workers: int
  queued_prefill_tokens: int
  prefill_tokens_per_s: float  # what the prefill side computes per second at its size
  prefill_busy: float  # share of the window the serving prefill workers spent computing
  decode_slot_use: float  # occupied / total slots of the serving decode workers
  decode_page_use: float
  ttft_attainment: Optional[float]
  tpot_attainment: Optional[float]
  # Rate matching: the window's arrivals (prompt tokens and requested output tokens per second)
  # and what one worker of each side serves (decode: at a batch whose step meets the TPOT SLO).
  arriving_prompt_tokens_per_s: float = 0.0
  arriving_output_tokens_per_s: float = 0.0
  decode_tokens_per_s_per_worker: float = 0.0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Decision:
  time: float
  action: Optional[str]  # TO_PREFILL, TO_DECODE or None
  reason: str
  signals: Signals
  count: int = 0  # workers to move at once

  def to_json(self) -> dict:
    return {"time": self.time, "action": self.action, "count": self.count,
            "reason": self.reason, "signals": self.signals.to_json()}


class ElasticController:
  """Decides moves from windowed signals (see the module docstring)."""

  def __init__(self, config: ElasticConfig):
    self.config = config
    self.log: list[Decision] = []
    self._streak: tuple[Optional[str], int] = (None, 0)
    self._last_move: tuple[Optional[str], float] = (None, float("-inf"))

  def pressure(self, s: Signals) -> tuple[bool, bool, str]:
    """(prefill side under pressure, decode side under pressure, why)."""
    c = self.config
    backlog_s = s.queued_prefill_tokens / max(s.prefill_tokens_per_s, 1e-9)
    ttft_low = s.ttft_attainment is not None and s.ttft_attainment < c.target
    tpot_low = s.tpot_attainment is not None and s.tpot_attainment < c.target
    prefill = ttft_low or backlog_s > c.ttft_slo_s
    full = max(s.decode_slot_use, s.decode_page_use) > c.page_pressure
    decode = tpot_low or full
    use = max(s.decode_slot_use, s.decode_page_use)
    why = (f"prefill backlog {backlog_s:.2f} s (TTFT SLO {c.ttft_slo_s:g} s), busy "
           f"{s.prefill_busy:.0%}, TTFT attainment {_pct(s.ttft_attainment)}; decode use "
           f"{use:.0%}, TPOT attainment {_pct(s.tpot_attainment)}")
    return prefill, decode, why

  def ideal_prefill_workers(self, s: Signals) -> Optional[int]:
    """The prefill side's share of the workers that matches the arriving mix (None: no
    arrivals or no capacity figures)."""
    per_prefill = s.prefill_tokens_per_s / max(s.prefill_workers, 1)
    if (per_prefill <= 0 or s.decode_tokens_per_s_per_worker <= 0
        or s.arriving_prompt_tokens_per_s + s.arriving_output_tokens_per_s <= 0):
      return None
    need_p = s.arriving_prompt_tokens_per_s / per_prefill
    need_d = s.arriving_output_tokens_per_s / s.decode_tokens_per_s_per_worker
    total, low = s.prefill_workers + s.decode_workers, self.config.min_workers
    # The split whose busier side is the least busy (ties: the current split, then fewer moves).
    return min(range(low, total - low + 1),
               key=lambda p: (round(max(need_p / p, need_d / (total - p)), 6),
                              abs(p - s.prefill_workers)))

  def decide(self, s: Signals) -> Optional[str]:
    c = self.config
    prefill, decode, why = self.pressure(s)
    want, count = None, 1
    ideal = self.ideal_prefill_workers(s)
    if ideal is not None:  # follow the arriving mix (hold when the split matches it)
      why += f"; arrivals match {ideal}P:{s.prefill_workers + s.decode_workers - ideal}D"
      count = max(1, min(abs(ideal - s.prefill_workers), c.max_step))
      if ideal > s.prefill_workers:
        want = TO_PREFILL
      elif ideal < s.prefill_workers:
        want = TO_DECODE
    elif prefill and not decode and s.decode_workers > c.min_workers:
      # Only if the decode side keeps room for what it holds.
      if max(s.decode_slot_use, s.decode_page_use) * s.decode_workers / (
          s.decode_workers - 1) <= c.page_pressure:
        want = TO_PREFILL
    elif decode and not prefill and s.prefill_workers > c.min_workers:
      # Only if the prefill side keeps up with fewer workers.
      if s.prefill_busy * s.prefill_workers / (s.prefill_workers - 1) <= c.page_pressure:
        want = TO_DECODE
    streak = self._streak[1] + 1 if want is not None and want == self._streak[0] else 1
    self._streak = (want, streak)
    last_action, last_time = self._last_move
    needed = c.patience + (1 if last_action is not None and want != last_action else 0)
    action, reason = None, why
    if want is None:
      reason = f"hold: {why}"
    elif streak < needed:
      reason = f"hold ({want} asked {streak} of {needed} windows): {why}"
    elif s.time - last_time < c.cooldown:
      reason = f"hold ({want}, cooling down {c.cooldown - (s.time - last_time):.1f} s): {why}"
    else:
      action, reason = want, f"{want} x{count}: {why}"
      self._last_move = (want, s.time)
      self._streak = (None, 0)
    self.log.append(Decision(s.time, action, reason, s, count if action else 0))
    return action


def _pct(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.0%}"
