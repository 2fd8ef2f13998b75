"""Roofline step times for hardware that is not here, as step-time tables for the simulator.

Each step costs max(FLOPs / (chips x peak x MFU), bytes / (chips x HBM bandwidth x MBU)) plus the
tensor-parallel all-reduces (two per layer, ring: 2 (tp-1)/tp x activation bytes over the
interconnect) plus a fixed per-step overhead. Weights are read once per step; decode also reads
every active sequence's KV; prefill's attention is quadratic in the prompt. KV transfers between
prefill and decode chips go over the interconnect (same slice / node) at `link_efficiency` of its
bandwidth.

MFU, MBU and the overhead are calibration factors. `fit_anchor` fits them for the H200
from the measured Llama-3-8B-shaped steps in ../shared/anchors (the only accelerator measurements
here); the H100 and A100 take the same fractions of their own peaks (an assumption for the A100,
an older chip), the TPU factors are assumptions; all are printed with every plan. On TPU,
decode's attention (the KV reads, per token of context) is not costed with the MBU factor but with
the ragged decode kernel's plan (`pallas_kernels.tpu_plan`: its grid steps at 0.35 us each plus
its K/V bytes at the chip's bandwidth; `decode_attention_per_token_s`).
`calibrate(profile, model_cfg)` reports the same factors for the CPU this machine has, from a
launch/profile.py table.

Prefill and decode may run on different kinds of chip (`parse_hardware("h100+a100")`: prefill on
H100s, decode on A100s, as Splitwise studies); their KV then moves between nodes over each chip's
`network_bw` (the slower end's) instead of NVLink / ICI.

`roofline(...)` is the bound no configuration can pass: the request rate at which the chips' peak
FLOP/s just cover every request's prefill and decode FLOPs, or their HBM bandwidth just covers
decode's reads (weights shared by as many sequences as memory holds, plus each token's KV).
The planner's and the simulator's sustained throughputs are checked against it.
"""

from __future__ import annotations

import dataclasses

from disagg_jax.engine import buckets
from disagg_jax.models import presets
from disagg_jax.models.config import ModelConfig
from disagg_jax.sim.profile import StepProfile
from pallas_kernels import tpu_plan


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Per chip: dense bf16 FLOP/s, HBM bytes/s and capacity, interconnect bytes/s (one direction)."""
  name: str
  peak_flops: float
  hbm_bw: float
  hbm_bytes: float
  link_bw: float  # ICI (TPU) or NVLink (GPU), per chip
  mfu: float  # achieved fraction of peak in prefill-sized matmuls
  mbu: float  # achieved fraction of HBM bandwidth in decode
  step_overhead_s: float  # launch / host cost per step
  link_efficiency: float = 0.7
  collective_latency_s: float = 10e-6
  source: str = ""
  # Between nodes, per chip, one direction (InfiniBand / DCN): the KV of heterogeneous phases
  # (prefill and decode on different kinds of chip, so on different nodes) moves over it.
  network_bw: float = 50e9


# ../shared/anchors/h200-*.jsonl: a Llama-3-8B-shaped model in plain JAX on one H200 (JAX 0.11.2,
# 2026-11-27): prefill B4 S2048 in 165.9 ms; decode (per-layer donated caches, cuDNN attention)
# B1 ctx2048 in 7.01 ms and B64 ctx2048 in 10.92 ms.
H200_ANCHOR = {"prefill": (4, 2048, 165.855e-3), "decode": ((1, 2048, 7.0149e-3),
                                                           (64, 2048, 10.9183e-3))}


def fit_anchor(cfg: ModelConfig, peak_flops: float, hbm_bw: float,
               anchor=H200_ANCHOR) -> dict[str, float]:
  """MFU from the prefill step; MBU and the per-step overhead from the two decode steps
  (time = overhead + bytes / (MBU x bandwidth))."""
  b, s, t = anchor["prefill"]
  mfu = prefill_cost(cfg, b, s).flops / t / peak_flops
  (b1, c1, t1), (b2, c2, t2) = anchor["decode"]
  bytes1, bytes2 = decode_cost(cfg, b1, b1 * c1).bytes, decode_cost(cfg, b2, b2 * c2).bytes
  rate = (bytes2 - bytes1) / (t2 - t1)
  return {"mfu": mfu, "mbu": rate / hbm_bw, "step_overhead_s": t1 - bytes1 / rate}


# Published per-chip figures (Google Cloud TPU and NVIDIA datasheets). MFU / MBU / overhead: see
# the module docstring.
HARDWARE = {
    "v5e": Hardware("v5e", 197e12, 819e9, 16e9, 200e9, 0.55, 0.75, 100e-6,
                    source="TPU v5e: 197 TFLOP/s bf16, 819 GB/s, 16 GB HBM, 1600 Gbps ICI"),
    "v5p": Hardware("v5p", 459e12, 2765e9, 95e9, 600e9, 0.55, 0.75, 100e-6,
                    source="TPU v5p: 459 TFLOP/s bf16, 2765 GB/s, 95 GB HBM, 4800 Gbps ICI"),
    "v6e": Hardware("v6e", 918e12, 1640e9, 32e9, 448e9, 0.55, 0.75, 100e-6,
                    source="TPU v6e: 918 TFLOP/s bf16, 1640 GB/s, 32 GB HBM, 3584 Gbps ICI"),
    "h100": Hardware("h100", 989e12, 3350e9, 80e9, 450e9, 0.45, 0.70, 150e-6,
                     source="H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s, 80 GB, NVLink 900 GB/s"),
    "h200": Hardware("h200", 989e12, 4800e9, 141e9, 450e9, 0.45, 0.70, 150e-6,
                     source="H200 SXM: 989 TFLOP/s bf16 dense, 4.8 TB/s, 141 GB, NVLink 900 GB/s"),
    "a100": Hardware("a100", 312e12, 2039e9, 80e9, 300e9, 0.45, 0.70, 150e-6, network_bw=25e9,
                     source="A100 SXM4 80GB: 312 TFLOP/s bf16 dense, 2.039 TB/s HBM2e, 80 GB, "
                     "NVLink 600 GB/s, HDR InfiniBand 200 Gb/s per GPU"),
}
# TPU hosts reach other slices over the data-center network: ~100 Gb/s per chip assumed.
for _name in ("v5e", "v5p", "v6e"):
  HARDWARE[_name] = dataclasses.replace(HARDWARE[_name], network_bw=12.5e9)
ANCHOR_FITTED = ("h100", "h200", "a100")
TPU_KINDS = ("v5e", "v5p", "v6e")  # decode attention from the TPU kernel's plan
DTYPE_BYTES = 2  # bf16 weights and KV

model_preset = presets.model_preset  # configs/models/NAME.py


def get_hardware(name: str, flag: str = "--hardware") -> Hardware:
  """The chip, with H100 / H200 / A100 factors fitted to the H200 anchor (the H100 is the same
  Hopper chip: it keeps the H200's MFU and overhead and the same MBU of its own bandwidth; the
  A100 is assumed to reach the same fractions of its own peak FLOP/s and bandwidth, with the same
  per-step overhead)."""
  if name not in HARDWARE:
    raise ValueError(f"{flag}={name!r} is not one of {', '.join(HARDWARE)} (or PREFILL+DECODE, "
                     "e.g. h100+a100)")
  hw = HARDWARE[name]
  if name in ANCHOR_FITTED:
    h200 = HARDWARE["h200"]
    fit = fit_anchor(model_preset("llama3_8b"), h200.peak_flops, h200.hbm_bw)
    how = ("fitted to the H200 anchor" if name != "a100"
           else "the H200 anchor's fractions, assumed for Ampere")
    hw = dataclasses.replace(hw, mfu=fit["mfu"], mbu=fit["mbu"],
                             step_overhead_s=fit["step_overhead_s"],
                             source=hw.source + f" (MFU/MBU/overhead {how})")
  return hw


def parse_hardware(spec: str, flag: str = "--hardware") -> tuple[Hardware, Hardware]:
  """(prefill chip, decode chip) of "h100" (both) or "h100+a100" (prefill + decode)."""
  names = [n.strip() for n in str(spec).split("+")]
  if len(names) > 2 or not all(names):
    raise ValueError(f"{flag}={spec!r} is not one of {', '.join(HARDWARE)} or PREFILL+DECODE "
                     "(e.g. h100+a100)")
  prefill = get_hardware(names[0], flag)
  return prefill, (get_hardware(names[1], flag) if len(names) == 2 else prefill)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """FLOPs and HBM bytes of one step on the whole tensor-parallel group, and its activations."""
  flops: float
  bytes: float
  tokens: int


def _layer_params(cfg: ModelConfig) -> float:
  """Weights every token multiplies through (the layers' matmuls, gated or plain MLP): all but
  the embedding / LM-head tables and a learned position table, which are looked up."""
  embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  positions = cfg.max_position_embeddings * cfg.hidden_size if cfg.learned_positions else 0
  return float(cfg.num_params() - embed - positions)


def _dense_flops(cfg: ModelConfig, tokens: int, sequences: int) -> float:
  """Matmul FLOPs: every layer for every token, the LM head only for each sequence's last."""
  return 2.0 * (_layer_params(cfg) * tokens + cfg.vocab_size * cfg.hidden_size * sequences)


def _weight_bytes(cfg: ModelConfig) -> float:
  return float(cfg.num_params()) * DTYPE_BYTES


def prefill_cost(cfg: ModelConfig, batch: int, length: int, offset: int = 0) -> StepCost:
  """`batch` prompts (or prompt chunks) of `length` tokens, each after `offset` tokens already in
  the KV cache (a later chunk of a chunked prefill): causal attention over the chunk plus the
  whole cached prefix, whose KV is read too."""
  attn = (4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * batch * length
          * (length / 2 + offset))
  kv = batch * (length + offset) * cfg.kv_bytes_per_token(DTYPE_BYTES)
  return StepCost(_dense_flops(cfg, batch * length, batch) + attn, _weight_bytes(cfg) + kv,
                  batch * length)


def decode_cost(cfg: ModelConfig, batch: int, context_tokens: int) -> StepCost:
  """`context_tokens`: the sum of the active sequences' lengths."""
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context_tokens
  kv = context_tokens * cfg.kv_bytes_per_token(DTYPE_BYTES)
  return StepCost(_dense_flops(cfg, batch, batch) + attn, _weight_bytes(cfg) + kv, batch)


def step_time(cost: StepCost, cfg: ModelConfig, hw: Hardware, tp: int) -> float:
  compute = cost.flops / (tp * hw.peak_flops * hw.mfu)
  memory = cost.bytes / (tp * hw.hbm_bw * hw.mbu)
  comm = 0.0
  if tp > 1:
    per_layer = 2 * (2 * (tp - 1) / tp * cost.tokens * cfg.hidden_size * DTYPE_BYTES
                     / (hw.link_bw * hw.link_efficiency) + hw.collective_latency_s)
    comm = cfg.num_layers * per_layer
  return max(compute, memory) + comm + hw.step_overhead_s


def decode_attention_per_token_s(cfg: ModelConfig, hw: Hardware, tp: int, batch: int,
                                 context: int) -> float:
  """Decode attention's seconds per token of context (all layers; the tp chips in parallel) at
  `batch` sequences of `context` tokens. TPU: the ragged Pallas kernel's plan for one chip's heads
  (`tpu_plan.ragged_plan`: grid steps x 0.35 us + K/V bytes / HBM bandwidth, no efficiency
  factor). Other chips: the KV bytes at MBU of the bandwidth."""
  if hw.name not in TPU_KINDS:
    return cfg.kv_bytes_per_token(DTYPE_BYTES) / (tp * hw.hbm_bw * hw.mbu)
  batch, context = max(batch, 1), max(context, 1)
  # Each chip holds Hkv / tp KV heads (a replica of one where tp > Hkv) and their query heads.
  shape = tpu_plan.DecodeShape(batch=batch, context=context,
                               hq=max(cfg.num_heads // tp, 1), hkv=max(cfg.num_kv_heads // tp, 1),
                               head_dim=cfg.head_dim, page_size=16, itemsize=DTYPE_BYTES)
  return cfg.num_layers * tpu_plan.ragged_plan(shape).time_s(hw.hbm_bw) / (batch * context)


def transfer_time(cfg: ModelConfig, hw: Hardware, tokens: int,
                  decode_hw: Hardware | None = None, across_hosts: bool = False) -> float:
  """One request's KV from the prefill chips to the decode chips: over NVLink / ICI when they are
  the same kind on one node / slice, else (other kinds, or `across_hosts`) between nodes at the
  slower chip's network bandwidth."""
  bw = hw.link_bw
  if across_hosts or (decode_hw is not None and decode_hw.name != hw.name):
    bw = min(hw.network_bw, (decode_hw or hw).network_bw)
  return (tokens * cfg.kv_bytes_per_token(DTYPE_BYTES) / (bw * hw.link_efficiency)
          + hw.collective_latency_s)


def fits(cfg: ModelConfig, hw: Hardware, tp: int, decode_batch: int, max_seq_len: int,
         memory_fraction: float = 0.9, staging_tokens: int = 0) -> tuple[bool, int]:
  """Whether weights plus at least one max_seq_len sequence fit; and how many KV pages of 16
  tokens the rest of HBM holds (capped at decode_batch full sequences), after
  `staging_tokens` of arriving KV (the in-process disaggregated engine's staging)."""
  free = (tp * hw.hbm_bytes * memory_fraction - _weight_bytes(cfg)
          - staging_tokens * cfg.kv_bytes_per_token(DTYPE_BYTES))
  per_page = 16 * cfg.kv_bytes_per_token(DTYPE_BYTES)
  pages = int(free // per_page)
  need_one = -(-max_seq_len // 16)
  return pages >= need_one, min(pages, decode_batch * need_one)


def disagg_staging(max_seq_len: int, prefill_batch: int, max_prefill_tokens: int = 8192) -> int:
  """The disaggregated engine's staging tokens at its default setting (`buckets.staging_tokens`),
  taken from its decode devices' memory."""
  return buckets.staging_tokens(-1, max_seq_len, 16, prefill_batch, max_prefill_tokens)


def profile_for(cfg: ModelConfig, hw: Hardware, *, mode: str, tp: int, decode_batch: int,
                max_seq_len: int, prefill_tp: int | None = None, prefill_batch: int = 4,
                chunk_size: int = 512, chunk_batch: int = 4,
                prefill_hw: Hardware | None = None,
                prompt_len: int | None = None, layers_per_group: int | None = None,
                across_hosts: bool = False, run_ahead: bool = True,
                max_prefill_tokens: int = 8192) -> StepProfile:
  """A step-time table as launch/profile.py would measure it on `hw` (decode on `hw`; prefill on
  `prefill_hw`, default the same chip). `prompt_len` (the workload's mean prompt) places the
  colocated engine's chunks in their prompts. Disaggregated, the KV moves in groups of
  `layers_per_group` layers (None: whole requests, `--config.engine.transfer`), over the
  network when `across_hosts` (else NVLink / ICI between chips of one kind). `run_ahead` and
  `max_prefill_tokens` are the engine's settings of those names (`configs/engine.py`); the
  disaggregated table's staging budget is the engine's default (`buckets.staging_tokens`), its
  memory taken from the KV pool's as the engine does.

  The table's decode step is linear in the active sequences and their context
  (StepProfile.decode_time), while the roofline step is max(compute, memory): weight reads
  dominate a small batch, the FLOPs of a large one. The per-sequence slope is the chord from an
  empty step to a full one (decode_batch sequences), so both ends are exact and the middle is
  never faster than the roofline (max of linear functions is convex); the slope of the single
  sequence alone would ignore that a batch of hundreds is compute-bound. (A full step holds at
  most as many sequences as the pool has room for at half of max_seq_len.)"""
  staging = (disagg_staging(max_seq_len, prefill_batch, max_prefill_tokens)
             if mode == "disagg" else 0)
  ok, pages = fits(cfg, hw, tp, decode_batch, max_seq_len, staging_tokens=staging)
  if not ok:
    raise ValueError(f"{cfg.num_params() / 1e9:.1f}B parameters with TP{tp} leave no room for "
                     f"one {max_seq_len}-token sequence in {tp} x {hw.hbm_bytes / 1e9:.0f} GB")
  prefill_hw = prefill_hw or hw
  base = step_time(decode_cost(cfg, 0, 0), cfg, hw, tp)
  # A full step: decode_batch sequences, or as many as the pool holds at half of max_seq_len.
  full_batch = max(min(decode_batch, pages * 16 // max(max_seq_len // 2, 1)), 1)
  full = step_time(decode_cost(cfg, full_batch, 0), cfg, hw, tp)
  per_seq = (full - base) / full_batch
  # Per token of context: at the full step's batch, its sequences half way to max_seq_len.
  per_token = decode_attention_per_token_s(cfg, hw, tp, full_batch, max(max_seq_len // 2, 1))
  profile = StepProfile(mode=mode, page_size=16, decode_batch=decode_batch, num_pages=pages,
                        max_seq_len=max_seq_len, decode_s=base,
                        decode_per_seq_s=max(per_seq, 0.0), decode_per_token_s=per_token,
                        run_ahead=run_ahead, staging_tokens=staging,
                        meta={"hardware": hw.name, "tp": tp, "analytic": True})
  if mode == "colocated":
    profile.chunk_size, profile.chunk_batch = chunk_size, chunk_batch
    for bc in buckets.chunk_rows(chunk_batch):
      for c in buckets.chunk_lens(chunk_size):
        # The chunk's compute rides on the decode step's weight read: only the excess counts.
        # The table does not know where in its prompt a chunk falls: a chunk shorter than the
        # prompt attends on average to half of the rest of it (the prompt: `prompt_len`, the
        # workload's mean, else max_seq_len).
        offset = max((prompt_len or max_seq_len) - c, 0) // 2
        chunk = step_time(prefill_cost(cfg, bc, c, offset), cfg, hw, tp)
        profile.mixed_s[(bc, c)] = max(chunk, base)
    return profile
  ptp = prefill_tp or tp
  profile.prefill_batch = prefill_batch
  profile.length_buckets = buckets.length_buckets(max_seq_len, 16)
  for s in profile.length_buckets:
    for b in buckets.batch_buckets(prefill_batch):
      profile.prefill_s[(b, s)] = step_time(prefill_cost(cfg, b, s), cfg, prefill_hw, ptp)
    profile.transfer_s[s] = transfer_time(cfg, prefill_hw, s, hw, across_hosts)
    profile.insert_s[s] = s * cfg.kv_bytes_per_token(DTYPE_BYTES) / (tp * hw.hbm_bw * hw.mbu)
  profile.transfer_latency_s = prefill_hw.collective_latency_s
  profile.transfer_groups = -(-cfg.num_layers // (layers_per_group or cfg.num_layers))
  profile.meta.update(prefill_tp=ptp, prefill_hardware=prefill_hw.name,
                      across_hosts=across_hosts)
  return profile


def describe(hw: Hardware) -> str:
  how = "fitted" if "fitted" in hw.source else "assumed"
  mbu = (f"MBU {hw.mbu:.2f} (decode weights; its attention from the ragged TPU kernel's plan, "
         f"{tpu_plan.STEP_OVERHEAD_S * 1e6:.2f} us per grid step)" if hw.name in TPU_KINDS
         else f"MBU {hw.mbu:.2f} (decode)")
  return (f"{hw.source}; {how} MFU {hw.mfu:.2f} (prefill), {mbu}, "
          f"{hw.step_overhead_s * 1e6:.0f} us per step, interconnect at "
          f"{hw.link_efficiency:.0%} of {hw.link_bw / 1e9:.0f} GB/s, "
          f"{hw.collective_latency_s * 1e6:.0f} us per collective")


def calibrate(profile: StepProfile, cfg: ModelConfig, peak_flops: float,
              hbm_bw: float) -> dict[str, float]:
  """Achieved fractions of `peak_flops` / `hbm_bw` implied by a measured table: MFU from the
  largest prefill step, MBU from the decode step (weights plus a full pool's KV)."""
  out = {}
  if profile.prefill_s:
    (b, s), t = max(profile.prefill_s.items(), key=lambda kv: kv[0][0] * kv[0][1])
    out["mfu"] = prefill_cost(cfg, b, s).flops / t / peak_flops
  cost = decode_cost(cfg, profile.decode_batch, profile.decode_batch * profile.max_seq_len)
  out["mbu"] = cost.bytes / profile.decode_s / hbm_bw
  return out


# ---------------------------------------------------------------- the roofline bound


@dataclasses.dataclass(frozen=True)
class Roofline:
  """The highest request rate chips can sustain on a workload, whatever the configuration."""
  request_rate: float  # requests/s
  output_tokens_per_s: float
  bound: str  # what binds: "prefill compute", "decode compute", "compute", "decode memory"
  limits: dict  # requests/s each resource alone allows

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _per_request(cfg: ModelConfig, prompt_lens, output_lens) -> dict[str, float]:
  """Mean FLOPs of one request's prefill and decode, and decode's KV bytes read per request
  (KV of every context token, every step), over the workload's requests."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  p = np.asarray(prompt_lens, np.float64).reshape(-1)
  o = np.maximum(np.asarray(output_lens, np.float64).reshape(-1), 1.0)
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  dense_token = 2.0 * _layer_params(cfg)
  head = 2.0 * cfg.vocab_size * cfg.hidden_size
  steps = o - 1  # the first token comes from the prefill
  context = steps * p + steps * (steps + 1) / 2  # sum over decode steps of the context read
  return {"prefill_flops": float(np.mean(dense_token * p + head + attn * p * p / 2)),
          "decode_flops": float(np.mean(steps * (dense_token + head) + attn * context)),
          "decode_kv_bytes": float(np.mean(context)) * cfg.kv_bytes_per_token(DTYPE_BYTES),
          "output_tokens": float(np.mean(o))}


def _decode_memory_rate(cfg: ModelConfig, hw: Hardware, devices: int, kv_bytes: float) -> float:
  """Requests/s decode's HBM reads allow on `devices` chips: every step reads the weights once
  (one copy over all the chips: a single replica is the best case) and each sequence's KV. A step
  of b sequences reads W + (their KV), and at most (HBM - W) of KV fits, so per token of context
  read the chips read at least HBM / (HBM - W) times its KV bytes: the weights' share vanishes
  only as the batch fills all of memory."""
  total_hbm = devices * hw.hbm_bytes
  weights = _weight_bytes(cfg)
  if weights >= total_hbm:
    return 0.0
  if kv_bytes <= 0:
    return float("inf")
  return devices * hw.hbm_bw * (total_hbm - weights) / (total_hbm * kv_bytes)


def roofline(cfg: ModelConfig, prompt_lens, output_lens, *, hardware: Hardware | None = None,
             devices: int = 0, prefill_hw: Hardware | None = None, prefill_devices: int = 0,
             decode_hw: Hardware | None = None, decode_devices: int = 0) -> Roofline:
  """The bound at peak FLOP/s and bandwidth (no MFU / MBU below 1, no overheads).

  Either `devices` chips of `hardware` that both phases share (any colocated or disaggregated
  configuration on them), or a split: prefill alone on `prefill_devices` chips of `prefill_hw`
  and decode alone on `decode_devices` of `decode_hw` (a disaggregated configuration, possibly of
  two kinds of chip). Lengths: the workload's requests (arrays) or one request's (numbers)."""
  work = _per_request(cfg, prompt_lens, output_lens)
  limits = {}
  if hardware is not None:
    if devices < 1:
      raise ValueError(f"roofline over {devices} devices")
    limits["compute"] = devices * hardware.peak_flops / (work["prefill_flops"]
                                                         + work["decode_flops"])
    limits["decode memory"] = _decode_memory_rate(cfg, hardware, devices, work["decode_kv_bytes"])
  else:
    if prefill_hw is None or decode_hw is None or prefill_devices < 1 or decode_devices < 1:
      raise ValueError("roofline needs hardware and devices, or both phases' chips and counts")
    limits["prefill compute"] = prefill_devices * prefill_hw.peak_flops / work["prefill_flops"]
    limits["decode compute"] = (decode_devices * decode_hw.peak_flops
                                / max(work["decode_flops"], 1e-30))
    limits["decode memory"] = _decode_memory_rate(cfg, decode_hw, decode_devices,
                                                  work["decode_kv_bytes"])
  bound = min(limits, key=limits.get)
  rate = limits[bound]
  return Roofline(rate, rate * work["output_tokens"], bound, limits)
