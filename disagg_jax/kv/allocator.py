"""Host-side page bookkeeping: which pages of the pool are free. Plain Python, outside jit."""

from __future__ import annotations

from disagg_jax.kv.pages import pages_for


class OutOfPagesError(RuntimeError):
  """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
  """A free list over page ids [first_page, num_pages).

  Allocation is all-or-nothing and never hands out a page twice; `free` rejects pages that are not
  allocated, so double frees show up as errors instead of corrupting another sequence's cache.
  Pages below `first_page` are never handed out: the engine keeps page 0 as a scratch page that
  unused page-table entries point at, so every page id a kernel sees is in bounds.
  """

  def __init__(self, num_pages: int, page_size: int, first_page: int = 0):
    if num_pages <= first_page or page_size <= 0:
      raise ValueError(f"num_pages ({num_pages}) must exceed first_page ({first_page}) and "
                       f"page_size ({page_size}) must be positive")
    self.num_pages = num_pages
    self.page_size = page_size
    self.capacity = num_pages - first_page
    # Popping from the end hands out low page ids first, which keeps small runs readable.
    self._free = list(range(num_pages - 1, first_page - 1, -1))
    self._allocated: set[int] = set()

  @property
  def num_free(self) -> int:
    return len(self._free)

  def pages_for(self, num_tokens: int) -> int:
    return pages_for(num_tokens, self.page_size)

  def can_allocate(self, num_pages: int) -> bool:
    return num_pages <= len(self._free)

  def allocate(self, num_pages: int) -> list[int]:
    if num_pages > len(self._free):
      raise OutOfPagesError(f"asked for {num_pages} pages; {len(self._free)} of "
                            f"{self.capacity} are free")
    pages = [self._free.pop() for _ in range(num_pages)]
    self._allocated.update(pages)
    return pages

  def free(self, pages) -> None:
    for page in pages:
      if page not in self._allocated:
        raise ValueError(f"page {page} is not allocated (double free?)")
      self._allocated.remove(page)
      self._free.append(page)
