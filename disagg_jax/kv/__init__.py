"""Paged KV cache: the page pool's pure functions, page arithmetic and the host-side allocator."""

from disagg_jax.kv.allocator import OutOfPagesError, PageAllocator
from disagg_jax.kv.cache import (KVPages, LayerKV, LayerPages, init_pages, token_slots,
                                 write_prompt, write_tokens)
from disagg_jax.kv.pages import page_aligned, pages_for

__all__ = ["OutOfPagesError", "PageAllocator", "KVPages", "LayerKV", "LayerPages", "init_pages",
           "page_aligned", "pages_for", "token_slots", "write_prompt", "write_tokens"]
