"""Serving benchmark: a workload against the in-process engine, with vLLM's metrics.

    python launch/benchmark.py --mode=disagg --num_cpu_devices=8 --prefill_devices=4 \
        --decode_devices=4 --dataset_name=random --num_prompts=200 --request_rate=4 \
        --random_input_len=128 --random_output_len=32 --goodput=ttft:2000,tpot:100 \
        --output_json=result.json

    python launch/benchmark.py --backend=openai --base_url=http://127.0.0.1:8000 \
        --dataset_name=decode_heavy --num_prompts=100 --request_rate=8      # any OpenAI server

Writes the contract's JSON (DESIGN.md: vLLM's keys plus per-phase means and p99s) to
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
flags.DEFINE_enum("dataset_name", "random", ["random", "sharegpt", "prefill_heavy",
                                              "decode_heavy"], "Workload.")
flags.DEFINE_string("dataset_path", None, "ShareGPT JSON file (--dataset_name=sharegpt).")
flags.DEFINE_integer("num_prompts", 200, "Requests to send.")
flags.DEFINE_float("request_rate", float("inf"), "Requests per second; inf sends all at once.")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the gaps: 1 Poisson, < 1 burstier.")
flags.DEFINE_integer("max_concurrency", None, "At most this many requests in flight.")
flags.DEFINE_integer("random_input_len", None,
                     "Prompt tokens (random: default 256; presets have their own).")
flags.DEFINE_integer("random_output_len", None,
                     "Output tokens (random: default 64; presets have their own).")
flags.DEFINE_float("random_range_ratio", None, "Lengths vary in [len*(1-r), len*(1+r)].")
flags.DEFINE_string("goodput", None, "SLOs for goodput, e.g. ttft:200,tpot:50 (milliseconds).")
flags.DEFINE_integer("seed", 0, "Seed of the workload and the arrivals.")
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
  if FLAGS.backend == "openai" and not FLAGS.base_url:
    raise app.UsageError("--backend=openai needs --base_url=http://HOST:PORT")
  from disagg_jax.bench import arrivals as arrivals_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench import metrics, report, runner, workloads  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.loading import DEMO_MODEL_DIR  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  # Everything about the workload is checked before a single device is touched.
  model_dir = FLAGS.model_path or DEMO_MODEL_DIR
  try:
    slos = metrics.parse_goodput(FLAGS.goodput)
    if FLAGS.max_concurrency is not None and FLAGS.max_concurrency < 1:
      raise workloads.WorkloadError(f"--max_concurrency={FLAGS.max_concurrency} must be >= 1")
    arrivals = arrivals_lib.arrival_times(FLAGS.num_prompts, FLAGS.request_rate,
                                          FLAGS.burstiness, FLAGS.seed)
    model_cfg = ModelConfig.from_dir(model_dir)
    engine_cfg = FLAGS.config.engine
    limits = (_server_limits(FLAGS.base_url) if FLAGS.backend == "openai" else
              Limits.for_model(model_cfg, engine_cfg.max_seq_len, engine_cfg.max_prefill_length))
    tokenizer = load_tokenizer(model_dir, model_cfg.bos_token_id)
    requests = workloads.build(
        FLAGS.dataset_name, num_prompts=FLAGS.num_prompts, vocab_size=model_cfg.vocab_size,
        tokenizer=tokenizer, seed=FLAGS.seed, dataset_path=FLAGS.dataset_path,
        input_len=FLAGS.random_input_len, output_len=FLAGS.random_output_len,
        range_ratio=FLAGS.random_range_ratio, first_id=_first_plain_id(model_cfg))
    workloads.check_limits(requests, limits.max_seq_len, limits.max_prefill_length)
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
  result = metrics.compute(records, duration, slos)
  result.update(backend=FLAGS.backend, mode=FLAGS.mode if FLAGS.backend == "inprocess" else None,
                dataset_name=FLAGS.dataset_name, num_prompts=FLAGS.num_prompts,
                request_rate=FLAGS.request_rate, burstiness=FLAGS.burstiness,
                max_concurrency=FLAGS.max_concurrency, goodput=FLAGS.goodput,
                date=time.strftime("%Y-%m-%d %H:%M"), num_devices=num_devices)
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


def _first_plain_id(model_cfg) -> int:
  """Random prompts avoid the special ids at the bottom of the vocabulary (byte tokenizer: 3)."""
  specials = [t for t in (model_cfg.bos_token_id, model_cfg.pad_token_id,
                          *model_cfg.eos_token_ids) if t is not None]
  return max(specials) + 1 if specials and max(specials) < 16 else 0


if __name__ == "__main__":
  app.run(main)
