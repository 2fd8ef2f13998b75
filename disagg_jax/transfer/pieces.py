"""What a request's KV travels as: pieces of whole pages and whole layer groups.

A prompt of n tokens fills p = ceil(n / page_size) pages. Steps compile for a few length buckets,
so a prefill step's KV holds a bucket of B >= p pages' worth of tokens; moving all of it would
move pages nobody reads. Instead a request's KV moves as `page_blocks(p)`: one block per set bit
of p, each 2^k pages at the offset of the bits above it (p = 19 = 16 + 2 + 1 moves pages [0, 16),
[16, 18) and [18, 19)). Every block has a power-of-two size, so the extract and insert steps
compile for log2(B) sizes only, and exactly p pages cross.

`--config.engine.transfer=layers:N` also splits the layers into groups of N (`layer_groups`): the
prefill step runs group by group and each group's blocks leave for the decode mesh while the next
group computes. `request` is one group of every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

TRANSFER_HELP = ("request (a request's KV moves once its prefill has finished) or layers:N "
                 "(prefill runs N layers at a time and each group's KV moves while the next "
                 "computes)")


def parse_transfer(spec: str, num_layers: int) -> int:
  """`--config.engine.transfer` -> layers per group (num_layers for `request`)."""
  text = str(spec).strip()
  if text == "request":
    return num_layers
  if text.startswith("layers:"):
    try:
      n = int(text.split(":", 1)[1])
    except ValueError:
      n = 0
    if n >= 1:
      return min(n, num_layers)
  raise ValueError(f"--config.engine.transfer={spec!r} is not one of: {TRANSFER_HELP}; e.g. "
                   "--config.engine.transfer=layers:4")


def layer_groups(num_layers: int, per_group: int) -> tuple[tuple[int, int], ...]:
  """[start, stop) of each group of `per_group` consecutive layers (the last may be shorter)."""
  return tuple((a, min(a + per_group, num_layers)) for a in range(0, num_layers, per_group))


def page_blocks(num_pages: int) -> list[tuple[int, int]]:
  """(first page, pages) of the blocks that move `num_pages` pages exactly: one per set bit,
  largest first."""
  out, first = [], 0
  for k in reversed(range(num_pages.bit_length())):
    if num_pages >> k & 1:
      out.append((first, 1 << k))
      first += 1 << k
  return out


def block_sizes(bucket_pages: int) -> tuple[int, ...]:
  """Every block size a request of up to `bucket_pages` pages can need, smallest first."""
  return tuple(1 << k for k in range(bucket_pages.bit_length()))


@dataclasses.dataclass
class Piece:
  """One unit of transfer: layers [layers[0], layers[1]) of pages [first_page, first_page +
  num_pages) of one request. `arrays` is what moves (the plan's source layout on the prefill
  side, the arrived [d, layers, 2, tokens, Hkv/d, D] array on the decode side)."""
  layers: tuple[int, int]
  first_page: int
  num_pages: int
  arrays: Any
  group: int = 0

  def nbytes(self) -> int:
    """Bytes of KV the piece holds (once, however many devices hold copies)."""
    arrays = self.arrays if isinstance(self.arrays, (list, tuple)) else [self.arrays]
    return sum(int(a.nbytes) for a in arrays)


# A pytree (its arrays are the leaves), so jax.block_until_ready and friends see through it.
jax.tree_util.register_pytree_node(
    Piece, lambda p: ((p.arrays,), (p.layers, p.first_page, p.num_pages, p.group)),
    lambda aux, children: Piece(aux[0], aux[1], aux[2], children[0], aux[3]))


def cut(blocks, layers: tuple[int, int], group: int, num_pages: int) -> list[Piece]:
  """The pieces of a request's first `num_pages` pages from its page blocks (`blocks[k]`: the
  block of 2^k pages, as `ModelSteps.make_extract` / `make_gather` return them): one piece per
  set bit of num_pages (`page_blocks`), of layers `layers`, layer group `group`."""
  return [Piece(layers, first, size, blocks[size.bit_length() - 1], group)
          for first, size in page_blocks(num_pages)]
