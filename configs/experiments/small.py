"""A small sweep that runs on a 2-core CPU machine in a few minutes (8 simulated devices):
colocated on 4 devices against disaggregated 2:2 and 4:4, on both workload presets."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_path = ml_collections.FieldReference(None, field_type=str)  # None: the demo model
  c.dtype = "float32"
  c.num_cpu_devices = 8
  c.engine = ml_collections.ConfigDict(dict(max_seq_len=512, decode_batch=16, prefill_batch=4,
                                            chunk_size=128, chunk_batch=2))
  c.colocated_devices = [4]
  c.colocated_tp = []  # empty: tp = devices
  c.disagg_splits = [(2, 2), (4, 4)]
  c.disagg_tp = []  # empty: each phase's tp = its devices
  c.workloads = ["prefill_heavy", "decode_heavy"]
  c.rates = [2.0, 6.0]
  c.burstiness = 1.0
  c.num_prompts = 24
  c.goodput = "ttft:1000,tpot:150"
  c.seed = 0
  c.first_token_id = 3  # skip the byte tokenizer's special ids
  return c
