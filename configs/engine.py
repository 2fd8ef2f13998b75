"""Default engine configuration; override any field from the command line, e.g.
`--config.engine.page_size=32 --config.engine.decode_batch=64`. The comments below describe each
(docs/TRANSFER.md the transfer settings)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.engine = ml_collections.ConfigDict(dict(
      page_size=16,  # tokens per KV page
      max_seq_len=0,  # prompt + output tokens; 0: the model's max_position_embeddings
      max_prefill_length=0,  # prompt tokens; 0: max_seq_len
      max_batch=32,  # --mode=single: rows of a static batch
      decode_batch=32,  # serving engine: decode slots (continuous batching)
      # Share of each device's free memory (after weights and the largest step's activations)
      # for the KV page pool; 0: 0.9 on TPU/GPU, 0.05 of the host's available memory on CPU.
      memory_fraction=0.0,
      num_pages=0,  # page pool incl. one scratch page per dp shard; 0: sized by memory_fraction
      prefill_batch=4,  # disagg: prompts per prefill step (same length bucket)
      max_prefill_tokens=8192,  # disagg: padded prompt tokens per prefill step (>= 1 prompt)
      chunk_size=128,  # colocated: prompt tokens per chunk
      chunk_batch=4,  # colocated: prompt chunks per step
      # Step shapes for sequences up to this many tokens compile at start-up, longer ones on
      # first use; -1: all at start-up.
      precompile_len=128,
      # disagg: how a request's KV moves to the decode mesh: "request" (once its prefill has
      # finished) or "layers:N" (prefill runs N layers at a time; each group's KV moves while
      # the next computes). Either way only the pages the prompt fills move.
      transfer="request",
      transfers_in_flight=4,  # disagg: KV pieces being copied at once
      # disagg: tokens of prefilled KV allowed to wait on the decode devices for a decode slot
      # (prefill backs off when they are taken); -1: one full prefill step (prefill_batch
      # prompts of the longest length bucket, capped at max_prefill_tokens), and at least the
      # longest length bucket. The memory comes out of the KV pool's budget.
      staging_tokens=-1,
      # The decode loops run one step ahead: step N+1 is dispatched before step N's tokens are
      # read, so the device never waits for the host. false: each step's tokens are read before
      # the next step is decided (a synchronous scheduler, as vLLM's before v0.10): a request
      # that arrives during a step can join the very next one.
      run_ahead=True,
      # Keep the KV of full prompt pages by content and reuse it for any later prompt that
      # starts with the same tokens (docs/PREFIX_CACHING.md).
      prefix_caching=True,
      # disagg, with prefix caching: the longest uncached tail of a prompt whose prefix the
      # decode pool holds that the decode mesh prefills itself (no prefill step, no transfer);
      # -1: chunk_size on TPU/GPU, 0 (off: the decode pool does not cache) on CPU, where XLA's
      # chunked step costs more than a dense prefill of the whole prompt.
      decode_prefill_tokens=-1,
      # disagg, with prefix caching: tokens of KV the prefill mesh keeps in a page pool of its
      # own, computing only the uncached tail of each prompt (in chunks) and reading the rest
      # from it; 0: off (one dense prefill step per batch); -1: max_prefill_tokens, and at
      # least max_seq_len per dp row of the prefill mesh (docs/PREFIX_CACHING.md).
      prefill_cache_tokens=-1,
      # --cluster=ray: the prefill worker of a request: "prefix" (the one likely holding the
      # longest cached prefix, weighed against its queue), "load" (fewest queued prompt
      # tokens) or "round_robin" (docs/PREFIX_CACHING.md).
      routing="prefix",
  ))
  return config
