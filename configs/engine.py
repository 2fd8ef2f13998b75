"""Default engine configuration; override any field from the command line, e.g.
`--config.engine.page_size=32 --config.engine.decode_batch=64`."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.engine = ml_collections.ConfigDict(dict(
      page_size=16,  # tokens per KV page
      max_seq_len=0,  # prompt + output tokens; 0: the model's max_position_embeddings
      max_prefill_length=0,  # prompt tokens; 0: max_seq_len
      max_batch=32,  # --mode=single: rows of a static batch
      decode_batch=32,  # serving engine: decode slots (continuous batching)
      num_pages=0,  # page pool incl. one scratch page; 0: every slot at max_seq_len
      prefill_batch=4,  # disagg: prompts per prefill step (same length bucket)
      chunk_size=128,  # colocated: prompt tokens per chunk
      chunk_batch=4,  # colocated: prompt chunks per step
  ))
  return config
