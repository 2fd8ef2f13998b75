r"""Fidelity against the noise: launch/validate_sim.py for each mode, one after the
other, into one output directory, then the combined report.

    python launch/fidelity.py --num_cpu_devices=8 --rates=2,4,6 --repeats=3 \
        --dataset_name=random --num_prompts=160 ... --output_dir=docs/results/fidelity

Every flag this script does not know goes to both calls unchanged; --colocated_flags and
--disagg_flags add the mode's devices (each mode runs in its own process, since the number of
devices is fixed when JAX starts). Each call appends its rows to OUTPUT_DIR/validation.jsonl and
rewrites OUTPUT_DIR/fidelity.md and fidelity.json from all of them, so after the second call they
cover both modes; this script prints the summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("colocated", "disagg")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--modes", default="colocated,disagg",
                      help="Modes to measure, in this order (comma-separated).")
  parser.add_argument("--colocated_flags", default="--devices=4",
                      help="Flags only the colocated call gets.")
  parser.add_argument("--disagg_flags", default="--prefill_devices=2 --decode_devices=2",
                      help="Flags only the disaggregated call gets.")
  args, rest = parser.parse_known_args(argv)
  modes = [m for m in args.modes.split(",") if m]
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    parser.error(f"--modes={args.modes}: each must be one of {', '.join(MODES)}")
  if any(a == "--mode" or a.startswith("--mode=") for a in rest):
    parser.error("--mode is set per call; use --modes")
  return args, rest


def commands(args: argparse.Namespace, rest: list[str]) -> list[list[str]]:
  """The validate_sim.py command line of each mode."""
  script = os.path.join(HERE, "validate_sim.py")
  extra = {"colocated": args.colocated_flags, "disagg": args.disagg_flags}
  return [[sys.executable, script, f"--mode={mode}", *shlex.split(extra[mode]), *rest]
          for mode in args.modes.split(",") if mode]


def output_dir(rest: list[str]) -> str:
  out = "sim_validation"  # validate_sim.py's default
  for i, arg in enumerate(rest):
    if arg.startswith("--output_dir="):
      out = arg.split("=", 1)[1]
    elif arg == "--output_dir" and i + 1 < len(rest):
      out = rest[i + 1]
  return out


def main(argv: list[str]) -> int:
  args, rest = parse(argv)
  for cmd in commands(args, rest):
    print("+ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode:
      print(f"{cmd[2]} failed with exit status {done.returncode}", file=sys.stderr)
      return done.returncode
  path = os.path.join(output_dir(rest), "fidelity.json")
  with open(path) as f:
    summary = json.load(f)["summary"]
  print(f"\nfidelity report: {os.path.join(output_dir(rest), 'fidelity.md')}")
  for mode, s in summary.items():
    print(f"{mode}: {s['metrics_within']}/{len(s['metrics'])} metrics within the real runs' "
          f"own difference, {s['within_5pct']}/{s['five_pct']} medians and throughputs within "
          f"5%, {s['within_noise']}/{s['judged']} cells within the range of the runs, "
          f"goal {'met' if s['goal_met'] else 'not met'}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
