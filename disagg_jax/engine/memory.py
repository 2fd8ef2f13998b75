"""Sizing the KV page pool from device memory, as vLLM's `gpu_memory_utilization` does.

On each device of the decode (or colocated) mesh, the pool gets `memory_fraction` of the memory
left after the weights and the largest step's activations, less the staging buffers where
disaggregated KV waits for a slot:

    pool + staging = memory_fraction * (capacity - in use - activations)

- TPU / GPU: capacity and in-use bytes are the device's own (`Device.memory_stats()`), read after
  the weights are placed; `memory_fraction` defaults to 0.9.
- CPU: the devices are simulated and share the host's memory, so "free" is the host's memory
  (MemTotal) less this process's weights and the activations of every mesh in it, and the pool
  takes `memory_fraction` of that, 0.05 by default: a modest share that leaves the machine usable
  (about 1 GB on a 24 GB machine); never more than half of what MemAvailable says is free.

The page count is rounded down to three significant bits (at most 12.5% less), so that the small
run-to-run changes of free memory do not change the pool's shape: every step takes the pool as an
argument, and a new shape would miss the persistent compilation cache.

The pool never exceeds what every slot at max_seq_len needs, and a pool that cannot hold one
max_seq_len request is an error that names the numbers and the flags to change. Activation
sizes are estimated from the model's shapes (`step_activation_bytes`, an upper bound checked
against XLA's own memory analysis in the tests).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from disagg_jax import parallel
from disagg_jax.engine import buckets
from disagg_jax.kv.pages import pages_for
from disagg_jax.models.config import ModelConfig
from pallas_kernels import dispatch

GB = 1e9
DEFAULT_FRACTION_ACCELERATOR = 0.9
DEFAULT_FRACTION_CPU = 0.05
SAMPLING_CANDIDATES = 256  # rows x candidates of the sampler's temporaries (generous)


# Every dp shard's block of the pool starts with a scratch page that unused page-table entries
# point at (`engine.slots`); it never holds a sequence's tokens.
SCRATCH_PAGES_PER_SHARD = 1


class PoolSizeError(ValueError):
  """A configuration whose page pool cannot hold one request (or whose steps do not fit)."""


# ------------------------------------------------------------------ the pool-size formula

def full_pool_pages(num_slots: int, max_seq_len: int, page_size: int) -> int:
  """Usable pages that hold `num_slots` sequences of `max_seq_len` tokens each: more than this
  is never used. The one formula for a full pool (engine, static generator, roofline model)."""
  return num_slots * pages_for(max_seq_len, page_size)


def full_shard_pages(slots_per_shard: int, max_seq_len: int, page_size: int) -> int:
  """Pages of one dp shard's block (its scratch page included) that hold every one of its
  `slots_per_shard` slots at `max_seq_len` tokens."""
  return full_pool_pages(slots_per_shard, max_seq_len, page_size) + SCRATCH_PAGES_PER_SHARD


def is_cpu(mesh) -> bool:
  return mesh.devices.flat[0].platform == "cpu"


def default_fraction(mesh) -> float:
  return DEFAULT_FRACTION_CPU if is_cpu(mesh) else DEFAULT_FRACTION_ACCELERATOR


def _meminfo(field: str) -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def host_total_bytes() -> int:
  """The host's physical memory (MemTotal)."""
  return _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_bytes() -> int:
  """MemAvailable from /proc/meminfo (physical memory where that is not readable)."""
  return _meminfo("MemAvailable") or host_total_bytes()


def round_pages(pages: int) -> int:
  """`pages` rounded down to three significant bits: 1000 -> 896, 1379 -> 1280."""
  if pages < 8:
    return pages
  step = 1 << (pages.bit_length() - 3)
  return pages // step * step


def tree_bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays (the largest device share)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def step_activation_bytes(cfg: ModelConfig, *, tokens: int, logits_rows: int,
                          attention_bytes: int, kv_out_bytes: int, itemsize: int, tp: int = 1
                          ) -> int:
  """An upper bound of one step's temporaries on one device: per token the residual stream and
  its norms, q/k/v and the MLP's gate/up (split over tp), float32 logits and the sampler's
  temporaries per row (the penalties' history rows and penalized logits among them), the
  attention path's own (`attention_bytes`, already per device) and the step's KV output
  (prefill). Doubled for XLA's fusion temporaries and buffer reuse limits."""
  per_token = (4 * cfg.hidden_size * itemsize
               + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * itemsize // tp
               + 3 * cfg.intermediate_size * itemsize // tp)
  logits = logits_rows * (3 * cfg.vocab_size // tp + 2 * cfg.vocab_size
                         + 2 * SAMPLING_CANDIDATES) * 4
  return 2 * (tokens * per_token + logits + attention_bytes) + kv_out_bytes


def paged_attention_bytes(*, rows: int, queries: int, context: int, heads: int, q_heads: int,
                          head_dim: int, itemsize: int, xla: bool) -> int:
  """Temporaries of paged attention for `rows` x `queries` queries against `context` tokens
  (per device: `heads` pool heads, `q_heads` query heads): the XLA path gathers K and V and
  materialises float32 scores; the Pallas kernels stream pages through on-chip memory."""
  if not xla:
    return rows * queries * q_heads * head_dim * 4
  gathered = 2 * heads * rows * context * head_dim * itemsize
  scores = 2 * q_heads * rows * queries * context * 4
  return gathered + scores


def prefill_attention_bytes(*, rows: int, length: int, q_heads: int, head_dim: int,
                            query_block: int, xla: bool) -> int:
  """Temporaries of prompt attention: the XLA path's float32 scores for one block of queries
  (`pallas_kernels.dispatch.XLA_QUERY_BLOCK`); the Pallas kernel's are small."""
  if not xla:
    return rows * length * q_heads * head_dim * 4
  return 2 * rows * q_heads * min(length, 2 * query_block) * length * 4


@dataclasses.dataclass
class PoolPlan:
  """The page pool of one mesh and the budget it came from (bytes are per device)."""
  pages_per_shard: int  # incl. the shard's scratch page
  num_shards: int  # dp
  page_size: int
  page_bytes: int  # one page of one shard, on each device holding it
  staging_tokens: int
  staging_bytes: int
  weights_bytes: int
  activation_bytes: int
  free_bytes: int | None  # None when num_pages was given
  fraction: float | None
  platform: str
  capped: bool = False  # every slot at max_seq_len fits; more would be unused

  @property
  def num_pages(self) -> int:
    return self.pages_per_shard * self.num_shards

  @property
  def usable_pages_per_shard(self) -> int:
    """Pages one dp shard hands out: the most one sequence can hold."""
    return self.pages_per_shard - SCRATCH_PAGES_PER_SHARD

  @property
  def usable_pages(self) -> int:
    return self.usable_pages_per_shard * self.num_shards

  @property
  def tokens(self) -> int:
    return self.usable_pages * self.page_size

  @property
  def pool_bytes(self) -> int:
    return self.pages_per_shard * self.page_bytes

  def describe(self, name: str, mesh) -> list[str]:
    """Start-up lines: the budget of each device of `mesh`."""
    dp, tp = parallel.dp_size(mesh), parallel.tp_size(mesh)
    head = (f"{name} mesh: {mesh.size} {self.platform} device(s), dp={dp} tp={tp}; per device: "
            f"weights {self.weights_bytes / GB:.2f} GB, largest step's activations "
            f"<= {self.activation_bytes / GB:.2f} GB")
    if self.free_bytes is None:
      budget = "page pool from --config.engine.num_pages"
    else:
      where = ("host memory free of this process's weights and activations (shared by all CPU "
               "devices)" if self.platform == "cpu" else "free")
      budget = (f"{where} {self.free_bytes / GB:.2f} GB x memory_fraction {self.fraction:g} = "
                f"{self.fraction * self.free_bytes / GB:.2f} GB for KV")
    pool = (f"KV page pool: {self.usable_pages:,} pages x {self.page_size} tokens = "
            f"{self.tokens:,} tokens ({self.pool_bytes / GB:.2f} GB per device)")
    if self.capped:
      pool += ", every slot at max_seq_len"
    if self.staging_tokens:
      pool += (f"; staging for arriving KV: {self.staging_tokens:,} tokens "
               f"({self.staging_bytes / GB:.2f} GB per device)")
    return [head, "  " + budget, "  " + pool]


def plan_pool(cfg: ModelConfig, mesh, *, dtype, page_size: int, num_slots: int, max_seq_len: int,
              weights, activation_bytes: int, staging_tokens: int = 0, num_pages: int = 0,
              memory_fraction: float = 0.0, other_bytes: int = 0) -> PoolPlan:
  """The page pool for `mesh` (see the module docstring). `weights` is the mesh's parameters
  (sharded arrays); `activation_bytes` the largest step's on one device of this mesh;
  `other_bytes` what the process's other meshes hold (their weights and activations: they share
  host memory on CPU); `staging_tokens` of arriving KV wait on these devices (disaggregated)."""
  itemsize = np.dtype(dtype).itemsize
  dp, tp = parallel.dp_size(mesh), parallel.tp_size(mesh)
  heads_per_device = parallel.pool_kv_heads(cfg, mesh) // tp
  page_bytes = 2 * cfg.num_layers * heads_per_device * page_size * cfg.head_dim * itemsize
  # Staged KV arrives as [d, L, 2, S, Hkv / d, D], heads over tp when they divide.
  staged_heads = cfg.num_kv_heads // (tp if parallel.kv_heads_sharded(cfg, mesh) else 1)
  staging_bytes = 2 * cfg.num_layers * staged_heads * staging_tokens * cfg.head_dim * itemsize
  pages_per_seq = pages_for(max_seq_len, page_size)
  full = full_shard_pages(num_slots // dp, max_seq_len, page_size)  # every slot at max_seq_len
  platform = mesh.devices.flat[0].platform
  plan = PoolPlan(0, dp, page_size, page_bytes, staging_tokens, staging_bytes,
                  tree_bytes_per_device(weights), activation_bytes, None, None, platform)
  if num_pages:
    if num_pages % dp:
      raise PoolSizeError(f"--config.engine.num_pages={num_pages} must split evenly over the "
                         f"decode mesh's dp={dp}")
    plan.pages_per_shard = num_pages // dp
  else:
    fraction = memory_fraction or default_fraction(mesh)
    if not 0 < fraction <= 1:
      raise PoolSizeError(f"--config.engine.memory_fraction={fraction} must be in (0, 1]")
    if platform == "cpu":
      # One memory for every simulated device: budget the whole mesh, then per device.
      ours = mesh.size * (plan.weights_bytes + activation_bytes) + other_bytes
      free = host_total_bytes() - ours
      # Never more than half of what is available now (other processes may hold much of it).
      available = host_available_bytes() - mesh.size * activation_bytes - other_bytes
      budget_all = min(fraction * free, available / 2) - mesh.size * staging_bytes
      pages = int(budget_all // (page_bytes * mesh.size)) if budget_all > 0 else 0
      plan.free_bytes = free
    else:
      pages, free_min = None, None
      for device in mesh.devices.flat:
        stats = device.memory_stats() or {}
        limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        if limit is None:
          raise PoolSizeError(f"device {device} reports no memory limit; set "
                             "--config.engine.num_pages")
        free = limit - used - activation_bytes
        free_min = free if free_min is None else min(free_min, free)
        here = int((fraction * free - staging_bytes) // page_bytes)
        pages = here if pages is None else min(pages, here)
      plan.free_bytes = free_min
    plan.fraction = fraction
    plan.pages_per_shard = round_pages(max(pages, 0))
    if plan.pages_per_shard >= full:
      plan.pages_per_shard, plan.capped = full, True
  if plan.usable_pages_per_shard < pages_per_seq:
    holds = max(plan.usable_pages_per_shard, 0) * page_size
    raise PoolSizeError(
        f"the KV page pool holds {holds:,} tokens per dp shard "
        f"({max(plan.pages_per_shard, 0):,} pages of {page_size}), fewer than one "
        f"max_seq_len={max_seq_len:,} request needs ({pages_per_seq:,} pages); weights take "
        f"{plan.weights_bytes / GB:.2f} GB and the largest step {activation_bytes / GB:.2f} GB "
        "per device. Raise --config.engine.memory_fraction (or num_pages), lower "
        "--config.engine.max_seq_len, or give the mesh more devices")
  return plan


# ------------------------------------------------------------------ the engine's meshes

def paged_step_activations(config, limits, model, *, decode_rows: int, chunk_rows: int = 0,
                           chunk_len: int = 0) -> int:
  """The largest paged step's activations on one device of `model`'s mesh: `decode_rows` rows of
  one query and `chunk_rows` rows of `chunk_len` queries (a mixed step), contexts up to
  max_seq_len; with the decode slots' penalty history (`history_bytes`), which lives beside
  them."""
  cfg, mesh = model.cfg, model.mesh
  tp, dp = parallel.tp_size(mesh), parallel.dp_size(mesh)
  itemsize = np.dtype(model.dtype).itemsize
  xla = dispatch.resolve_impl(config.attention_impl) == "xla"
  attention = sum(
      paged_attention_bytes(rows=-(-rows // dp), queries=queries, context=limits.max_seq_len,
                            heads=parallel.pool_kv_heads(cfg, mesh) // tp,
                            q_heads=cfg.num_heads // tp, head_dim=cfg.head_dim,
                            itemsize=itemsize, xla=xla)
      for rows, queries in ((decode_rows, 1), (chunk_rows, chunk_len)) if rows)
  rows = decode_rows + chunk_rows
  return step_activation_bytes(cfg, tokens=-(-(decode_rows + chunk_rows * chunk_len) // dp),
                               logits_rows=-(-rows // dp), attention_bytes=attention,
                               kv_out_bytes=0, itemsize=itemsize, tp=tp) + history_bytes(
                                   cfg, decode_rows, dp)


def history_bytes(cfg: ModelConfig, num_slots: int, dp: int) -> int:
  """Per device: the penalty history of `num_slots` decode slots (int32[slots, V], rows over
  dp; `engine.decode_core.DecodeCore.history`)."""
  return -(-num_slots // dp) * cfg.vocab_size * 4


def prefill_step_activations(config, limits, model) -> int:
  """The largest prefill step's activations and KV output on one device of `model`'s mesh
  (batches of `prefill_batch` prompts, at most `max_prefill_tokens` padded tokens)."""
  cfg, mesh = model.cfg, model.mesh
  tp, dp = parallel.tp_size(mesh), parallel.dp_size(mesh)
  itemsize = np.dtype(model.dtype).itemsize
  xla = dispatch.resolve_impl(config.attention_impl) == "xla"
  batches = buckets.batch_buckets(config.prefill_batch, dp)
  kv_heads = cfg.num_kv_heads // (tp if parallel.kv_heads_sharded(cfg, mesh) else 1)
  worst = 0
  for s in buckets.length_buckets(limits.max_seq_len, config.page_size):
    rows = -(-max([b for b in batches if b * s <= config.max_prefill_tokens] or [batches[0]])
             // dp)
    attention = prefill_attention_bytes(rows=rows, length=s, q_heads=cfg.num_heads // tp,
                                        head_dim=cfg.head_dim,
                                        query_block=dispatch.XLA_QUERY_BLOCK, xla=xla)
    kv_out = 2 * cfg.num_layers * rows * s * kv_heads * cfg.head_dim * itemsize
    worst = max(worst, step_activation_bytes(
        cfg, tokens=rows * s, logits_rows=rows, attention_bytes=attention, kv_out_bytes=kv_out,
        itemsize=itemsize, tp=tp))
  return worst


def plan_engine_pool(config, limits, mode: str, decode_model, prefill_model=None) -> PoolPlan:
  """The page pool of a serving engine's decode mesh ("disagg": `prefill_model`'s mesh runs the
  prefill steps in this process, or None when it is another process's) or of its one mesh
  ("colocated"). `config` is an EngineConfig."""
  other = 0
  if mode == "disagg":
    activations = paged_step_activations(config, limits, decode_model,
                                         decode_rows=config.decode_batch)
    if prefill_model is not None:
      other = (prefill_model.mesh.size * (prefill_step_activations(config, limits, prefill_model)
                                          + tree_bytes_per_device(prefill_model.params))
               + prefill_cache_bytes(config, limits, prefill_model))
    staging = buckets.staging_tokens(config.staging_tokens, limits.max_seq_len,
                                     config.page_size, config.prefill_batch,
                                     config.max_prefill_tokens)
  else:
    activations = paged_step_activations(
        config, limits, decode_model, decode_rows=config.decode_batch,
        chunk_rows=config.chunk_batch, chunk_len=config.chunk_size)
    staging = 0
  return plan_pool(decode_model.cfg, decode_model.mesh, dtype=decode_model.dtype,
                   page_size=config.page_size, num_slots=config.decode_batch,
                   max_seq_len=limits.max_seq_len, weights=decode_model.params,
                   activation_bytes=activations, staging_tokens=staging,
                   num_pages=config.num_pages, memory_fraction=config.memory_fraction,
                   other_bytes=other)


def prefill_cache_tokens(config, max_seq_len: int, dp: int) -> int:
  """--config.engine.prefill_cache_tokens resolved (`config` an EngineConfig) for a prefill mesh
  with `dp` rows: 0 (off) without prefix caching; -1: one full prefill batch
  (max_prefill_tokens), and at least one max_seq_len sequence per dp row, on every platform (on
  CPU it measured x0.72 median TTFT on the multi-turn workload, docs/PREFIX_CACHING.md)."""
  n = cache_knob(config, "prefill_cache_tokens")
  return max(config.max_prefill_tokens, max_seq_len * dp) if n is None else n


def cache_knob(config, name: str) -> int | None:
  """A prefix-cache size in tokens, `--config.engine.NAME` (-1 auto, 0 off, or a count),
  checked: 0 without prefix caching, None for auto (the caller's rule), else the count."""
  n = getattr(config, name)
  if n < -1:
    raise ValueError(f"--config.engine.{name}={n} must be -1 (auto), 0 (off) or a token count")
  if not config.prefix_caching:
    return 0
  return None if n == -1 else n


def prefill_cache_bytes(config, limits, model) -> int:
  """Bytes of the prefill mesh's prefix cache (`engine.prefill_cache`), all its devices: its
  pages and its slots' penalty history."""
  cfg, mesh = model.cfg, model.mesh
  dp = parallel.dp_size(mesh)
  tokens = prefill_cache_tokens(config, limits.max_seq_len, dp)
  if not tokens:
    return 0
  slots = -(-config.prefill_batch // dp) * dp  # as engine.prefill_cache sizes them
  return (2 * cfg.num_layers * parallel.pool_kv_heads(cfg, mesh) * cfg.head_dim * tokens
          * np.dtype(model.dtype).itemsize + mesh.size * history_bytes(cfg, slots, dp))


def describe_prefill(config, limits, model) -> str:
  """The start-up line of a prefill mesh: weights and the largest step per device."""
  mesh = model.mesh
  return (f"prefill mesh: {mesh.size} {mesh.devices.flat[0].platform} device(s), "
          f"dp={parallel.dp_size(mesh)} tp={parallel.tp_size(mesh)}; per device: weights "
          f"{tree_bytes_per_device(model.params) / GB:.2f} GB, largest step's activations "
          f"<= {prefill_step_activations(config, limits, model) / GB:.2f} GB")
