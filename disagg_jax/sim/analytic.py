"""Roofline step times for hardware that is not here, as step-time tables for the simulator.

Each step costs max(FLOPs / (chips x peak x MFU), bytes / (chips x HBM bandwidth x MBU)) plus the
tensor-parallel all-reduces (two per layer, ring: 2 (tp-1)/tp x activation bytes over the
interconnect) plus a fixed per-step overhead. Weights are read once per step; decode also reads
every active sequence's KV; prefill's attention is quadratic in the prompt. KV transfers between
prefill and decode chips go over the interconnect (same slice / node) at `link_efficiency` of its
bandwidth.

MFU, MBU and the overhead are calibration factors. `fit_anchor` fits them for the H200
from the measured Llama-3-8B-shaped steps in ../shared/anchors (the only accelerator measurements
here); the TPU factors are assumptions, printed with every plan. `calibrate(profile, model_cfg)`
reports the same factors for the CPU this machine has, from a launch/profile.py table.
"""

from __future__ import annotations

import dataclasses

from disagg_jax.engine import buckets
from disagg_jax.models import presets
from disagg_jax.models.config import ModelConfig
from disagg_jax.sim.profile import StepProfile


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
}
DTYPE_BYTES = 2  # bf16 weights and KV

model_preset = presets.model_preset  # configs/models/NAME.py


def get_hardware(name: str) -> Hardware:
  """The chip, with H100 / H200 factors fitted to the H200 anchor (same Hopper chip; the H100
  keeps the H200's MFU and overhead and the same MBU of its own bandwidth)."""
  if name not in HARDWARE:
    raise ValueError(f"--hardware={name!r} is not one of {', '.join(HARDWARE)}")
  hw = HARDWARE[name]
  if name in ("h100", "h200"):
    h200 = HARDWARE["h200"]
    fit = fit_anchor(model_preset("llama3_8b"), h200.peak_flops, h200.hbm_bw)
    hw = dataclasses.replace(hw, mfu=fit["mfu"], mbu=fit["mbu"],
                             step_overhead_s=fit["step_overhead_s"],
                             source=hw.source + " (MFU/MBU/overhead fitted to the H200 anchor)")
  return hw


@dataclasses.dataclass(frozen=True)
class StepCost:
  """FLOPs and HBM bytes of one step on the whole tensor-parallel group, and its activations."""
  flops: float
  bytes: float
  tokens: int


def _dense_flops(cfg: ModelConfig, tokens: int, sequences: int) -> float:
  """Matmul FLOPs: every layer for every token, the LM head only for each sequence's last."""
  embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  return 2.0 * ((cfg.num_params() - embed) * tokens + cfg.vocab_size * cfg.hidden_size * sequences)


def _weight_bytes(cfg: ModelConfig) -> float:
  return float(cfg.num_params()) * DTYPE_BYTES


def prefill_cost(cfg: ModelConfig, batch: int, length: int) -> StepCost:
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * batch * length * length / 2
  kv = batch * length * cfg.kv_bytes_per_token(DTYPE_BYTES)
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


def transfer_time(cfg: ModelConfig, hw: Hardware, tokens: int) -> float:
  return (tokens * cfg.kv_bytes_per_token(DTYPE_BYTES) / (hw.link_bw * hw.link_efficiency)
          + hw.collective_latency_s)


def fits(cfg: ModelConfig, hw: Hardware, tp: int, decode_batch: int, max_seq_len: int,
         memory_fraction: float = 0.9) -> tuple[bool, int]:
  """Whether weights plus at least one max_seq_len sequence fit; and how many KV pages of 16
  tokens the rest of HBM holds (capped at decode_batch full sequences)."""
  free = tp * hw.hbm_bytes * memory_fraction - _weight_bytes(cfg)
  per_page = 16 * cfg.kv_bytes_per_token(DTYPE_BYTES)
  pages = int(free // per_page)
  need_one = -(-max_seq_len // 16)
  return pages >= need_one, min(pages, decode_batch * need_one)


def profile_for(cfg: ModelConfig, hw: Hardware, *, mode: str, tp: int, decode_batch: int,
                max_seq_len: int, prefill_tp: int | None = None, prefill_batch: int = 4,
                chunk_size: int = 512, chunk_batch: int = 4) -> StepProfile:
  """A step-time table as launch/profile.py would measure it on `hw` (decode cost is linear in the
  active batch and context, see StepProfile.decode_time)."""
  ok, pages = fits(cfg, hw, tp, decode_batch, max_seq_len)
  if not ok:
    raise ValueError(f"{cfg.num_params() / 1e9:.1f}B parameters with TP{tp} leave no room for "
                     f"one {max_seq_len}-token sequence in {tp} x {hw.hbm_bytes / 1e9:.0f} GB")
  base = step_time(decode_cost(cfg, 0, 0), cfg, hw, tp)
  per_seq = step_time(decode_cost(cfg, 1, 0), cfg, hw, tp) - base
  per_token = cfg.kv_bytes_per_token(DTYPE_BYTES) / (tp * hw.hbm_bw * hw.mbu)
  profile = StepProfile(mode=mode, page_size=16, decode_batch=decode_batch, num_pages=pages,
                        max_seq_len=max_seq_len, decode_s=base,
                        decode_per_seq_s=max(per_seq, 0.0), decode_per_token_s=per_token,
                        meta={"hardware": hw.name, "tp": tp, "analytic": True})
  if mode == "colocated":
    profile.chunk_size, profile.chunk_batch = chunk_size, chunk_batch
    for bc in buckets.chunk_rows(chunk_batch):
      for c in buckets.chunk_lens(chunk_size):
        # The chunk's compute rides on the decode step's weight read: only the excess counts.
        chunk = step_time(prefill_cost(cfg, bc, c), cfg, hw, tp)
        profile.mixed_s[(bc, c)] = max(chunk, base)
    return profile
  ptp = prefill_tp or tp
  profile.prefill_batch = prefill_batch
  profile.length_buckets = buckets.length_buckets(max_seq_len, 16)
  for s in profile.length_buckets:
    for b in buckets.batch_buckets(prefill_batch):
      profile.prefill_s[(b, s)] = step_time(prefill_cost(cfg, b, s), cfg, hw, ptp)
    profile.transfer_s[s] = transfer_time(cfg, hw, s)
    profile.insert_s[s] = s * cfg.kv_bytes_per_token(DTYPE_BYTES) / (tp * hw.hbm_bw * hw.mbu)
  profile.meta["prefill_tp"] = ptp
  return profile


def describe(hw: Hardware) -> str:
  how = "fitted" if "fitted" in hw.source else "assumed"
  return (f"{hw.source}; {how} MFU {hw.mfu:.2f} (prefill), MBU {hw.mbu:.2f} (decode), "
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
