"""Prefix caching: full KV pages kept by content, shared by reference, evicted least recently used.

A full page is named by a chain hash: the hash of its parent page's name and its own tokens (and
a salt, e.g. the model's name), so a page's name stands for the whole prefix up to its end and
two prompts share a page only when they agree on every token before it. `page_hashes` computes
the names; `CachingAllocator` is a page allocator that also keeps them:

- every handed-out page has a reference count (the sequences holding it);
- a page is *cached* once registered under its name (`register`, after its KV was written);
- a cached page whose count drops to zero is not freed but parked, evictable, in LRU order; it
  counts as free (`num_free`) and is reused (its name forgotten) only when the free list is empty;
- `match(names)` finds the longest run of leading names that are cached, and `acquire` takes a
  reference to those pages (a parked page leaves the evictable set).

Invariants (`check`): a page is either free, or referenced, or parked and cached; never two of
them; a referenced page is never evicted. Plain Python, outside jit.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from disagg_jax.kv.allocator import OutOfPagesError, PageAllocator


def page_hashes(tokens: Sequence[int], page_size: int, salt: bytes = b"",
                start: Sequence[bytes] = ()) -> list[bytes]:
  """The chain names of `tokens`' full pages: name_i = H(name_{i-1}, salt, tokens of page i).
  `start`: names already computed for the first pages (extended, not recomputed)."""
  names = list(start)
  parent = names[-1] if names else b""
  for i in range(len(names), len(tokens) // page_size):
    page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
    parent = hashlib.blake2b(parent + salt + page, digest_size=16).digest()
    names.append(parent)
  return names


class CachingAllocator(PageAllocator):
  """A `PageAllocator` whose pages can be cached by name and shared (see the module docstring).
  Without `register` calls it behaves exactly as a plain free list."""

  def __init__(self, num_pages: int, page_size: int, first_page: int = 0):
    super().__init__(num_pages, page_size, first_page)
    self._refs: dict[int, int] = {}  # handed-out page -> references
    self._page_of: dict[bytes, int] = {}  # name -> cached page
    self._name_of: dict[int, bytes] = {}  # cached page -> name
    self._parked: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
    self.evictions = 0

  # ------------------------------------------------------------------ queries

  @property
  def num_free(self) -> int:
    """Pages an allocation can take: the free list plus the parked cached pages."""
    return len(self._free) + len(self._parked)

  @property
  def num_cached(self) -> int:
    return len(self._page_of)

  def match(self, names: Sequence[bytes]) -> list[int]:
    """The cached pages of the longest run of leading `names` (possibly none)."""
    pages = []
    for name in names:
      page = self._page_of.get(name)
      if page is None:
        break
      pages.append(page)
    return pages

  def parked_among(self, pages: Sequence[int]) -> int:
    """How many of `pages` are parked: acquiring them takes that many from `num_free`."""
    return sum(1 for p in pages if p in self._parked)

  def refs(self, page: int) -> int:
    return self._refs.get(page, 0)

  # ------------------------------------------------------------------ changes

  def allocate(self, num_pages: int) -> list[int]:
    if num_pages > self.num_free:
      raise OutOfPagesError(f"asked for {num_pages} pages; {self.num_free} of "
                            f"{self.capacity} are free")
    pages = []
    for _ in range(num_pages):
      if self._free:
        page = self._free.pop()
      else:  # evict the least recently used parked page
        page, _ = self._parked.popitem(last=False)
        del self._page_of[self._name_of.pop(page)]
        self.evictions += 1
      self._refs[page] = 1
      pages.append(page)
    self._allocated.update(pages)
    return pages

  def acquire(self, pages: Sequence[int]) -> None:
    """One more reference to each of `pages` (cached pages, as `match` returned them)."""
    for page in pages:
      if page not in self._name_of:
        raise ValueError(f"page {page} is not cached")
      if page in self._parked:
        del self._parked[page]
        self._allocated.add(page)
        self._refs[page] = 1
      else:
        self._refs[page] += 1

  def free(self, pages) -> None:
    """Drops one reference to each page; a page left unreferenced is parked if cached (most
    recently used last), else freed."""
    for page in pages:
      if page not in self._allocated:
        raise ValueError(f"page {page} is not allocated (double free?)")
      self._refs[page] -= 1
      if self._refs[page]:
        continue
      del self._refs[page]
      self._allocated.remove(page)
      if page in self._name_of:
        self._parked[page] = None
      else:
        self._free.append(page)

  def register(self, page: int, name: bytes) -> bool:
    """Caches a held page (its KV written) under `name`; False when the name is already cached
    (by another page: this one stays private) or the page already has a name."""
    if page not in self._allocated:
      raise ValueError(f"page {page} is not held; only a held page can be cached")
    if name in self._page_of or page in self._name_of:
      return False
    self._page_of[name] = page
    self._name_of[page] = name
    return True

  def check(self) -> None:
    """Raises AssertionError if the bookkeeping is inconsistent (for tests)."""
    free, parked, held = set(self._free), set(self._parked), set(self._allocated)
    assert len(free) == len(self._free), "a page is twice on the free list"
    assert not free & parked and not free & held and not parked & held, \
        "a page is in two of free / parked / held"
    assert len(free | parked | held) == self.capacity, "a page went missing"
    assert set(self._refs) == held and all(n > 0 for n in self._refs.values())
    assert parked <= set(self._name_of), "a parked page has no name"
    assert not free & set(self._name_of), "a free page is still cached"
    assert all(self._page_of[n] == p for p, n in self._name_of.items())
    assert len(self._page_of) == len(self._name_of)


def cache_salt(cfg) -> bytes:
  """The prefix cache's salt for a model (its configuration): pages are named only within one
  model's KV."""
  return repr(cfg).encode()
