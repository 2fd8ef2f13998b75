"""Paged KV cache: the page pool's pure functions and the host-side allocator."""

from disagg_jax.kv.allocator import OutOfPagesError, PageAllocator
from disagg_jax.kv.cache import (KVPages, LayerKV, LayerPages, init_pages, token_slots,
                                 write_prompt, write_tokens)

__all__ = ["OutOfPagesError", "PageAllocator", "KVPages", "LayerKV", "LayerPages", "init_pages",
           "token_slots", "write_prompt", "write_tokens"]
