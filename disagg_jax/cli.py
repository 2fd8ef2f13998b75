"""Flags shared by the launch scripts, and building a generator or engine from them.

The flags are documented in docs/CLI.md; tuning knobs live in the ml_collections config
(`--config=configs/engine.py`, `--config.engine.page_size=32`).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from disagg_jax.engine.api import EngineAPI, Generator
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "engine.py")
MODES = ("single", "colocated", "disagg")


def _shown_in_help(define):
  """Decorates a define_*_flags function: the flags it defines are listed by the script's own
  `--help` (absl shows only the main module's flags there), not just by `--helpfull`."""
  def wrapper(*args, **kwargs):
    before = set(flags.FLAGS)
    define(*args, **kwargs)
    for name in sorted(set(flags.FLAGS) - before):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  wrapper.__doc__, wrapper.__name__ = define.__doc__, define.__name__
  return wrapper


def engine_config_help() -> str:
  """The `--config.engine.*` fields with their defaults and what each does, from the comments
  of configs/engine.py (the one place they are documented)."""
  lines, pending = [], []
  with open(DEFAULT_CONFIG, encoding="utf-8") as f:
    for raw in f:
      text = raw.strip()
      field = re.match(r"(\w+)=(.*?),\s*(?:#\s*(.*))?$", text)
      if text.startswith("#"):
        pending.append(text.lstrip("# "))
      elif field and raw.startswith(" " * 6):
        name, default, comment = field.groups()
        meaning = " ".join(pending + [comment or ""]).strip()
        lines.append(f"  --config.engine.{name}={default}: {meaning}")
        pending = []
      else:
        pending = []
  return "\n".join(lines)


@_shown_in_help
def define_engine_flags() -> None:
  """Model, meshes, dtype and attention flags."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:  # ml_collections resolves the --config.* overrides of sys.argv here already
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Engine configuration file; override a field with "
        "--config.engine.NAME=VALUE. The fields and their defaults:\n" + engine_config_help())
  except (AttributeError, KeyError) as e:
    print(f"error: no such config field: {_config_error(e)} (--help lists the fields)",
          file=sys.stderr)
    sys.exit(2)
  flags.DEFINE_string("model_path", None,
                      "Hugging Face directory or orbax checkpoint; default: the built-in demo model.")
  flags.DEFINE_enum("mode", "single", MODES,
                    "single: static batches on one mesh (the reference); colocated: the serving "
                    "engine on one mesh; disagg: prefill and decode on separate meshes.")
  flags.DEFINE_string("devices", "1", "single/colocated mesh: a device count or comma-separated ids.")
  flags.DEFINE_integer("tp", 0, "single/colocated tensor parallelism; 0: all of --devices.")
  flags.DEFINE_string("prefill_devices", "1", "disagg prefill mesh: a count or ids.")
  flags.DEFINE_string("decode_devices", "1",
                      "disagg decode mesh: a count (taken after the prefill devices) or ids.")
  flags.DEFINE_integer("prefill_tp", 0, "Prefill tensor parallelism; 0: all prefill devices.")
  flags.DEFINE_integer("decode_tp", 0, "Decode tensor parallelism; 0: all decode devices.")
  flags.DEFINE_integer("num_cpu_devices", 0,
                       "Simulated CPU devices (set before JAX starts); 0 leaves JAX's default.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and activation dtype.")
  flags.DEFINE_enum("attention_impl", "auto", ["auto", "xla", "pallas"],
                    "auto: Pallas on TPU/GPU, XLA on CPU.")
  flags.DEFINE_enum("cluster", "local", ["local", "ray"],
                    "local: everything in this process; ray: prefill and decode workers as Ray "
                    "actors (--mode=disagg), each with its own mesh of --prefill_devices / "
                    "--decode_devices.")
  flags.DEFINE_integer("num_prefill_workers", 1, "--cluster=ray: prefill worker processes.")
  flags.DEFINE_integer("num_decode_workers", 1, "--cluster=ray: decode worker processes.")
  flags.DEFINE_enum("on_decode_failure", "reprefill", ["reprefill", "error"],
                    "--cluster=ray: what a dead decode worker's requests do.")
  flags.DEFINE_float("kv_lease_s", 30.0,
                     "--cluster=ray: offered KV not pulled within this is dropped.")
  flags.DEFINE_string("prefill_cpus", "", "--cluster=ray: pin prefill workers to cores, one "
                      "group per worker: '0' or '0,1;2,3'. Empty: no pinning.")
  flags.DEFINE_string("decode_cpus", "", "--cluster=ray: the same for decode workers.")
  flags.DEFINE_string("driver_cpus", "", "--cluster=ray: pin this process and Ray's own "
                      "processes to these cores, e.g. '0'.")
  flags.DEFINE_bool("elastic", False,
                    "--mode=disagg: the prefill:decode split follows the traffic; devices "
                    "move between the meshes and a side's TP may change with them (it starts at "
                    "--prefill_tp / --decode_tp, 1 unless set); with --cluster=ray, workers "
                    "drain and change role.")
  flags.DEFINE_string("elastic_slo", "ttft:2000,tpot:200",
                      "--elastic: the TTFT and TPOT SLOs (ms) the controller holds the sides to; "
                      "benchmark.py's --goodput replaces it when given.")
  flags.DEFINE_float("elastic_window_s", 5.0, "--elastic: seconds between the controller's reads "
                     "of the signals.")
  flags.DEFINE_integer("elastic_patience", 2, "--elastic: windows in a row that must ask for a "
                       "move before it is made.")
  flags.DEFINE_float("elastic_switch_s", 20.0, "--elastic: the cost of a move (seconds); no move "
                     "within 2 x this + a window of the last.")
  flags.DEFINE_string("compilation_cache_dir", "",
                      "JAX's persistent compilation cache, so later start-ups load compiled steps "
                      "instead of compiling them. Empty: $XDG_CACHE_HOME/disagg_jax/"
                      "jax_compilation_cache (else ~/.cache/...); 'none': off.")


@_shown_in_help
def define_sampling_flags() -> None:
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (a line may override).")
  flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 disables.")
  flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p x the most likely one; "
                     "0 disables.")
  flags.DEFINE_integer("seed", 0, "Sampling seed, in [0, 2**32).")
  flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from the logit of every token "
                     "generated so far, in [-2, 2]; 0 disables.")
  flags.DEFINE_float("frequency_penalty", 0.0, "Times each token's count so far, subtracted "
                     "from its logit, in [-2, 2]; 0 disables.")
  flags.DEFINE_float("repetition_penalty", 1.0, "Tokens of the prompt or generated so far: "
                     "positive logits divided by it, negative ones multiplied; 1 disables.")
  flags.DEFINE_integer("logprobs", None, "Write each output token's log-probability and the N "
                       "most likely tokens' (0-20) into the output lines; unset: none.")


def run(main) -> None:
  """`app.run(main)` for the launch scripts: a bad flag or config field, a missing file or a
  value the engine refuses prints one line naming it (no help dump, no traceback) and exits 2.
  DISAGG_JAX_TRACEBACK=1 shows the traceback instead."""
  def fail(message: str):
    if os.environ.get("DISAGG_JAX_TRACEBACK"):
      raise  # pylint: disable=misplaced-bare-raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f"{e} (--help lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config field
      fail(f"no such config field: {_config_error(e)} (--help lists the fields)")
    except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
      fail(str(e))

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(str(e))
    except OSError as e:
      if e.filename is None:
        raise
      fail(f"{e.strerror}: {e.filename}")
    except ValueError as e:  # the engine's own checks name the value, the limit and the flag
      fail(str(e))

  app.run(guarded, flags_parser=parse)


def _config_error(e: Exception) -> str:
  """ml_collections' unknown-field error, as one line naming the field and the suggestion."""
  text = str(e)
  wrong = re.search(r'instead of \\?"(\w+)', text) or re.search(r"'(\w+)", text)
  right = re.search(r'Did you mean \\?"(\w+)', text)
  name = wrong.group(1) if wrong else text.strip()
  return f"{name}" + (f"; did you mean {right.group(1)}?" if right else "")


def setup_jax() -> None:
  """Must run before anything touches a JAX device. On CPU, without --num_cpu_devices, JAX
  simulates as many devices as the mesh flags ask for (e.g. two for --mode=disagg)."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and friends log every file at INFO
  from disagg_jax.engine import compiled  # pylint: disable=g-import-not-at-top
  n = flags.FLAGS.num_cpu_devices
  if n < 0:
    raise app.UsageError(f"--num_cpu_devices={n} must be >= 0")
  n = n or _devices_asked_for()
  if n > 1:  # CPU devices only: accelerators are unaffected
    jax.config.update("jax_num_cpu_devices", n)
  if "compilation_cache_dir" in flags.FLAGS:
    try:
      compiled.enable_persistent_cache(flags.FLAGS.compilation_cache_dir)
    except OSError as e:
      raise app.UsageError(f"--compilation_cache_dir={flags.FLAGS.compilation_cache_dir!r}: "
                           f"{e}") from None


def _devices_asked_for() -> int:
  """The devices the mesh flags of this process need (counts or ids; 0 if they do not say)."""
  f = flags.FLAGS
  if "mode" not in f or getattr(f, "cluster", "local") == "ray":
    return 0

  def end(spec: str, start: int = 0) -> int:
    """One past the last device a spec takes: a count from `start`, or ids."""
    spec = str(spec).strip()
    if spec.isdigit():
      return start + int(spec)
    try:
      return max(int(i) for i in spec.split(",")) + 1
    except ValueError:
      return 0  # pick_devices reports the bad value
  if f.mode != "disagg":
    return end(f.devices)
  prefill = end(f.prefill_devices)
  return max(prefill, end(f.decode_devices, start=prefill))  # decode counts follow prefill


def sampling_from_flags() -> SamplingParams:
  f = flags.FLAGS
  try:
    return SamplingParams(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                          top_p=f.top_p, top_k=f.top_k, seed=f.seed, min_p=f.min_p,
                          presence_penalty=f.presence_penalty,
                          frequency_penalty=f.frequency_penalty,
                          repetition_penalty=f.repetition_penalty, logprobs=f.logprobs)
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None


def meshes_from_flags():
  """(prefill or only mesh, decode mesh or None) from the mesh flags of --mode."""
  import jax  # pylint: disable=g-import-not-at-top
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  available = jax.devices()
  if f.mode != "disagg":
    devices = parallel.pick_devices(f.devices, available)
    return parallel.make_mesh(devices, f.tp or len(devices)), None
  prefill = parallel.pick_devices(f.prefill_devices, available)
  decode = parallel.pick_devices(f.decode_devices, available, start=len(prefill))
  shared = sorted(d.id for d in set(prefill) & set(decode))
  if shared:
    raise ValueError(f"--prefill_devices and --decode_devices share devices {shared}")
  if f.elastic:  # it starts from the smallest TP groups unless the flags say more
    return (parallel.make_mesh(prefill, f.prefill_tp or 1),
            parallel.make_mesh(decode, f.decode_tp or 1))
  return (parallel.make_mesh(prefill, f.prefill_tp or len(prefill)),
          parallel.make_mesh(decode, f.decode_tp or len(decode)))


# The flags that say which engine runs (recorded with a profile, so the planner can say how to
# run each configuration it ranks, and set again to run it).
ENGINE_FLAGS = ("model_path", "mode", "devices", "tp", "prefill_devices", "decode_devices",
                "prefill_tp", "decode_tp", "dtype", "attention_impl")


def engine_flag_values(config) -> dict:
  """{flag: value} of ENGINE_FLAGS and every `config.engine.*` field, as now set."""
  f = flags.FLAGS
  out = {name: f[name].value for name in ENGINE_FLAGS}
  out.update({f"config.engine.{k}": v for k, v in config.engine.items()})
  return out


def set_engine_flags(config, values: dict) -> None:
  """Sets the flags and config fields of an engine_flag_values() dict (unknown keys raise
  ValueError naming them)."""
  unknown = [k for k in values
             if k not in ENGINE_FLAGS and not (k.startswith("config.engine.")
                                                and k[len("config.engine."):] in config.engine)]
  if unknown:
    raise ValueError(f"not engine flags: {', '.join(sorted(unknown))}")
  for key, value in values.items():
    if key.startswith("config.engine."):
      config.engine[key[len("config.engine."):]] = value
    else:
      setattr(flags.FLAGS, key, value)


def build_generator(config) -> Generator:
  """The generator of the engine flags, with the model of --model_path: a StaticGenerator
  (--mode=single), a running Engine (--mode=colocated|disagg) or ClusterEngine (--cluster=ray).
  Every one is an `engine.api.Generator`, the last two `engine.api.EngineAPI`s (see
  `build_engine`)."""
  from disagg_jax.engine.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.single import StaticGenerator  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.safetensors_io import CheckpointError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  engine = config.engine
  if f.elastic and f.mode != "disagg":
    raise app.UsageError(f"--elastic moves devices between prefill and decode: it needs "
                         f"--mode=disagg, not --mode={f.mode}")
  if f.cluster == "ray":
    return _build_cluster(config)
  try:
    mesh, decode_mesh = meshes_from_flags()
    model = loading.load_model(f.model_path, mesh, f.dtype)
    if f.mode == "single":
      limits = Limits.for_model(model.cfg, engine.max_seq_len, engine.max_prefill_length)
      return StaticGenerator(model, limits=limits, page_size=engine.page_size,
                             max_batch=engine.max_batch, attention_impl=f.attention_impl)
    decode_model = loading.load_model(f.model_path, decode_mesh, f.dtype) if decode_mesh else None
    engine_config = EngineConfig.from_config(engine, attention_impl=f.attention_impl)
    if f.elastic:
      from disagg_jax.engine.elastic import ElasticEngine  # pylint: disable=g-import-not-at-top
      return ElasticEngine(model, decode_model, engine_config, elastic_config())
    return Engine.create(f.mode, model, decode_model, engine_config)
  except (ValueError, CheckpointError) as e:  # ConfigError is a ValueError
    raise app.UsageError(str(e)) from None


def elastic_config():
  """The elastic controller's settings from the --elastic_* flags; the SLOs of --elastic_slo,
  each replaced by --goodput's where the script has that flag and it names one. ValueError names
  a bad value."""
  from disagg_jax.bench.metrics import parse_goodput  # pylint: disable=g-import-not-at-top
  from disagg_jax.sched.elastic import ElasticConfig  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    slos = parse_goodput(f.elastic_slo)
  except ValueError as e:
    raise ValueError(f"--elastic_slo={f.elastic_slo!r}: {e}") from None
  slos.update(parse_goodput(f["goodput"].value if "goodput" in f else None))
  if set(slos) < {"ttft", "tpot"}:
    raise ValueError(f"--elastic needs a TTFT and a TPOT SLO, e.g. "
                     f"--elastic_slo=ttft:2000,tpot:200; got --elastic_slo={f.elastic_slo!r}")
  return ElasticConfig(ttft_slo_s=slos["ttft"], tpot_slo_s=slos["tpot"],
                       window_s=f.elastic_window_s, patience=f.elastic_patience,
                       switch_s=f.elastic_switch_s)


def build_engine(config) -> EngineAPI:
  """A running serving engine of the engine flags (`build_generator`, but --mode=single, the
  offline reference, raises UsageError)."""
  if flags.FLAGS.mode == "single":
    raise app.UsageError("--mode=single is the offline reference path; serve with "
                         "--mode=colocated or --mode=disagg")
  return build_generator(config)


def _cores(spec: str) -> list[tuple[int, ...]]:
  """'0,1;2,3' -> [(0, 1), (2, 3)]."""
  return [tuple(int(c) for c in group.split(",") if c.strip())
          for group in spec.split(";") if group.strip()]


def _build_cluster(config) -> EngineAPI:
  from disagg_jax.cluster.driver import ClusterEngine  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.engine import EngineConfig  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.mode != "disagg":
    raise app.UsageError(f"--cluster=ray runs --mode=disagg, not --mode={f.mode}")
  try:
    prefill_devices, decode_devices = int(f.prefill_devices), int(f.decode_devices)
  except ValueError:
    raise app.UsageError("--cluster=ray takes device counts per worker, not ids, for "
                         f"--prefill_devices={f.prefill_devices!r} and --decode_devices="
                         f"{f.decode_devices!r}") from None
  try:
    return ClusterEngine(
        f.model_path, EngineConfig.from_config(config.engine, attention_impl=f.attention_impl),
        num_prefill_workers=f.num_prefill_workers, num_decode_workers=f.num_decode_workers,
        prefill_devices=prefill_devices, decode_devices=decode_devices,
        prefill_tp=f.prefill_tp, decode_tp=f.decode_tp, dtype=f.dtype,
        prefill_cpus=_cores(f.prefill_cpus), decode_cpus=_cores(f.decode_cpus),
        on_decode_failure=f.on_decode_failure, kv_lease_s=f.kv_lease_s,
        driver_cpus=[c for group in _cores(f.driver_cpus) for c in group],
        compilation_cache_dir=f.compilation_cache_dir,
        elastic=elastic_config() if f.elastic else None)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


@_shown_in_help
def define_workload_flags() -> None:
  """vLLM's benchmark workload flags (benchmark.py, simulate.py)."""
  from disagg_jax.bench import workloads  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("dataset_name", "random", list(workloads.DATASETS),
                    "Workload: random, sharegpt (--dataset_path), prefill_heavy / decode_heavy "
                    "(the demo model's scale), real-scale presets: chat (ShareGPT-like, 755 / "
                    "200 tokens on average), 1k_1k, 4k_256, 8k_128 (input_output tokens, +-10%); "
                    "or shared prefixes (prefix caching): multiturn (conversations on shared "
                    "system prompts), documents (questions about shared documents); see "
                    "--multiturn_*; or with their own arrival times: shifting (phases of "
                    "different mixes, --shifting_phases), trace (a recorded trace replayed, "
                    "--dataset_path).")
  flags.DEFINE_string("dataset_path", None, "ShareGPT JSON file (--dataset_name=sharegpt), or a "
                      "trace CSV / JSONL of arrival time, input and output length "
                      "(--dataset_name=trace; e.g. configs/traces/sample.csv).")
  flags.DEFINE_string("shifting_phases", None,
                      "--dataset_name=shifting: name:seconds[:rate],... phases one after the "
                      "other, each a length workload (prefill_heavy, decode_heavy, random, "
                      "chat, ...) at its rate or --request_rate; default "
                      "prefill_heavy:20,decode_heavy:20,random:20. --num_prompts does not "
                      "apply (the phases set the count); for trace it keeps the first N.")
  flags.DEFINE_integer("num_prompts", 200, "Requests to send.")
  flags.DEFINE_float("request_rate", float("inf"), "Requests per second; inf sends all at once.")
  flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the gaps: 1 Poisson, < 1 burstier.")
  flags.DEFINE_integer("max_concurrency", None, "At most this many requests in flight.")
  flags.DEFINE_integer("random_input_len", None,
                       "Prompt tokens (random: default 256; presets have their own; chat: the "
                       "mean).")
  flags.DEFINE_integer("random_output_len", None,
                       "Output tokens (random: default 64; presets have their own; chat: the "
                       "mean).")
  flags.DEFINE_float("random_range_ratio", None, "Lengths vary in [len*(1-r), len*(1+r)].")
  flags.DEFINE_integer("multiturn_turns", None, "multiturn: turns per conversation (default 4).")
  flags.DEFINE_integer("multiturn_prefix_len", None,
                       "multiturn: system prompt tokens (default 128); documents: document "
                       "tokens (default 320).")
  flags.DEFINE_integer("multiturn_num_prefixes", None,
                       "multiturn / documents: distinct system prompts or documents (default 4).")
  flags.DEFINE_integer("multiturn_turn_len", None,
                       "multiturn: tokens of each user message; documents: of each question "
                       "(default 32). Output tokens: --random_output_len (default 16).")
  flags.DEFINE_float("multiturn_think_time", None,
                     "multiturn: mean seconds between a conversation's turns (exponential; "
                     "default 1.0).")
  flags.DEFINE_string("goodput", None, "SLOs for goodput, e.g. ttft:200,tpot:50 (milliseconds).")
  flags.DEFINE_integer("seed", 0, "Seed of the workload and the arrivals.")


def workload_from_flags(config, limits=None, model_cfg=None):
  """(requests, arrival times, SLOs) of the workload flags, checked against the model's limits
  (or `limits`); `model_cfg` replaces --model_path's config (a planning preset). Raises
  ValueError (WorkloadError, ConfigError) naming the bad value."""
  from disagg_jax.bench import arrivals as arrivals_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench import metrics, workloads  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.loading import DEMO_MODEL_DIR  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  model_dir = FLAGS.model_path or DEMO_MODEL_DIR
  slos = metrics.parse_goodput(FLAGS.goodput)
  arrivals = arrivals_lib.arrival_times(FLAGS.num_prompts, FLAGS.request_rate, FLAGS.burstiness,
                                        FLAGS.seed)
  tokenizer_cfg = ModelConfig.from_dir(model_dir)
  model_cfg = model_cfg or tokenizer_cfg
  if limits is None:
    limits = Limits.for_model(model_cfg, config.engine.max_seq_len,
                              config.engine.max_prefill_length)
  tokenizer = load_tokenizer(model_dir, tokenizer_cfg.bos_token_id)
  if FLAGS.dataset_name in workloads.TIMED_DATASETS:
    from disagg_jax.bench import timed  # pylint: disable=g-import-not-at-top
    if FLAGS.dataset_name == "shifting":
      requests, arrivals = timed.shifting(
          timed.parse_phases(FLAGS.shifting_phases or timed.DEFAULT_PHASES),
          request_rate=FLAGS.request_rate, burstiness=FLAGS.burstiness,
          vocab_size=model_cfg.vocab_size, seed=FLAGS.seed, first_id=_first_plain_id(model_cfg))
    else:
      requests, arrivals = timed.trace(FLAGS.dataset_path, num=FLAGS.num_prompts,
                                       vocab_size=model_cfg.vocab_size, seed=FLAGS.seed,
                                       first_id=_first_plain_id(model_cfg))
    workloads.check_limits(requests, limits.max_seq_len, limits.max_prefill_length)
    return requests, arrivals, slos
  requests = workloads.build(
      FLAGS.dataset_name, num_prompts=FLAGS.num_prompts, vocab_size=model_cfg.vocab_size,
      tokenizer=tokenizer, seed=FLAGS.seed, dataset_path=FLAGS.dataset_path,
      input_len=FLAGS.random_input_len, output_len=FLAGS.random_output_len,
      range_ratio=FLAGS.random_range_ratio, first_id=_first_plain_id(model_cfg),
      prefix={k: getattr(FLAGS, f"multiturn_{k}") for k in workloads.PREFIX_FIELDS
              if k != "output_len"})
  workloads.check_limits(requests, limits.max_seq_len, limits.max_prefill_length)
  if FLAGS.dataset_name in workloads.PREFIX_DEFAULTS:
    requests, arrivals = arrivals_lib.conversation_arrivals(requests, FLAGS.request_rate,
                                                            FLAGS.burstiness, FLAGS.seed)
  return requests, arrivals, slos


def workload_fields(requests) -> dict:
  """The benchmark JSON's workload keys the flags alone do not give: for shifting and trace
  workloads the number of requests (their phases or file set it); for shifting the phases
  ("workload_phases": [[name, start s, end s], ...])."""
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  out = {}
  if FLAGS.dataset_name in ("shifting", "trace"):
    out["num_prompts"] = len(requests)
  if FLAGS.dataset_name == "shifting":
    from disagg_jax.bench import timed  # pylint: disable=g-import-not-at-top
    out["workload_phases"] = timed.phase_bounds(
        timed.parse_phases(FLAGS.shifting_phases or timed.DEFAULT_PHASES))
  return out


def _first_plain_id(model_cfg) -> int:
  """Random prompts avoid the special ids at the bottom of the vocabulary (byte tokenizer: 3)."""
  specials = [t for t in (model_cfg.bos_token_id, model_cfg.pad_token_id,
                          *model_cfg.eos_token_ids) if t is not None]
  return max(specials) + 1 if specials and max(specials) < 16 else 0
