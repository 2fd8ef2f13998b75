r"""Offline generation: prompts in, continuations out.

    python launch/generate.py                                  # the demo model on sample prompts
    python launch/generate.py --model_path=DIR --prompts_file=in.jsonl --output_file=out.jsonl
    python launch/generate.py --mode=disagg --num_cpu_devices=8 --prefill_devices=4 \
        --decode_devices=4                                     # prefill and decode meshes

Input and output formats: README.md ("Generating from a real checkpoint") and
`disagg_jax/prompts.py`. A line that cannot be served (malformed, too long, out-of-vocabulary
ids) gets an output line with "error" and finish_reason "error"; the other lines are generated,
and the exit status is 1.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
cli.define_sampling_flags()
flags.DEFINE_string("prompts_file", None, "JSONL of prompts; default: a few built-in prompts.")
flags.DEFINE_string("output_file", None, "JSONL of outputs; default: print to stdout.")
FLAGS = flags.FLAGS

DEMO_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    ',
    "import os\nimport sys\n\n\ndef main():\n    ",
    "class Stack:\n    def __init__(self):\n        self.",
    "    if not isinstance(value, str):\n        raise ",
)


def main(argv):
  del argv
  cli.setup_jax()
  from disagg_jax import prompts as prompts_io  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import RequestOutput  # pylint: disable=g-import-not-at-top

  if FLAGS.prompts_file and not os.path.isfile(FLAGS.prompts_file):
    raise app.UsageError(f"--prompts_file={FLAGS.prompts_file}: no such file")
  default_sampling = cli.sampling_from_flags()
  start = time.perf_counter()
  generator = cli.build_generator(FLAGS.config)
  tokenizer = generator.tokenizer
  load_s = time.perf_counter() - start

  if FLAGS.prompts_file:
    lines = prompts_io.read_prompts(FLAGS.prompts_file, tokenizer, default_sampling)
  else:
    lines = [prompts_io.PromptLine(i + 1, tokenizer.encode(p), default_sampling)
             for i, p in enumerate(DEMO_PROMPTS)]
  good = [line for line in lines if line.error is None]

  start = time.perf_counter()
  try:
    results = generator.generate([l.prompt_token_ids for l in good], [l.sampling for l in good])
  finally:
    generator.shutdown()
  gen_s = time.perf_counter() - start
  by_line = {line.line_number: out for line, out in zip(good, results)}

  outputs = []
  for line in lines:
    out = by_line.get(line.line_number)
    if out is None:
      out = RequestOutput(f"line-{line.line_number}", line.prompt_token_ids or [],
                          finish_reason="error", error=line.error)
    elif out.error is not None:
      out.error = f"line {line.line_number}: {out.error}"
    outputs.append(out)

  if FLAGS.output_file:
    prompts_io.write_outputs(FLAGS.output_file, (o.to_json() for o in outputs))
  else:
    for line, out in zip(lines, outputs):
      prompt = tokenizer.decode(line.prompt_token_ids or [])
      print(f"--- prompt {line.line_number} ---")
      print(prompt)
      print(f"--- output {line.line_number} ({out.finish_reason}) ---")
      print(out.error if out.error else out.text)
  errors = [o.error for o in outputs if o.error]
  for error in errors:
    print(f"error: {error}", file=sys.stderr)

  tokens = sum(len(o.output_token_ids) for o in outputs)
  print(f"\n{len(outputs) - len(errors)} prompts generated, {len(errors)} failed; {tokens} tokens "
        f"in {gen_s:.2f} s (model load and compilation {load_s:.2f} s)")
  _print_timings(generator, outputs)
  return 1 if errors else 0


def _print_timings(generator, outputs) -> None:
  served = [o for o in outputs if o.metrics is not None and o.error is None]
  if served:  # the serving engine: per-request phases
    phases = [o.metrics.phases() for o in served]
    mean = {k: sum(p[k] for p in phases) / len(phases) * 1e3 for k in phases[0]}
    print(f"mode={FLAGS.mode}: mean per request  queue {mean['queue']:.0f} ms | prefill "
          f"{mean['prefill']:.0f} ms | KV transfer {mean['transfer']:.0f} ms | decode "
          f"{mean['decode']:.0f} ms")
    if FLAGS.elastic:
      split = " -> ".join(f"{p}P:{d}D" for _, p, d in generator.split_timeline)
      print(f"--elastic: split {split} ({generator.split_changes} moves)")
    return
  times = getattr(generator, "times", None)
  if times is not None:
    print(f"mode={FLAGS.mode}: prefill {times.prefill_s * 1e3:.0f} ms; decode "
          f"{times.decode_s * 1e3:.0f} ms over {times.decode_steps} steps "
          f"({times.decode_s / max(times.decode_steps, 1) * 1e3:.1f} ms/step); compiling the "
          f"steps {times.compile_s * 1e3:.0f} ms")


if __name__ == "__main__":
  cli.run(main)
