import jax.numpy as jnp
import numpy as np
import pytest

from disagg_jax.kv import (LayerKV, LayerPages, OutOfPagesError, PageAllocator, token_slots,
                           write_prompt, write_tokens)
from pallas_kernels import reference


def test_allocator_never_double_allocates_and_rejects_double_free():
  alloc = PageAllocator(num_pages=8, page_size=16)
  a = alloc.allocate(3)
  b = alloc.allocate(5)
  assert sorted(a + b) == list(range(8)) and alloc.num_free == 0
  with pytest.raises(OutOfPagesError, match="asked for 1 pages; 0 of 8 are free"):
    alloc.allocate(1)
  alloc.free(a)
  assert alloc.num_free == 3
  with pytest.raises(ValueError, match="is not allocated"):
    alloc.free(a[:1])
  assert alloc.pages_for(33) == 3 and alloc.pages_for(32) == 2


def test_prompt_and_token_writes_land_where_the_page_table_says():
  hkv, num_pages, ps, d = 2, 6, 4, 3
  pages = LayerPages(jnp.zeros((hkv, num_pages, ps, d)), jnp.zeros((hkv, num_pages, ps, d)))
  rng = np.random.default_rng(0)
  k = rng.normal(size=(1, 8, hkv, d)).astype(np.float32)
  # A 6-token prompt in pages [4, 1]; the padding block beyond it is dropped (id num_pages).
  pages = write_prompt(pages, LayerKV(jnp.asarray(k), jnp.asarray(k)),
                       jnp.array([[4, 1]], jnp.int32))
  page_table = jnp.array([[4, 1, 2]], jnp.int32)
  gathered = np.asarray(reference.gather_pages(pages.k, page_table))[:, 0]  # [Hkv, 12, D]
  np.testing.assert_array_equal(gathered[:, :8], k[0].transpose(1, 0, 2))
  # Append token 6, token 8 (first slot of page 2) and an invalid one that must vanish.
  positions = jnp.array([[6, 8, 9]], jnp.int32)
  valid = jnp.array([[True, True, False]])
  page_ids, offsets = token_slots(page_table, positions, valid, num_pages, ps)
  assert page_ids.tolist() == [[1, 2, num_pages]] and offsets.tolist() == [[2, 0, 1]]
  new = rng.normal(size=(1, 3, hkv, d)).astype(np.float32)
  pages = write_tokens(pages, jnp.asarray(new), jnp.asarray(new), page_ids, offsets)
  gathered = np.asarray(reference.gather_pages(pages.k, page_table))[:, 0]
  np.testing.assert_array_equal(gathered[:, 6], new[0, 0])
  np.testing.assert_array_equal(gathered[:, 8], new[0, 1])
  assert not gathered[:, 9].any()
