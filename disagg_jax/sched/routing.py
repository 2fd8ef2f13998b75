"""Choosing the prefill worker of a request (`--cluster=ray`), as a thread-free policy.

`--config.engine.routing`:
- `prefix` (default): the worker whose cache most likely holds the longest prefix of the prompt,
  weighed against load. The router keeps, per worker, the names (`kv.prefix_cache.page_hashes`)
  of the full prompt pages it sent there, least recently used first, bounded by the pages that
  worker's cache holds (`PrefixIndex`): an approximation of the worker's cache (it also holds
  evictions the router does not see; a worker without a cache holds nothing). The score of a
  worker is the prompt tokens it would compute before this request's first token: the tokens
  queued there, plus this prompt's tokens minus those it probably has cached. The lowest wins
  (ties: the least queued, then the lowest index). With no cache anywhere this is `load`.
- `load`: the fewest queued prompt tokens (the routing before prefix caching).
- `round_robin`: each worker in turn, whatever it holds (the baseline prefix routing is measured
  against).

Decode workers that prefill cache hits themselves (`--config.engine.decode_prefill_tokens` > 0:
their pools cache every sequence that ends there) are indexed the same way, with the whole
sequence of each request that finished there (`record`). Under `prefix`, a request whose prefix
a decode worker probably holds, with at most `decode_prefill_tokens` tokens after it, skips
prefill and goes to that worker (`choose_local`: the longest expected prefix): a conversation's
next turn returns to the worker that decoded the previous one.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Sequence

from disagg_jax.kv.prefix_cache import page_hashes

ROUTINGS = ("prefix", "load", "round_robin")


class PrefixIndex:
  """Names of full pages a worker probably has cached, least recently sent first, at most
  `capacity`."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._names: collections.OrderedDict = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._names)

  def match(self, names: Sequence[bytes]) -> int:
    """How many of `names`, from the first, it holds."""
    n = 0
    for name in names:
      if name not in self._names:
        break
      n += 1
    return n

  def add(self, names: Sequence[bytes]) -> None:
    """The worker will hold `names` (just sent): most recent, evicting the oldest past capacity."""
    for name in names:
      self._names[name] = None
      self._names.move_to_end(name)
    while len(self._names) > self.capacity:
      self._names.popitem(last=False)


@dataclasses.dataclass
class Candidate:
  """A live worker as the router sees it: `key` (any hashable id), its load (prefill: prompt
  tokens queued there), pages its cache holds (0: none) and, for a decode worker, the longest
  uncached tail it prefills itself (0: none)."""
  key: object
  queued_tokens: int
  cache_pages: int = 0
  max_tail: int = 0


class Router:
  """Picks a worker for each prompt under `policy` (one of ROUTINGS; module docstring)."""

  def __init__(self, policy: str, page_size: int, salt: bytes = b""):
    if policy not in ROUTINGS:
      raise ValueError(f"--config.engine.routing={policy!r} is not one of {', '.join(ROUTINGS)}")
    self.policy = policy
    self.page_size = page_size
    self.salt = salt
    self._indexes: dict[object, PrefixIndex] = {}
    self._turn = itertools.count()

  def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]):
    """The key of the worker to send a prompt of `tokens` to; `candidates` non-empty, in a
    stable order. With `prefix`, the chosen worker is recorded as holding its full pages."""
    if self.policy == "round_robin":
      return candidates[next(self._turn) % len(candidates)].key
    if self.policy == "load":
      return min(candidates, key=lambda c: c.queued_tokens).key
    n, names = len(tokens), self._names(tokens)
    best = min(candidates,
               key=lambda c: (c.queued_tokens + n - self._hit(c, names, n), c.queued_tokens))
    index = self._index(best)
    if index is not None:
      index.add(names)
    return best.key

  def choose_local(self, candidates: Sequence[Candidate], tokens: Sequence[int]):
    """The key of the decode worker to prefill `tokens` itself: the one probably holding the
    longest prefix of them, if at most its `max_tail` tokens follow it; None (prefill computes
    it) otherwise, and always under a policy other than `prefix`."""
    if self.policy != "prefix" or not any(c.max_tail > 0 for c in candidates):
      return None
    n, names = len(tokens), self._names(tokens)
    best, best_hit = None, 0
    for c in candidates:
      hit = self._hit(c, names, n)
      if hit > best_hit and n - hit <= c.max_tail:
        best, best_hit = c.key, hit
    return best

  def record(self, candidate: Candidate, tokens: Sequence[int]) -> None:
    """`candidate` now caches the full pages of `tokens` (a sequence that ended there)."""
    index = self._index(candidate)
    if index is not None:
      index.add(self._names(tokens))

  def expected_hit(self, candidate: Candidate, tokens: Sequence[int]) -> int:
    """Prompt tokens the router expects `candidate` to find cached (for logs and tests)."""
    return self._hit(candidate, self._names(tokens), len(tokens))

  def _names(self, tokens: Sequence[int]) -> list[bytes]:
    """The names of the full pages of `tokens` (`kv.prefix_cache.page_hashes`)."""
    ps = self.page_size
    return page_hashes(list(tokens[:len(tokens) // ps * ps]), ps, self.salt)

  def _hit(self, c: Candidate, names: Sequence[bytes], num_tokens: int) -> int:
    """Tokens of a `num_tokens` prompt (page names `names`) `c` probably holds; the last token
    is always computed."""
    index = self._index(c)
    if index is None:
      return 0
    return index.match(names[:(num_tokens - 1) // self.page_size]) * self.page_size

  def _index(self, c: Candidate) -> PrefixIndex | None:
    if c.cache_pages <= 0:
      return None
    if c.key not in self._indexes:
      self._indexes[c.key] = PrefixIndex(c.cache_pages)
    return self._indexes[c.key]
