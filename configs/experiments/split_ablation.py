"""The prefill:decode split and per-phase TP ablation on 8 devices (larger; a TPU VM or a GPU
box runs it as is with --experiment.model_path=... and its own devices)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_path = ml_collections.FieldReference(None, field_type=str)
  c.dtype = "float32"
  c.num_cpu_devices = 8
  c.engine = ml_collections.ConfigDict(dict(max_seq_len=1024, decode_batch=32, prefill_batch=4,
                                            chunk_size=256, chunk_batch=2))
  c.colocated_devices = [8]
  c.colocated_tp = [1, 2, 4]
  c.disagg_splits = [(2, 6), (4, 4), (6, 2)]
  c.disagg_tp = [(1, 1), (2, 2), (0, 0)]  # 0: all of that phase's devices
  c.workloads = ["prefill_heavy", "decode_heavy"]
  c.rates = [1.0, 2.0, 4.0, 8.0, 16.0]
  c.burstiness = 1.0
  c.num_prompts = 200
  c.goodput = "ttft:2000,tpot:100"
  c.seed = 0
  c.first_token_id = 3
  return c
