"""Sweeps: engine configurations x workloads x request rates, one results row per run.

An experiment (configs/experiments/*.py) lists colocated meshes, disaggregated prefill:decode
splits with their TP degrees, workloads and rates. Each engine is built (and compiled) once and
then serves every workload at every rate; rows go to results.jsonl as they finish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

from disagg_jax import parallel
from disagg_jax.bench import arrivals as arrivals_lib
from disagg_jax.bench import metrics, runner, workloads
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.request import Limits
from disagg_jax.models import loading
from disagg_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  mode: str
  prefill_devices: int  # colocated: the mesh's devices
  prefill_tp: int
  decode_devices: int = 0
  decode_tp: int = 0

  @property
  def label(self) -> str:
    if self.mode == "colocated":
      return f"colocated {self.prefill_devices}dev tp{self.prefill_tp}"
    return (f"disagg {self.prefill_devices}P:{self.decode_devices}D "
            f"tp{self.prefill_tp}/{self.decode_tp}")

  @property
  def num_devices(self) -> int:
    return self.prefill_devices + self.decode_devices


def expand(experiment) -> list[EngineSpec]:
  """The engine configurations of an experiment config."""
  specs = []
  for devices in experiment.colocated_devices:
    for tp in experiment.colocated_tp or [devices]:
      if devices % tp == 0:
        specs.append(EngineSpec("colocated", devices, tp))
  for prefill, decode in experiment.disagg_splits:
    for prefill_tp, decode_tp in experiment.disagg_tp or [(prefill, decode)]:
      prefill_tp, decode_tp = prefill_tp or prefill, decode_tp or decode
      if prefill % prefill_tp == 0 and decode % decode_tp == 0:
        specs.append(EngineSpec("disagg", prefill, prefill_tp, decode, decode_tp))
  return specs


def build_engine(spec: EngineSpec, model_path, dtype, engine_config: EngineConfig) -> Engine:
  devices = jax.devices()
  if spec.num_devices > len(devices):
    raise ValueError(f"{spec.label} needs {spec.num_devices} devices; {len(devices)} exist")
  prefill_mesh = parallel.make_mesh(devices[:spec.prefill_devices], spec.prefill_tp)
  prefill = loading.load_model(model_path, prefill_mesh, dtype)
  if spec.mode == "colocated":
    return Engine.create("colocated", prefill, config=engine_config, progress=False)
  decode_mesh = parallel.make_mesh(
      devices[spec.prefill_devices:spec.num_devices], spec.decode_tp)
  decode = loading.load_model(model_path, decode_mesh, dtype)
  return Engine.create("disagg", prefill, decode, config=engine_config, progress=False)


def run(experiment, out_dir: str, progress: bool = True, log=print) -> list[dict]:
  """Runs every (engine, workload, rate) of `experiment`; returns and writes the rows."""
  os.makedirs(out_dir, exist_ok=True)
  engine_config = EngineConfig.from_config(experiment.engine)
  slos = metrics.parse_goodput(experiment.goodput)
  model_cfg = ModelConfig.from_dir(experiment.model_path or loading.DEMO_MODEL_DIR)
  limits = Limits.for_model(model_cfg, engine_config.max_seq_len,
                            engine_config.max_prefill_length)
  requests_by_workload = {
      name: workloads.build(name, num_prompts=experiment.num_prompts,
                            vocab_size=model_cfg.vocab_size, tokenizer=None,
                            seed=experiment.seed, first_id=experiment.first_token_id)
      for name in experiment.workloads}
  for requests in requests_by_workload.values():  # fail before any engine is built
    workloads.check_limits(requests, limits.max_seq_len, limits.max_prefill_length)
  for rate in experiment.rates:
    arrivals_lib.arrival_times(1, rate, experiment.burstiness)
  rows = []
  results_path = os.path.join(out_dir, "results.jsonl")
  with open(results_path, "w") as results_file:
    for spec in expand(experiment):
      start = time.perf_counter()
      engine = build_engine(spec, experiment.model_path, experiment.dtype, engine_config)
      log(f"[{spec.label}] built and compiled in {time.perf_counter() - start:.0f} s")
      try:
        for workload, requests in requests_by_workload.items():
          for rate in experiment.rates:
            arrivals = arrivals_lib.arrival_times(len(requests), rate, experiment.burstiness,
                                                  experiment.seed)
            records, duration = runner.run(engine, requests, arrivals, progress=progress)
            row = {"label": spec.label, **dataclasses.asdict(spec),
                   "num_devices": spec.num_devices, "workload": workload, "request_rate": rate,
                   **metrics.compute(records, duration, slos),
                   "ttft_s": [r.ttft for r in records if r.success],
                   "itl_s": [g for r in records if r.success for g in r.itl]}
            rows.append(row)
            results_file.write(json.dumps(row) + "\n")
            results_file.flush()
            log(f"[{spec.label}] {workload} @ {rate:g} req/s: goodput "
                f"{row['request_goodput'] or 0:.2f} req/s, p90 TTFT {row['p90_ttft_ms']:.0f} ms, "
                f"p99 ITL {row['p99_itl_ms']:.0f} ms")
      finally:
        engine.shutdown()
  return rows
