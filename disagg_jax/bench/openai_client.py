"""Drives a workload through any OpenAI-compatible server (streamed /v1/completions), with the
same arrival schedule and metrics as the in-process runner, timed on the client side."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Sequence

from tqdm import tqdm

from disagg_jax.bench.metrics import RequestRecord
from disagg_jax.bench.workloads import BenchRequest


async def _one(client, model: str, request: BenchRequest, ignore_eos: bool, seed: int
               ) -> RequestRecord:
  body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
          "temperature": 0.0, "seed": seed, "stream": True,
          "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
  record = RequestRecord(len(request.prompt_token_ids))
  start = time.perf_counter()
  chunk_times, completion_tokens, phases = [], None, {}
  try:
    async with client.stream("POST", "/v1/completions", json=body) as response:
      if response.status_code != 200:
        record.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
        return record
      async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        payload = json.loads(line[len("data: "):])
        if payload.get("usage"):
          completion_tokens = payload["usage"]["completion_tokens"]
          details = payload["usage"].get("prompt_tokens_details") or {}
          record.cached_tokens = int(details.get("cached_tokens") or 0)
          phases = payload.get("phases_s") or {}
        # A token per chunk: this server sends one per token (text may be held back, so
        # empty); others put the last token in the chunk with finish_reason.
        if any(c.get("finish_reason") is None or c.get("text") for c in payload.get("choices", [])):
          chunk_times.append(time.perf_counter())
  except Exception as e:  # connection errors count as failed requests, not a crashed run
    record.error = f"{type(e).__name__}: {e}"
    return record
  if not chunk_times:
    record.error = "no tokens received"
    return record
  record.success = True
  record.output_len = completion_tokens if completion_tokens is not None else len(chunk_times)
  record.ttft = chunk_times[0] - start
  record.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
  record.e2el = chunk_times[-1] - start
  record.phases = phases
  return record


async def _run(base_url, model, requests, arrivals, max_concurrency, ignore_eos, seed, progress):
  import httpx  # pylint: disable=g-import-not-at-top
  limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else None
  bar = tqdm(total=len(requests), desc="openai requests", disable=not progress, leave=False)
  limits = httpx.Limits(max_connections=max_concurrency or 1000,
                        max_keepalive_connections=max_concurrency or 1000)
  async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
    if model is None:
      model = (await client.get("/v1/models")).json()["data"][0]["id"]
    start = time.perf_counter()

    async def send(i, request):
      await asyncio.sleep(max(0.0, start + float(arrivals[i]) - time.perf_counter()))
      if limiter:
        async with limiter:
          record = await _one(client, model, request, ignore_eos, seed + i)
      else:
        record = await _one(client, model, request, ignore_eos, seed + i)
      bar.update()
      return record

    records = await asyncio.gather(*(send(i, r) for i, r in enumerate(requests)))
    # From the first send (its scheduled time), as the in-process runner and the simulator.
    first = float(min(arrivals)) if len(requests) else 0.0
    duration = time.perf_counter() - (start + first)
  bar.close()
  return list(records), duration


def run(base_url: str, requests: Sequence[BenchRequest], arrivals, *, model: str | None = None,
        max_concurrency: int | None = None, ignore_eos: bool = True, seed: int = 0,
        progress: bool = True) -> tuple[list[RequestRecord], float]:
  """Like `runner.run`, against `base_url` (e.g. http://127.0.0.1:8000); greedy sampling."""
  base_url = base_url.rstrip("/")
  if base_url.endswith("/v1"):
    base_url = base_url[:-3]
  return asyncio.run(_run(base_url, model, requests, arrivals, max_concurrency, ignore_eos,
                          seed % 2**32, progress))
