"""Drives a workload through an engine (`engine.api.EngineAPI`) on its arrival schedule."""

from __future__ import annotations

import threading
import time
from typing import Sequence

from tqdm import tqdm

from disagg_jax.bench.metrics import RequestRecord
from disagg_jax.bench.workloads import BenchRequest
from disagg_jax.engine.api import EngineAPI
from disagg_jax.engine.request import RequestOutput
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams


def run(engine: EngineAPI, requests: Sequence[BenchRequest], arrivals, *,
        max_concurrency: int | None = None, ignore_eos: bool = True, temperature: float = 0.0,
        seed: int = 0, progress: bool = True, timeout: float | None = None
        ) -> tuple[list[RequestRecord], float]:
  """Sends request i at `arrivals[i]` seconds (at most `max_concurrency` in flight) and returns
  one record per request and the run's duration (first send to last completion)."""
  n = len(requests)
  outputs: list[RequestOutput | None] = [None] * n
  limiter = threading.Semaphore(max_concurrency) if max_concurrency else None
  all_done = threading.Event()
  lock = threading.Lock()
  remaining = [n]
  bar = tqdm(total=n, desc=f"{engine.mode} requests", disable=not progress, leave=False)
  finished_at = [0.0]

  def on_done(i):
    def callback(output):
      outputs[i] = output
      with lock:
        remaining[0] -= 1
        finished_at[0] = time.perf_counter()
        if remaining[0] == 0:
          all_done.set()
      if limiter:
        limiter.release()
      bar.update()
    return callback

  start = time.perf_counter()
  first_sent = None
  for i, request in enumerate(requests):
    delay = start + float(arrivals[i]) - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    if limiter:
      limiter.acquire()
    if first_sent is None:
      first_sent = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=request.output_len, ignore_eos=ignore_eos,
                              temperature=temperature, seed=(seed + i) % 2**32)
    try:
      stream = engine.add_request(request.prompt_token_ids, sampling)
    except InvalidRequestError as e:
      on_done(i)(RequestOutput(f"bench-{i}", request.prompt_token_ids, finish_reason="error",
                               error=str(e)))
      continue
    stream.add_done_callback(on_done(i))
  if n and not all_done.wait(timeout):
    raise TimeoutError(f"{remaining[0]} of {n} requests unfinished after {timeout} s")
  bar.close()
  # From the first send, as the simulator counts it (its clock starts at the first arrival).
  duration = max(finished_at[0] - (first_sent or start), 1e-9)
  records = [RequestRecord.from_output(out, len(req.prompt_token_ids))
             for out, req in zip(outputs, requests)]
  for record, arrival in zip(records, arrivals):
    record.arrival = float(arrival)
  return records, duration
