"""Small hand-made step-time tables for simulator and planner tests: round numbers, so
timelines can be computed by hand."""

from disagg_jax.sim.profile import StepProfile


def colocated_profile(**kw):
  base = dict(mode="colocated", page_size=16, decode_batch=4, num_pages=64, max_seq_len=512,
              decode_s=0.01, chunk_size=128, chunk_batch=2,
              mixed_s={(b, c): 0.05 for b in (1, 2) for c in (32, 64, 128)})
  base.update(kw)
  return StepProfile(**base)


def disagg_profile(**kw):
  lb = (16, 32, 64, 128, 256, 512)
  base = dict(mode="disagg", page_size=16, decode_batch=4, num_pages=128, max_seq_len=512,
              decode_s=0.01, prefill_batch=2, length_buckets=lb,
              prefill_s={(b, s): 0.05 * b for b in (1, 2) for s in lb},
              insert_s={s: 0.005 for s in lb}, transfer_s={s: 0.02 for s in lb})
  base.update(kw)
  return StepProfile(**base)
