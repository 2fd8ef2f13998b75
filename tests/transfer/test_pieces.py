"""KV pieces: page blocks that move exactly a prompt's pages, layer groups, the transfer flag."""

import pytest

from disagg_jax.transfer import pieces


@pytest.mark.parametrize("num_pages", [1, 2, 3, 7, 8, 19, 32, 33, 127, 128])
def test_page_blocks_cover_exactly_the_pages(num_pages):
  blocks = pieces.page_blocks(num_pages)
  covered = [p for first, size in blocks for p in range(first, first + size)]
  assert covered == list(range(num_pages))
  assert all(size & (size - 1) == 0 for _, size in blocks)  # powers of two
  assert len(blocks) == bin(num_pages).count("1")
  assert {size for _, size in blocks} <= set(pieces.block_sizes(num_pages))


def test_page_blocks_of_19():
  assert pieces.page_blocks(19) == [(0, 16), (16, 2), (18, 1)]
  assert pieces.block_sizes(32) == (1, 2, 4, 8, 16, 32)


def test_layer_groups():
  assert pieces.layer_groups(5, 2) == ((0, 2), (2, 4), (4, 5))
  assert pieces.layer_groups(30, 30) == ((0, 30),)
  assert pieces.layer_groups(4, 8) == ((0, 4),)


@pytest.mark.parametrize("spec, expected", [("request", 30), ("layers:4", 4), ("layers:1", 1),
                                            ("layers:64", 30), (" layers:8 ", 8)])
def test_parse_transfer(spec, expected):
  assert pieces.parse_transfer(spec, 30) == expected


@pytest.mark.parametrize("spec", ["layer:4", "layers:0", "layers:x", "layers:", "stream", ""])
def test_parse_transfer_rejects_with_the_flag_and_the_choices(spec):
  with pytest.raises(ValueError, match=r"--config.engine.transfer=.*request.*layers:N"):
    pieces.parse_transfer(spec, 30)
