r"""Serving benchmark: a workload against the in-process engine, with vLLM's metrics.

    python launch/benchmark.py --mode=disagg --num_cpu_devices=8 --prefill_devices=4 \
        --decode_devices=4 --dataset_name=random --num_prompts=200 --request_rate=4 \
        --random_input_len=128 --random_output_len=32 --goodput=ttft:2000,tpot:100 \
        --output_json=result.json

    python launch/benchmark.py --backend=openai --base_url=http://127.0.0.1:8000 \
        --dataset_name=decode_heavy --num_prompts=100 --request_rate=8      # any OpenAI server

Writes the benchmark JSON (docs/FORMATS.md: vLLM's keys plus per-phase means and p99s) to
--output_json, one line per request to --output_requests (default: next to the JSON), and
prints the same as a table. Bad workload input fails before the engine starts. With
--backend=openai the workload is sent as streamed /v1/completions with token-id prompts and timed
on the client; --model_path then only supplies the vocabulary for random prompts, and the
per-phase times come from the server when it reports them (this project's does).
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
flags.FLAGS.set_default("mode", "colocated")
flags.DEFINE_enum("backend", "inprocess", ["inprocess", "openai"],
                  "inprocess: this project's engine in this process; openai: an HTTP server.")
flags.DEFINE_string("base_url", None, "The server of --backend=openai, e.g. http://127.0.0.1:8000.")
flags.DEFINE_string("served_model_name", None, "--backend=openai: model id; default: the "
                    "server's first model.")
cli.define_workload_flags()
flags.DEFINE_bool("ignore_eos", True, "Generate exactly each request's output length.")
flags.DEFINE_string("output_json", None, "The run's metrics (JSON).")
flags.DEFINE_string("output_requests", None,
                    "Per-request records (JSONL); default: <output_json>.requests.jsonl.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup_jax()
  if FLAGS.backend == "inprocess" and FLAGS.mode == "single":
    raise app.UsageError("--mode=single is the offline reference path; benchmark "
                         "--mode=colocated or --mode=disagg")
  if FLAGS.backend == "openai" and FLAGS.elastic:
    raise app.UsageError("--elastic runs the in-process engine; start the server with "
                         "serve.py --elastic and benchmark it with --backend=openai")
  if FLAGS.backend == "openai" and not FLAGS.base_url:
    raise app.UsageError("--backend=openai needs --base_url=http://HOST:PORT")
  from disagg_jax.bench import metrics, report, runner, workloads  # pylint: disable=g-import-not-at-top

  # Everything about the workload is checked before a single device is touched.
  try:
    if FLAGS.max_concurrency is not None and FLAGS.max_concurrency < 1:
      raise workloads.WorkloadError(f"--max_concurrency={FLAGS.max_concurrency} must be >= 1")
    limits = _server_limits(FLAGS.base_url) if FLAGS.backend == "openai" else None
    requests, arrivals, slos = cli.workload_from_flags(FLAGS.config, limits)
  except ValueError as e:  # WorkloadError, ConfigError
    raise app.UsageError(str(e)) from None

  if FLAGS.backend == "openai":
    from disagg_jax.bench import openai_client  # pylint: disable=g-import-not-at-top
    records, duration = openai_client.run(FLAGS.base_url, requests, arrivals,
                                          model=FLAGS.served_model_name,
                                          max_concurrency=FLAGS.max_concurrency,
                                          ignore_eos=FLAGS.ignore_eos, seed=FLAGS.seed,
                                          progress=FLAGS.progress)
    label, num_devices = f"openai server {FLAGS.base_url}", None
  else:
    engine = cli.build_generator(FLAGS.config)
    try:
      records, duration = runner.run(engine, requests, arrivals,
                                     max_concurrency=FLAGS.max_concurrency,
                                     ignore_eos=FLAGS.ignore_eos, seed=FLAGS.seed,
                                     progress=FLAGS.progress)
    finally:
      engine.shutdown()
    label, num_devices = FLAGS.mode, engine.num_devices
    elastic = engine.report() if FLAGS.elastic else None
  result = metrics.compute(records, duration, slos)
  result.update(backend=FLAGS.backend, mode=FLAGS.mode if FLAGS.backend == "inprocess" else None,
                dataset_name=FLAGS.dataset_name, num_prompts=FLAGS.num_prompts,
                request_rate=FLAGS.request_rate, burstiness=FLAGS.burstiness,
                max_concurrency=FLAGS.max_concurrency, goodput=FLAGS.goodput,
                date=time.strftime("%Y-%m-%d %H:%M"), num_devices=num_devices)
  result.update(cli.workload_fields(requests))
  if FLAGS.backend == "inprocess" and elastic is not None:
    label += f" --elastic ({elastic['split_changes']} moves)"
    result.update(elastic=True, **elastic)
  print(report.format_table(result, f"{label} on {FLAGS.dataset_name}"))
  if FLAGS.output_json:
    report.write_json(FLAGS.output_json, result)
    report.write_records(FLAGS.output_requests or FLAGS.output_json + ".requests.jsonl", records)
  elif FLAGS.output_requests:
    report.write_records(FLAGS.output_requests, records)
  failed = [r.error for r in records if not r.success]
  if failed:
    print(f"{len(failed)} requests failed, e.g.: {json.dumps(failed[0])}")
  return 0


def _server_limits(base_url: str):
  """The served model's context length, from /v1/models."""
  import httpx  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  try:
    models = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/v1/models", timeout=30).json()
  except (httpx.HTTPError, ValueError) as e:
    raise ValueError(f"--base_url={base_url}: cannot list models ({e})") from None
  max_len = models["data"][0].get("max_model_len") or 10**9
  return Limits(max_seq_len=max_len, max_prefill_length=max_len)


if __name__ == "__main__":
  cli.run(main)
