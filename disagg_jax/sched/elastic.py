"""When to move capacity between the prefill and the decode side: a pure controller.

`ElasticController.decide(signals, options)` reads one window's `Signals` (arrivals, prefill queue
and busy time, decode slot and page use, TTFT and TPOT attainment against the SLOs) and answers
"to_prefill", "to_decode", "reshape" or None (`Decision.count`: how many workers;
`Decision.target`: the split chosen). The splits it may choose from are `SplitOption`s, each with
what its two sides serve: the caller's (`options`; a simulator knows every configuration's
capacity, including ones whose tensor parallelism differs from the current one's), or, by default,
every count of the current workers with the capacities measured per worker scaled linearly
(`worker_options`). When the window had arrivals it matches rates: from the arriving prompt
tokens/s and requested output tokens/s, the split whose busier side is the least busy — the prefill
side at the share of its capacity that keeps TTFT within the SLO (`prefill_utilization`) — and it
moves toward it (up to `max_step` workers at once on worker counts); splits within `min_gain` of
the least busy count as equal: the current one stays, else the one moving the fewest devices wins.
The arrival rates are a moving average over the windows (`arrival_weight` on the newest). Without
arrival figures it moves one worker only when one side is under pressure and the other is not and
would keep up with one worker less (its use scaled up stays under `page_pressure`). Either way only
after `patience` windows in a row asking for the same move (a reversal of the last move needs one
more), and never sooner than `cooldown_s` after the last one, which is at least twice the cost of a
move: a move takes a worker out of service for `switch_s` (after it drains), so flapping costs
capacity. Every call is logged with its signals and the reason (`ElasticController.log`).

The same object drives the simulator (`sim.simulator`, `elastic=`), so a policy change is
measured where it is decided.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

TO_PREFILL = "to_prefill"
TO_DECODE = "to_decode"
RESHAPE = "reshape"  # the same devices on each side, another tensor parallelism


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
  min_gain: float = 0.0  # a rate-matched move needs its busier side this much less busy
  arrival_weight: float = 0.5  # the newest window's weight in the arrival rates' moving average

  def __post_init__(self):
    for name in ("ttft_slo_s", "tpot_slo_s", "window_s", "switch_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"elastic {name}={getattr(self, name)} must be positive")
    if self.patience < 1 or self.min_workers < 1:
      raise ValueError("elastic patience and min_workers must be at least 1")
    if not 0 < self.arrival_weight <= 1:
      raise ValueError(f"elastic arrival_weight={self.arrival_weight} must be in (0, 1]")
    if not 0 <= self.min_gain < 1:
      raise ValueError(f"elastic min_gain={self.min_gain} must be in [0, 1)")

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
  arriving_requests_per_s: float = 0.0
  # KV pages the serving decode workers hold and have in all (0: not known).
  decode_pages_used: int = 0
  decode_pages_total: int = 0

  @property
  def decode_use(self) -> float:
    """The serving decode workers' slot or page use, whichever is higher."""
    return max(self.decode_slot_use, self.decode_page_use)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SplitOption:
  """A split the controller may choose: `key` names it for the caller (e.g. (prefill tp, decode
  tp, prefill workers, decode workers)); the capacities are whole sides' (tokens/s; decode at a
  batch whose step meets the TPOT SLO)."""
  key: tuple
  prefill_devices: int
  decode_devices: int
  prefill_tokens_per_s: float
  decode_tokens_per_s: float
  prefill_workers: int = 1
  decode_pages: int = 0  # KV pages its decode side holds (0: not known)

  def load(self, need_prefill: float, need_decode: float, prompt_len: float = 0.0,
           ttft_slo_s: float = float("inf")) -> float:
    """The busier side's share of what it serves within the SLOs at the given arriving tokens/s
    (prefill: of `prefill_utilization` of its capacity, for prompts of `prompt_len` tokens)."""
    per_worker = self.prefill_tokens_per_s / max(self.prefill_workers, 1)
    usable = prefill_utilization(prompt_len / max(per_worker, 1e-9), ttft_slo_s)
    return max(need_prefill / max(self.prefill_tokens_per_s * usable, 1e-9),
               need_decode / max(self.decode_tokens_per_s, 1e-9))


def prefill_utilization(service_s: float, ttft_slo_s: float) -> float:
  """The busy share a prefill worker can run at and keep TTFT within the SLO, for prompts that
  take `service_s` each: queueing as M/D/1 (mean wait rho / (1 - rho) x service / 2), its 90th
  percentile taken as ln 10 x the mean (an exponential tail), plus the prompt's own service time.
  1 when the SLO is infinite; 0.05 at least (a prompt that alone misses the SLO)."""
  if ttft_slo_s == float("inf") or service_s <= 0:
    return 1.0
  room = 2 * (ttft_slo_s - service_s) / (2.302585 * service_s)  # rho / (1 - rho) at most
  return min(max(room / (1 + room), 0.05), 1.0)


def worker_options(s: Signals, min_workers: int = 1) -> list[SplitOption]:
  """Every split of the current workers (one device each, keys (prefill workers, decode
  workers)), a side's capacity its measured per-worker rate times its workers."""
  total = s.prefill_workers + s.decode_workers
  per_prefill = s.prefill_tokens_per_s / max(s.prefill_workers, 1)
  pages = s.decode_pages_total // max(s.decode_workers, 1)
  return [SplitOption((p, total - p), p, total - p, per_prefill * p,
                      s.decode_tokens_per_s_per_worker * (total - p), p, pages * (total - p))
          for p in range(min_workers, total - min_workers + 1)]


@dataclasses.dataclass(frozen=True)
class Decision:
  time: float
  action: Optional[str]  # TO_PREFILL, TO_DECODE, RESHAPE or None
  reason: str
  signals: Signals
  count: int = 0  # workers to move at once (worker counts) or devices changing side (options)
  target: Optional[tuple] = None  # the chosen SplitOption's key (with an action)

  def to_json(self) -> dict:
    return {"time": self.time, "action": self.action, "count": self.count,
            "target": None if self.target is None else list(self.target),
            "reason": self.reason, "signals": self.signals.to_json()}


class ElasticController:
  """Decides moves from windowed signals (see the module docstring)."""

  def __init__(self, config: ElasticConfig):
    self.config = config
    self.log: list[Decision] = []
    self._streak: tuple[Optional[str], int] = (None, 0)
    self._last_move: tuple[Optional[str], float] = (None, float("-inf"))
    self._arrivals: Optional[tuple[float, float, float]] = None  # the moving average

  def pressure(self, s: Signals) -> tuple[bool, bool, str]:
    """(prefill side under pressure, decode side under pressure, why)."""
    c = self.config
    backlog_s = s.queued_prefill_tokens / max(s.prefill_tokens_per_s, 1e-9)
    ttft_low = s.ttft_attainment is not None and s.ttft_attainment < c.target
    tpot_low = s.tpot_attainment is not None and s.tpot_attainment < c.target
    prefill = ttft_low or backlog_s > c.ttft_slo_s
    decode = tpot_low or s.decode_use > c.page_pressure
    why = (f"prefill backlog {backlog_s:.2f} s (TTFT SLO {c.ttft_slo_s:g} s), busy "
           f"{s.prefill_busy:.0%}, TTFT attainment {_pct(s.ttft_attainment)}; decode use "
           f"{s.decode_use:.0%}, TPOT attainment {_pct(s.tpot_attainment)}")
    return prefill, decode, why

  def rate_matched(self, s: Signals, options: list[SplitOption],
                   current: SplitOption) -> Optional[SplitOption]:
    """The split for the window's arrivals (None: no arrivals or no capacity figures): of the
    options whose busier side is within `min_gain` of the least busy one, the current split if
    it is one of them, else the one moving the fewest devices (then the least busy). A split
    whose decode side could not hold the KV held now (within `page_pressure`) is left out: the
    sequences decoding would be preempted as soon as it serves."""
    need_p, need_d, rate = self.arriving(s)
    if need_p + need_d <= 0 or not all(o.prefill_tokens_per_s > 0 and o.decode_tokens_per_s > 0
                                       for o in options):
      return None
    prompt = need_p / rate if rate > 0 else 0.0
    options = [o for o in options if o.key == current.key or not o.decode_pages
               or s.decode_pages_used <= self.config.page_pressure * o.decode_pages]
    loads = {o.key: round(o.load(need_p, need_d, prompt, self.config.ttft_slo_s), 6)
             for o in options}
    bound = min(loads.values()) / (1 - self.config.min_gain)
    near = [o for o in options if loads[o.key] <= bound]
    return min(near, key=lambda o: (o.key != current.key,
                                    abs(o.prefill_devices - current.prefill_devices),
                                    loads[o.key]))

  def arriving(self, s: Signals) -> tuple[float, float, float]:
    """Prompt tokens/s, output tokens/s and requests/s arriving: a moving average over the
    windows (`arrival_weight` on the newest), so one window's burst does not swing the target.
    Call once per window."""
    new = (s.arriving_prompt_tokens_per_s, s.arriving_output_tokens_per_s,
           s.arriving_requests_per_s)
    w = self.config.arrival_weight
    old = self._arrivals or new
    self._arrivals = tuple(w * n + (1 - w) * o for n, o in zip(new, old))
    return self._arrivals

  def decide(self, s: Signals, options: Optional[list[SplitOption]] = None,
             current: Optional[tuple] = None) -> Optional[str]:
    """One window's decision. `options` (with `current`, the serving split's key): the splits
    to choose from; None: the current workers' splits (`worker_options`)."""
    c = self.config
    prefill, decode, why = self.pressure(s)
    by_workers = options is None
    if by_workers:
      options, current = worker_options(s, c.min_workers), (s.prefill_workers, s.decode_workers)
    here = next(o for o in options if o.key == current)
    target = self.rate_matched(s, options, here)
    if target is not None:  # follow the arriving mix (hold when the split matches it)
      why += (f"; arrivals match {target.prefill_devices}P:{target.decode_devices}D"
              + ("" if by_workers else f" {target.key}"))
    else:  # pressure on one side only, and the other keeps up with one worker less
      step = 0
      if prefill and not decode and s.decode_workers > c.min_workers:
        step = 1 if s.decode_use * s.decode_workers / (s.decode_workers - 1) <= c.page_pressure else 0
      elif decode and not prefill and s.prefill_workers > c.min_workers:
        step = -1 if (s.prefill_busy * s.prefill_workers / (s.prefill_workers - 1)
                      <= c.page_pressure) else 0
      side = [o for o in options if (o.prefill_devices - here.prefill_devices) * step > 0]
      target = min(side, key=lambda o: abs(o.prefill_devices - here.prefill_devices),
                   default=None) if step else None
    want = None
    if target is not None and target.key != here.key:
      want = (TO_PREFILL if target.prefill_devices > here.prefill_devices else
              TO_DECODE if target.prefill_devices < here.prefill_devices else RESHAPE)
    count = 0
    if want is not None and by_workers:  # at most max_step workers toward the target
      count = min(abs(target.prefill_devices - here.prefill_devices), c.max_step)
      p = here.prefill_devices + (count if want == TO_PREFILL else -count)
      target = next(o for o in options if o.prefill_devices == p)
    elif want is not None:
      count = abs(target.prefill_devices - here.prefill_devices)
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
    self.log.append(Decision(s.time, action, reason, s, count if action else 0,
                             target.key if action else None))
    return action


def _pct(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.0%}"
