r"""OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    python launch/serve.py --model_path=DIR --host=127.0.0.1 --port=8000 [engine flags]
    python launch/serve.py --mode=disagg --num_cpu_devices=8 --prefill_devices=4 \
        --decode_devices=4 --port=8000                        # the demo model, disaggregated

Streams with server-sent events as OpenAI's clients expect; `--max_pending` bounds the requests
in flight (beyond it: 429), `--max_request_bytes` the body (413); `--api_key` (or the
DISAGG_JAX_API_KEY environment variable) requires `Authorization: Bearer KEY` except on
`--open_endpoints` (docs/SERVING.md).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
flags.FLAGS.set_default("mode", "colocated")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("served_model_name", None, "The model id clients send; default: the "
                    "--model_path directory's name (or disagg_jax-demo).")
flags.DEFINE_integer("max_pending", 256, "Requests in flight before new ones get 429.")
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` (401 otherwise); "
                    "default: the DISAGG_JAX_API_KEY environment variable, else no key.")
flags.DEFINE_list("open_endpoints", ["/health", "/metrics"],
                  "Paths served without the API key (empty: every path needs it).")
flags.DEFINE_integer("max_request_bytes", 8 << 20, "Larger request bodies get 413.")
flags.DEFINE_bool("quiet", False, "No access log and no start-up / shutdown lines.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup_jax()
  if FLAGS.mode == "single":
    raise app.UsageError("serve --mode=colocated or --mode=disagg (single is offline only)")
  if FLAGS.max_request_bytes < 1:
    raise app.UsageError(f"--max_request_bytes={FLAGS.max_request_bytes} must be >= 1")
  api_key = FLAGS.api_key or os.environ.get("DISAGG_JAX_API_KEY") or None
  if FLAGS.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
    print(f"warning: --host={FLAGS.host} serves the API to anyone who can reach it; set "
          "--api_key (or DISAGG_JAX_API_KEY)", file=sys.stderr)
  import uvicorn  # pylint: disable=g-import-not-at-top
  from disagg_jax.serve.app import Server, build_app  # pylint: disable=g-import-not-at-top
  # The engine's threads and the event loop share the GIL; a short switch interval keeps a
  # busy scheduler thread from delaying HTTP work by the default 5 ms per hand-over.
  sys.setswitchinterval(0.0005)
  engine = cli.build_engine(FLAGS.config)
  name = FLAGS.served_model_name or (
      os.path.basename(os.path.normpath(FLAGS.model_path)) if FLAGS.model_path
      else "disagg_jax-demo")
  server = Server(engine, name, FLAGS.model_path, max_pending=FLAGS.max_pending,
                  api_key=api_key, open_paths=tuple(FLAGS.open_endpoints),
                  max_request_bytes=FLAGS.max_request_bytes)
  if not FLAGS.quiet:
    print(f"serving {name} ({FLAGS.mode}{', ray' if FLAGS.cluster == 'ray' else ''}) on "
          f"http://{FLAGS.host}:{FLAGS.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
  try:
    # log_level info: uvicorn's own start-up and shutdown lines and one access line a request.
    uvicorn.run(build_app(server), host=FLAGS.host, port=FLAGS.port,
                log_level="warning" if FLAGS.quiet else "info", access_log=not FLAGS.quiet)
  finally:
    engine.shutdown()
    if not FLAGS.quiet:
      print("server stopped; engine shut down", file=sys.stderr, flush=True)


if __name__ == "__main__":
  cli.run(main)
